"""The elementwise arithmetic of LSQ fake quantization, one fused kernel per call.

Eager PyTorch runs each elementwise op of the LSQ forward (4 ops) and backward (7 ops) as its
own pass over the tensor; on the large attention tensors of a detector those passes were
about a third of a quantized training step on the CPU. `torch.compile` fuses each chain into
one kernel. Only elementwise ops are compiled: reductions (the step-size gradient's sum or
dot) stay eager, so results are bit-equal to the eager chain (multiplying by a 0 / 1 mask
is exact, so no fused multiply-add can round differently; tests/quant/test_fused.py checks
forward and gradients against the eager ops).

Tensors are flattened to fixed ranks before the call (per tensor: (N,), per channel:
(outer, C, inner)), in their memory order so that results keep the strides eager ops give
them, and the integer range is passed as tensors: a few compiled graphs serve every layer, bit
width and input size. Compilation happens once per process and graph (Inductor's on-disk cache
makes later processes fast). Small tensors, and every tensor where compilation is off
(`AQDETR_FUSED_QUANT=0`), unavailable, tracing for export, or failed (logged once), take the
eager ops on the tensors as they are.
"""
import contextlib
import logging
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .base import _scaled

logger = logging.getLogger(__name__)

# Set AQDETR_FUSED_QUANT=0 to run the eager ops (e.g. to compare speed, or where no compiler is installed).
_ENABLED = os.environ.get("AQDETR_FUSED_QUANT", "1") != "0"
_failed = False
# Smallest tensors worth a compiled call: below them the eager ops are as fast or faster. The
# compiled forward's guards and wrappers cost ~70-120 us on the 2-core CPU, and its 4 eager ops
# stay in cache up to ~1M elements (1 thread: 136 against 74 us at 256k, 284 against 394 us
# at 1M); the eager backward's 7 ops fall behind from ~64k (98 against 216 us). So batch-1
# inference runs eagerly and compiles nothing, and training compiles its large tensors.
_MIN_NUMEL_FORWARD = 1 << 20
_MIN_NUMEL_BACKWARD = 1 << 15
# Devices whose compiled kernels were checked bit-equal to the eager ops (tests/quant/test_fused.py).
# CUDA (Triton kernels) joins once those tests have passed on a GPU; until then it runs the eager ops.
_CHECKED_DEVICES = ("cpu",)


def _forward(x: Tensor, scale: Tensor, inv_scale: Tensor, offset: Optional[Tensor], qmin, qmax) -> Tensor:
    v = x * inv_scale if offset is None else (x - offset) * inv_scale
    out = torch.clamp(v.round(), qmin, qmax) * scale
    return out if offset is None else out + offset


def _backward(x: Tensor, inv_scale: Tensor, offset: Optional[Tensor], grad: Tensor, qmin, qmax, product: bool):
    """grad_x = grad inside [qmin, qmax], else 0; ds = round(v) - v inside, the clipped bound
    outside (times grad when `product`)."""
    v = x * inv_scale if offset is None else (x - offset) * inv_scale
    clipped = torch.clamp(v, qmin, qmax)
    inside = clipped == v
    grad_x = torch.where(inside, grad, 0.0)
    ds = clipped.round() - v * inside
    return grad_x, (grad * ds if product else ds)


_compiled_forward = torch.compile(_forward, dynamic=True)
_compiled_backward = torch.compile(_backward, dynamic=True)
# One graph per layout (per tensor / per channel, with or without offset, sizes of 1 specialised):
# up to about a dozen per function, above Dynamo's default limit of 8, past which it would
# silently run the rest eagerly.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)


@contextlib.contextmanager
def eager_ops():
    """Within the block every quantizer runs the eager ops (to measure what fusion saves)."""
    global _ENABLED
    enabled, _ENABLED = _ENABLED, False
    try:
        yield
    finally:
        _ENABLED = enabled


def _use_compiled(x: Tensor, min_numel: int) -> bool:
    return (_ENABLED and not _failed and x.numel() >= min_numel and x.device.type in _CHECKED_DEVICES
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling())


def _compiled_call(compiled, *args):
    """`compiled(*args)` on detached tensors, or None (logged once) where compilation fails."""
    global _failed
    try:
        # Detached: the saved input of the autograd function requires grad, the forward's does not.
        return compiled(*(a.detach() if isinstance(a, Tensor) else a for a in args))
    except Exception as e:  # no C++ compiler, unsupported device, ...: the same ops, eagerly
        _failed = True
        logger.warning("Fused fake quantization is unavailable (%s: %s); using eager ops, which are "
                       "slower but give the same numbers", type(e).__name__, str(e).splitlines()[0])
        return None


