"""
Turn a float model into a fake-quantized one by swapping modules in place.

nn.Linear -> QuantLinear, nn.Conv2d (incl. Detectron2's Conv2d) -> QuantConv2d, and the
attention quantization points (`nn.Identity` attributes named as in attention.QUANT_POINTS)
-> quantizers. Parameters are shared with the float modules, so the converted model loads
float checkpoints and its own checkpoints (quantizer state included) unchanged.
"""
import difflib
import logging
from collections import Counter
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Dict, List, Sequence, Tuple

from torch import nn

from .attention import QUANT_POINTS, point_quantizer
from .integer_bias import norm_folds_in_training
from .modules import QuantConv2d, QuantLinear
from .quantizers import LSQ_INITS, QUANTIZER_REGISTRY, QuantizerBase, build_quantizer, check_bits

logger = logging.getLogger(__name__)

_PATTERN_FIELDS = (
    "conv_patterns",
    "linear_patterns",
    "attn_patterns",
    "keep_fp_patterns",
    "int8_patterns",
    "unsigned_act_patterns",
)


@dataclass
class QuantConfig:
    """
    What `quantize_model` quantizes, and how.

    Patterns are case-sensitive fnmatch globs on module names as in `model.named_modules()`
    (e.g. "backbone.*", "transformer.decoder.layers.*.linear2"); a pattern selects a module
    when it matches the module's name or the name of one of its ancestors. Every pattern
    must select at least one module.

    Attributes:
        weight_bits, act_bits, attn_bits: 2, 3, 4, 8 or 32 (off), for layer weights (per
            output channel), layer inputs (per tensor) and attention quantization points.
        quantizer: "lsq", "lsq+" (LSQ with an offset on activations) or "minmax".
        learnable_offset: give activation and attention quantizers the LSQ+ offset (as
            quantizer="lsq+" does). Weights are always quantized symmetrically.
        conv_patterns, linear_patterns, attn_patterns: which Conv2d / Linear modules /
            attention quantization points to quantize.
        keep_fp_patterns: modules left in full precision, whatever the patterns above say.
        int8_patterns: modules quantized with at least 8 bits (e.g. the stem conv).
        unsigned_act_patterns: layers whose input is non-negative (e.g. after a ReLU): their
            input quantizer uses the unsigned range.
        attn_per_head: one step size per head for attention tensors, else one per tensor.
        attn_prob_init: LSQ step-size initialisation of the softmax outputs (attention
            probabilities, deformable attention weights): "lsq" (the LSQ rule) or "mse".
        integer_bias: quantized convolutions fold their frozen batch norm and round their bias
            as their integer (ONNX) form does (`QuantConv2d.integer_bias`).
    """

    weight_bits: int = 4
    act_bits: int = 4
    attn_bits: int = 4
    quantizer: str = "lsq"
    learnable_offset: bool = False
    conv_patterns: Sequence[str] = ("*",)
    linear_patterns: Sequence[str] = ("*",)
    attn_patterns: Sequence[str] = ("*",)
    keep_fp_patterns: Sequence[str] = ()
    int8_patterns: Sequence[str] = ()
    unsigned_act_patterns: Sequence[str] = ()
    attn_per_head: bool = True
    attn_prob_init: str = "lsq"
    integer_bias: bool = False

    def __post_init__(self):
        check_bits(self.weight_bits, "WEIGHT_BITS")
        check_bits(self.act_bits, "ACT_BITS")
        check_bits(self.attn_bits, "ATTN_BITS")
        if self.quantizer not in QUANTIZER_REGISTRY:
            raise ValueError(
                f"quantizer must be one of {sorted(QUANTIZER_REGISTRY)}; got {self.quantizer!r}"
            )
        if self.learnable_offset and self.quantizer == "minmax":
            raise ValueError("learnable_offset needs an LSQ quantizer; got quantizer='minmax'")
        if self.attn_prob_init not in LSQ_INITS:
            raise ValueError(f"attn_prob_init (MODEL.QUANT.ATTN_PROB_INIT) must be one of {LSQ_INITS}; "
                             f"got {self.attn_prob_init!r}")
        if self.attn_prob_init != "lsq" and self.act_quantizer != "lsq":
            raise ValueError(f"attn_prob_init (MODEL.QUANT.ATTN_PROB_INIT) {self.attn_prob_init!r} initialises "
                             "LSQ step sizes without an offset; use quantizer 'lsq' without learnable_offset, "
                             "or attn_prob_init 'lsq'")
        for name in _PATTERN_FIELDS:
            value = getattr(self, name)
            # A bare string would be iterated character by character.
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise ValueError(f"{name} must be a list of glob patterns; got {value!r}")
            setattr(self, name, tuple(value))

    @property
    def weight_quantizer(self) -> str:
        # LSQ+ keeps weights symmetric: its offset is for activations.
        return "lsq" if self.quantizer == "lsq+" else self.quantizer

    @property
    def act_quantizer(self) -> str:
        return "lsq+" if self.learnable_offset else self.quantizer


