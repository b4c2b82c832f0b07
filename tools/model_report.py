#!/usr/bin/env python
"""Print the per-part size / FLOPs / OPs table (markdown) of the model a config builds.

    python tools/model_report.py --config-file configs/shapes/detr_fp32.yaml MODEL.QUANT.ENABLED True
    python tools/model_report.py --config-file configs/coco/detr_r50_fp32.yaml --image-size 800 1216 \\
        MODEL.QUANT.ENABLED True MODEL.QUANT.WEIGHT_BITS 4 MODEL.QUANT.ACT_BITS 4 MODEL.QUANT.ATTN_BITS 8

Sizes and FLOPs depend only on the config and the input size, so MODEL.WEIGHTS is loaded only
with --load-weights. One forward pass on a random image of INPUT.MIN_SIZE_TEST x
INPUT.MIN_SIZE_TEST pixels (or --image-size H W) measures the FLOPs. Float configs report
32 bit throughout (OPs == FLOPs). Accounting: aqdetr_d2/quant/report.py.
"""
import argparse
import json
import logging

import torch

from detectron2.modeling import build_model

from aqdetr_d2.config import load_config
from aqdetr_d2.modeling import meta_arch_class
from aqdetr_d2.quant.report import model_report
from aqdetr_d2.errors import user_errors_exit


def describe_quant(cfg) -> str:
    q = cfg.MODEL.QUANT
    if not q.ENABLED:
        return "full precision (MODEL.QUANT.ENABLED False)"
    return f"W{q.WEIGHT_BITS}/A{q.ACT_BITS}/Attn{q.ATTN_BITS} ({q.QUANTIZER}), parts {list(q.PARTS)}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                        help="input size (default: INPUT.MIN_SIZE_TEST square)")
    parser.add_argument("--load-weights", action="store_true", help="load MODEL.WEIGHTS first (not needed)")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    cfg = load_config(args.config_file, args.opts)
    parts = meta_arch_class(cfg).part_patterns()
    model = build_model(cfg)
    if args.load_weights and cfg.MODEL.WEIGHTS:
        from aqdetr_d2.engine import AQDETRCheckpointer

        AQDETRCheckpointer(model, use_ema=cfg.MODEL_EMA.ENABLED).load(cfg.MODEL.WEIGHTS)
    height, width = args.image_size or (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST)
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)

    report = model_report(model, lambda: [{"image": image, "height": height, "width": width}], parts,
                          input_desc=f"one {height}x{width} image")
    print(f"# {cfg.MODEL.META_ARCHITECTURE} from {args.config_file}: {describe_quant(cfg)}\n")
    print(report.to_markdown())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config_file": args.config_file, "quant": describe_quant(cfg), **report.as_dict()}, f, indent=2)


if __name__ == "__main__":
    with user_errors_exit():  # a bad checkpoint, dataset or key: one line, exit 2
        main()
