#!/usr/bin/env python
"""Interpolate a quantization-aware fine-tune with the calibrated model it started from (WiSE-FT).

    python tools/interpolate_weights.py --config-file output/run/config.yaml \\
        --fine-tuned output/run/model_final.pth --alpha 0.75 --output output/run/interpolated_0.75.pth
    python projects/AQDETR/train_net.py --config-file output/run/config.yaml --eval-only \\
        MODEL.WEIGHTS output/run/interpolated_0.75.pth MODEL_EMA.ENABLED False

The config is the run's own (its `MODEL.WEIGHTS` is the start, e.g. the float teacher); the start
is rebuilt exactly as training began (weights loaded, quantizers calibrated on the same images).
`--fine-tuned` loads like `--eval-only` does: its averaged weights when `MODEL_EMA.ENABLED`.
Writes `{"model": (1 - alpha) * start + alpha * fine-tuned, "interpolation": {...}}`, a checkpoint
of the same model and bit widths that `MODEL.WEIGHTS` (and tools/export_quantized.py) accept.
See aqdetr_d2/engine/interpolation.py.
"""
import argparse
import logging
import os
import sys

import torch

from detectron2.utils.logger import setup_logger

from aqdetr_d2.config import load_config
from aqdetr_d2.engine import build_calibrated_model, calibrated_start, interpolate_state_dicts
from aqdetr_d2.engine.interpolation import check_alpha
from aqdetr_d2.errors import user_errors_exit


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="the fine-tune's config")
    parser.add_argument("--fine-tuned", required=True, metavar="PTH", help="the fine-tune's checkpoint")
    parser.add_argument("--alpha", required=True, type=float, help="share of the fine-tuned weights, in [0, 1]")
    parser.add_argument("--output", required=True, metavar="OUT", help="checkpoint to write (.pth)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    try:
        check_alpha(args.alpha)
    except ValueError as e:
        sys.exit(f"error: --alpha: {e}")
    if not os.path.isfile(args.fine_tuned):
        sys.exit(f"error: --fine-tuned {args.fine_tuned} does not exist")
    cfg = load_config(args.config_file, args.opts)
    if not cfg.MODEL.WEIGHTS:
        sys.exit("error: the config's MODEL.WEIGHTS is empty, so there is no start to interpolate with; "
                 "pass the weights the fine-tune began from as MODEL.WEIGHTS")
    setup_logger(name="aqdetr_d2")
    # A float start lacks every quantizer's state: fvcore would list each missing key.
    logging.getLogger("fvcore.common.checkpoint").setLevel(logging.ERROR)

    start_cfg = cfg.clone()
    start_cfg.defrost()
    start_cfg.MODEL_EMA.ENABLED = False
    start = calibrated_start(start_cfg)
    fine_tuned = build_calibrated_model(cfg, args.fine_tuned).state_dict()
    model = interpolate_state_dicts(start, fine_tuned, args.alpha)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save({"model": model, "interpolation": {"alpha": args.alpha, "start": cfg.MODEL.WEIGHTS,
                                                  "fine_tuned": args.fine_tuned,
                                                  "averaged": bool(cfg.MODEL_EMA.ENABLED)}}, args.output)
    print(f"Wrote {args.output}: {1 - args.alpha:g} x start ({cfg.MODEL.WEIGHTS}) + {args.alpha:g} x "
          f"fine-tuned ({args.fine_tuned}{', averaged weights' if cfg.MODEL_EMA.ENABLED else ''})")


if __name__ == "__main__":
    with user_errors_exit():  # a bad checkpoint, dataset or key: one line, exit 2
        main()