def selects(names: Sequence[str], patterns: Sequence[str]) -> bool:
    """Whether a pattern matches one of `names` or one of their ancestors."""
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if any(fnmatchcase(prefix, p) for p in patterns):
                return True
    return False


def _references(model: nn.Module) -> Dict[object, Tuple[nn.Module, List[Tuple[nn.Module, str, str]]]]:
    """
    Every module reachable from `model`, with all the (parent, attribute, name) places that
    hold it: a module shared by several parents must be swapped in each. Quantization points
    are keyed by their place instead, so that each gets its own quantizer.
    """
    refs = {}
    seen = set()
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        # Not named_children(): it skips a module held twice by the same parent.
        for attr, child in parent._modules.items():
            if child is None:
                continue
            name = f"{parent_name}.{attr}" if parent_name else attr
            place = (id(parent), attr)
            if place in seen:
                continue
            seen.add(place)
            key = place if _is_point(attr, child) else id(child)
            refs.setdefault(key, (child, []))[1].append((parent, attr, name))
    return refs


def _is_point(attr: str, module: nn.Module) -> bool:
    return attr in QUANT_POINTS and isinstance(module, nn.Identity)


def _check_patterns(qcfg: QuantConfig, names: List[str]):
    for field in _PATTERN_FIELDS:
        for pattern in getattr(qcfg, field):
            if not selects(names, [pattern]):
                close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.5)
                top = sorted({n.split(".")[0] for n in names})[:10]
                raise ValueError(
                    f"{field} pattern {pattern!r} matches no module. Close names: {close}; "
                    f"top-level modules: {top}"
                )


def _check_swappable(module: nn.Module, base: type, name: str):
    # A subclass with its own forward would lose it in the swap. Detectron2's Conv2d only
    # adds norm and activation, which QuantConv2d applies.
    cls = type(module)
    if cls.forward is base.forward or cls.__module__.startswith("detectron2.layers"):
        return
    raise ValueError(
        f"{name} is a {cls.__qualname__}, a {base.__name__} subclass with its own forward; "
        "converting it would drop that forward. Keep it float with keep_fp_patterns."
    )


def _device_of(module: nn.Module):
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return None if tensor is None else tensor.device


