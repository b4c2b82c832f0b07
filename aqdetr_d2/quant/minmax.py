"""Min-max post-training quantization: the baseline with fixed, observed ranges."""
from typing import Optional

import torch

from .base import QuantizerBase, _scaled

class MinMaxQuantizer(QuantizerBase):
    """
    Post-training quantization baseline: fixed scale and zero point from observed ranges.

    The range is the minimum / maximum over all observed data, widened to contain 0. Signed: symmetric, scale = max(|lo|, |hi|) / Qp, zero
    point 0. Unsigned: affine, scale = (hi - lo) / (Qp - Qn), integer zero point. Forward
    and backward (straight-through) are PyTorch's fake-quantize ops.
    """

    def __init__(
        self,
        bits: int,
        signed: bool = True,
        granularity: str = "tensor",
        ch_axis: Optional[int] = None,
        num_channels: Optional[int] = None,
        eps: float = 1e-8,
    ):
        super().__init__(bits, signed, granularity, ch_axis, num_channels)
        self.eps = eps
        if self.enabled:
            shape = self._qparam_shape(num_channels)
            self.register_buffer("scale", torch.ones(shape))
            self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))

    def _qparam_names(self):
        return ("scale", "zero_point")

    def _stats(self, flat):
        return {"min": (flat.amin(1).float(), "min"), "max": (flat.amax(1).float(), "max")}

    def _set_qparams(self, stats):
        lo, hi = stats["min"].clamp(max=0), stats["max"].clamp(min=0)
        if self.signed:
            scale = (torch.maximum(-lo, hi) / self.qmax).clamp_min(self.eps)
            zero_point = torch.zeros_like(scale)
        else:
            scale = ((hi - lo) / (self.qmax - self.qmin)).clamp_min(self.eps)
            zero_point = (self.qmin - torch.round(lo / scale)).clamp(self.qmin, self.qmax)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    def _fake_quantize(self, x):
        if self.per_tensor:
            return torch.fake_quantize_per_tensor_affine(
                x, self.scale, self.zero_point, self.qmin, self.qmax
            )
        return torch.fake_quantize_per_channel_affine(
            x, self.scale, self.zero_point, self.ch_axis % x.dim(), self.qmin, self.qmax
        )

    @torch.no_grad()
    def quantize_to_int(self, x):
        self._check_enabled()
        self._ensure_initialized(x)
        codes = _scaled(x, self._view(self.scale, x), None).round_()
        codes = codes.add_(self._view(self.zero_point, x)).clamp_(self.qmin, self.qmax)
        return codes.to(self._code_dtype()), self.scale.clone(), self.zero_point.clone()
