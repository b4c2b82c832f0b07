"""LSQ / LSQ+ fake quantization: learned step sizes (and offsets), with the LSQ gradients."""
import math
from typing import Optional

import torch
from torch import nn

from .base import QuantizerBase, _scaled
from .fused import fake_quantize, lsq_backward_terms

# LSQ step-size initialisations: the LSQ paper's rule, or the least squared error.
LSQ_INITS = ("lsq", "mse")
# The "mse" search: points of its coarse and of its fine grid, and elements per step size it
# reads (evenly strided).
_MSE_GRID = 32
_MSE_SAMPLES = 2**18


class _LSQFunction(torch.autograd.Function):
    """
    LSQ / LSQ+ fake quantization with the LSQ gradients.

    Forward: x_hat = s * clamp(round((x - b) / s), Qn, Qp) + b.
    Backward (v = (x - b) / s):
        dx = 1 inside [Qn, Qp], else 0 (straight-through rounding);
        ds = g * (round(v) - v) inside, g * Qn below, g * Qp above;
        db = g * (0 inside, 1 outside).
    Only x, s and b are saved, not the intermediates: attention tensors are large.
    `scale` is used clamped to >= eps and receives the gradient of the clamped value, so a
    step size pushed below eps can still recover.
    """

    @staticmethod
    def forward(ctx, x, scale, offset, qmin, qmax, grad_factor, eps):
        ctx.save_for_backward(x, scale, offset)
        ctx.qrange = (qmin, qmax)
        ctx.grad_factor = grad_factor
        ctx.eps = eps
        return fake_quantize(x, scale.clamp_min(eps), offset, qmin, qmax)

    @staticmethod
    def backward(ctx, grad):
        # The elementwise terms come from one fused kernel (fused.py): as a chain of eager ops
        # this backward was ~30% of a quantized DETR training step on a CPU. The reductions
        # stay eager, in the order they always had.
        x, scale, offset = ctx.saved_tensors
        per_tensor = scale.numel() == 1
        grad_x, ds = lsq_backward_terms(x, scale.clamp_min(ctx.eps), offset, grad, *ctx.qrange,
                                        product=not per_tensor)
        grad_scale = grad_offset = None
        if ctx.needs_input_grad[1]:
            # ds: round(v) - v inside, the clipped bound outside (per channel, times grad).
            if per_tensor:
                grad_scale = torch.dot(grad.reshape(-1), ds.reshape(-1)).reshape(scale.shape)
            else:
                grad_scale = ds.sum_to_size(scale.shape)
            grad_scale = grad_scale * ctx.grad_factor
        if offset is not None and ctx.needs_input_grad[2]:
            # The offset's gradient is the upstream gradient of the clipped elements.
            grad_offset = (grad.sum_to_size(offset.shape) - grad_x.sum_to_size(offset.shape)) * ctx.grad_factor
        return (grad_x if ctx.needs_input_grad[0] else None), grad_scale, grad_offset, None, None, None, None


