"""Detectron2 meta-architectures `AQDETR` and `AQDeformableDETR`."""
from functools import partial
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances

from ..layers.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from ..layers.mlp import MLP
from ..layers.position_encoding import PositionEmbeddingSine
from .aux_queries import (DEFORMABLE_DETR_QUERY_AXES, DETR_QUERY_AXES, AuxQueries, aux_query_loss,
                          split_query_outputs)
from .backbone import build_detr_backbone, masked_features
from .criterion import SetCriterion
from .deformable_detr import DeformableDETR
from .deformable_transformer import DeformableTransformer
from .matcher import HungarianMatcher
from .quantization import DEFORMABLE_DETR_LAYOUT, DETR_LAYOUT, maybe_quantize
from .transformer import Transformer

__all__ = ["AQDETR", "AQDeformableDETR"]


class _SetPredictionDetector(nn.Module):
    """Input normalization, target conversion and output formatting shared by both models."""

    def __init__(self, *, backbone, in_features, criterion, num_classes, pixel_mean, pixel_std,
                 aux_queries: Optional[AuxQueries] = None):
        super().__init__()
        self.backbone = backbone
        self.in_features = list(in_features)
        self.criterion = criterion
        self.num_classes = num_classes
        # Training-only auxiliary queries (settings; the subclass owns `aux_query_embed`).
        self.aux_queries = aux_queries
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)
        # Set by the trainer when distillation is on: a module without state that holds the
        # frozen teacher out of sight of state_dict(), parameters() and DDP.
        self.distiller = None

    @property
    def device(self):
        return self.pixel_mean.device

    @property
    def uses_aux_queries(self) -> bool:
        """Auxiliary queries run in training only: at inference they do not exist."""
        return self.training and self.aux_queries is not None

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images)

    def prepare_targets(self, batched_inputs: List[Dict], images: ImageList) -> List[Dict[str, Tensor]]:
        """Instances in absolute xyxy -> labels (T,) and normalized cxcywh boxes (T, 4)."""
        targets = []
        for x, (h, w) in zip(batched_inputs, images.image_sizes):
            inst = x["instances"].to(self.device)
            scale = torch.as_tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            boxes = box_xyxy_to_cxcywh(inst.gt_boxes.tensor / scale)
            targets.append({"labels": inst.gt_classes, "boxes": boxes})
        return targets

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: Detectron2 format, per image "image" (C, H, W) uint8 in
                `INPUT.FORMAT`, "height", "width" and in training "instances".
        Returns:
            training: dict of weighted losses. Inference: per image {"instances": Instances}
            with pred_boxes (absolute xyxy in the original image), scores and pred_classes.
        """
        images = self.preprocess_image(batched_inputs)
        outputs = self.predict(images)
        if self.training:
            if any("instances" not in x for x in batched_inputs):
                raise ValueError("Training inputs need 'instances'; check the dataset mapper")
            targets = self.prepare_targets(batched_inputs, images)
            losses = self.criterion(outputs, targets)
            if "aux_query_outputs" in outputs:
                losses.update(aux_query_loss(self.criterion, outputs["aux_query_outputs"], targets,
                                             self.aux_queries))
            if self.distiller is not None:
                losses.update(self.distiller(self, images, outputs, targets))
            return losses
        results = self.inference(outputs["pred_logits"], outputs["pred_boxes"], images.image_sizes)
        return [
            {"instances": detector_postprocess(r, x.get("height", size[0]), x.get("width", size[1]))}
            for r, x, size in zip(results, batched_inputs, images.image_sizes)
        ]

    def _instances(self, scores, labels, boxes, image_size) -> Instances:
        h, w = image_size
        result = Instances(image_size)
        result.pred_boxes = Boxes(box_cxcywh_to_xyxy(boxes) * boxes.new_tensor([w, h, w, h]))
        result.scores = scores
        result.pred_classes = labels
        return result


def _pixel_stats(cfg):
    if len(cfg.MODEL.PIXEL_MEAN) != len(cfg.MODEL.PIXEL_STD):
        raise ValueError("MODEL.PIXEL_MEAN and MODEL.PIXEL_STD must have the same length")
    return {"pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD}


def _check_heads(node, name):
    if node.HIDDEN_DIM % node.NHEADS != 0:
        raise ValueError(f"{name}.HIDDEN_DIM ({node.HIDDEN_DIM}) must be divisible by "
                         f"{name}.NHEADS ({node.NHEADS})")
    if node.NUM_CLASSES < 1:
        raise ValueError(f"{name}.NUM_CLASSES must be >= 1, got {node.NUM_CLASSES}")


@META_ARCH_REGISTRY.register()
class AQDETR(_SetPredictionDetector):
    """DETR (Carion et al. 2020) on a Detectron2 backbone, with quantizable explicit attention."""

    @configurable
    def __init__(self, *, backbone, in_feature: str, transformer: Transformer, num_classes: int,
                 num_queries: int, criterion: SetCriterion, deep_supervision: bool = True,
                 aux_queries: Optional[AuxQueries] = None, quantize=None, pixel_mean, pixel_std):
        super().__init__(backbone=backbone, in_features=[in_feature], criterion=criterion,
                         num_classes=num_classes, pixel_mean=pixel_mean, pixel_std=pixel_std,
                         aux_queries=aux_queries)
        hidden = transformer.d_model
        self.transformer = transformer
        self.position_embedding = PositionEmbeddingSine(hidden // 2, normalize=True)
        self.input_proj = nn.Conv2d(backbone.output_shape()[in_feature].channels, hidden, kernel_size=1)
        self.query_embed = nn.Embedding(num_queries, hidden)
        self.class_embed = nn.Linear(hidden, num_classes + 1)
        self.bbox_embed = MLP(hidden, hidden, 4, 3)
        self.deep_supervision = deep_supervision
        # Created last, so that the other parameters are initialised as without it.
        self.aux_query_embed = nn.Embedding(aux_queries.num_queries, hidden) if aux_queries else None
        if quantize is not None:
            quantize(self)

    @classmethod
    def from_config(cls, cfg):
        d = cfg.MODEL.DETR
        _check_heads(d, "MODEL.DETR")
        matcher = HungarianMatcher(d.COST_CLASS, d.COST_BBOX, d.COST_GIOU)
        return {
            "backbone": build_detr_backbone(cfg, [d.IN_FEATURE]),
            "in_feature": d.IN_FEATURE,
            "transformer": Transformer(d.HIDDEN_DIM, d.NHEADS, d.ENC_LAYERS, d.DEC_LAYERS,
                                       d.DIM_FEEDFORWARD, d.DROPOUT, d.PRE_NORM),
            "num_classes": d.NUM_CLASSES,
            "num_queries": d.NUM_OBJECT_QUERIES,
            "criterion": SetCriterion(d.NUM_CLASSES, matcher, d.CLASS_WEIGHT, d.L1_WEIGHT,
                                      d.GIOU_WEIGHT, d.NO_OBJECT_WEIGHT),
            "deep_supervision": d.DEEP_SUPERVISION,
            "aux_queries": AuxQueries.from_config(cfg),
            "quantize": partial(maybe_quantize, cfg, layout=DETR_LAYOUT),
            **_pixel_stats(cfg),
        }

    def predict(self, images: ImageList) -> Dict:
        """-> "pred_logits" (B, Q, K + 1), "pred_boxes" (B, Q, 4), "aux_outputs", "transformer";
        in training with auxiliary queries also "aux_query_outputs" (see `split_query_outputs`)."""
        features, masks = masked_features(self.backbone, images, self.in_features)
        src, mask = features[-1], masks[-1]
        pos = self.position_embedding(mask).to(src.dtype)
        queries, tgt_mask = self.query_embed.weight, None
        if self.uses_aux_queries:
            tgt_mask = self.aux_queries.self_attn_mask(len(queries), queries.device)
            queries = torch.cat([queries, self.aux_query_embed.weight])
        out = self.transformer(self.input_proj(src), mask, queries, pos, tgt_mask=tgt_mask)
        logits = self.class_embed(out["hs"])
        boxes = self.bbox_embed(out["hs"]).sigmoid()
        outputs = {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "transformer": out}
        if self.deep_supervision:
            outputs["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        if tgt_mask is not None:
            outputs = split_query_outputs(outputs, self.query_embed.num_embeddings, "transformer", DETR_QUERY_AXES)
        return outputs

    def inference(self, logits: Tensor, boxes: Tensor, image_sizes) -> List[Instances]:
        """Best non-background class per query: logits (B, Q, K + 1), boxes (B, Q, 4)."""
        scores, labels = F.softmax(logits, dim=-1)[..., :-1].max(-1)
        return [self._instances(s, l, b, size) for s, l, b, size in zip(scores, labels, boxes, image_sizes)]


@META_ARCH_REGISTRY.register()
class AQDeformableDETR(_SetPredictionDetector):
    """Deformable-DETR (Zhu et al. 2021) with pure-PyTorch multi-scale deformable attention."""

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
        _check_heads(d, "MODEL.DEFORMABLE_DETR")
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
            aux_loss=d.DEEP_SUPERVISION, with_box_refine=d.WITH_BOX_REFINE, two_stage=d.TWO_STAGE)
        matcher = HungarianMatcher(d.COST_CLASS, d.COST_BBOX, d.COST_GIOU, focal=True,
                                   focal_alpha=d.FOCAL_ALPHA)
        criterion = SetCriterion(d.NUM_CLASSES, matcher, d.CLASS_WEIGHT, d.L1_WEIGHT, d.GIOU_WEIGHT,
                                 focal=True, focal_alpha=d.FOCAL_ALPHA)
        return {"backbone": backbone, "in_features": d.IN_FEATURES, "detector": detector,
                "num_classes": d.NUM_CLASSES, "criterion": criterion, "topk_test": d.TOPK_TEST,
                "aux_queries": AuxQueries.from_config(cfg),
                "quantize": partial(maybe_quantize, cfg, layout=DEFORMABLE_DETR_LAYOUT),
                **_pixel_stats(cfg)}

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
        return split_query_outputs(out, num_queries, "transformer_out", DEFORMABLE_DETR_QUERY_AXES)

    def inference(self, logits: Tensor, boxes: Tensor, image_sizes) -> List[Instances]:
        """Top-k (query, class) pairs by sigmoid score: logits (B, Q, K), boxes (B, Q, 4)."""
        batch, num_queries, num_classes = logits.shape
        k = min(self.topk_test, num_queries * num_classes)
        scores, idx = logits.sigmoid().flatten(1).topk(k, dim=1)
        labels = idx % num_classes
        boxes = torch.gather(boxes, 1, (idx // num_classes).unsqueeze(-1).expand(-1, -1, 4))
        return [self._instances(s, l, b, size) for s, l, b, size in zip(scores, labels, boxes, image_sizes)]
