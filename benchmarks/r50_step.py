"""Training step and eval latency of the R50 models at the size users train, for benchmarks/run.py --r50.

DETR-R50 and Deformable-DETR-R50 (configs/coco), random weights, batch 1, one synthetic 800x1333
image with a few boxes: float, LSQ W4A4A4 (also with the frozen stages' step sizes fixed,
MODEL.QUANT.LEARN_FROZEN_STEP_SIZES False) and AQ-DETR W4A4A4 (auxiliary queries and teacher-forced
distillation from the same random float weights). Rows have the keys of run.py's shapes rows.
"""
import os

import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from aqdetr_d2.config import load_config
from aqdetr_d2.distill import build_distiller
from aqdetr_d2.engine import build_detr_optimizer
from aqdetr_d2.quant import calibrate
from timing import Subject, add_ratios, train_and_eval_times  # benchmarks/, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = (800, 1333)
# name -> (float, LSQ W4A4A4, AQ-DETR W4A4A4) configs.
R50_CONFIGS = {
    "DETR-R50": ("configs/coco/detr_r50_fp32.yaml", "configs/coco/detr_r50_lsq_w4a4.yaml",
                 "configs/coco/aqdetr_r50_w4a4.yaml"),
    "Deformable-DETR-R50": ("configs/coco/deformable_detr_r50_fp32.yaml",
                            "configs/coco/deformable_detr_r50_lsq_w4a4.yaml",
                            "configs/coco/aq_deformable_detr_r50_w4a4.yaml"),
}


def synthetic_input(device, generator) -> dict:
    """One Detectron2 training input: a uint8 image of SIZE and four boxes of class 0..3."""
    h, w = SIZE
    xy = torch.rand(4, 2, generator=generator) * torch.tensor([w / 2, h / 2])
    boxes = torch.cat([xy, xy + torch.tensor([w / 4, h / 4])], 1)
    instances = Instances(SIZE, gt_boxes=Boxes(boxes), gt_classes=torch.arange(4))
    image = torch.randint(0, 256, (3, h, w), generator=generator, dtype=torch.uint8)
    return {"image": image.to(device), "height": h, "width": w, "instances": instances}


def _cfg(path, device, opts):
    return load_config(os.path.join(ROOT, path), ["MODEL.DEVICE", device, "MODEL.WEIGHTS", "", *opts])


def bench_r50(arch, device, repeats, workdir):
    """Rows for `arch` (a key of R50_CONFIGS): float, LSQ W4A4A4 (twice, see above), AQ-DETR."""
    float_cfg, lsq_cfg, aq_cfg = R50_CONFIGS[arch]
    generator = torch.Generator().manual_seed(0)
    batch = [synthetic_input(device, generator)]
    teacher_weights = os.path.join(workdir, f"{arch}_float.pth")
    torch.manual_seed(0)
    float_state = build_model(_cfg(float_cfg, device, [])).state_dict()
    torch.save({"model": float_state}, teacher_weights)  # the distiller reads its teacher from a file
    image = [{k: v for k, v in batch[0].items() if k != "instances"}]
    variants = [("float", float_cfg, []), ("LSQ W4A4A4", lsq_cfg, []),
                # The frozen stages (BACKBONE.FREEZE_AT) keep their calibrated step sizes, so the
                # backward stops where the float model's does.
                ("LSQ W4A4A4, frozen stages' step sizes fixed", lsq_cfg,
                 ["MODEL.QUANT.LEARN_FROZEN_STEP_SIZES", "False"]),
                ("W4A4A4 + aux queries + distillation", aq_cfg,
                 ["MODEL.DISTILL.TEACHER_WEIGHTS", teacher_weights,
                  "MODEL.DISTILL.TEACHER_CONFIG", os.path.join(ROOT, float_cfg)])]
    rows = []
    for name, path, opts in variants:
        cfg = _cfg(path, device, opts)
        model = build_model(cfg)
        model.load_state_dict(float_state, strict=False)
        if cfg.MODEL.QUANT.ENABLED:
            calibrate(model.eval(), [image])
        if cfg.MODEL.DISTILL.ENABLED:
            model.distiller = build_distiller(cfg)
        # One model at a time, unlike the shapes models: the R50 models and an 800x1333 step do not
        # all fit in the 2-core machine's memory at once (the round robin was killed for it), and a
        # step of seconds averages out short slow spells by itself.
        subject = Subject(model, build_detr_optimizer(cfg, model), batch, image)
        (times,) = train_and_eval_times([subject], device, repeats, repeats)
        rows.append({"model": f"{arch} {name}", "config": path, "options": opts, "image": list(SIZE), **times})
        del subject, model
    return add_ratios(rows)
