#!/usr/bin/env python
"""Train or evaluate AQ-DETR models with Detectron2.

    python projects/AQDETR/train_net.py --config-file configs/shapes/detr_fp32.yaml MODEL.DEVICE cpu
    python projects/AQDETR/train_net.py --config-file F --eval-only MODEL.WEIGHTS model_final.pth
    python projects/AQDETR/train_net.py --config-file F --num-gpus 8 --resume
"""
import torch

from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from aqdetr_d2 import add_aqdetr_config
from aqdetr_d2.config import merge_config
from aqdetr_d2.errors import UserInputError, user_errors_exit
from aqdetr_d2.engine import AQDETRCheckpointer, AQDETRTrainer, initialize_quantizers
from aqdetr_d2.utils.numerics import NUMERICS_TAG, numerics_summary


class MissingWeightsError(UserInputError):
    pass


# MODEL.WEIGHTS value that asks --eval-only for the random initialisation explicitly.
SCRATCH = "scratch"


def setup(args):
    cfg = get_cfg()
    add_aqdetr_config(cfg)
    merge_config(cfg, args.config_file, args.opts)
    fell_back = cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available()
    if fell_back:
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    default_setup(cfg, args)
    logger = setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="aqdetr_d2")
    if fell_back:
        logger.warning("CUDA is not available; running on the CPU (MODEL.DEVICE cpu)")
    # Runs reproduce each other exactly only under the same instructions (aqdetr_d2.utils.numerics).
    logger.info("%s %s", NUMERICS_TAG, numerics_summary())
    return cfg


def main(args):
    # The user's file, data or config, not the code: one line that names it and the fix, exit 2.
    with user_errors_exit():
        return run(args)


def run(args):
    cfg = setup(args)
    AQDETRTrainer.check_test_datasets(cfg)
    if args.eval_only:
        model = AQDETRTrainer.build_model(cfg)
        checkpointer = AQDETRCheckpointer(model, save_dir=cfg.OUTPUT_DIR, use_ema=cfg.MODEL_EMA.ENABLED)
        if not cfg.MODEL.WEIGHTS and not (args.resume and checkpointer.has_checkpoint()):
            raise MissingWeightsError("--eval-only needs MODEL.WEIGHTS, the checkpoint to evaluate (to evaluate the "
                                      f"random initialisation on purpose, set MODEL.WEIGHTS {SCRATCH})")
        weights = "" if cfg.MODEL.WEIGHTS == SCRATCH else cfg.MODEL.WEIGHTS
        checkpointer.resume_or_load(weights, resume=args.resume)
        initialize_quantizers(cfg, model)
        if cfg.MODEL.QUANT.INTEGER_EVAL:
            from aqdetr_d2.deploy import integer_model  # aqdetr_d2.deploy needs the optional onnx extra

            model = integer_model(cfg, model)
        results = AQDETRTrainer.test(cfg, model)
        verify_results(cfg, results)
        return results
    trainer = AQDETRTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
