"""
What every fake quantizer shares: bit widths and integer ranges, granularity (per tensor, per
channel, per head), data-driven initialisation (reduced over batches and DDP ranks) and the
state that makes a checkpoint resume exactly. The quantizers themselves: lsq.py, minmax.py.
"""
import math
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

VALID_BITS = (2, 3, 4, 8, 32)
GRANULARITIES = ("tensor", "channel", "head")
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

    @property
    def quantizing(self) -> bool:
        """Whether forward quantizes: enabled, initialised and not calibrating."""
        return self.enabled and self._ready and not self._calibrating

    def step_size(self) -> torch.Tensor:
        """Step sizes, (C,) (C = 1 per tensor), as `quantize_to_int` returns them."""
        return self.scale

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


def _scaled(x: torch.Tensor, scale: torch.Tensor, offset: Optional[torch.Tensor],
            inv_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    # Multiplying by the reciprocal, as PyTorch's fake-quantize kernels do, keeps rounding ties
    # identical to torch.fake_quantize_per_*_affine. `inv_scale`: 1 / scale, when the caller has it.
    if inv_scale is None:
        inv_scale = 1.0 / scale
    return x * inv_scale if offset is None else (x - offset) * inv_scale
