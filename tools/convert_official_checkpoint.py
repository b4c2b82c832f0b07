#!/usr/bin/env python
"""Convert an official DETR / Deformable-DETR checkpoint for use as MODEL.WEIGHTS.

    python tools/convert_official_checkpoint.py --arch detr detr-r50-e632da11.pth detr_r50_d2.pth
"""
import argparse

import torch

from aqdetr_d2.checkpoint import UnsafeCheckpointError, convert_official_state_dict, load_torch_weights
from aqdetr_d2.checkpoint.official import ARCHS


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", required=True, choices=ARCHS)
    parser.add_argument("--coco-to-contiguous", default="auto", choices=("auto", "yes", "no"),
                        help="reduce COCO's 91 sparse class ids to Detectron2's 80 contiguous ones")
    parser.add_argument("input", help="official checkpoint (.pth with a 'model' entry)")
    parser.add_argument("output", help="converted checkpoint (.pth)")
    args = parser.parse_args()

    try:
        checkpoint = load_torch_weights(args.input, "official checkpoint")
        state = checkpoint.get("model", checkpoint)
        converted = convert_official_state_dict(state, args.arch, args.coco_to_contiguous)
    except (UnsafeCheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    torch.save({"model": converted, "__author__": f"converted from official {args.arch}"}, args.output)
    print(f"wrote {len(converted)} tensors to {args.output}")


if __name__ == "__main__":
    main()
