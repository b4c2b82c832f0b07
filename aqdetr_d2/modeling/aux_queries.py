"""Auxiliary queries: training-only decoder queries that give the quantized decoder more positives.

Following H-DETR's hybrid matching ("auxiliary queries" in its paper) and Group-DETR:
`NUM_QUERIES` extra queries go through the same decoder, heads and quantizers as the object
queries; a decoder self-attention mask keeps the two sets from seeing each other. Their loss
is the detector's own criterion (same Hungarian matcher) on expanded targets:

- "hybrid": one group of auxiliary queries matched to each image's ground truth repeated K
  times, i.e. one-to-many supervision (K x T positives instead of T);
- "group": K groups of NUM_QUERIES / K queries, each matched one-to-one to the original
  ground truth, groups masked from each other; as in Group-DETR, every group's loss counts as
  much as the object queries' (summed over groups), times LOSS_WEIGHT.

Loss weights: H-DETR's one-to-many loss is the criterion on the K-times repeated targets,
normalised by their K x T boxes, with lambda 1 ("hybrid" with LOSS_WEIGHT 1). Group-DETR weighs
all its groups alike ("group" with LOSS_WEIGHT 1). Gradient clipping at a full-model norm of 0.1
normalises every step on the shapes proxy, so only these weights' ratio to the detection loss
matters, not their scale.

At inference the auxiliary queries do not exist: no embedding is read, no mask is built, and
predictions equal those of the same weights without them.

Layout of the outputs in training (see `split_query_outputs`): the detector's outputs keep
their usual keys for the object queries only (their "states" cut to those queries), and
"aux_query_outputs" holds the same structure for the auxiliary queries.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Union

import torch
from torch import Tensor

from .outputs import SELF_ATTN, QueryAxes

Targets = List[Dict[str, Tensor]]


def _hybrid_targets(targets: Targets, k: int) -> List[Targets]:
    """One query group; each image's boxes and labels repeated K times (one-to-many)."""
    return [[{**t, "boxes": t["boxes"].repeat(k, 1), "labels": t["labels"].repeat(k)} for t in targets]]


def _group_targets(targets: Targets, k: int) -> List[Targets]:
    """K query groups, each matched one-to-one to the original targets."""
    return [targets] * k


# MODE -> target expansion: (per-image targets, K) -> one per-image target list per query group.
# The auxiliary queries are split into len(result) equal, mutually masked groups.
TARGET_EXPANSIONS: Dict[str, Callable[[Targets, int], List[Targets]]] = {
    "hybrid": _hybrid_targets,
    "group": _group_targets,
}


