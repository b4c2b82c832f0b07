"""Running an exported detector in ONNX Runtime, as a Detectron2 model for its evaluators."""
import os
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

# Operators through which ONNX Runtime computes in integers (after its QDQ fusions).
INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger",
               "MatMulNBits", "QLinearAdd", "QLinearMul")


def ort_session(path: str, threads: Optional[int] = None, optimized_model_filepath: Optional[str] = None):
    """An onnxruntime CPU session of `path` with every graph optimisation (the QDQ fusions among
    them) and `threads` intra-op threads (default: onnxruntime's own choice)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if optimized_model_filepath:
        options.optimized_model_filepath = optimized_model_filepath
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX file {path} does not exist; write it with tools/export_onnx.py")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


class OnnxRuntimeDetector(nn.Module):
    """Detectron2's model interface over an onnxruntime session of `tools/export_onnx.py`'s graph.

    Each image of `batched_inputs` ("image" (3, H, W) as the test mapper gives it, "height",
    "width") runs alone through the session; `postprocess` is the PyTorch model whose
    `inference` turns (pred_logits, pred_boxes) into Instances, so both paths share it.
    """

    def __init__(self, session, postprocess: nn.Module):
        super().__init__()
        self.session = session
        self.postprocess = postprocess.eval()

    def forward(self, batched_inputs: List[Dict]):
        from detectron2.modeling.postprocessing import detector_postprocess

        results = []
        for x in batched_inputs:
            image = x["image"].to(torch.float32)[None].numpy()
            logits, boxes = self.session.run(None, {"image": np.ascontiguousarray(image)})
            size = tuple(x["image"].shape[-2:])
            instances = self.postprocess.inference(torch.from_numpy(logits), torch.from_numpy(boxes), [size])[0]
            results.append({"instances": detector_postprocess(instances, x.get("height", size[0]),
                                                              x.get("width", size[1]))})
        return results
