"""From `MODEL.QUANT.*` to a `QuantConfig` for one meta-architecture.

Each architecture names its parts (backbone / encoder / decoder / heads) as module-name globs,
the layers that stay float by default (following Q-DETR: stem conv, input projection, class
head, last box layer) and the layers whose input is non-negative (after a ReLU), which get
the unsigned range.
"""
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Dict, Optional, Sequence

from torch import nn

from ..errors import UserInputError
from ..quant import QuantConfig, QuantConv2d, QuantLinear, quantize_model

PARTS = ("BACKBONE", "ENCODER", "DECODER", "HEADS")


@dataclass(frozen=True)
class QuantLayout:
    """Where the parts of one architecture live, as glob patterns on module names."""

    parts: Dict[str, Sequence[str]]
    keep_fp: Sequence[str]
    unsigned_inputs: Sequence[str]
    at_least_8bit: Sequence[str] = ()


DETR_LAYOUT = QuantLayout(
    parts={"BACKBONE": ["backbone"], "ENCODER": ["transformer.encoder"], "DECODER": ["transformer.decoder"],
           "HEADS": ["input_proj", "class_embed", "bbox_embed", "query_selection"]},
    # "bbox_embed.*" patterns: one head per decoder layer with box refinement.
    keep_fp=["backbone.stem.conv1", "input_proj", "class_embed", "bbox_embed.layers.2", "bbox_embed.*.layers.2"],
    unsigned_inputs=["backbone.res*", "transformer.*.linear2", "bbox_embed.layers.[12]", "bbox_embed.*.layers.[12]",
                     "transformer.decoder.ref_point_head.layers.1"],
)

DEFORMABLE_DETR_LAYOUT = QuantLayout(
    parts={"BACKBONE": ["backbone"], "ENCODER": ["detector.transformer.encoder.layers"],
           "DECODER": ["detector.transformer.decoder.layers"],
           # "detector.*" also matches the decoder's aliases of the heads used for box refinement.
           "HEADS": ["detector.input_proj", "detector.*class_embed", "detector.*bbox_embed",
                     "detector.transformer.enc_output", "detector.transformer.pos_trans",
                     "detector.transformer.reference_points"]},
    keep_fp=["backbone.stem.conv1", "detector.input_proj", "detector.*class_embed",
             "detector.*bbox_embed.*.layers.2", "detector.transformer.reference_points"],
    unsigned_inputs=["backbone.res*", "detector.transformer.*.linear2", "detector.*bbox_embed.*.layers.[12]"],
    # Sampling offsets become sampling locations, which the paper's design keeps at >= 8 bit.
    at_least_8bit=["detector.transformer.*.sampling_offsets"],
)


def _present(patterns: Sequence[str], names: Sequence[str]):
    """Architecture defaults that exist in this model (two-stage layers exist only in two-stage)."""
    return [p for p in patterns if any(fnmatchcase(n, p) for n in names)]


def quant_config_from_cfg(cfg, model: nn.Module, layout: QuantLayout) -> Optional[QuantConfig]:
    """`MODEL.QUANT` -> QuantConfig for `model`, or None when quantization is off."""
    q = cfg.MODEL.QUANT
    if not q.ENABLED:
        return None
    names = [n for n, _ in model.named_modules(remove_duplicate=False)]
    unknown = [p for p in q.PARTS if p not in PARTS]
    if unknown:
        raise ValueError(f"MODEL.QUANT.PARTS has unknown parts {unknown}; valid parts are {list(PARTS)}")
    selected = [p for part in q.PARTS for p in _present(layout.parts[part], names)]
    keep_fp = (_present(layout.keep_fp, names) if q.KEEP_FP_DEFAULTS else []) + list(q.KEEP_FP_PATTERNS)
    return QuantConfig(
        weight_bits=q.WEIGHT_BITS, act_bits=q.ACT_BITS, attn_bits=q.ATTN_BITS, quantizer=q.QUANTIZER,
        learnable_offset=q.LEARNABLE_OFFSET, conv_patterns=selected, linear_patterns=selected,
        attn_patterns=selected, keep_fp_patterns=keep_fp, int8_patterns=_present(layout.at_least_8bit, names) + list(q.INT8_PATTERNS),
        unsigned_act_patterns=_present(layout.unsigned_inputs, names), attn_per_head=q.ATTN_PER_HEAD,
        attn_prob_init=q.ATTN_PROB_INIT, integer_bias=q.INTEGER_BIAS)


def fix_frozen_layer_step_sizes(model: nn.Module) -> nn.Module:
    """Stop training the quantizers of layers whose weights are frozen (Detectron2's
    `BACKBONE.FREEZE_AT` stages): their step sizes keep the calibrated values, and the backward
    pass stops where it stops in the float model instead of running through those stages for
    the step sizes' sake."""
    for module in model.modules():
        if isinstance(module, (QuantConv2d, QuantLinear)) and not module.weight.requires_grad:
            module.weight_quantizer.requires_grad_(False)
            module.input_quantizer.requires_grad_(False)
    return model


class QuantConfigError(UserInputError, ValueError):
    """MODEL.QUANT asks for something the quantization library refuses (its message names the key)."""


def maybe_quantize(cfg, model: nn.Module, layout: QuantLayout) -> nn.Module:
    try:
        qcfg = quant_config_from_cfg(cfg, model, layout)
        if qcfg is None:
            return model
        model = quantize_model(model, qcfg)
    except ValueError as e:  # the library's checks of bits, patterns and layers: one line for the user
        raise QuantConfigError(str(e)) from e
    return model if cfg.MODEL.QUANT.LEARN_FROZEN_STEP_SIZES else fix_frozen_layer_step_sizes(model)
