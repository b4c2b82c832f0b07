"""Detectron2 backbone features with DETR's padding masks, and a narrow ResNet for CPU models."""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, build_backbone
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet
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


@BACKBONE_REGISTRY.register()
def build_narrow_resnet_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """ResNet-18/34 (BasicBlock) of any width: `MODEL.RESNETS.STEM_OUT_CHANNELS` and
    `RES2_OUT_CHANNELS` set the first widths, doubled at every later stage.

    Detectron2's `build_resnet_backbone` fixes R18/R34 at width 64; the CPU-sized shapes models
    use width 32, which makes a checkpoint small enough to commit.
    """
    r = cfg.MODEL.RESNETS
    blocks_per_stage = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}
    if r.DEPTH not in blocks_per_stage:
        raise ValueError(f"build_narrow_resnet_backbone supports MODEL.RESNETS.DEPTH 18 or 34, got {r.DEPTH}")
    stem = BasicStem(in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS, norm=r.NORM)
    stages, in_channels, out_channels = [], r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    for idx, num_blocks in enumerate(blocks_per_stage[r.DEPTH]):
        stages.append(ResNet.make_stage(
            block_class=BasicBlock, num_blocks=num_blocks, in_channels=in_channels, out_channels=out_channels,
            stride_per_block=[1 if idx == 0 else 2] + [1] * (num_blocks - 1), norm=r.NORM))
        in_channels, out_channels = out_channels, out_channels * 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