class LSQQuantizer(QuantizerBase):
    """
    Learned step size quantization (Esser et al. 2020), with an optional learnable offset
    (LSQ+, Bhalgat et al. 2020) for asymmetric activations.

    Initialisation ("lsq"): s = 2 * mean(|x|) / sqrt(Qp) per step size. With an offset b:
    unsigned, b = min(x) and s = 2 * mean(x - b) / sqrt(Qp) (the smallest value gets code 0);
    signed, b = (min(x) + max(x)) / 2 and s = 2 * mean(|x|) / sqrt(Qp).
    Initialisation "mse" (no offset): per calibration batch, the step size that minimises the
    squared quantization error over a geometric grid from a quarter of the "lsq" step to the
    step that clips nothing, averaged over batches. The "lsq" rule suits bell-shaped tensors;
    on softmax outputs (mean 1 / keys, peaks near 1) it clips every peak.
    The step-size gradient is scaled by g = 1 / sqrt(N * Qp), N = elements per step size.

    Args:
        bits: 2, 3, 4, 8, or 32 (identity).
        signed: signed range if True, unsigned (e.g. after ReLU / softmax) if False.
        granularity: "tensor", "channel" (weights, ch_axis 0) or "head" (ch_axis 1).
        ch_axis: axis holding the channels / heads; negative values count from the end.
        num_channels: size of that axis; may be left None and is then taken on first use.
        learnable_offset: add the LSQ+ offset.
        eps: lower bound of the step size used in the forward pass.
        init: step-size initialisation, "lsq" or "mse" (see above).
    """

    def __init__(
        self,
        bits: int,
        signed: bool = True,
        granularity: str = "tensor",
        ch_axis: Optional[int] = None,
        num_channels: Optional[int] = None,
        learnable_offset: bool = False,
        eps: float = 1e-8,
        init: str = "lsq",
    ):
        super().__init__(bits, signed, granularity, ch_axis, num_channels)
        if init not in LSQ_INITS:
            raise ValueError(f"init must be one of {LSQ_INITS}; got {init!r}")
        if init == "mse" and learnable_offset:
            raise ValueError('init="mse" searches the step size alone; it cannot initialise an LSQ+ offset')
        self.learnable_offset = learnable_offset
        self.eps = eps
        self.init = init
        self._scale_cache = None  # see _inference_scales
        if self.enabled:
            shape = self._qparam_shape(num_channels)
            self.scale = nn.Parameter(torch.ones(shape))
            self.offset = nn.Parameter(torch.zeros(shape)) if learnable_offset else None

    def _qparam_names(self):
        return ("scale", "offset") if self.learnable_offset else ("scale",)

    def _stats(self, flat):
        stats = {
            "abs_sum": (flat.abs().sum(1, dtype=torch.float32), "sum"),
            "count": (flat.new_full((flat.shape[0],), flat.shape[1], dtype=torch.float32), "sum"),
        }
        if self.learnable_offset:
            stats["sum"] = (flat.sum(1, dtype=torch.float32), "sum")
            stats["min"] = (flat.amin(1).float(), "min")
            stats["max"] = (flat.amax(1).float(), "max")
        if self.init == "mse":
            stats["mse_scale_sum"] = (self._least_squares_scale(flat), "sum")
            stats["batches"] = (flat.new_ones(flat.shape[0], dtype=torch.float32), "sum")
        return stats

    def _least_squares_scale(self, flat: torch.Tensor) -> torch.Tensor:
        """(C,) step sizes of least squared quantization error for the rows of flat (C, N): a
        geometric grid from a quarter of the "lsq" step to the step that clips nothing, then a
        finer one between the best point's neighbours."""
        x = flat[:, :: max(1, flat.shape[1] // _MSE_SAMPLES)].float()
        lsq = (2 * x.abs().mean(1) / math.sqrt(self.qmax)).clamp_min(self.eps)
        low, high = lsq / 4, torch.maximum(x.abs().amax(1) / self.qmax, lsq)
        fractions = torch.linspace(0, 1, _MSE_GRID, device=x.device)
        for _ in range(2):
            grid = low[:, None] * (high / low)[:, None] ** fractions
            errors = torch.stack([
                (x / s[:, None]).round_().clamp_(self.qmin, self.qmax).mul_(s[:, None]).sub_(x).square_().sum(1)
                for s in grid.unbind(1)
            ], 1)
            best = errors.argmin(1, keepdim=True)
            low = grid.gather(1, (best - 1).clamp_min(0)).squeeze(1)
            high = grid.gather(1, (best + 1).clamp_max(_MSE_GRID - 1)).squeeze(1)
        return grid.gather(1, best).squeeze(1)

    def _set_qparams(self, stats):
        if self.init == "mse":
            self.scale.copy_((stats["mse_scale_sum"] / stats["batches"]).clamp_min(self.eps))
            return
        spread = stats["abs_sum"] / stats["count"]
        if self.learnable_offset:
            if self.signed:
                offset = (stats["min"] + stats["max"]) / 2
            else:
                offset = stats["min"]
                # mean(x - min) is mean(|x - min|), exactly, since x >= min.
                spread = stats["sum"] / stats["count"] - offset
            self.offset.copy_(offset)
        self.scale.copy_((2 * spread / math.sqrt(self.qmax)).clamp_min(self.eps))

    def _fake_quantize(self, x):
        offset = None if self.offset is None else self._view(self.offset, x)
        if not torch.is_grad_enabled():
            # Inference: the same arithmetic without the autograd.Function's per-call overhead,
            # which dominates on the many small activations of a detector.
            scale, inv_scale = self._inference_scales(x)
            return fake_quantize(x, scale, offset, self.qmin, self.qmax, inv_scale)
        grad_factor = 1.0 / math.sqrt(x.numel() / self.scale.numel() * self.qmax)
        return _LSQFunction.apply(
            x, self._view(self.scale, x), offset, self.qmin, self.qmax, grad_factor, self.eps
        )

    def _inference_scales(self, x):
        """The clamped step size viewed to x's rank, and its reciprocal: cached while the step size
        is unchanged (an optimizer step, a load or a device move changes its storage or version),
        which saves two of the six ops of a batch-1 inference call."""
        step = self.scale  # one Module attribute lookup: this runs on every inference call
        key = (x.dim(), step.data_ptr(), step._version, step.dtype, step.device)
        if self._scale_cache is None or self._scale_cache[0] != key:
            scale = self._view(step, x).clamp_min(self.eps)
            self._scale_cache = (key, scale, 1.0 / scale)
        return self._scale_cache[1:]

    @torch.no_grad()
    def quantize_to_int(self, x):
        self._check_enabled()
        self._ensure_initialized(x)
        scale = self.step_size()
        offset = None if self.offset is None else self._view(self.offset, x)
        codes = _scaled(x, self._view(scale, x), offset).round_().clamp_(self.qmin, self.qmax)
        if self.offset is None:
            zero_point = torch.zeros_like(scale, dtype=torch.int32)
        else:
            # Not an integer: deployment folds offset = -zero_point * scale into the next bias.
            zero_point = -self.offset / scale
        return codes.to(self._code_dtype()), scale, zero_point

    def step_size(self):
        return self.scale.clamp_min(self.eps)

    def extra_repr(self):
        return (super().extra_repr() + (", learnable_offset=True" if self.learnable_offset else "")
                + (f", init={self.init}" if self.init != "lsq" else ""))


class LSQPlusQuantizer(LSQQuantizer):
    """LSQ+ : `LSQQuantizer` with the learnable offset on."""

    def __init__(self, bits: int, **kwargs):
        kwargs.setdefault("learnable_offset", True)
        super().__init__(bits, **kwargs)
