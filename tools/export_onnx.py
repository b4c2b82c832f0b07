#!/usr/bin/env python
"""Export a detector to ONNX, its quantized layers as integer operators for ONNX Runtime.

    python tools/export_onnx.py --config-file configs/shapes/detr_lsq_w4a4.yaml --output out/detr_w4.onnx \\
        MODEL.WEIGHTS output/shapes/detr_lsq_w4a4/model_final.pth
    python tools/export_onnx.py --config-file configs/shapes/detr_lsq_w4a4.yaml --output out/detr_fp.onnx --float \\
        MODEL.WEIGHTS output/shapes/detr_lsq_w4a4/model_final.pth

MODEL.WEIGHTS is a QAT checkpoint or a packed export of tools/export_quantized.py. A float
checkpoint has no step sizes and is refused, unless `--calibrate` asks for post-training
quantization (step sizes from MODEL.QUANT.CALIB_BATCHES batches of DATASETS.TRAIN[0], as
`--eval-only` calibrates). `--float` exports the same architecture with MODEL.QUANT.ENABLED
False, the baseline, from a checkpoint that holds float weights. The graph
(aqdetr_d2/deploy/onnx_export.py):

    image (1, 3, H, W) float32, dynamic H, W   ->   pred_logits (1, Q, C), pred_boxes (1, Q, 4)

The tool then checks the file with onnx.checker, runs it once in ONNX Runtime against the
PyTorch model on the first test image, and prints the integer kernels ONNX Runtime made of it.
"""
import argparse
import collections
import logging
import os
import tempfile

import onnx
import torch

from detectron2.data import DatasetCatalog
from detectron2.utils.logger import setup_logger

from aqdetr_d2.checkpoint import AQDETRCheckpointer
from aqdetr_d2.checkpoint.safe_load import load_torch_weights
from aqdetr_d2.config import load_config
from aqdetr_d2.data import DetrDatasetMapper
from aqdetr_d2.deploy import export_onnx
from aqdetr_d2.deploy.runtime import INTEGER_OPS, ort_session
from aqdetr_d2.engine import AQDETRTrainer, initialize_quantizers
from aqdetr_d2.engine.calibration import uninitialized_quantizers
from aqdetr_d2.errors import UserInputError, user_errors_exit
from aqdetr_d2.quant.export import is_export

MB = 2**20


