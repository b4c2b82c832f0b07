"""
Quantization library of AQ-DETR: LSQ / LSQ+ / min-max fake quantizers, quantized Linear and
Conv2d, attention quantization points, and model conversion. Depends only on PyTorch.
"""
from .attention import (
    MHA_POINTS,
    QUANT_POINTS,
    QuantPoint,
    install_quantizers,
    point_quantizer,
)
from .calibrate import calibrate, calibration, iter_quantizers
from .convert import QuantConfig, quantize_model
from .export import export_quantized, exported_state_dict, load_exported, pack_codes, unpack_codes
from .modules import QuantConv2d, QuantLinear
from .quantizers import (
    QUANTIZER_REGISTRY,
    VALID_BITS,
    LSQPlusQuantizer,
    LSQQuantizer,
    MinMaxQuantizer,
    QuantizerBase,
    build_quantizer,
    check_bits,
    quant_range,
)
from .report import ModelReport, PartStats, model_report

__all__ = [
    "MHA_POINTS",
    "QUANT_POINTS",
    "QUANTIZER_REGISTRY",
    "VALID_BITS",
    "LSQPlusQuantizer",
    "LSQQuantizer",
    "MinMaxQuantizer",
    "ModelReport",
    "PartStats",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "QuantPoint",
    "QuantizerBase",
    "build_quantizer",
    "calibrate",
    "calibration",
    "check_bits",
    "export_quantized",
    "exported_state_dict",
    "install_quantizers",
    "iter_quantizers",
    "load_exported",
    "model_report",
    "pack_codes",
    "point_quantizer",
    "quant_range",
    "quantize_model",
    "unpack_codes",
]
