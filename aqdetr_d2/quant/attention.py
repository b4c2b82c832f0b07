"""
Quantization points of attention modules.

A float attention module declares each tensor that an integer kernel would consume as an
`nn.Identity` attribute with one of the reserved names below, applied where that tensor
is formed; quantizing attention is then a module swap of those attributes:

    multi-head attention, tensors (B, H, L, d) / (B, H, L, S):
        q = self.q_quant(q); k = self.k_quant(k); v = self.v_quant(v)
        attn = self.attn_quant(attn.softmax(-1))         # before dropout and attn @ v
    multi-scale deformable attention:
        value = self.value_quant(value)                  # (B, S, H, d), after value_proj
        weights = self.attn_weight_quant(weights)        # (B, Lq, H, levels, points), after softmax

Sampling locations get no quantization point: they stay in floating point.
"""
from dataclasses import dataclass
from typing import Dict, Optional

from torch import nn

from .quantizers import build_quantizer


@dataclass(frozen=True)
class QuantPoint:
    signed: bool  # False for non-negative tensors: softmax probabilities
    head_axis: int  # axis of the heads in the tensor the point receives


QUANT_POINTS: Dict[str, QuantPoint] = {
    "q_quant": QuantPoint(signed=True, head_axis=1),
    "k_quant": QuantPoint(signed=True, head_axis=1),
    "v_quant": QuantPoint(signed=True, head_axis=1),
    "attn_quant": QuantPoint(signed=False, head_axis=1),
    "value_quant": QuantPoint(signed=True, head_axis=2),
    "attn_weight_quant": QuantPoint(signed=False, head_axis=2),
}

MHA_POINTS = ("q_quant", "k_quant", "v_quant", "attn_quant")


def point_quantizer(
    point: str,
    bits: int,
    quantizer: str = "lsq",
    num_heads: Optional[int] = None,
    per_head: bool = True,
    prob_init: str = "lsq",
) -> nn.Module:
    """Quantizer for quantization point `point` (a key of QUANT_POINTS); `prob_init` is the LSQ
    step-size initialisation of the softmax-output points ("lsq" or "mse")."""
    if point not in QUANT_POINTS:
        raise ValueError(f"unknown quantization point {point!r}; known: {sorted(QUANT_POINTS)}")
    spec = QUANT_POINTS[point]
    kwargs = {} if spec.signed or prob_init == "lsq" else {"init": prob_init}
    if per_head:
        kwargs.update(granularity="head", ch_axis=spec.head_axis, num_channels=num_heads)
    return build_quantizer(quantizer, bits, signed=spec.signed, **kwargs)


def install_quantizers(module: nn.Module, quantizers: Dict[str, nn.Module]) -> nn.Module:
    """Replace `module`'s identity placeholders by `quantizers` (name -> quantizer)."""
    for name, q in quantizers.items():
        if not isinstance(getattr(module, name, None), nn.Identity):
            raise ValueError(f"{type(module).__name__} has no nn.Identity placeholder {name!r}")
        setattr(module, name, q)
    return module