def optimized_op_counts(path: str) -> collections.Counter:
    """Operator counts of the graph ONNX Runtime runs (all graph optimisations on)."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = os.path.join(tmp, "optimized.onnx")
        ort_session(path, optimized_model_filepath=optimized)
        return collections.Counter(n.op_type for n in onnx.load(optimized).graph.node)


def check_image(cfg, size: int):
    """(1, 3, H, W) image for the check after export, and what it is: the first image of
    DATASETS.TEST as the test mapper gives it or, where that set cannot be read here, random
    pixels. On random pixels, far from any training image, a code that rounds the other way at
    a boundary changes much of what follows it."""
    try:
        record = DatasetCatalog.get(cfg.DATASETS.TEST[0])[0]
        image = DetrDatasetMapper(cfg, is_train=False)(record)["image"]
        return image.float()[None], f"the first image of {cfg.DATASETS.TEST[0]}"
    except Exception as e:  # noqa: BLE001 -- only which image the check uses depends on it
        test_set = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "DATASETS.TEST"
        return torch.rand(1, 3, size, size * 4 // 3) * 255, f"random pixels ({test_set} unreadable here: {type(e).__name__})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--output", required=True, metavar="FILE.onnx")
    parser.add_argument("--float", action="store_true", help="export without quantization (the baseline)")
    parser.add_argument("--calibrate", action="store_true",
                        help="calibrate step sizes that MODEL.WEIGHTS lacks (post-training quantization)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides (e.g. MODEL.WEIGHTS)")
    args = parser.parse_args(argv)

    cfg = load_config(args.config_file, args.opts + (["MODEL.QUANT.ENABLED", "False"] if args.float else []))
    if args.float and cfg.MODEL.WEIGHTS and os.path.isfile(cfg.MODEL.WEIGHTS) and \
            is_export(load_torch_weights(cfg.MODEL.WEIGHTS).get("model")):
        raise UserInputError(f"{cfg.MODEL.WEIGHTS} is a packed integer export and holds no float weights for "
                             "--float; pass the QAT checkpoint it came from (or the float teacher)")
    if not cfg.MODEL.WEIGHTS:
        raise UserInputError("MODEL.WEIGHTS is empty: pass the checkpoint to export (MODEL.WEIGHTS FILE)")
    setup_logger(name="aqdetr_d2")
    # A float checkpoint lacks every quantizer's state: fvcore would list each missing key.
    logging.getLogger("fvcore.common.checkpoint").setLevel(logging.ERROR)
    model = AQDETRTrainer.build_model(cfg)
    AQDETRCheckpointer(model, use_ema=cfg.MODEL_EMA.ENABLED).load(cfg.MODEL.WEIGHTS, checkpointables=[])
    missing = uninitialized_quantizers(model)
    if missing and not args.calibrate:
        raise UserInputError(f"{cfg.MODEL.WEIGHTS} has no step sizes for {len(missing)} quantizers (a float "
                             "checkpoint?): export the quantization-aware checkpoint, or add --calibrate for "
                             "post-training quantization")
    initialize_quantizers(cfg, model)
    model.eval()
    size = cfg.INPUT.MIN_SIZE_TEST
    # Traced at one size, checked below on a test image of (usually) another: H and W are dynamic.
    example = torch.rand(1, 3, size + 16, size * 4 // 3 - 16) * 255
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    q = cfg.MODEL.QUANT
    traced = export_onnx(model, args.output, example, metadata={
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE, "weights": cfg.MODEL.WEIGHTS,
        "quantization": f"W{q.WEIGHT_BITS}A{q.ACT_BITS}A{q.ATTN_BITS} {q.QUANTIZER}" if q.ENABLED else "float"})
    onnx.checker.check_model(args.output)

    image, what = check_image(cfg, size)
    logits, boxes = ort_session(args.output).run(None, {"image": image.numpy()})
    with torch.no_grad():
        ref_logits, ref_boxes = traced(image)
    counts = optimized_op_counts(args.output)
    integer = {op: counts[op] for op in INTEGER_OPS if counts[op]}
    print(f"# Exported {cfg.MODEL.META_ARCHITECTURE} ({'float' if args.float else 'quantized'}) to {args.output}: "
          f"{os.path.getsize(args.output) / MB:.3f} MB")
    outputs = [(torch.from_numpy(logits), ref_logits), (torch.from_numpy(boxes), ref_boxes)]
    agree = [float(((got - ref).abs() <= 1e-3 + 1e-3 * ref.abs()).float().mean()) for got, ref in outputs]
    print(f"onnxruntime on {what}, {tuple(image.shape[2:])}: pred_logits {tuple(logits.shape)}, pred_boxes "
          f"{tuple(boxes.shape)}; within 1e-3 of PyTorch: {agree[0]:.1%} of the logits, {agree[1]:.1%} of the box "
          "coordinates" + ("" if args.float else " (the rest follow codes that round the other way at a boundary: "
                                                 "README, Deploy)"))
    print("integer kernels after onnxruntime's optimisations: "
          + (", ".join(f"{op} x{n}" for op, n in integer.items()) or "none"))
    print(f"float kernels left: MatMul x{counts['MatMul'] + counts['FusedMatMul']}, Conv x{counts['Conv'] + counts['FusedConv']}, "
          f"GridSample x{counts['GridSample']}, Softmax x{counts['Softmax']}")


if __name__ == "__main__":
    with user_errors_exit():  # a bad checkpoint, config or layer: one line, exit 2
        main()
