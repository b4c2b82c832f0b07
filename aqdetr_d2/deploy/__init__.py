"""Deployment: the quantized detectors as ONNX graphs that ONNX Runtime runs with integer kernels."""
from .onnx_export import ExportedDetector, export_onnx
from .qdq import ExportError, integer_model, to_integer_forms

__all__ = ["ExportError", "ExportedDetector", "export_onnx", "integer_model", "to_integer_forms"]
