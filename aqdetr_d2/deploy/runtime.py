"""Running an exported detector in ONNX Runtime, as a Detectron2 model for its evaluators."""
import os
import statistics
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from ..errors import UserInputError
from .int4 import widen_int4

# Operators through which ONNX Runtime computes in integers (after its QDQ fusions).
INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger",
               "MatMulNBits", "QLinearAdd", "QLinearMul")


class OnnxFileError(UserInputError):
    """An ONNX file that is missing, or that is not a graph of the config's model."""


def ort_session(path: str, threads: Optional[int] = None, optimized_model_filepath: Optional[str] = None,
                profile_prefix: Optional[str] = None):
    """An onnxruntime CPU session of `path` with every graph optimisation (the QDQ fusions among
    them) and `threads` intra-op threads (default: onnxruntime's own choice). INT4 weight codes
    are widened to INT8 first, which onnxruntime's integer kernels take (see `int4`)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if optimized_model_filepath:
        options.optimized_model_filepath = optimized_model_filepath
    if profile_prefix:  # onnxruntime's profiler, its JSON from `session.end_profiling()`
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if not os.path.isfile(path):
        raise OnnxFileError(f"ONNX file {path} does not exist; write it with tools/export_onnx.py")
    model = widen_int4(onnx.load(path))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def session_latencies(paths: Sequence[str], image: np.ndarray, repeats: int = 10) -> List[float]:
    """Median seconds of one `ort_session` run of `image` (1, 3, H, W), per file in `paths`.

    Each session is warmed up twice, then the sessions take turns, `repeats` runs each: the load
    of a shared machine drifts over seconds, and turn-taking spreads it over all of them alike, so
    that their ratio holds (measured one after the other, the same file's median moved by 1.6x).
    """
    sessions = [ort_session(path) for path in paths]
    for session in sessions:
        for _ in range(2):
            session.run(None, {"image": image})
    times = [[] for _ in sessions]
    for _ in range(repeats):
        for session, took in zip(sessions, times):
            start = time.perf_counter()
            session.run(None, {"image": image})
            took.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


class OnnxRuntimeDetector(nn.Module):
    """Detectron2's model interface over an onnxruntime session of `tools/export_onnx.py`'s graph.

    Each image of `batched_inputs` ("image" (3, H, W) as the test mapper gives it, "height",
    "width") runs alone through the session; `postprocess` is the PyTorch model whose
    `inference` turns (pred_logits, pred_boxes) into Instances, so both paths share it.
    """

    def __init__(self, session, postprocess: nn.Module, check_size: int = 128):
        super().__init__()
        self.session = session
        self.postprocess = postprocess.eval()
        self._check_matches(session, self.postprocess, check_size)

    @staticmethod
    @torch.no_grad()
    def _check_matches(session, model: nn.Module, size: int):
        """Refuse a graph of another model: its architecture (from the file's metadata) and the
        shapes of its outputs on a `size` x `size` image must be those of the config's model."""
        from detectron2.structures import ImageList

        exported_arch = session.get_modelmeta().custom_metadata_map.get("meta_architecture")
        if exported_arch and exported_arch != type(model).__name__:
            raise OnnxFileError(f"the ONNX file is a {exported_arch} and the config builds a {type(model).__name__}; "
                                "pass the config the file was exported with")
        image = torch.zeros(1, 3, size, size)
        expected = model.predict(ImageList(image.to(model.device), [(size, size)]))
        got = session.run(None, {"image": image.numpy()})
        for out, value in zip(session.get_outputs(), got):
            want = tuple(expected[out.name].shape)
            if value.shape != want:
                raise OnnxFileError(f"the ONNX file's {out.name} is {value.shape} but the config's model gives {want}: "
                                    "queries or classes differ; pass the config the file was exported with")

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
