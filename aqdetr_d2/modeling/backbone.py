"""Detectron2 backbone features with DETR's padding masks."""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from detectron2.modeling import Backbone, build_backbone
from detectron2.structures import ImageList


def build_detr_backbone(cfg, in_features: Sequence[str]) -> Backbone:
    """Build `cfg.MODEL.BACKBONE.NAME` and check it produces `in_features`."""
    backbone = build_backbone(cfg)
    available = list(backbone.output_shape().keys())
    missing = [f for f in in_features if f not in available]
    if missing:
        raise ValueError(
            f"Backbone '{cfg.MODEL.BACKBONE.NAME}' does not output {missing}; it outputs {available}. "
            "Set MODEL.RESNETS.OUT_FEATURES to include them.")
    return backbone


def padding_mask(images: ImageList) -> Tensor:
    """(B, H_pad, W_pad) bool mask of the padded batch, True where a pixel is padding."""
    batch, _, height, width = images.tensor.shape
    mask = torch.ones((batch, height, width), dtype=torch.bool, device=images.tensor.device)
    for i, (h, w) in enumerate(images.image_sizes):
        mask[i, :h, :w] = False
    return mask


def masked_features(backbone: Backbone, images: ImageList, in_features: Sequence[str]
                    ) -> Tuple[List[Tensor], List[Tensor]]:
    """Run the backbone and give each requested level its padding mask.

    Returns features (B, C_l, H_l, W_l) and masks (B, H_l, W_l) (True = padding), in the
    order of `in_features`. Masks are the image mask resized with nearest neighbour, as DETR does.
    """
    outputs: Dict[str, Tensor] = backbone(images.tensor)
    mask = padding_mask(images)
    features, masks = [], []
    for name in in_features:
        feat = outputs[name]
        features.append(feat)
        masks.append(F.interpolate(mask[None].float(), size=feat.shape[-2:]).to(torch.bool)[0])
    return features, masks
