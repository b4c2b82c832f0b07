"""
Integer-kernel forms of the fake-quantized layers, for ONNX export.

Each module here computes exactly what the fake-quantized module it replaces computes (up to
float rounding where a batch norm is folded), and exports as the QDQ pattern that ONNX Runtime
turns into integer kernels:

    activation quantizer:  QuantizeLinear(int8 / uint8) -> Clip(to the b-bit range) -> DequantizeLinear
    quantized weight:      int8 initializer holding the b-bit codes -> DequantizeLinear(per channel)
    QuantLinear:           DQ(x) @ DQ(W^T) + bias   (MatMul, fused to MatMulIntegerToFloat)
    QuantConv2d:           Conv(DQ(x), DQ(W), bias) (fused to QLinearConv when a Q follows)

ONNX's QuantizeLinear saturates to the container's range (int8 or uint8), not to b bits; the
Clip between Q and DQ is on the integer codes, so that the Q / DQ pair around an operator
stays adjacent to it and the runtime can still fuse it.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserInputError
from ..quant import LSQQuantizer, MinMaxQuantizer, QuantConv2d, QuantizerBase, QuantLinear
from ..quant.integer_bias import UINT8_SHIFT, conv_bias_layout, fold_norm_sign, frozen_norm_affine, uint8_shifted


class ExportError(UserInputError, ValueError):
    """A layer of the model has no integer form in ONNX."""


def _per_axis(t: Tensor, x: Tensor, axis: Optional[int]) -> Tensor:
    if axis is None:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.view(shape)


class _QuantizeDequantize(torch.autograd.Function):
    """x_hat = (clamp(round(x / s) + z, qmin, qmax) - z) * s; scale s and zero point z are 0-d
    (per tensor) or (C,) along `axis`."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int, axis: Optional[int]):
        s, z = _per_axis(scale, x, axis), _per_axis(zero_point.float(), x, axis)
        # Multiplying by the reciprocal, as the quantizers do, keeps their rounding ties.
        codes = (x * (1.0 / s)).round_().add_(z).clamp_(qmin, qmax)
        return codes.sub_(z).mul_(s)

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmin, qmax, axis):
        kwargs = {} if axis is None else {"axis_i": axis}
        codes = g.op("QuantizeLinear", x, scale, zero_point, **kwargs)
        dtype = torch.int8 if qmin < 0 else torch.uint8  # the zero point's type
        bounds = [g.op("Constant", value_t=torch.tensor(v, dtype=dtype)) for v in (qmin, qmax)]
        codes = g.op("Clip", codes, *bounds)
        return g.op("DequantizeLinear", codes, scale, zero_point, **kwargs)


class _DequantizeBias(torch.autograd.Function):
    """bias = codes * scale per output channel: int32 codes at the input scale times the
    weight scale, the bias that an integer convolution adds to its int32 accumulator."""

    @staticmethod
    def forward(ctx, codes, scale):
        return codes.float() * scale

    @staticmethod
    def symbolic(g, codes, scale):
        return g.op("DequantizeLinear", codes, scale, axis_i=0)


class _DequantizeWeight(torch.autograd.Function):
    """weight = (codes - zero_point) * scale along `axis`; codes are integer initializers."""

    @staticmethod
    def forward(ctx, codes, scale, zero_point, axis: int):
        return (codes.float() - _per_axis(zero_point.float(), codes, axis)) * _per_axis(scale, codes, axis)

    @staticmethod
    def symbolic(g, codes, scale, zero_point, axis):
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=axis)


def _integer_qparams(quantizer: QuantizerBase, name: str, weight: bool = False):
    """Scale (0-d or (C,)) and integer zero point of an enabled, calibrated quantizer: int8 for
    weights, uint8 for activations."""
    if not bool(quantizer.initialized):
        raise ExportError(f"{name}: the quantizer was never calibrated; load a trained checkpoint or "
                          "calibrate (MODEL.QUANT.CALIB_BATCHES) before exporting")
    if isinstance(quantizer, LSQQuantizer):
        if quantizer.offset is not None:
            raise ExportError(f"{name}: an LSQ+ offset is not an integer zero point, so ONNX's "
                              "QuantizeLinear cannot express it; export models trained with QUANTIZER 'lsq' "
                              "or 'minmax' and LEARNABLE_OFFSET False")
        scale = quantizer.scale.detach().clamp_min(quantizer.eps)
        zero_point = torch.zeros_like(scale)
    elif isinstance(quantizer, MinMaxQuantizer):
        scale, zero_point = quantizer.scale.detach(), quantizer.zero_point.detach().float()
    else:
        raise ExportError(f"{name}: no ONNX form for {type(quantizer).__name__}")
    shifted = uint8_shifted(quantizer, weight)
    zero_point = (zero_point.round() + (UINT8_SHIFT if shifted else 0)).to(
        torch.uint8 if shifted or not quantizer.signed else torch.int8)
    if quantizer.per_tensor:
        return scale.reshape(()).clone(), zero_point.reshape(()).clone()
    return scale.clone(), zero_point.clone()


