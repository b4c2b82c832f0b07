"""
Fake quantizers: LSQ / LSQ+ (learned step size) and a min-max observer baseline.

A quantizer maps x to what an integer kernel would compute with,
    x_hat = s * clamp(round((x - offset) / s), Qn, Qp) + offset,
with signed range [-2^(b-1), 2^(b-1) - 1] or unsigned range [0, 2^b - 1]. One step size per
tensor, or one per slice along `ch_axis` (output channels of a weight, heads of an attention
tensor). Its state (step size, offset, whether it has been initialised) lives in the
state_dict, so a checkpoint resumes exactly and a fresh model loads it without a forward pass.
32 bits means "off": the quantizer is the identity and holds no state.
"""
import math
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

VALID_BITS = (2, 3, 4, 8, 32)
GRANULARITIES = ("tensor", "channel", "head")
# LSQ step-size initialisations: the LSQ paper's rule, or the least squared error.
LSQ_INITS = ("lsq", "mse")
# The "mse" search: points of its coarse and of its fine grid, and elements per step size it
# reads (evenly strided).
_MSE_GRID = 32
_MSE_SAMPLES = 2**18

# Neutral element of each reduction, for a DDP rank that saw no data during calibration.
_NEUTRAL = {"sum": 0.0, "min": math.inf, "max": -math.inf}
_MERGE = {"sum": torch.add, "min": torch.minimum, "max": torch.maximum}


def check_bits(bits, what: str = "bits") -> int:
    """Return `bits` if it is a supported bit width, else raise a ValueError naming `what`."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise ValueError(f"{what} must be one of 2, 3, 4, 8, 32; got {bits!r}")
    return bits


def quant_range(bits: int, signed: bool) -> Tuple[int, int]:
    """Integer range (Qn, Qp) of a `bits`-bit code."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class BitWidthMismatchError(ValueError):
    """A checkpoint's quantizer was trained at another bit width than the model's."""


