"""Detectron2 meta-architectures `AQDETR` and `AQDeformableDETR`."""
import copy
import math
from functools import partial
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList, Instances

from ..layers.box_ops import inverse_sigmoid
from ..layers.mlp import MLP
from ..layers.position_encoding import PositionEmbeddingSine
from .aux_queries import DEFORMABLE_DETR_QUERY_AXES, DETR_QUERY_AXES, AuxQueries, split_query_outputs
from .backbone import build_detr_backbone, masked_features
from .criterion import SetCriterion
from .deformable_detr import DeformableDETR
from .deformable_transformer import DeformableTransformer
from .matcher import HungarianMatcher
from .quantization import DEFORMABLE_DETR_LAYOUT, DETR_LAYOUT, maybe_quantize
from .query_selection import EncoderQuerySelection
from .outputs import TransformerStates
from .set_prediction import TEACHER_MATCHING_KEYS, SetPredictionDetector, check_heads, pixel_stats
from .transformer import Transformer

__all__ = ["AQDETR", "AQDeformableDETR"]

@META_ARCH_REGISTRY.register()
class AQDETR(SetPredictionDetector):
    """DETR (Carion et al. 2020) on a Detectron2 backbone, with quantizable explicit attention.

    Off by default, four convergence aids make a small DETR trainable on a CPU (the papers'
    COCO / VOC models use none of them):
    - the criterion's `focal`: per-class sigmoid classification with focal loss (no
      "no-object" class);
    - the transformer's `anchor_queries` (`box_refine`): anchor boxes as query positions
      (DAB-DETR), refined by one box head per decoder layer (Deformable-DETR); `query_embed`
      then holds query content, not positions;
    - `two_stage`: the best encoder proposals give the anchors and, from their encoder
      features, the query content (`EncoderQuerySelection`); no query embedding is learned;
    - the transformer's `spatial_prior`: a Gaussian around each anchor box added to the
      decoder cross-attention logits (SMCA), so attention starts local.
    """

    config_node = "DETR"
    quant_layout = DETR_LAYOUT

    @configurable
    def __init__(self, *, backbone, in_feature: str, transformer: Transformer, num_classes: int,
                 num_queries: int, criterion: SetCriterion, deep_supervision: bool = True,
                 two_stage: bool = False, topk_test: int = 100, aux_queries: Optional[AuxQueries] = None,
                 quantize=None, pixel_mean, pixel_std):
        super().__init__(backbone=backbone, in_features=[in_feature], criterion=criterion,
                         num_classes=num_classes, pixel_mean=pixel_mean, pixel_std=pixel_std,
                         aux_queries=aux_queries)
        focal, box_refine = criterion.focal, transformer.anchor_queries
        if two_stage and not (box_refine and focal):
            raise ValueError("MODEL.DETR.TWO_STAGE needs MODEL.DETR.BOX_REFINE and MODEL.DETR.FOCAL_LOSS")
        hidden = transformer.d_model
        self.transformer = transformer
        self.position_embedding = PositionEmbeddingSine(hidden // 2, normalize=True)
        self.input_proj = nn.Conv2d(backbone.output_shape()[in_feature].channels, hidden, kernel_size=1)
        self.num_queries = num_queries
        self.query_embed = None if two_stage else nn.Embedding(num_queries, hidden)
        self.two_stage = two_stage
        self.topk_test = topk_test
        self.deep_supervision = deep_supervision
        class_embed = nn.Linear(hidden, num_classes if focal else num_classes + 1)
        bbox_embed = MLP(hidden, hidden, 4, 3)
        if focal:
            # Every class starts at probability 0.01, so background queries do not swamp the loss.
            nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
        if box_refine:
            # Boxes start at their anchors (zero correction); two-stage adds the proposal heads.
            nn.init.zeros_(bbox_embed.layers[-1].weight)
            nn.init.zeros_(bbox_embed.layers[-1].bias)
            num_heads = transformer.decoder.num_layers + (1 if two_stage else 0)
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_heads))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_heads))
        else:
            self.class_embed, self.bbox_embed = class_embed, bbox_embed
        self.query_selection = EncoderQuerySelection(hidden) if two_stage else None
        self.anchor_embed = _anchor_embedding(num_queries) if box_refine and not two_stage else None
        # Created last, so that the other parameters are initialised as without them. In two-stage
        # the auxiliary queries are the next-best proposals (H-DETR) and need no embedding.
        self.aux_query_embed = None
        if aux_queries and not two_stage:
            self.aux_query_embed = nn.Embedding(aux_queries.num_queries, hidden)
        self.aux_anchor_embed = None
        if aux_queries and self.anchor_embed is not None:
            self.aux_anchor_embed = _anchor_embedding(aux_queries.num_queries)
        if quantize is not None:
            quantize(self)

    @classmethod
    def from_config(cls, cfg):
        d = cfg.MODEL.DETR
        check_heads(d, "MODEL.DETR")
        matcher = HungarianMatcher(d.COST_CLASS, d.COST_BBOX, d.COST_GIOU, focal=d.FOCAL_LOSS,
                                   focal_alpha=d.FOCAL_ALPHA)
        return {
            "backbone": build_detr_backbone(cfg, [d.IN_FEATURE]),
            "in_feature": d.IN_FEATURE,
            "transformer": Transformer(d.HIDDEN_DIM, d.NHEADS, d.ENC_LAYERS, d.DEC_LAYERS,
                                       d.DIM_FEEDFORWARD, d.DROPOUT, d.PRE_NORM, anchor_queries=d.BOX_REFINE,
                                       spatial_prior=d.SPATIAL_PRIOR),
            "num_classes": d.NUM_CLASSES,
            "num_queries": d.NUM_OBJECT_QUERIES,
            "criterion": SetCriterion(d.NUM_CLASSES, matcher, d.CLASS_WEIGHT, d.L1_WEIGHT,
                                      d.GIOU_WEIGHT, d.NO_OBJECT_WEIGHT, focal=d.FOCAL_LOSS,
                                      focal_alpha=d.FOCAL_ALPHA),
            "deep_supervision": d.DEEP_SUPERVISION,
            "two_stage": d.TWO_STAGE,
            "topk_test": d.TOPK_TEST,
            "aux_queries": AuxQueries.from_config(cfg),
            "quantize": partial(maybe_quantize, cfg, layout=cls.quant_layout),
            **pixel_stats(cfg),
        }

    @property
    def focal(self) -> bool:
        """Sigmoid focal classification (K logits) rather than softmax with no-object (K + 1)."""
        return self.criterion.focal

    @property
    def box_refine(self) -> bool:
        """Anchor-box queries refined by one head per decoder layer."""
        return self.transformer.anchor_queries

    def layer_predictions(self, lvl: int, hidden: Tensor, reference: Optional[Tensor] = None):
        """Class logits (B, Q, K or K + 1) and boxes (B, Q, 4) of decoder layer `lvl` from its
        output hidden (B, Q, C) and, with box refinement, its input anchor boxes (B, Q, 4)."""
        if not self.box_refine:
            return self.class_embed(hidden), self.bbox_embed(hidden).sigmoid()
        boxes = (self.bbox_embed[lvl](hidden) + inverse_sigmoid(reference)).sigmoid()
        return self.class_embed[lvl](hidden), boxes

    def predict(self, images: ImageList) -> Dict:
        """-> "pred_logits" (B, Q, K + 1, or K with focal loss), "pred_boxes" (B, Q, 4),
        "aux_outputs", "states" (`TransformerStates`), in two-stage "enc_outputs" (the scored proposals); in
        training with auxiliary queries also "aux_query_outputs" (see `split_query_outputs`)."""
        features, masks = masked_features(self.backbone, images, self.in_features)
        src, mask = features[-1], masks[-1]
        pos = self.position_embedding(mask).to(src.dtype)
        enc = self.transformer.encode(self.input_proj(src), mask, pos)
        batch, tgt_mask, outputs = src.shape[0], None, {}
        num_queries = self.num_queries + (self.aux_queries.num_queries if self.uses_aux_queries else 0)
        if self.uses_aux_queries:
            tgt_mask = self.aux_queries.self_attn_mask(self.num_queries, self.device)
        if self.two_stage:
            sel = self.query_selection(enc["memory"], enc["mask"], src.shape[-2:], self.class_embed[-1],
                                       self.bbox_embed[-1], num_queries)
            outputs["enc_outputs"] = {"pred_logits": sel["enc_logits"], "pred_boxes": sel["enc_boxes"]}
            out = self.transformer.decode(enc, sel["content"].transpose(0, 1), None, tgt_mask,
                                          sel["reference_boxes"], self.bbox_embed)
        else:
            content = self.query_embed.weight
            if self.uses_aux_queries:
                content = torch.cat([content, self.aux_query_embed.weight])
            queries = content.unsqueeze(1).repeat(1, batch, 1)  # (Q, B, C)
            if not self.box_refine:
                out = self.transformer.decode(enc, torch.zeros_like(queries), queries, tgt_mask)
            else:
                anchors = self.anchor_embed.weight
                if self.uses_aux_queries:
                    anchors = torch.cat([anchors, self.aux_anchor_embed.weight])
                anchors = anchors.sigmoid().unsqueeze(0).expand(batch, -1, -1)
                out = self.transformer.decode(enc, queries, None, tgt_mask, anchors, self.bbox_embed)
        if self.box_refine:  # the decoder already ran each layer's box head to refine its anchors
            logits, boxes = [head(h) for head, h in zip(self.class_embed, out["hs"])], out["dec_boxes"]
        else:
            logits, boxes = self.class_embed(out["hs"]), self.bbox_embed(out["hs"]).sigmoid()
        states = TransformerStates(encoder_states=[s.transpose(0, 1) for s in out["enc_states"]],
                                   encoder_attention=out["enc_attn"], padding_mask=out["mask"],
                                   decoder_states=out["hs"], internals=out)
        outputs.update(pred_logits=logits[-1], pred_boxes=boxes[-1], states=states)
        if self.deep_supervision:
            outputs["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        if tgt_mask is not None:
            outputs = split_query_outputs(outputs, self.num_queries, DETR_QUERY_AXES)
        return outputs

    def inference(self, logits: Tensor, boxes: Tensor, image_sizes) -> List[Instances]:
        """Softmax: best non-background class per query; focal: top-k (query, class) pairs.
        logits (B, Q, K + 1) or (B, Q, K), boxes (B, Q, 4)."""
        if self.focal:
            return self._topk_sigmoid_instances(logits, boxes, image_sizes, self.topk_test)
        scores, labels = F.softmax(logits, dim=-1)[..., :-1].max(-1)
        return [self._instances(s, l, b, size) for s, l, b, size in zip(scores, labels, boxes, image_sizes)]


def _anchor_embedding(num: int) -> nn.Embedding:
    """(num, 4) learned anchor boxes in logit space: centres spread uniformly, sizes 0.1."""
    embed = nn.Embedding(num, 4)
    with torch.no_grad():
        embed.weight[:, :2].uniform_(0, 1)
        embed.weight[:, :2] = inverse_sigmoid(embed.weight[:, :2])
        embed.weight[:, 2:] = inverse_sigmoid(torch.full((num, 2), 0.1))
    return embed


@META_ARCH_REGISTRY.register()
class AQDeformableDETR(SetPredictionDetector):
    """Deformable-DETR (Zhu et al. 2021) with pure-PyTorch multi-scale deformable attention.

    Unlike `AQDETR`, the network after the backbone is a submodule, `self.detector`
    (`DeformableDETR`), because that module is the official code's `DeformableDETR` without its
    backbone, parameter for parameter: official checkpoints convert by a prefix, the tests run it
    alone against the official layout and two-stage / refinement variants, and every checkpoint
    written so far (the committed teacher, QAT runs, exports) names its tensors `detector.*`.
    Flattening it would rename every parameter and needs a checkpoint migration first.
    """

    config_node = "DEFORMABLE_DETR"
    quant_layout = DEFORMABLE_DETR_LAYOUT
    teacher_matching_keys = TEACHER_MATCHING_KEYS + ("NUM_FEATURE_LEVELS", "WITH_BOX_REFINE", "TWO_STAGE")

    @configurable
    def __init__(self, *, backbone, in_features, detector: DeformableDETR, num_classes: int,
                 criterion: SetCriterion, topk_test: int = 100, aux_queries: Optional[AuxQueries] = None,
                 quantize=None, pixel_mean, pixel_std):
        super().__init__(backbone=backbone, in_features=in_features, criterion=criterion,
                         num_classes=num_classes, pixel_mean=pixel_mean, pixel_std=pixel_std,
                         aux_queries=aux_queries)
        self.detector = detector
        self.topk_test = topk_test
        # [position | content] like `detector.query_embed`. In two-stage the auxiliary queries
        # are the next-best encoder proposals (H-DETR) and need no embedding.
        self.aux_query_embed = None
        if aux_queries is not None and not detector.two_stage:
            self.aux_query_embed = nn.Embedding(aux_queries.num_queries, 2 * detector.transformer.d_model)
        if quantize is not None:
            quantize(self)

    @classmethod
    def from_config(cls, cfg):
        d = cfg.MODEL.DEFORMABLE_DETR
        check_heads(d, "MODEL.DEFORMABLE_DETR")
        if d.NUM_FEATURE_LEVELS < len(d.IN_FEATURES):
            raise ValueError(f"MODEL.DEFORMABLE_DETR.NUM_FEATURE_LEVELS ({d.NUM_FEATURE_LEVELS}) "
                             f"is smaller than the number of IN_FEATURES {list(d.IN_FEATURES)}")
        backbone = build_detr_backbone(cfg, d.IN_FEATURES)
        shapes = backbone.output_shape()
        transformer = DeformableTransformer(
            d_model=d.HIDDEN_DIM, nhead=d.NHEADS, num_encoder_layers=d.ENC_LAYERS,
            num_decoder_layers=d.DEC_LAYERS, dim_feedforward=d.DIM_FEEDFORWARD, dropout=d.DROPOUT,
            activation="relu", num_feature_levels=d.NUM_FEATURE_LEVELS, dec_n_points=d.DEC_N_POINTS,
            enc_n_points=d.ENC_N_POINTS, two_stage=d.TWO_STAGE,
            two_stage_num_proposals=d.NUM_OBJECT_QUERIES)
        detector = DeformableDETR(
            in_channels=[shapes[f].channels for f in d.IN_FEATURES], transformer=transformer,
            num_classes=d.NUM_CLASSES, num_queries=d.NUM_OBJECT_QUERIES,
            num_feature_levels=d.NUM_FEATURE_LEVELS,
            position_embedding=PositionEmbeddingSine(d.HIDDEN_DIM // 2, normalize=True, offset=-0.5),
            deep_supervision=d.DEEP_SUPERVISION, with_box_refine=d.WITH_BOX_REFINE, two_stage=d.TWO_STAGE)
        matcher = HungarianMatcher(d.COST_CLASS, d.COST_BBOX, d.COST_GIOU, focal=True,
                                   focal_alpha=d.FOCAL_ALPHA)
        criterion = SetCriterion(d.NUM_CLASSES, matcher, d.CLASS_WEIGHT, d.L1_WEIGHT, d.GIOU_WEIGHT,
                                 focal=True, focal_alpha=d.FOCAL_ALPHA)
        return {"backbone": backbone, "in_features": d.IN_FEATURES, "detector": detector,
                "num_classes": d.NUM_CLASSES, "criterion": criterion, "topk_test": d.TOPK_TEST,
                "aux_queries": AuxQueries.from_config(cfg),
                "quantize": partial(maybe_quantize, cfg, layout=cls.quant_layout),
                **pixel_stats(cfg)}

    def predict(self, images: ImageList) -> Dict:
        """`DeformableDETR.forward`'s dict; in training with auxiliary queries, cut to the object
        queries, with "aux_query_outputs" for the auxiliary ones (see `split_query_outputs`)."""
        features, masks = masked_features(self.backbone, images, self.in_features)
        pos = [self.detector.position_embedding(m).to(f.dtype) for f, m in zip(features, masks)]
        if not self.uses_aux_queries:
            return self.detector(features, masks, pos)
        num_queries = self.detector.num_queries
        attn_mask = self.aux_queries.self_attn_mask(num_queries, self.device)
        if self.detector.two_stage:
            out = self.detector(features, masks, pos, self_attn_mask=attn_mask,
                                num_aux_proposals=self.aux_queries.num_queries)
        else:
            queries = torch.cat([self.detector.query_embed.weight, self.aux_query_embed.weight])
            out = self.detector(features, masks, pos, self_attn_mask=attn_mask, query_embeds=queries)
        return split_query_outputs(out, num_queries, DEFORMABLE_DETR_QUERY_AXES)

    def inference(self, logits: Tensor, boxes: Tensor, image_sizes) -> List[Instances]:
        """Top-k (query, class) pairs by sigmoid score: logits (B, Q, K), boxes (B, Q, 4)."""
        return self._topk_sigmoid_instances(logits, boxes, image_sizes, self.topk_test)