class QuantizeDequantize(nn.Module):
    """The export form of an activation or attention quantizer: x (any shape) -> x_hat."""

    def __init__(self, quantizer: QuantizerBase, name: str):
        super().__init__()
        scale, zero_point = _integer_qparams(quantizer, name)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        shift = UINT8_SHIFT if uint8_shifted(quantizer, weight=False) else 0
        self.qmin, self.qmax = quantizer.qmin + shift, quantizer.qmax + shift
        self.ch_axis = None if quantizer.per_tensor else quantizer.ch_axis

    def forward(self, x: Tensor) -> Tensor:
        axis = None if self.ch_axis is None else self.ch_axis % x.dim()
        return _QuantizeDequantize.apply(x, self.scale, self.zero_point, self.qmin, self.qmax, axis)


def export_quantizer(quantizer: nn.Module, name: str) -> nn.Module:
    """Identity for a disabled (32-bit) quantizer, else its QuantizeDequantize."""
    if isinstance(quantizer, QuantizerBase) and quantizer.enabled:
        return QuantizeDequantize(quantizer, name)
    return nn.Identity()


def _weight_codes(module, name: str):
    """int8 codes, (C_out,) float scale and int8 zero point of a quantized layer's weight, or
    None when its weight quantizer is off."""
    quantizer = module.weight_quantizer
    if not (isinstance(quantizer, QuantizerBase) and quantizer.enabled):
        return None
    scale, zero_point = _integer_qparams(quantizer, name + ".weight_quantizer", weight=True)
    codes, _, _ = quantizer.quantize_to_int(module.weight.detach())
    channels = module.weight.shape[0]
    if quantizer.per_tensor:
        scale, zero_point = scale.expand(channels).clone(), zero_point.expand(channels).clone()
    elif quantizer.ch_axis % module.weight.dim() != 0:
        raise ExportError(f"{name}: weight step sizes along axis {quantizer.ch_axis}; ONNX export needs them "
                          "per output channel (axis 0)")
    # Unsigned weight codes would need a uint8 container; weights are signed in every config.
    return codes.to(torch.int8), scale.float(), zero_point.to(torch.int8)


