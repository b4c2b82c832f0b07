#!/usr/bin/env python
"""Convert an official DETR / Deformable-DETR checkpoint for use as MODEL.WEIGHTS.

    python tools/convert_official_checkpoint.py --arch detr detr-r50-e632da11.pth
    python tools/convert_official_checkpoint.py --arch deformable_detr r50_deformable_detr-checkpoint.pth

The output defaults to the path the COCO configs read (`DEFAULT_OUTPUTS`).
"""
import os
import argparse

import torch

from aqdetr_d2.checkpoint import convert_official_state_dict, load_torch_weights
from aqdetr_d2.checkpoint.official import ARCHS
from aqdetr_d2.errors import user_errors_exit

# --arch -> where configs/coco/ read the converted full-precision model (MODEL.WEIGHTS, TEACHER_WEIGHTS).
DEFAULT_OUTPUTS = {"detr": "checkpoints/detr_r50_coco_d2.pth",
                   "deformable_detr": "checkpoints/deformable_detr_r50_coco_d2.pth"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", required=True, choices=ARCHS)
    parser.add_argument("--coco-to-contiguous", default="auto", choices=("auto", "yes", "no"),
                        help="reduce COCO's 91 sparse class ids to Detectron2's 80 contiguous ones")
    parser.add_argument("input", help="official checkpoint (.pth with a 'model' entry)")
    parser.add_argument("output", nargs="?", help="converted checkpoint (.pth); default: where configs/coco/ expect it")
    args = parser.parse_args()
    output = args.output or DEFAULT_OUTPUTS[args.arch]

    checkpoint = load_torch_weights(args.input, "official checkpoint")
    state = checkpoint.get("model", checkpoint)
    report = []
    converted = convert_official_state_dict(state, args.arch, args.coco_to_contiguous, report)
    for line in report or ["class heads kept as they are"]:
        print(f"remapped: {line}")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    torch.save({"model": converted, "__author__": f"converted from official {args.arch}"}, output)
    print(f"wrote {len(converted)} tensors to {output}")


if __name__ == "__main__":
    with user_errors_exit():  # a bad checkpoint, dataset or key: one line, exit 2
        main()
