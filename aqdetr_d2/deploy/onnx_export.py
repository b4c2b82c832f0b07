"""
ONNX export of AQDETR / AQDeformableDETR: one image in, the raw predictions out.

    image        float32 (1, 3, H, W), H and W dynamic: what Detectron2 feeds the model
                 (INPUT.FORMAT channel order, 0-255, after the test resize), before normalisation
    pred_logits  float32 (1, Q, C): the object queries' class logits (no auxiliary queries)
    pred_boxes   float32 (1, Q, 4): normalised (cx, cy, w, h)

A quantized model is first rewritten into its integer forms (`qdq.to_integer_forms`), so its
weights are stored as integer codes and its quantizers become Q / DQ pairs; codes of 4 bits or
fewer are then stored as INT4 (`int4.pack_int4`, opset 21). The float parts (see README,
"Deploy") are traced as they are.
"""
import copy
import warnings
from typing import Dict, Optional, Tuple

import onnx
import torch
from torch import Tensor, nn

from detectron2.structures import ImageList

from ..quant import iter_quantizers
from .int4 import pack_int4
from .qdq import to_integer_forms

# QuantizeLinear / DequantizeLinear per axis (13), Clip on integers (12); 17 is what
# onnxruntime's quantization tools write.
OPSET = 17
INPUT_NAMES = ["image"]
OUTPUT_NAMES = ["pred_logits", "pred_boxes"]


class ExportedDetector(nn.Module):
    """image (1, 3, H, W) -> (pred_logits (1, Q, C), pred_boxes (1, Q, 4)) of `detector`."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor]:
        d = self.detector
        x = (image - d.pixel_mean) / d.pixel_std
        # One unpadded image: its size is the tensor's, so the padding mask is all False.
        out = d.predict(ImageList(x, [x.shape[-2:]]))
        return out["pred_logits"], out["pred_boxes"]


def is_quantized(model: nn.Module) -> bool:
    return any(q.enabled for q in iter_quantizers(model))


def export_onnx(model: nn.Module, path: str, example: Tensor, metadata: Optional[Dict[str, str]] = None) -> nn.Module:
    """Write `model` (an eval-mode detector, fake-quantized or float) to `path` as ONNX, traced
    on `example` (1, 3, H, W), with `metadata` as the file's metadata_props. Returns the traced
    module (integer forms in place), whose outputs are what the graph computes; the model
    itself is left unchanged."""
    if model.training:
        raise ValueError("export an eval-mode model (auxiliary queries and dropout are training-only)")
    exported = ExportedDetector(to_integer_forms(copy.deepcopy(model))).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated, but the torch.export one cannot trace the
        # Q / DQ symbolics that carry the integer codes (torch 2.14).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # The tracer's notes on Python values (the fixed number of levels, layers and queries) are
        # what is meant: the image size stays dynamic (checked at two sizes by the tests).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(exported, (example,), path, dynamo=False, opset_version=OPSET,
                          input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
                          dynamic_axes={"image": {2: "height", 3: "width"}}, do_constant_folding=True)
    onnx_model = onnx.load(path)
    if is_quantized(model):
        onnx_model = pack_int4(onnx_model)
    onnx.helper.set_model_props(onnx_model, dict(metadata or {}))
    onnx.save(onnx_model, path)
    return exported
