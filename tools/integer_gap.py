#!/usr/bin/env python
"""Where a quantized model's ONNX AP departs from `--eval-only`: COCO AP in PyTorch with parts of the
model replaced by the integer forms that the ONNX export writes (`aqdetr_d2.deploy.qdq`).

    python tools/integer_gap.py --config-file docs/models/<name>/config.yaml MODEL.WEIGHTS docs/models/<name>/model.pth

onnxruntime computes the integer forms to float rounding, so their AP in PyTorch is, within float
noise, onnxruntime's; each row replaces one kind of layer, so the row that moves names the cause:

    fake-quantized       the model as `train_net.py --eval-only` evaluates it
    integer forms        every layer replaced (what the ONNX graph computes)
    convolutions         QuantConv2d only: batch norm folded, int32 bias at the accumulator's step
    convolutions, float bias   as above with the exact float bias (what rounding the bias costs)
    convolutions, jittered bias 1 / 2   the exact bias plus uniform noise within +-half its int32 step
                         (two draws): how far a change of the rounding's size moves AP at random
    linear layers        QuantLinear only
    quantizers           the remaining activation / attention quantizers only

Prints one line per row (AP, AP50, AP75 and the AP difference from the fake-quantized model) and the
command.
"""
import argparse
import copy
import functools
import sys
import zlib

import torch
from detectron2.utils.logger import setup_logger

from aqdetr_d2.config import load_config
from aqdetr_d2.deploy import qdq
from aqdetr_d2.engine import AQDETRCheckpointer, AQDETRTrainer, initialize_quantizers
from aqdetr_d2.engine.calibration import uninitialized_quantizers
from aqdetr_d2.errors import UserInputError, user_errors_exit
from aqdetr_d2.quant import QuantConv2d, QuantizerBase, QuantLinear


class FloatBiasConv(qdq.DequantConv2d):
    """The integer form of a convolution with its exact float bias instead of the int32 one."""

    def __init__(self, module, name):
        super().__init__(module, name)
        self.bias_codes = None


class JitteredBiasConv(FloatBiasConv):
    """As FloatBiasConv, its bias moved by uniform noise within +-half its int32 step: a change as
    large as the rounding's, at random. How far AP moves under it is the model's sensitivity to
    the rounding, against which the int32 row's difference can be judged."""

    def __init__(self, module, name, seed: int):
        super().__init__(module, name)
        if hasattr(self, "bias_scale"):
            # A draw per layer and seed (CPU generators keep 32 bits of a seed: hash both into them).
            generator = torch.Generator().manual_seed(zlib.crc32(f"{seed} {name}".encode()))
            noise = torch.rand(self.bias.shape, generator=generator) - 0.5
            self.bias += noise.to(self.bias) * self.bias_scale


# Row -> which fake-quantized layers are replaced, and by what (None: `qdq`'s own form).
ROWS = {
    "fake-quantized": {},
    "integer forms": {QuantConv2d: None, QuantLinear: None, QuantizerBase: None},
    "convolutions": {QuantConv2d: None},
    "convolutions, float bias": {QuantConv2d: FloatBiasConv},
    **{f"convolutions, jittered bias {seed}": {QuantConv2d: functools.partial(JitteredBiasConv, seed=seed)}
       for seed in (1, 2)},
    "linear layers": {QuantLinear: None},
    "quantizers": {QuantizerBase: None},
}


def replace(model, forms: dict):
    """`model` with the layers of the types in `forms` replaced by their integer forms."""
    def form(module, name):
        kind = next((k for k in forms if isinstance(module, k)), None)
        if kind is None:
            return None
        return (forms[kind] or qdq.export_form)(module, name)

    return qdq.to_integer_forms(model, form)


def build(cfg, calibrate: bool):
    """The fake-quantized model of `cfg` with MODEL.WEIGHTS, its step sizes calibrated if `calibrate`."""
    model = AQDETRTrainer.build_model(cfg)
    AQDETRCheckpointer(model, use_ema=cfg.MODEL_EMA.ENABLED).load(cfg.MODEL.WEIGHTS, checkpointables=[])
    if uninitialized_quantizers(model) and not calibrate:
        raise UserInputError(f"{cfg.MODEL.WEIGHTS} has no step sizes: pass a QAT checkpoint or a packed export, "
                             "or add --calibrate for post-training quantization")
    initialize_quantizers(cfg, model)
    return model.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--row", action="append", choices=list(ROWS), dest="rows", metavar="ROW",
                        help="a row to evaluate, repeatable (default: all): " + ", ".join(f"'{r}'" for r in ROWS))
    parser.add_argument("--calibrate", action="store_true",
                        help="calibrate step sizes that MODEL.WEIGHTS lacks (post-training quantization)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides, MODEL.WEIGHTS among them")
    args = parser.parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    if not cfg.MODEL.QUANT.ENABLED or not cfg.MODEL.WEIGHTS:
        raise UserInputError("pass a quantized config and its MODEL.WEIGHTS")
    setup_logger(name="detectron2")
    if len(cfg.DATASETS.TEST) != 1:
        raise UserInputError(f"DATASETS.TEST {cfg.DATASETS.TEST}: name one test set")
    AQDETRTrainer.check_test_datasets(cfg)
    model, results = build(cfg, args.calibrate), {}
    for row in ["fake-quantized"] + [r for r in args.rows or ROWS if r != "fake-quantized"]:
        with torch.no_grad():
            results[row] = AQDETRTrainer.test(cfg, replace(copy.deepcopy(model), ROWS[row]))["bbox"]
    print(f"Command: python tools/integer_gap.py {' '.join(sys.argv[1:])}")
    for row, bbox in results.items():
        print(f"{row:30s} AP {bbox['AP']:6.2f}  AP50 {bbox['AP50']:6.2f}  AP75 {bbox['AP75']:6.2f}  "
              f"vs fake-quantized {bbox['AP'] - results['fake-quantized']['AP']:+.2f}")


if __name__ == "__main__":
    with user_errors_exit():  # a bad checkpoint or config: one line, exit 2
        main()
