"""
Quantized drop-in replacements for nn.Linear and nn.Conv2d.

They keep the float module's parameters (same objects, same names: `weight`, `bias`, and for
Detectron2's Conv2d `norm.*`), so a full-precision state dict loads unchanged; the
quantizers add `weight_quantizer.*` and `input_quantizer.*` entries.
"""
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .integer_bias import integer_bias_conv, integer_bias_terms


def _versions(tensors):
    return tuple((t.data_ptr(), t._version) for t in tensors)


def _inference_cached(cache, compute, tensors_of):
    """compute()'s value and the cache entry to keep for the next inference call: `cache`'s
    value while none of the tensors it was keyed on has changed (storage or version counter:
    an optimizer step, a state-dict load or a device move), else computed again (under no_grad)
    and keyed on tensors_of(), listed after computing since the first call may initialise a
    quantizer."""
    if cache is None or cache[1] != _versions(cache[0]):
        with torch.no_grad():
            value = compute()
        tensors = tuple(t for t in tensors_of() if t is not None)
        cache = (tensors, _versions(tensors), value)
    return cache[2], cache


class _QuantWeightMixin:
    """
    Fake-quantized weight, computed once per forward in training and cached in inference.

    The cache is keyed on the storage and version counter of the weight and of every
    parameter and buffer of the weight quantizer: an optimizer step, a state-dict load or a
    device move changes one of them and invalidates it. The tensors themselves are listed
    once per cache entry (walking the quantizer's parameters on every call costs more than
    the quantization of small layers saves).
    """

    def _inference(self) -> bool:
        return not (self.training or (torch.is_grad_enabled() and self.weight.requires_grad))

    def _quantized_weight(self) -> torch.Tensor:
        if not self._inference():
            self._weight_cache = None
            return self.weight_quantizer(self.weight)
        weight, self._weight_cache = _inference_cached(
            self._weight_cache, lambda: self.weight_quantizer(self.weight),
            lambda: (self.weight, *self.weight_quantizer.parameters(), *self.weight_quantizer.buffers()))
        return weight

    def train(self, mode: bool = True):
        # Frees the cached copy while training.
        self._weight_cache = None
        return super().train(mode)


class QuantLinear(_QuantWeightMixin, nn.Linear):
    """
    y = input_quantizer(x) @ weight_quantizer(weight)^T + bias.

    x: (..., in_features) -> y: (..., out_features). The bias stays in floating point (an
    integer kernel accumulates it in int32 at scale s_w * s_x).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        w_quantizer: nn.Module,
        a_quantizer: nn.Module,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight_quantizer = w_quantizer
        self.input_quantizer = a_quantizer
        self._weight_cache = None

    @classmethod
    def from_float(cls, module: nn.Linear, w_quantizer: nn.Module, a_quantizer: nn.Module):
        """Wrap `module`'s own weight and bias (shared, not copied) with the two quantizers."""
        qmodule = cls(
            module.in_features,
            module.out_features,
            module.bias is not None,
            w_quantizer=w_quantizer,
            a_quantizer=a_quantizer,
            device="meta",  # parameters are replaced by the float module's just below
        )
        qmodule.weight = module.weight
        qmodule.bias = module.bias
        return qmodule.train(module.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self._quantized_weight(), self.bias)


class QuantConv2d(_QuantWeightMixin, nn.Conv2d):
    """
    y = activation(norm(conv2d(input_quantizer(x), weight_quantizer(weight), bias))).

    x: (N, C_in, H, W) -> y: (N, C_out, H', W'). `norm` and `activation` are optional, as in
    Detectron2's `Conv2d`, whose conversions keep them (and so its `norm.*` parameters).
    With `integer_bias` True the frozen norm is folded in and the bias rounded to the steps
    of the conv's int32 accumulator, as in its ONNX export (`integer_bias.py`).
    """

    integer_bias = False

    def __init__(
        self,
        *args,
        w_quantizer: nn.Module,
        a_quantizer: nn.Module,
        norm: Optional[nn.Module] = None,
        activation: Optional[Callable] = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.weight_quantizer = w_quantizer
        self.input_quantizer = a_quantizer
        self.norm = norm
        self.activation = activation
        self._weight_cache = None
        self._bias_cache = None

    @classmethod
    def from_float(cls, module: nn.Conv2d, w_quantizer: nn.Module, a_quantizer: nn.Module):
        """Wrap `module` (nn.Conv2d or Detectron2's Conv2d) sharing its parameters and norm."""
        qmodule = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            w_quantizer=w_quantizer,
            a_quantizer=a_quantizer,
            norm=getattr(module, "norm", None),
            activation=getattr(module, "activation", None),
            device="meta",  # parameters are replaced by the float module's just below
        )
        qmodule.weight = module.weight
        qmodule.bias = module.bias
        return qmodule.train(module.training)

    def _integer_bias_terms(self):
        # In inference the rounded bias is kept like the weight: finding its steps takes the
        # weight's integer codes, as long to compute as the fake-quantized weight.
        if not self._inference() or not getattr(self.input_quantizer, "quantizing", False):
            self._bias_cache = None  # calibrating (or not yet initialised) flips no tensor's version
            return integer_bias_terms(self)
        terms, cache = _inference_cached(
            self._bias_cache, lambda: integer_bias_terms(self),
            lambda: (self.weight, self.bias, *self.weight_quantizer.parameters(), *self.weight_quantizer.buffers(),
                     *self.input_quantizer.parameters(), *self.input_quantizer.buffers(),
                     *(self.norm.buffers() if self.norm is not None else ()),
                     *(self.norm.parameters() if self.norm is not None else ())))
        self._bias_cache = cache
        return terms

    def train(self, mode: bool = True):
        self._bias_cache = None
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight = self.input_quantizer(x), self._quantized_weight()
        if self.integer_bias:
            x = integer_bias_conv(self, x, weight, self._integer_bias_terms())
        else:
            x = self._conv_forward(x, weight, self.bias)
            if self.norm is not None:
                x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x
