"""
Fake quantizers: LSQ / LSQ+ (learned step size, lsq.py) and a min-max baseline (minmax.py), by name.

A quantizer maps x to what an integer kernel would compute with,
    x_hat = s * clamp(round((x - offset) / s), Qn, Qp) + offset,
with signed range [-2^(b-1), 2^(b-1) - 1] or unsigned range [0, 2^b - 1]. One step size per
tensor, or one per slice along `ch_axis` (output channels of a weight, heads of an attention
tensor). Its state (step size, offset, whether it has been initialised) lives in the
state_dict, so a checkpoint resumes exactly and a fresh model loads it without a forward pass.
32 bits means "off": the quantizer is the identity and holds no state.
"""
from .base import (GRANULARITIES, VALID_BITS, BitWidthMismatchError, QuantizerBase, check_bits,  # noqa: F401
                   quant_range)
from .lsq import LSQ_INITS, LSQPlusQuantizer, LSQQuantizer  # noqa: F401
from .minmax import MinMaxQuantizer  # noqa: F401

QUANTIZER_REGISTRY = {
    "lsq": LSQQuantizer,
    "lsq+": LSQPlusQuantizer,
    "minmax": MinMaxQuantizer,
}


def build_quantizer(name: str, bits: int, **kwargs) -> QuantizerBase:
    """Build the quantizer registered as `name` ("lsq", "lsq+", "minmax") with `bits` bits."""
    if name not in QUANTIZER_REGISTRY:
        raise ValueError(f"unknown quantizer {name!r}; choose one of {sorted(QUANTIZER_REGISTRY)}")
    return QUANTIZER_REGISTRY[name](bits, **kwargs)
