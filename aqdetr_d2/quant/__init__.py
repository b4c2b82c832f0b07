"""
Quantization library of AQ-DETR: LSQ / LSQ+ / min-max fake quantizers, quantized Linear and
Conv2d, attention quantization points, and model conversion. Depends only on PyTorch.
"""
from .attention import (
    MHA_POINTS,
    QUANT_POINTS,
    QuantPoint,
    attention_quantizers,
    install_quantizers,
    point_quantizer,
)
from .calibrate import calibrate, calibration, iter_quantizers
from .convert import QuantConfig, quantize_model
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

__all__ = [
    "MHA_POINTS",
    "QUANT_POINTS",
    "QUANTIZER_REGISTRY",
    "VALID_BITS",
    "LSQPlusQuantizer",
    "LSQQuantizer",
    "MinMaxQuantizer",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "QuantPoint",
    "QuantizerBase",
    "attention_quantizers",
    "build_quantizer",
    "calibrate",
    "calibration",
    "check_bits",
    "install_quantizers",
    "iter_quantizers",
    "point_quantizer",
    "quant_range",
    "quantize_model",
]