def compiled_or_none(compiled, x: Tensor, min_numel: int, *args):
    """`compiled(x, *args)` when x is large enough and fusion is on for its device (the rules above),
    else None: the caller then runs its eager ops. For other modules' fused elementwise kernels."""
    if not _use_compiled(x, min_numel):
        return None
    return _compiled_call(compiled, x, *args)


def _memory_order(x: Tensor) -> Tuple[int, ...]:
    """The permutation of x's dimensions that is contiguous in memory (identity when x is
    contiguous), so that results keep x's strides, as eager elementwise ops do: reductions of
    them then add in the same order."""
    if x.is_contiguous():
        return tuple(range(x.dim()))
    order = tuple(sorted(range(x.dim()), key=lambda d: -x.stride(d)))
    return order if x.permute(order).is_contiguous() else tuple(range(x.dim()))


class _Layout:
    """x (in memory order) as (N,) for a per-tensor parameter, or as (outer, C, inner) for a
    (C,) parameter viewed to broadcast along one axis of x."""

    def __init__(self, x: Tensor, param: Tensor):
        self.order = _memory_order(x)
        self.inverse = tuple(sorted(range(x.dim()), key=self.order.__getitem__))
        self.permuted = x.permute(self.order).shape
        if param.numel() == 1:
            self.flat, self.param = (-1,), (1,)
        else:
            axis = next(i for i, n in enumerate(param.permute(self.order).shape) if n != 1)
            channels = self.permuted[axis]
            self.flat, self.param = (-1, channels, self.permuted[axis + 1:].numel()), (1, channels, 1)

    def flatten(self, t: Tensor) -> Tensor:
        return t.permute(self.order).contiguous().view(self.flat)

    def restore(self, t: Tensor) -> Tensor:
        return t.view(self.permuted).permute(self.inverse)

    def param_view(self, t: Optional[Tensor]) -> Optional[Tensor]:
        if t is None:
            return None
        return t.reshape(self.param) if t.numel() == 1 else t.permute(self.order).reshape(self.param)


def _bounds(qmin: int, qmax: int, like: Tensor) -> Tuple[Tensor, Tensor]:
    return (torch.tensor(float(qmin), dtype=like.dtype, device=like.device),
            torch.tensor(float(qmax), dtype=like.dtype, device=like.device))


def fake_quantize(x: Tensor, scale: Tensor, offset: Optional[Tensor], qmin: int, qmax: int,
                  inv_scale: Optional[Tensor] = None) -> Tensor:
    """s * clamp(round((x - b) / s), qmin, qmax) + b with s = `scale` (already clamped), b =
    `offset` (or None); both viewed to x's rank, broadcast per tensor or along one axis.
    `inv_scale`, 1 / s computed by the caller (inference caches it), saves an op per call."""
    if _use_compiled(x, _MIN_NUMEL_FORWARD):
        layout = _Layout(x, scale)
        s = layout.param_view(scale)
        out = _compiled_call(_compiled_forward, layout.flatten(x), s, 1.0 / s, layout.param_view(offset),
                             *_bounds(qmin, qmax, x))
        if out is not None:
            return layout.restore(out)
    # In place after the first op: one allocation, which matters on the many small tensors.
    out = _scaled(x, scale, offset, inv_scale).round_().clamp_(qmin, qmax).mul_(scale)
    return out if offset is None else out.add_(offset)


def lsq_backward_terms(x: Tensor, scale: Tensor, offset: Optional[Tensor], grad: Tensor, qmin: int, qmax: int,
                       product: bool) -> Tuple[Tensor, Tensor]:
    """The elementwise part of the LSQ backward (see `_backward`), with the strides eager ops give."""
    if _use_compiled(x, _MIN_NUMEL_BACKWARD):
        layout = _Layout(x, scale)
        out = _compiled_call(_compiled_backward, layout.flatten(x), 1.0 / layout.param_view(scale),
                             layout.param_view(offset), layout.flatten(grad), *_bounds(qmin, qmax, x), product)
        if out is not None:
            grad_x, ds = layout.restore(out[0]), layout.restore(out[1])
            if product and _memory_order(grad) != layout.order:
                # Eager `grad * ds` takes grad's strides (its first operand's); the reduction of
                # the product adds in that order.
                ds = torch.empty_like(grad).copy_(ds)
            return grad_x, ds
    return _backward(x, 1.0 / scale, offset, grad, qmin, qmax, product)