@dataclass(frozen=True)
class AuxQueries:
    """Settings and helpers of the auxiliary-query branch (the embedding lives on the detector).

    Args:
        num_queries: number of auxiliary queries.
        mode: a key of `TARGET_EXPANSIONS`.
        k: hybrid: times the ground truth is repeated; group: number of groups.
        loss_weight: multiplies every auxiliary-query loss.
    """

    num_queries: int
    mode: str = "hybrid"
    k: int = 6
    loss_weight: float = 1.0

    def __post_init__(self):
        if self.mode not in TARGET_EXPANSIONS:
            raise ValueError(f"MODEL.AUX_QUERIES.MODE must be one of {sorted(TARGET_EXPANSIONS)}, "
                             f"got {self.mode!r}")
        if self.num_queries < 1:
            raise ValueError(f"MODEL.AUX_QUERIES.NUM_QUERIES must be >= 1 when MODEL.AUX_QUERIES.ENABLED, "
                             f"got {self.num_queries}")
        if self.k < 1:
            raise ValueError(f"MODEL.AUX_QUERIES.K must be >= 1, got {self.k}")
        if self.num_queries % self.num_groups != 0:
            raise ValueError(f"MODEL.AUX_QUERIES.NUM_QUERIES ({self.num_queries}) must be divisible by the "
                             f"number of groups ({self.num_groups}, MODEL.AUX_QUERIES.K) in mode {self.mode!r}")

    @classmethod
    def from_config(cls, cfg) -> Optional["AuxQueries"]:
        """`MODEL.AUX_QUERIES` -> AuxQueries, or None when disabled. Raises ValueError on bad values."""
        a = cfg.MODEL.AUX_QUERIES
        if not a.ENABLED:
            return None
        return cls(num_queries=a.NUM_QUERIES, mode=a.MODE, k=a.K, loss_weight=a.LOSS_WEIGHT)

    @property
    def num_groups(self) -> int:
        return len(TARGET_EXPANSIONS[self.mode]([], self.k))

    def expand_targets(self, targets: Targets) -> List[Targets]:
        """Per query group, the per-image targets its queries are matched to."""
        return TARGET_EXPANSIONS[self.mode](targets, self.k)

    def self_attn_mask(self, num_object_queries: int, device=None) -> Tensor:
        """(Q_total, Q_total) bool decoder self-attention mask, True = blocked.

        Queries are ordered [object queries | aux group 0 | aux group 1 | ...]; a query sees
        only the queries of its own set (the object queries being one set).
        """
        group_size = self.num_queries // self.num_groups
        ids = torch.cat([torch.zeros(num_object_queries, dtype=torch.long, device=device),
                         1 + torch.arange(self.num_queries, device=device) // group_size])
        return ids[:, None] != ids[None, :]


# Query axes of each transformer's `internals` (see outputs.py): entries not listed (the
# encoder's, the memory, ...) are shared by both query sets and passed through unchanged.
DETR_QUERY_AXES: Dict[str, Union[int, str]] = {
    "hs": 2,  # (L, B, Q, C)
    "dec_raw_states": 0,  # per layer (Q, B, C)
    "dec_self_attn": SELF_ATTN,  # per layer (B, H, Q, Q)
    "dec_cross_attn": 2,  # per layer (B, H, Q, S)
    "dec_query_pos": 0,  # per layer (Q, B, C)
    "dec_references": 1,  # per layer (B, Q, 4), with anchor boxes
    "dec_boxes": 1,  # per layer (B, Q, 4), with anchor boxes
    "dec_cross_attn_prior": 2,  # per layer (B, 1, Q, S), with the spatial prior
    "query_pos": 0,  # (Q, B, C)
    "tgt": 0,  # (Q, B, C)
}
DEFORMABLE_DETR_QUERY_AXES: Dict[str, Union[int, str]] = {
    "hs": 2,  # (L, B, Q, C)
    "init_reference": 1,  # (B, Q, 2 or 4)
    "inter_references": 2,  # (L, B, Q, 2 or 4)
    "dec_self_attn": SELF_ATTN,  # per layer (B, H, Q, Q)
    "dec_cross_attn_weights": 1,  # per layer (B, Q, H, L, P)
    "query_pos": 1,  # (B, Q, C)
    "tgt": 1,  # (B, Q, C)
}


def _cut_predictions(outputs: Mapping, index: slice) -> Dict:
    out = {"pred_logits": outputs["pred_logits"][:, index], "pred_boxes": outputs["pred_boxes"][:, index]}
    if "aux_outputs" in outputs:
        out["aux_outputs"] = [_cut_predictions(a, index) for a in outputs["aux_outputs"]]
    return out


def split_query_outputs(outputs: Mapping, num_object_queries: int, query_axes: QueryAxes) -> Dict:
    """Split a training forward over [object | auxiliary] queries into the two query sets.

    Args:
        outputs: "pred_logits" (B, Q_total, K), "pred_boxes" (B, Q_total, 4), optional
            "aux_outputs" (per-layer list of the same), optional "enc_outputs" (two-stage
            proposals, kept with the object queries) and "states" (`TransformerStates`).
        num_object_queries: N; queries [0, N) are the object queries, the rest auxiliary.
        query_axes: the query axes of the states' internals: `DETR_QUERY_AXES` or
            `DEFORMABLE_DETR_QUERY_AXES`.
    Returns:
        the object-query outputs (same keys, every query-indexed tensor cut to N queries) with
        "aux_query_outputs": the same structure for the auxiliary queries (no "enc_outputs").
    """
    obj, aux = slice(0, num_object_queries), slice(num_object_queries, None)
    result = _cut_predictions(outputs, obj)
    aux_result = _cut_predictions(outputs, aux)
    if "enc_outputs" in outputs:
        result["enc_outputs"] = outputs["enc_outputs"]
    if "states" in outputs:
        result["states"] = outputs["states"].cut_queries(obj, query_axes)
        aux_result["states"] = outputs["states"].cut_queries(aux, query_axes)
    for key in outputs:
        if key not in result and key not in aux_result:
            result[key] = outputs[key]
    result["aux_query_outputs"] = aux_result
    return result


def _rename(losses: Dict[str, Tensor], suffix: str) -> Dict[str, Tensor]:
    return {f"{k}{suffix}": v for k, v in losses.items()}


def aux_query_loss(criterion, aux_query_outputs: Mapping, targets: Targets, aux_queries: AuxQueries
                   ) -> Dict[str, Tensor]:
    """Weighted losses of the auxiliary queries, with the detector's own criterion.

    Args:
        criterion: the detector's `SetCriterion` (its Hungarian matcher does the matching; one-
            to-many in hybrid mode arises from the repeated targets).
        aux_query_outputs: "aux_query_outputs" of a training forward: "pred_logits" (B, N_aux, K),
            "pred_boxes" (B, N_aux, 4), optional per-layer "aux_outputs".
        targets: per image "labels" (T,) and "boxes" (T, 4), normalized cxcywh.
    Returns:
        `loss_ce_aux`, `loss_bbox_aux`, `loss_giou_aux` (last decoder layer) and
        `loss_*_{i}_aux` (decoder layer i), multiplied by `aux_queries.loss_weight`; in group
        mode, summed over the groups (each matched one-to-one to the original targets).
    """
    groups = aux_queries.expand_targets(targets)
    size = aux_query_outputs["pred_logits"].shape[1] // len(groups)
    total: Dict[str, Tensor] = {}
    for g, group_targets in enumerate(groups):
        preds = _cut_predictions(aux_query_outputs, slice(g * size, (g + 1) * size))
        for k, v in criterion(preds, group_targets).items():
            total[k] = total[k] + v if k in total else v
    return _rename({k: v * aux_queries.loss_weight for k, v in total.items()}, "_aux")

