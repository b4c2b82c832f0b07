#!/usr/bin/env python
"""Print every loss term, the total and the summed |gradient| of one W4A4A4 AQ-DETR training step.

    python tools/loss_fingerprint.py > new.txt
    (in another checkout) PYTHONPATH=. python tools/loss_fingerprint.py > old.txt; diff old.txt new.txt

A refactor that changes no numbers prints the same lines, to the last digit. Random float
weights stand in for the teacher (DETR and Deformable-DETR shapes configs, auxiliary queries
and distillation on; DETR also in parallel mode), one thread, four shapes_train images, every
random source seeded.
"""
import os
import random
import tempfile

import numpy as np
import torch

from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from aqdetr_d2.config import load_config
from aqdetr_d2.data import DetrDatasetMapper
from aqdetr_d2.distill import build_distiller

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (float teacher config, student config, distillation mode, extra options)
CASES = [
    ("configs/shapes/detr_fp32.yaml", "configs/shapes/aqdetr_w4a4.yaml", "teacher_forced", []),
    # Parallel mode cannot distill a two-stage decoder: encoder terms only.
    ("configs/shapes/detr_fp32.yaml", "configs/shapes/aqdetr_w4a4.yaml", "parallel",
     ["MODEL.DISTILL.DEC_HIDDEN_WEIGHT", "0.0", "MODEL.DISTILL.DEC_CLASS_WEIGHT", "0.0",
      "MODEL.DISTILL.DEC_BOX_WEIGHT", "0.0"]),
    ("configs/shapes/deformable_detr_fp32.yaml", "configs/shapes/aq_deformable_detr_w4a4.yaml", "teacher_forced", []),
]


def fingerprint(teacher_config, student_config, mode, opts, workdir) -> str:
    torch.manual_seed(0)
    weights = os.path.join(workdir, "teacher.pth")
    teacher_cfg = load_config(os.path.join(ROOT, teacher_config), ["MODEL.DEVICE", "cpu"])
    torch.save({"model": build_model(teacher_cfg).state_dict()}, weights)
    cfg = load_config(os.path.join(ROOT, student_config), [
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", weights, "MODEL.DISTILL.TEACHER_WEIGHTS", weights,
        "MODEL.DISTILL.TEACHER_CONFIG", os.path.join(ROOT, teacher_config), "MODEL.DISTILL.MODE", mode, *opts])
    torch.manual_seed(0)
    model = build_model(cfg)
    model.load_state_dict(torch.load(weights, weights_only=True)["model"], strict=False)
    model.distiller = build_distiller(cfg)
    random.seed(0)
    np.random.seed(0)
    mapper = DetrDatasetMapper(cfg, is_train=True)
    batch = [mapper(d) for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:4]]
    model.train()
    torch.manual_seed(1)
    model(batch)  # initialises the quantizers from this batch
    torch.manual_seed(2)
    losses = model(batch)
    total = sum(losses.values())
    total.backward()
    grad = sum(p.grad.double().abs().sum() for p in model.parameters() if p.grad is not None)
    terms = " ".join(f"{k}={v.item()!r}" for k, v in losses.items())
    return f"{os.path.basename(student_config)} {mode}: total={total.item()!r} grad_abs_sum={grad.item()!r} {terms}"


def main():
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as workdir:
        for case in CASES:
            print(fingerprint(*case, workdir), flush=True)


if __name__ == "__main__":
    main()