class DequantLinear(nn.Module):
    """y = DQ(x) @ DQ(codes)^T + bias. x: (..., in_features) -> y: (..., out_features).

    The codes are stored transposed, (in_features, out_features) with one step size per column,
    so that MatMul reads the DequantizeLinear directly (a Transpose in between blocks fusion).
    """

    def __init__(self, module: QuantLinear, name: str):
        super().__init__()
        self.input_quant = export_quantizer(module.input_quantizer, name + ".input_quantizer")
        packed = _weight_codes(module, name)
        if packed is None:
            self.register_buffer("weight_t", module.weight.detach().t().contiguous())
            self.codes_t = None
        else:
            codes, scale, zero_point = packed
            self.register_buffer("codes_t", codes.t().contiguous())
            self.register_buffer("scale", scale)
            self.register_buffer("zero_point", zero_point)
        self.register_buffer("bias", None if module.bias is None else module.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        if self.codes_t is None:
            weight = self.weight_t
        else:
            weight = _DequantizeWeight.apply(self.codes_t, self.scale, self.zero_point, 1)
        y = torch.matmul(self.input_quant(x), weight)
        return y if self.bias is None else y + self.bias


class DequantConv2d(nn.Module):
    """y = act(Conv(DQ(x), DQ(codes), bias)), with an inference batch norm folded in.

    x: (N, C_in, H, W) -> y: (N, C_out, H', W'). A batch norm's per-channel scale multiplies
    the weight's per-channel step size, so the integer codes stay those of the trained layer
    (a negative scale negates a channel's codes: still integers, within int8).
    """

    def __init__(self, module: QuantConv2d, name: str):
        super().__init__()
        self.input_quant = export_quantizer(module.input_quantizer, name + ".input_quantizer")
        self.conv_args = dict(stride=module.stride, padding=module.padding, dilation=module.dilation,
                              groups=module.groups)
        if module.padding_mode != "zeros":
            raise ExportError(f"{name}: padding_mode {module.padding_mode!r} has no ONNX Conv form; use 'zeros'")
        channels = module.out_channels
        affine = frozen_norm_affine(module.norm)
        self.norm = module.norm if affine is None else None  # a norm that does not fold runs after the conv
        zeros = module.weight.new_zeros(channels)
        norm_scale, norm_shift = (zeros + 1, zeros) if affine is None else (t.detach() for t in affine)
        bias = zeros if module.bias is None else module.bias.detach()
        self.register_buffer("bias", bias * norm_scale + norm_shift)
        self.activation = module.activation
        self.register_buffer("bias_codes", None)  # set below when the conv is integer on both sides
        packed = _weight_codes(module, name)
        if packed is None:
            self.register_buffer("weight", module.weight.detach() * norm_scale.view(-1, 1, 1, 1))
            self.codes = None
            return
        codes, scale, zero_point = packed
        negative = norm_scale < 0
        if bool(negative.any()) and bool(zero_point.any()):
            raise ExportError(f"{name}: a negative batch-norm scale cannot fold into asymmetric weight codes")
        if bool((codes[negative] == -128).any()):
            raise ExportError(f"{name}: an 8-bit weight code -128 in a channel whose batch-norm scale is negative "
                              "has no int8 negation; export this layer with MODEL.QUANT.KEEP_FP_PATTERNS")
        codes, scale = fold_norm_sign(codes, norm_scale), scale * norm_scale.abs()
        layout = conv_bias_layout(module, codes, zero_point, norm_scale)
        if layout is not None:
            # The int32 bias of an integer convolution (as ONNX Runtime's WeightBiasQuantization
            # would round it), rounded here so that the graph states it exactly, in steps 2^k
            # finer than the input step times the weight step (the codes 2^k larger): at 2 bits
            # the coarse steps moved a DETR by 0.4 AP at 2^4, 0.2 at 2^6 (integer_bias.py).
            shift, bias_scale = layout
            codes, scale = codes * 2 ** shift, scale / 2 ** shift
            self.register_buffer("bias_scale", bias_scale)
            self.register_buffer("bias_codes", torch.round(self.bias / bias_scale).to(torch.int32))
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)

    def forward(self, x: Tensor) -> Tensor:
        if self.codes is None:
            weight = self.weight
        else:
            weight = _DequantizeWeight.apply(self.codes, self.scale, self.zero_point, 0)
        bias = self.bias
        if self.bias_codes is not None:
            bias = _DequantizeBias.apply(self.bias_codes, self.bias_scale)
        y = F.conv2d(self.input_quant(x), weight, bias, **self.conv_args)
        if self.norm is not None:
            y = self.norm(y)
        return y if self.activation is None else self.activation(y)


def export_form(module: nn.Module, name: str) -> Optional[nn.Module]:
    """The integer form of a QuantLinear, QuantConv2d or quantizer named `name`; None for other modules."""
    if isinstance(module, QuantLinear):
        return DequantLinear(module, name)
    if isinstance(module, QuantConv2d):
        return DequantConv2d(module, name)
    if isinstance(module, QuantizerBase):
        return export_quantizer(module, name)
    return None


def to_integer_forms(model: nn.Module, form_of=export_form) -> nn.Module:
    """Replace, in place, every QuantLinear / QuantConv2d and every remaining quantizer of
    `model` (eval mode) by its export form; a module held by two parents (the decoder's alias
    of a box head) is replaced under both names by one new module. Raises ExportError naming a
    layer that has no integer form. `form_of(module, name)` gives a module's form, or None
    to keep it (tools/integer_gap.py replaces one kind of layer at a time)."""
    new_forms, places = {}, []
    for name, module in model.named_modules(remove_duplicate=False):
        if any(name.startswith(place + ".") for place, _ in places):
            continue  # inside a layer replaced as a whole
        if id(module) not in new_forms:
            form = form_of(module, name)
            if form is None:
                continue
            new_forms[id(module)] = form
        places.append((name, module))
    for name, module in places:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new_forms[id(module)])
    return model


def integer_model(cfg, model: nn.Module) -> nn.Module:
    """`model` (a fake-quantized detector with its step sizes) computing as its ONNX export does:
    every layer replaced by its integer form, on cfg.MODEL.DEVICE. Its AP differs from
    onnxruntime's by float rounding only (0.01 to 0.2 AP on the model zoo); the fake-quantized
    model's differs by what folding the batch norms and rounding the conv biases to int32 moves
    (tools/integer_gap.py)."""
    if not cfg.MODEL.QUANT.ENABLED:
        raise ExportError("MODEL.QUANT.INTEGER_EVAL needs a quantized model: set MODEL.QUANT.ENABLED True "
                          "or INTEGER_EVAL False")
    return to_integer_forms(model.eval()).to(cfg.MODEL.DEVICE)
