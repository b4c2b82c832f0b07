"""
The int32 bias of an integer convolution, and training with it.

An integer convolution (ONNX Runtime's QLinearConv) adds its bias, with a frozen batch norm
folded in, to the int32 accumulator of input codes times weight codes: the bias is rounded to
steps of input step x weight step. At 2 bits those steps are so coarse that the rounding moves
outputs by percents of their range; the export scales the weight codes up by 2^k (`bias_shift`)
to make the steps 2^k finer, but a 2-bit DETR still moved by 0.2 to 0.9 AP under it. With
`QuantConv2d.integer_bias` (MODEL.QUANT.INTEGER_BIAS) the fake-quantized convolution adds that
same rounded bias (straight-through in backward), so training sees the deployed arithmetic and
`--eval-only` computes what ONNX Runtime computes, up to float rounding.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .base import QuantizerBase

# Signed per-tensor activation codes ride in uint8 in the export, shifted by this much
# (`uint8_shifted`).
UINT8_SHIFT = 128
# onnxruntime's u8 x s8 kernels on CPUs without VNNI add products in pairs in int16: input code
# times weight code, twice, must stay within this.
_INT16_MAX = 32767
# The most `bias_shift` scales codes up: the export's widen_int4 multiplies int8 codes by 2^k.
MAX_BIAS_SHIFT = 6


def bias_shift(codes: Tensor, zero_point: Tensor, input_max: int) -> int:
    """k >= 0 such that the weight codes times 2^k stay int8 and, times the largest uint8 input
    code `input_max`, within the int16 pair sums of onnxruntime's kernels on CPUs without VNNI.
    An integer convolution's weight codes are multiplied by 2^k and their steps divided by 2^k
    (the same weights exactly), so that its int32 bias, in steps of the input step times the
    weight step, is 2^k times finer. 0 for codes with zero points (asymmetric)."""
    if bool(zero_point.any()) or not bool(codes.any()):
        return 0
    bound = _INT16_MAX // (2 * max(input_max, 1))
    low, high = -min(bound, 128), min(bound, 127)
    shift = 0
    smallest, largest = int(codes.min()), int(codes.max())
    while shift < MAX_BIAS_SHIFT and low <= smallest << (shift + 1) and largest << (shift + 1) <= high:
        shift += 1
    return shift


def uint8_shifted(quantizer: QuantizerBase, weight: bool) -> bool:
    """Signed per-tensor activation codes ride in uint8, shifted by 128: x86 integer kernels
    take unsigned activations, and ONNX Runtime only converts int8 Q / DQ pairs that are
    adjacent. Per-head attention codes stay int8: ONNX Runtime 1.32 fuses a per-axis uint8
    MatMul input into MatMulIntegerToFloat, which then refuses per-axis zero points."""
    return quantizer.signed and not weight and quantizer.per_tensor


def input_code_max(quantizer: QuantizerBase) -> int:
    """The largest uint8 code of an activation quantizer in the export."""
    return quantizer.qmax + (UINT8_SHIFT if uint8_shifted(quantizer, weight=False) else 0)


def norm_folds_in_training(norm: Optional[nn.Module]) -> bool:
    """Whether `norm` (or its absence) folds into the convolution before it in training too: a
    batch norm with fixed statistics (FrozenBatchNorm2d), not one that updates them."""
    return norm is None or (_has_statistics(norm) and not isinstance(norm, _BatchNorm))


def _has_statistics(norm: nn.Module) -> bool:
    return all(hasattr(norm, a) for a in ("weight", "bias", "running_mean", "running_var", "eps"))


def frozen_norm_affine(norm: Optional[nn.Module]) -> Optional[Tuple[Tensor, Tensor]]:
    """(scale, shift), each (C,), of a batch norm whose statistics are fixed (Detectron2's
    FrozenBatchNorm2d, or any batch norm in eval mode), so that it folds into the convolution
    before it; None when there is none, or its statistics are still being updated."""
    if norm is None or not _has_statistics(norm):
        return None
    if isinstance(norm, _BatchNorm) and norm.training:
        return None
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    return scale, norm.bias - norm.running_mean * scale


def fold_norm_sign(codes: Tensor, norm_scale: Tensor) -> Tensor:
    """Weight codes (C_out, ...) as int16, negated in the channels whose folded batch-norm scale
    (C_out,) is negative: the per-channel steps then take |norm_scale|."""
    sign = torch.where(norm_scale < 0, -1, 1).to(torch.int16).view(-1, *[1] * (codes.dim() - 1))
    return codes.to(torch.int16) * sign


def conv_bias_layout(conv: nn.Module, codes: Tensor, zero_point: Tensor,
                     norm_scale: Tensor) -> Optional[Tuple[int, Tensor]]:
    """How the integer form of QuantConv2d `conv` holds its bias, or None where the bias stays
    float (the input not quantized per tensor, or the weight not quantized).

    codes: its weight codes with the norm's signs folded in (`fold_norm_sign`); zero_point:
    theirs; norm_scale: (C_out,) scale of the batch norm folded into the conv (ones if none).
    Returns (k, step): the integer form holds the codes times 2^k (`bias_shift`) and its bias in
    steps (C_out,) of input step x weight step x |norm_scale| / 2^k.
    """
    x_quant, w_quant = conv.input_quantizer, conv.weight_quantizer
    if not (isinstance(x_quant, QuantizerBase) and x_quant.enabled and x_quant.per_tensor
            and isinstance(w_quant, QuantizerBase) and w_quant.enabled):
        return None
    shift = bias_shift(codes, zero_point, input_code_max(x_quant))
    # In the order the export computes the integer weights' steps, then the bias's.
    step = x_quant.step_size().reshape(()) * (w_quant.step_size().reshape(-1) * norm_scale.abs() / 2 ** shift)
    return shift, step


class _RoundToStep(torch.autograd.Function):
    """round(x / step) * step; straight through in backward (to x only: the step is a given)."""

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor) -> Tensor:
        return torch.round(x / step) * step

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def integer_bias_terms(conv: nn.Module) -> Optional[Tuple[Tensor, Tensor]]:
    """(scale, bias), each (C_out,), such that conv(x, weight) * scale + bias is QuantConv2d
    `conv` followed by its frozen batch norm, with the bias rounded as its integer form rounds
    it; None where the bias stays float (`conv_bias_layout`) or the input quantizer is not
    quantizing yet (calibration)."""
    if not norm_folds_in_training(conv.norm):
        raise ValueError(f"integer_bias needs a frozen batch norm to fold, not a {type(conv.norm).__name__} "
                         "(use FrozenBN, e.g. MODEL.RESNETS.NORM 'FrozenBN')")
    if not getattr(conv.input_quantizer, "quantizing", False) or not conv.weight_quantizer.enabled:
        return None
    zeros = conv.weight.new_zeros(conv.weight.shape[0])
    norm_scale, norm_shift = frozen_norm_affine(conv.norm) or (zeros + 1, zeros)
    codes, _, zero_point = conv.weight_quantizer.quantize_to_int(conv.weight.detach())
    layout = conv_bias_layout(conv, fold_norm_sign(codes, norm_scale), zero_point, norm_scale.detach())
    if layout is None:
        return None
    bias = norm_shift if conv.bias is None else conv.bias * norm_scale + norm_shift
    return norm_scale, _RoundToStep.apply(bias, layout[1].detach())


def integer_bias_conv(conv: nn.Module, x: Tensor, weight: Tensor, terms: Optional[Tuple[Tensor, Tensor]]) -> Tensor:
    """`conv`'s convolution and frozen batch norm, with `terms` (`integer_bias_terms`) or, where
    they are None, as the plain conv -> norm. x: (N, C_in, H, W), already quantized; weight: the
    fake-quantized weight (C_out, C_in, kh, kw). Returns (N, C_out, H', W') before the activation."""
    if terms is None:
        y = conv._conv_forward(x, weight, conv.bias)
        return y if conv.norm is None else conv.norm(y)
    scale, bias = terms
    return conv._conv_forward(x, weight, None) * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
