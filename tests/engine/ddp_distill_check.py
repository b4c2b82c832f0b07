"""Worker for test_aqdetr_train: 2 gloo processes train AQ-DETR with distillation (and the
weight average of MODEL_EMA), then compare ranks.

    python tests/engine/ddp_distill_check.py CONFIG RESULT_JSON [--resume] [KEY VALUE ...]
"""
import json
import sys

import torch
from torch.nn.parallel import DistributedDataParallel

from detectron2.config import get_cfg
from detectron2.engine import launch
from detectron2.utils import comm

from aqdetr_d2 import add_aqdetr_config
from aqdetr_d2.config import merge_config
from aqdetr_d2.engine import AQDETRTrainer
from aqdetr_d2.quant import iter_quantizers


def worker(config, result_path, resume, opts):
    cfg = get_cfg()
    add_aqdetr_config(cfg)
    merge_config(cfg, config, opts)
    trainer = AQDETRTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    student = trainer.model.module
    teacher_ids = {id(p) for p in student.distiller.teacher.parameters()}
    scales = torch.cat([q.scale.detach().flatten() for q in iter_quantizers(student) if q.enabled])
    params = torch.cat([p.detach().flatten() for p in student.parameters()])
    averaged = torch.cat([v.flatten() for v in trainer.model_ema.weights.values() if v.is_floating_point()])
    trained = torch.cat([v.flatten() for v in student.state_dict().values() if v.is_floating_point()])
    gathered_scales, gathered_params = comm.all_gather(scales), comm.all_gather(params)
    gathered_averages = comm.all_gather(averaged)
    if comm.is_main_process():
        result = {
            "world_size": comm.get_world_size(),
            "ddp_wrapped": isinstance(trainer.model, DistributedDataParallel),
            "teacher_in_ddp": bool(teacher_ids & {id(p) for p in trainer.model.parameters()}),
            "num_quantizers": sum(1 for q in iter_quantizers(student) if q.enabled),
            "max_scale_difference_across_ranks": (gathered_scales[0] - gathered_scales[1]).abs().max().item(),
            "max_param_difference_across_ranks": (gathered_params[0] - gathered_params[1]).abs().max().item(),
            "max_ema_difference_across_ranks": (gathered_averages[0] - gathered_averages[1]).abs().max().item(),
            "ema_differs_from_weights": not torch.equal(averaged, trained),
            "iterations": trainer.iter,  # after train(), the number of steps taken
        }
        with open(result_path, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    config, result_path, *opts = sys.argv[1:]
    resume = opts[:1] == ["--resume"]
    launch(worker, 2, dist_url="auto", args=(config, result_path, resume, opts[resume:]))
