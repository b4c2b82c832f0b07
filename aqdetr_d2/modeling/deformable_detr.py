"""Deformable-DETR network without backbone: input projections, transformer and prediction heads.

Module names mirror fundamentalvision/Deformable-DETR's `DeformableDETR` (`input_proj`,
`transformer`, `class_embed`, `bbox_embed`, `query_embed`), including its head layout:
without box refinement one class head and one box MLP are shared by all decoder layers
(listed once per layer, as the official state dict does); with refinement each layer has
its own copy, plus one for the encoder proposals in two-stage.
"""
import copy
import math
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.box_ops import inverse_sigmoid
from ..layers.mlp import MLP
from .deformable_transformer import DeformableTransformer
from .outputs import TransformerStates


class DeformableDETR(nn.Module):
    """
    Args:
        in_channels: channels of each backbone level given to `forward`, finest first.
        transformer: a `DeformableTransformer` (its `d_model` is the hidden size, which must be a
            multiple of 32 for the GroupNorm of the input projections).
        num_classes: object classes; classification is per-class sigmoid (focal loss), with no
            "no-object" class.
        num_queries: object queries; in two-stage, must equal
            `transformer.two_stage_num_proposals`.
        num_feature_levels: levels given to the transformer; levels beyond `len(in_channels)`
            come from stride-2 3x3 convs on the last backbone level.
        position_embedding: maps a (B, H, W) padding mask to (B, d_model, H, W); used for the
            extra levels.
        deep_supervision: also return the predictions of the intermediate decoder layers
            ("aux_outputs", DETR's name; the official code's `aux_loss`), each with its own loss.
        with_box_refine: iterative box refinement, one head per decoder layer.
        two_stage: queries from the top-scoring encoder proposals (needs `with_box_refine`,
            as in the official code, where two-stage is built on top of refinement).
    """

    def __init__(self, in_channels: List[int], transformer: DeformableTransformer, num_classes: int,
                 num_queries: int, num_feature_levels: int, position_embedding: nn.Module, deep_supervision: bool = True,
                 with_box_refine: bool = False, two_stage: bool = False):
        super().__init__()
        hidden_dim = transformer.d_model
        if len(in_channels) > num_feature_levels:
            raise ValueError(f"{len(in_channels)} backbone levels but only {num_feature_levels} feature levels")
        if transformer.num_feature_levels != num_feature_levels:
            raise ValueError(f"transformer has {transformer.num_feature_levels} levels, "
                             f"num_feature_levels is {num_feature_levels}")
        if transformer.two_stage != two_stage:
            raise ValueError(f"two_stage={two_stage} but the transformer was built with "
                             f"two_stage={transformer.two_stage}")
        if two_stage and not with_box_refine:
            raise ValueError("two_stage requires with_box_refine (the official two-stage model refines boxes "
                             "and scores proposals with the extra refinement heads)")
        if two_stage and num_queries != transformer.two_stage_num_proposals:
            raise ValueError(f"num_queries ({num_queries}) must equal the transformer's "
                             f"two_stage_num_proposals ({transformer.two_stage_num_proposals}) in two-stage")
        self.num_queries = num_queries
        self.num_backbone_levels = len(in_channels)
        self.num_feature_levels = num_feature_levels
        self.transformer = transformer
        self.position_embedding = position_embedding
        self.deep_supervision = deep_supervision
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage

        input_proj = [nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim))
                      for c in in_channels]
        extra_in = in_channels[-1]
        for _ in range(num_feature_levels - len(in_channels)):
            input_proj.append(nn.Sequential(nn.Conv2d(extra_in, hidden_dim, kernel_size=3, stride=2, padding=1),
                                            nn.GroupNorm(32, hidden_dim)))
            extra_in = hidden_dim
        self.input_proj = nn.ModuleList(input_proj)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)

        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        # Focal-loss prior: every class starts at probability 0.01, so the many background
        # queries do not swamp the loss early on.
        prior_prob = 0.01
        nn.init.constant_(class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        # Boxes start at the reference point (zero correction).
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)

        # In two-stage, the extra last pair of heads scores the encoder proposals.
        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        if with_box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            # Only the first layer turns a reference point into a box, so only its head needs a
            # size prior (w = h = sigmoid(-2) ~ 0.12); later layers start from that box.
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:
            # Every layer predicts from a reference point: all share the size prior.
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList(class_embed for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(bbox_embed for _ in range(num_pred))
        if two_stage:
            self.transformer.decoder.class_embed = self.class_embed
            # Proposals already carry a size: start every head at a zero size correction.
            for box_head in self.bbox_embed:
                nn.init.zeros_(box_head.layers[-1].bias)

    def _extra_levels(self, features: List[Tensor], masks: List[Tensor]):
        """Levels beyond the backbone: stride-2 convs on the last backbone level (then on the
        previous extra level), masks resized (nearest) from the last backbone mask.

        Returns lists of srcs (B, d, H, W), masks (B, H, W) and position embeddings (B, d, H, W).
        """
        extra_srcs, extra_masks, extra_pos = [], [], []
        for lvl in range(len(features), self.num_feature_levels):
            src = self.input_proj[lvl](features[-1] if lvl == len(features) else extra_srcs[-1])
            mask = F.interpolate(masks[-1][None].float(), size=src.shape[-2:]).to(torch.bool)[0]
            extra_srcs.append(src)
            extra_masks.append(mask)
            extra_pos.append(self.position_embedding(mask).to(src.dtype))
        return extra_srcs, extra_masks, extra_pos

    def layer_predictions(self, lvl: int, hidden: Tensor, reference: Tensor):
        """Class logits (B, Q, K) and boxes (B, Q, 4) of decoder layer `lvl`: hidden (B, Q, C),
        reference (B, Q, 2 or 4) normalized, the layer's input reference points."""
        reference = inverse_sigmoid(reference)
        delta = self.bbox_embed[lvl](hidden)
        if reference.shape[-1] == 4:
            coord = delta + reference
        else:
            coord = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
        return self.class_embed[lvl](hidden), coord.sigmoid()

    def forward(self, features: List[Tensor], masks: List[Tensor], pos: List[Tensor],
                self_attn_mask: Optional[Tensor] = None, query_embeds: Optional[Tensor] = None,
                num_aux_proposals: int = 0) -> Dict[str, Any]:
        """
        Args:
            features: per backbone level (B, C_l, H_l, W_l), finest first.
            masks: per backbone level (B, H_l, W_l) bool, True on padding.
            pos: per backbone level (B, d_model, H_l, W_l) position embeddings.
            self_attn_mask: (Q, Q) bool, True where decoder query i must not attend to query j
                (e.g. to keep auxiliary query groups apart); Q is the number of queries used.
            query_embeds: (Q, 2 * d_model) queries to use instead of `query_embed.weight`
                (e.g. object queries followed by auxiliary ones); not with two-stage.
            num_aux_proposals: two-stage only: extra encoder proposals used as queries after the
                `num_queries` object queries (auxiliary queries, H-DETR).
        Returns:
            dict with
            - "pred_logits": (B, Q, num_classes) class logits of the last decoder layer;
            - "pred_boxes": (B, Q, 4) normalized (cx, cy, w, h) boxes of the last decoder layer;
            - "aux_outputs": with `deep_supervision`, a list over the other decoder layers of
              {"pred_logits", "pred_boxes"};
            - "enc_outputs": in two-stage, {"pred_logits": (B, S, num_classes),
              "pred_boxes": (B, S, 4)} of the encoder proposals;
            - "states": `TransformerStates` (per-layer states and attention weights, the
              transformer's dict as its internals).
        """
        if not (len(features) == len(masks) == len(pos) == self.num_backbone_levels):
            raise ValueError(f"expected {self.num_backbone_levels} backbone levels, got "
                             f"{len(features)} features, {len(masks)} masks, {len(pos)} position embeddings")
        if self.two_stage and query_embeds is not None:
            raise ValueError("query_embeds cannot be given in two-stage: the queries come from the encoder")

        srcs = [proj(f) for proj, f in zip(self.input_proj, features)]
        extra_srcs, extra_masks, extra_pos = self._extra_levels(features, masks)
        srcs, masks, pos = srcs + extra_srcs, list(masks) + extra_masks, list(pos) + extra_pos

        if not self.two_stage and query_embeds is None:
            query_embeds = self.query_embed.weight
        out = self.transformer(srcs, masks, pos, query_embeds, self_attn_mask, num_aux_proposals)

        hs = out["hs"]
        outputs_classes, outputs_coords = [], []
        for lvl in range(hs.shape[0]):
            reference = out["init_reference"] if lvl == 0 else out["inter_references"][lvl - 1]
            logits, boxes = self.layer_predictions(lvl, hs[lvl], reference)
            outputs_classes.append(logits)
            outputs_coords.append(boxes)

        result = {"pred_logits": outputs_classes[-1], "pred_boxes": outputs_coords[-1]}
        if self.deep_supervision:
            result["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b}
                                     for c, b in zip(outputs_classes[:-1], outputs_coords[:-1])]
        if self.two_stage:
            result["enc_outputs"] = {"pred_logits": out["enc_outputs_class"],
                                     "pred_boxes": out["enc_outputs_coord_unact"].sigmoid()}
        result["states"] = TransformerStates(encoder_states=out["enc_states"], encoder_attention=out["enc_attn_weights"],
                                             padding_mask=out["mask_flatten"], decoder_states=hs, internals=out)
        return result
