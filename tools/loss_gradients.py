#!/usr/bin/env python
"""Per loss term: its value, the norm of its gradient and how it points against the detection loss.

    python tools/loss_gradients.py --config-file configs/shapes/aq_deformable_detr_w3a3.yaml --batches 2 \\
        MODEL.WEIGHTS docs/quickstart/deformable_teacher.pth ...

Builds the model exactly as `projects/AQDETR/train_net.py` would (teacher and distiller included,
MODEL.WEIGHTS loaded, unset quantizers calibrated), takes `--batches` training batches and, for
every term of the loss dict, prints the mean over batches of: its (weighted) value, the L2 norm of
its gradient over all trainable parameters, and the cosine between that gradient and the
gradient of the detection loss (every term that is neither `loss_distill_*` nor `*_aux`). With
full-model gradient clipping, one term whose gradient norm dwarfs the others decides the
direction of every step; a negative cosine means the term pulls against detection.
Nothing is trained or saved.
"""
import argparse
import logging
from collections import defaultdict

import torch

from aqdetr_d2.config import load_config
from aqdetr_d2.engine import AQDETRTrainer
from aqdetr_d2.errors import user_errors_exit


def is_detection_term(name: str) -> bool:
    return not name.startswith("loss_distill") and not name.endswith("_aux")


def flat_gradient(loss, params):
    """The gradient of `loss` over `params` as one vector (zeros where a parameter is unused)."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def term_statistics(losses, params):
    """{term: (value, gradient norm, cosine with the detection gradient)} for one batch."""
    detection = flat_gradient(sum(v for k, v in losses.items() if is_detection_term(k)), params)
    stats = {}
    for name, value in losses.items():
        grad = flat_gradient(value, params)
        cosine = torch.nn.functional.cosine_similarity(grad, detection, dim=0, eps=1e-12)
        stats[name] = (value.item(), grad.norm().item(), cosine.item())
    stats["(detection total)"] = (sum(v.item() for k, v in losses.items() if is_detection_term(k)),
                                  detection.norm().item(), 1.0)
    return stats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--batches", type=int, default=1, help="training batches to average over")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()
    if args.batches < 1:
        raise SystemExit("--batches must be at least 1")
    # Detectron2's INFO logging (the model, the data) would bury the table: warnings only, on
    # stderr. With the level set, AQDETRTrainer leaves logging as it is.
    d2_logger = logging.getLogger("detectron2")
    d2_logger.setLevel(logging.INFO)
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING)
    d2_logger.addHandler(handler)
    d2_logger.propagate = False

    cfg = load_config(args.config_file, args.opts)
    trainer = AQDETRTrainer(cfg)
    trainer.resume_or_load(resume=False)
    model = trainer.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    totals = defaultdict(lambda: [0.0, 0.0, 0.0])
    batches = iter(trainer.data_loader)
    for _ in range(args.batches):
        for name, values in term_statistics(model(next(batches)), params).items():
            totals[name] = [t + v / args.batches for t, v in zip(totals[name], values)]

    print(f"# loss terms of {args.config_file}, mean over {args.batches} batch(es) of "
          f"{cfg.SOLVER.IMS_PER_BATCH} images\n")
    print("| term | value | gradient norm | cosine with detection |")
    print("|---|---|---|---|")
    for name, (value, norm, cosine) in sorted(totals.items()):
        print(f"| {name} | {value:.4g} | {norm:.4g} | {cosine:+.3f} |")


if __name__ == "__main__":
    with user_errors_exit():  # a bad checkpoint, dataset or key: one line, exit 2
        main()
