#!/usr/bin/env python
"""Export a quantized model for deployment: integer weights packed at their bit width.

    python tools/export_quantized.py --config-file configs/shapes/detr_fp32.yaml --output out/detr_w4.pth \\
        MODEL.QUANT.ENABLED True MODEL.WEIGHTS output/shapes/detr_w4/model_final.pth

Builds the model of the config (MODEL.QUANT.ENABLED must be True), loads MODEL.WEIGHTS (a
quantized checkpoint, or a float one: its quantizers are then calibrated on
MODEL.QUANT.CALIB_BATCHES batches of DATASETS.TRAIN[0], as train_net does), and writes
`aqdetr_d2.quant.export_quantized(model)` with torch.save; the file loads with
`torch.load(..., weights_only=True)` and `aqdetr_d2.quant.load_exported(model, exported)`
restores a model whose outputs equal the fake-quantized model's; `MODEL.WEIGHTS` may also name
the export (e.g. `train_net.py --eval-only` with the same config). Format and packing layout:
aqdetr_d2/quant/export.py. Prints what is stored at which bit width and the size on disk
against the float state dict (saved the same way).
"""
import argparse
import io
import logging
import os
import sys
from collections import defaultdict

import torch

from detectron2.utils.logger import setup_logger

from aqdetr_d2.config import load_config
from aqdetr_d2.engine import build_calibrated_model
from aqdetr_d2.quant import QuantizerBase
from aqdetr_d2.quant.export import export_quantized
from aqdetr_d2.errors import user_errors_exit

MB = 2**20


def float_state_dict(model):
    """What a float checkpoint of the model holds: every parameter and buffer except quantizer state."""
    quantizer_prefixes = tuple(f"{n}." for n, m in model.named_modules(remove_duplicate=False)
                               if isinstance(m, QuantizerBase))
    return {k: v for k, v in model.state_dict().items() if not k.startswith(quantizer_prefixes)}


def saved_size(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def summary_table(exported, file_size: int, float_size: int) -> str:
    by_bits = defaultdict(lambda: [0, 0, 0])
    qparam_bytes = 0
    for entry in exported["packed"].values():
        row = by_bits[entry["bits"]]
        row[0] += 1
        row[1] += int(torch.tensor(entry["shape"]).prod())
        row[2] += tensor_bytes(entry["codes"])
        qparam_bytes += tensor_bytes(entry["scale"]) + tensor_bytes(entry["zero_point"])
    # Aliased tensors share storage and are saved once.
    remainder = {t.untyped_storage().data_ptr(): t for t in exported["state_dict"].values()}
    lines = ["| stored as | layers / tensors | values | MB |", "|---|---|---|---|"]
    for bits in sorted(by_bits):
        layers, values, nbytes = by_bits[bits]
        lines.append(f"| {bits}-bit weight codes, packed | {layers} layers | {values:,} | {nbytes / MB:.3f} |")
    lines.append(f"| fp32 scales + integer zero points | {len(exported['packed'])} layers | "
                 f"{sum(e['scale'].numel() * 2 for e in exported['packed'].values()):,} | {qparam_bytes / MB:.3f} |")
    lines.append(f"| full-precision remainder (float layers, biases, norms, embeddings, activation "
                 f"step sizes, buffers) | {len(remainder)} tensors | "
                 f"{sum(t.numel() for t in remainder.values()):,} | "
                 f"{sum(t.untyped_storage().nbytes() for t in remainder.values()) / MB:.3f} |")
    lines.append(f"| **export file on disk** | | | **{file_size / MB:.3f}** |")
    lines.append(f"| float state dict (torch.save, same model) | | | {float_size / MB:.3f} |")
    lines.append(f"\ncompression on disk: {float_size / file_size:.2f}x (float state dict / export); MB = 2^20 bytes")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--output", required=True, metavar="OUT", help="export file to write (.pth)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides (e.g. MODEL.WEIGHTS)")
    args = parser.parse_args(argv)

    cfg = load_config(args.config_file, args.opts)
    q = cfg.MODEL.QUANT
    if not q.ENABLED:
        sys.exit("error: MODEL.QUANT.ENABLED is False, so the model has no integer weights to export. "
                 "Pass the quantized config, e.g. append `MODEL.QUANT.ENABLED True MODEL.QUANT.WEIGHT_BITS 4`, "
                 "with the weights as MODEL.WEIGHTS.")
    if q.WEIGHT_BITS == 32:
        sys.exit("error: MODEL.QUANT.WEIGHT_BITS is 32: weights stay in floating point, nothing to pack.")
    setup_logger(name="aqdetr_d2")

    # A float checkpoint lacks every quantizer's state: fvcore would list each missing key. The
    # checkpointer still refuses any other missing tensor, and calibration fills them in.
    logging.getLogger("fvcore.common.checkpoint").setLevel(logging.ERROR)
    model = build_calibrated_model(cfg)

    exported = export_quantized(model, metadata={
        "config": cfg.dump(), "weights": cfg.MODEL.WEIGHTS, "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "quant": f"W{q.WEIGHT_BITS}/A{q.ACT_BITS}/Attn{q.ATTN_BITS} {q.QUANTIZER}"})
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    torch.save(exported, args.output)
    file_size = os.path.getsize(args.output)
    float_size = saved_size(float_state_dict(model))

    print(f"# Exported {cfg.MODEL.META_ARCHITECTURE} W{q.WEIGHT_BITS}/A{q.ACT_BITS}/Attn{q.ATTN_BITS} "
          f"to {args.output}\n")
    print(summary_table(exported, file_size, float_size))
    if cfg.MODEL.WEIGHTS and os.path.isfile(cfg.MODEL.WEIGHTS):
        print(f"MODEL.WEIGHTS file {cfg.MODEL.WEIGHTS}: {os.path.getsize(cfg.MODEL.WEIGHTS) / MB:.3f} MB "
              "(may include optimizer and scheduler state)")


if __name__ == "__main__":
    with user_errors_exit():  # a bad checkpoint, dataset or key: one line, exit 2
        main()