def _quantize_layer(module: nn.Module, names: List[str], qcfg: QuantConfig) -> nn.Module:
    weight_bits, act_bits = qcfg.weight_bits, qcfg.act_bits
    if selects(names, qcfg.int8_patterns):
        weight_bits, act_bits = max(weight_bits, 8), max(act_bits, 8)
    device = module.weight.device
    w_quantizer = build_quantizer(
        qcfg.weight_quantizer,
        weight_bits,
        signed=True,
        granularity="channel",
        ch_axis=0,
        num_channels=module.weight.shape[0],
    ).to(device)
    a_quantizer = build_quantizer(
        qcfg.act_quantizer,
        act_bits,
        signed=not selects(names, qcfg.unsigned_act_patterns),
        granularity="tensor",
    ).to(device)
    if not isinstance(module, nn.Conv2d):
        return QuantLinear.from_float(module, w_quantizer, a_quantizer)
    conv = QuantConv2d.from_float(module, w_quantizer, a_quantizer)
    if qcfg.integer_bias:
        norm = getattr(module, "norm", None)
        if not norm_folds_in_training(norm):
            raise ValueError(f"{names[0]}: MODEL.QUANT.INTEGER_BIAS folds batch norms into convolutions in "
                             f"training, which needs frozen statistics, not a {type(norm).__name__}; use "
                             "FrozenBN (MODEL.RESNETS.NORM 'FrozenBN') or INTEGER_BIAS False")
        conv.integer_bias = True
    return conv


def _quantize_point(parent: nn.Module, point: str, names: List[str], qcfg: QuantConfig) -> nn.Module:
    bits = qcfg.attn_bits
    if selects(names, qcfg.int8_patterns):
        bits = max(bits, 8)
    num_heads = getattr(parent, "num_heads", None) or getattr(parent, "n_heads", None)
    if qcfg.attn_per_head and num_heads is None:
        # Parameter shapes must be known before DDP wraps the model and when checkpoints load.
        raise ValueError(
            f"{names[0]}: per-head quantization needs the number of heads, but "
            f"{type(parent).__name__} has no `num_heads` or `n_heads` attribute; add one or set "
            "attn_per_head=False"
        )
    quantizer = point_quantizer(point, bits, qcfg.act_quantizer, num_heads, qcfg.attn_per_head, qcfg.attn_prob_init)
    device = _device_of(parent)
    return quantizer if device is None else quantizer.to(device)


def quantize_model(model: nn.Module, qcfg: QuantConfig) -> nn.Module:
    """
    Swap the layers and attention quantization points selected by `qcfg` for quantized ones,
    in place; returns `model`. Quantizers are initialised on first use or by `calibrate`.
    Raises ValueError for a pattern that selects nothing or a layer that cannot be swapped.
    """
    refs = _references(model)
    _check_patterns(qcfg, [name for _, places in refs.values() for _, _, name in places])
    counts = Counter()
    for module, places in refs.values():
        names = [name for _, _, name in places]
        parent, attr = places[0][0], places[0][1]
        if isinstance(module, (QuantizerBase, QuantLinear, QuantConv2d)):
            continue  # already quantized
        if _is_point(attr, module):
            kind, patterns = "attention points", qcfg.attn_patterns
        elif isinstance(module, nn.Linear):
            kind, patterns = "Linear", qcfg.linear_patterns
        elif isinstance(module, nn.Conv2d):
            kind, patterns = "Conv2d", qcfg.conv_patterns
        else:
            continue
        if not selects(names, patterns) or selects(names, qcfg.keep_fp_patterns):
            counts[f"float {kind}"] += 1
            continue
        if kind == "attention points":
            new = _quantize_point(parent, attr, names, qcfg)
        else:
            _check_swappable(module, nn.Linear if kind == "Linear" else nn.Conv2d, names[0])
            if any(isinstance(p, nn.MultiheadAttention) for p, _, _ in places):
                raise ValueError(
                    f"{names[0]} belongs to an nn.MultiheadAttention, which uses its projection "
                    "weights directly: swapping it would not quantize anything. Use an attention "
                    "module with quantization points, or keep it float with keep_fp_patterns."
                )
            new = _quantize_layer(module, names, qcfg)
        for p, a, _ in places:
            setattr(p, a, new)
        counts[f"quantized {kind}"] += 1
    logger.info(
        "quantize_model (W%d/A%d/Attn%d, %s): %s",
        qcfg.weight_bits,
        qcfg.act_bits,
        qcfg.attn_bits,
        qcfg.quantizer,
        ", ".join(f"{n} {k}" for k, n in sorted(counts.items())),
    )
    return model