class QuantizerBase(nn.Module):
    """
    Range, granularity and data-driven initialisation shared by all quantizers.

    A quantizer is initialised from data once: from the first tensor it sees (the weight
    itself for weight quantizers), or from every tensor seen between `start_calibration()`
    and `finish_calibration()`. Statistics are summed over batches and over DDP ranks, so
    every rank ends up with the same parameters. While calibrating the input passes through
    unquantized.

    Subclasses define `_stats(flat)`, `_set_qparams(stats)`, `_fake_quantize(x)`,
    `quantize_to_int(x)` and list their per-channel tensors in `_qparam_names()`.
    """

    def __init__(
        self,
        bits: int,
        signed: bool = True,
        granularity: str = "tensor",
        ch_axis: Optional[int] = None,
        num_channels: Optional[int] = None,
    ):
        super().__init__()
        check_bits(bits)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}; got {granularity!r}")
        self.bits = bits
        self.signed = signed
        self.granularity = granularity
        # Weights are (C_out, ...): channel axis 0. Attention tensors are (B, H, L, d): head axis 1.
        self.ch_axis = (0 if granularity == "channel" else 1) if ch_axis is None else ch_axis
        self.qmin, self.qmax = quant_range(bits, signed)
        self._calibrating = False
        self._accumulated: Optional[Dict[str, Tuple[torch.Tensor, str]]] = None
        # Python mirror of the `initialized` buffer: reading the buffer in every forward would
        # synchronise the device.
        self._ready = False
        if self.enabled:
            self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8))
            # Saved so that a checkpoint's step sizes are never used with another bit width.
            self.register_buffer("bit_width", torch.tensor(bits, dtype=torch.uint8))

    @property
    def enabled(self) -> bool:
        return self.bits < 32

    @property
    def per_tensor(self) -> bool:
        return self.granularity == "tensor"

    def _qparam_shape(self, num_channels: Optional[int]) -> Tuple[int]:
        # A per-channel quantizer whose channel count is unknown starts with an empty tensor,
        # sized in place on first use or by load_state_dict. Pass num_channels for DDP, which
        # fixes parameter shapes when it wraps the model, and for Detectron2's checkpointer,
        # which drops checkpoint tensors whose shape differs from the model's.
        return (1,) if self.per_tensor else (num_channels or 0,)

    def _qparam_names(self) -> Tuple[str, ...]:
        raise NotImplementedError

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Reshape a (C,) parameter to broadcast against x along `ch_axis`."""
        if self.per_tensor:
            return t
        shape = [1] * x.dim()
        shape[self.ch_axis % x.dim()] = -1
        return t.view(shape)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        """x as (C, N): one row per step size (C = 1 per tensor)."""
        if self.per_tensor:
            return x.reshape(1, -1)
        return x.movedim(self.ch_axis % x.dim(), 0).reshape(x.shape[self.ch_axis], -1)

    def _match_channels(self, num_channels: int):
        for name in self._qparam_names():
            t = getattr(self, name)
            if t.numel() == 0:
                # `.data` keeps the Parameter object, so an optimizer built before the first
                # forward still holds it.
                t.data = t.new_ones(num_channels) if name == "scale" else t.new_zeros(num_channels)
            elif t.numel() != num_channels:
                raise ValueError(
                    f"{type(self).__name__} has {t.numel()} step sizes but the input has "
                    f"{num_channels} channels along axis {self.ch_axis}"
                )

    # ---------------------------------------------------------------- initialisation
    def start_calibration(self):
        """Observe instead of quantize until `finish_calibration()`."""
        self._calibrating = True
        self._accumulated = None

    def finish_calibration(self):
        """Set the quantization parameters from everything observed since `start_calibration()`.

        Under torch.distributed every rank must call this, in the same order for all
        quantizers: statistics are reduced across ranks.
        """
        self._calibrating = False
        self._finalize()

    def cancel_calibration(self):
        """Stop observing and forget the statistics; the parameters stay as they were."""
        self._calibrating = False
        self._accumulated = None

    def _observe(self, x: torch.Tensor):
        x = x.detach()
        if not self.per_tensor:
            self._match_channels(x.shape[self.ch_axis])
        stats = self._stats(self._flat(x))
        if self._accumulated is None:
            self._accumulated = stats
        else:
            self._accumulated = {
                k: (_MERGE[op](self._accumulated[k][0], t), op) for k, (t, op) in stats.items()
            }

    def _finalize(self):
        stats, self._accumulated = self._accumulated, None
        if _distributed():
            # Ranks that saw no data still take part in the reductions, with neutral values.
            anchor = self.initialized
            seen = torch.tensor([float(stats is not None)], device=anchor.device)
            dist.all_reduce(seen)
            if seen.item() == 0:
                return
            if stats is None:
                stats = self._neutral_stats(anchor.device)
            for t, op in stats.values():
                dist.all_reduce(t, op=getattr(dist.ReduceOp, op.upper()))
        if stats is None:
            return
        with torch.no_grad():
            self._set_qparams({k: t for k, (t, _) in stats.items()})
            self.initialized.fill_(1)
        self._ready = True

    def _neutral_stats(self, device) -> Dict[str, Tuple[torch.Tensor, str]]:
        num_channels = getattr(self, self._qparam_names()[0]).numel()
        if num_channels == 0:
            raise RuntimeError(
                f"{type(self).__name__}: this rank saw no data and does not know the number of "
                "channels; construct the quantizer with num_channels"
            )
        probe = self._stats(torch.zeros(num_channels, 1, device=device))
        return {k: (torch.full_like(t, _NEUTRAL[op]), op) for k, (t, op) in probe.items()}

    def _stats(self, flat: torch.Tensor) -> Dict[str, Tuple[torch.Tensor, str]]:
        """Per-row statistics of flat (C, N), each (C,) float32 with its reduction op."""
        raise NotImplementedError

    def _set_qparams(self, stats: Dict[str, torch.Tensor]):
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.enabled:
            # Checkpoints and exports from before the bit width was saved load as they did.
            saved_bits = int(state_dict.setdefault(prefix + "bit_width", self.bit_width))
            if saved_bits != self.bits:
                raise BitWidthMismatchError(f"{prefix.rstrip('.')} is {saved_bits}-bit in the checkpoint and "
                                            f"{self.bits}-bit in the config")
        # A lazily sized quantizer takes its channel count from the checkpoint.
        for name in self._qparam_names() if self.enabled else ():
            saved = state_dict.get(prefix + name)
            if saved is not None and getattr(self, name).numel() == 0:
                self._match_channels(saved.numel())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.enabled:
            self._ready = bool(self.initialized)

    # ---------------------------------------------------------------- quantization
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize x (any shape; ch_axis indexes the channels). Returns x's shape."""
        # An empty tensor has nothing to quantize and would initialise a NaN step size.
        if not self.enabled or x.numel() == 0:
            return x
        if self._calibrating:
            self._observe(x)
            return x
        self._ensure_initialized(x)
        return self._fake_quantize(x)

    def _ensure_initialized(self, x: torch.Tensor):
        if not self._ready:
            self._observe(x)
            self._finalize()

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def quantize_to_int(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Integer codes of x, with x_hat = (codes - zero_point) * scale.

        Returns codes (x's shape; int8 if signed else uint8), scale (C,) and zero_point (C,),
        C = 1 per tensor; scale and zero_point broadcast along `ch_axis`.
        """
        raise NotImplementedError

    def _check_enabled(self):
        if not self.enabled:
            raise ValueError("a 32-bit quantizer is disabled and has no integer codes")

    def _code_dtype(self) -> torch.dtype:
        return torch.int8 if self.signed else torch.uint8

    def extra_repr(self) -> str:
        s = f"bits={self.bits}, signed={self.signed}, granularity={self.granularity}"
        if not self.per_tensor:
            s += f", ch_axis={self.ch_axis}"
        return s


def _scaled(x: torch.Tensor, scale: torch.Tensor, offset: Optional[torch.Tensor]) -> torch.Tensor:
    # Multiplying by the reciprocal, as PyTorch's fake-quantize kernels do, keeps rounding ties
    # identical to torch.fake_quantize_per_*_affine.
    inv_scale = 1.0 / scale
    return x * inv_scale if offset is None else (x - offset) * inv_scale


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
        s = scale.clamp_min(eps)
        out = _scaled(x, s, offset).round_().clamp_(qmin, qmax).mul_(s)
        return out if offset is None else out.add_(offset)

    @staticmethod
    def backward(ctx, grad):
        # Few passes over x and no bool-to-float promotions: on a CPU this backward was ~40% of
        # a quantized DETR training step.
        x, scale, offset = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        v = _scaled(x, scale.clamp_min(ctx.eps), offset)
        clipped = v.clamp(qmin, qmax)
        inside = clipped == v
        grad_x = torch.where(inside, grad, 0.0)
        grad_scale = grad_offset = None
        if ctx.needs_input_grad[1]:
            # round(v) - v inside; the clipped bound outside.
            ds = clipped.round_().sub_(v.mul_(inside))
            if scale.numel() == 1:
                grad_scale = torch.dot(grad.reshape(-1), ds.reshape(-1)).reshape(scale.shape)
            else:
                grad_scale = (grad * ds).sum_to_size(scale.shape)
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
            s = self._view(self.scale, x).clamp_min(self.eps)
            out = _scaled(x, s, offset).round_().clamp_(self.qmin, self.qmax).mul_(s)
            return out if offset is None else out.add_(offset)
        grad_factor = 1.0 / math.sqrt(x.numel() / self.scale.numel() * self.qmax)
        return _LSQFunction.apply(
            x, self._view(self.scale, x), offset, self.qmin, self.qmax, grad_factor, self.eps
        )

    @torch.no_grad()
    def quantize_to_int(self, x):
        self._check_enabled()
        self._ensure_initialized(x)
        scale = self.scale.clamp_min(self.eps)
        offset = None if self.offset is None else self._view(self.offset, x)
        codes = _scaled(x, self._view(scale, x), offset).round_().clamp_(self.qmin, self.qmax)
        if self.offset is None:
            zero_point = torch.zeros_like(scale, dtype=torch.int32)
        else:
            # Not an integer: deployment folds offset = -zero_point * scale into the next bias.
            zero_point = -self.offset / scale
        return codes.to(self._code_dtype()), scale, zero_point

    def extra_repr(self):
        return (super().extra_repr() + (", learnable_offset=True" if self.learnable_offset else "")
                + (f", init={self.init}" if self.init != "lsq" else ""))


class LSQPlusQuantizer(LSQQuantizer):
    """LSQ+ : `LSQQuantizer` with the learnable offset on."""

    def __init__(self, bits: int, **kwargs):
        kwargs.setdefault("learnable_offset", True)
        super().__init__(bits, **kwargs)


class MinMaxQuantizer(QuantizerBase):
    """
    Post-training quantization baseline: fixed scale and zero point from observed ranges.

    observer="minmax" takes the minimum / maximum over all observed data; "percentile" the
    mean over batches of the `percentile`-th and (100 - `percentile`)-th percentiles. The
    range is widened to contain 0. Signed: symmetric, scale = max(|lo|, |hi|) / Qp, zero
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
        observer: str = "minmax",
        percentile: float = 99.99,
        eps: float = 1e-8,
    ):
        super().__init__(bits, signed, granularity, ch_axis, num_channels)
        if observer not in ("minmax", "percentile"):
            raise ValueError(f"observer must be 'minmax' or 'percentile'; got {observer!r}")
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100]; got {percentile}")
        self.observer = observer
        self.percentile = percentile
        self.eps = eps
        if self.enabled:
            shape = self._qparam_shape(num_channels)
            self.register_buffer("scale", torch.ones(shape))
            self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))

    def _qparam_names(self):
        return ("scale", "zero_point")

    def _stats(self, flat):
        if self.observer == "minmax":
            return {"min": (flat.amin(1).float(), "min"), "max": (flat.amax(1).float(), "max")}
        n = flat.shape[1]
        k = min(max(math.ceil(self.percentile / 100.0 * n), 1), n)
        flat = flat.float()
        return {
            "lo_sum": (flat.kthvalue(n - k + 1, dim=1).values, "sum"),
            "hi_sum": (flat.kthvalue(k, dim=1).values, "sum"),
            "batches": (flat.new_ones(flat.shape[0]), "sum"),
        }

    def _set_qparams(self, stats):
        if self.observer == "minmax":
            lo, hi = stats["min"], stats["max"]
        else:
            lo, hi = stats["lo_sum"] / stats["batches"], stats["hi_sum"] / stats["batches"]
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
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

    def extra_repr(self):
        return super().extra_repr() + f", observer={self.observer}"


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
