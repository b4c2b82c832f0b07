"""`TransformerStates`: the per-layer tensors of one forward, under the same names for both models.

`predict()` of `AQDETR` and `AQDeformableDETR` returns DETR's prediction dict ("pred_logits",
"pred_boxes", "aux_outputs" per decoder layer, "enc_outputs" in two-stage, "aux_query_outputs"
with auxiliary queries) and, under "states", this dataclass. Distillation, pictures and tests
read the shared fields; `internals` keeps each transformer's own dict, whose layer inputs
(positions, references, memory) only that architecture's teacher-forced layers need.
"""
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Union

from torch import Tensor

# How to cut an `internals` entry between object and auxiliary queries: the query axis of the
# tensor (or of every tensor of a per-layer list), or SELF_ATTN for (B, H, Q, Q) decoder
# self-attention maps (cut on both query axes). Entries not listed are shared by both sets.
SELF_ATTN = "self_attn"
QueryAxes = Mapping[str, Union[int, str]]


def _cut(x, axis, index: slice):
    if isinstance(x, (list, tuple)):
        return [_cut(v, axis, index) for v in x]
    if axis == SELF_ATTN:
        return x[..., index, index]
    return x[(slice(None),) * axis + (index,)]


@dataclass
class TransformerStates:
    """
    encoder_states: per encoder layer its output, (B, S, C), S the flattened positions.
    encoder_attention: per encoder layer its attention: DETR (B, H, S, S) softmax maps,
        Deformable-DETR (B, S, H, levels, points) sampling weights (the model's
        `attention_kind` says which).
    padding_mask: (B, S) bool, True on padded positions.
    decoder_states: (L, B, Q, C) normalised decoder outputs, object queries only once split.
    internals: the transformer's own dict (layer inputs for teacher forcing, cross-attention
        for pictures), in its own layout.
    """

    encoder_states: List[Tensor]
    encoder_attention: List[Tensor]
    padding_mask: Tensor
    decoder_states: Tensor
    internals: Dict[str, Any]

    def cut_queries(self, index: slice, query_axes: QueryAxes) -> "TransformerStates":
        """The states of the queries in `index`; encoder fields are shared and kept."""
        internals = {k: _cut(v, query_axes[k], index) if k in query_axes and v is not None else v
                     for k, v in self.internals.items()}
        return replace(self, decoder_states=self.decoder_states[:, :, index], internals=internals)
