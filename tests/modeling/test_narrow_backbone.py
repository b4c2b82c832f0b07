"""The narrow ResNet backbone: Detectron2's ResNet-18 layout at any width."""
import pytest
import torch

from detectron2.modeling import build_backbone


def test_narrow_resnet_widths_and_strides(make_cfg):
    cfg = make_cfg("shapes/detr_fp32.yaml", "MODEL.BACKBONE.NAME", "build_narrow_resnet_backbone",
                   "MODEL.RESNETS.STEM_OUT_CHANNELS", "16", "MODEL.RESNETS.RES2_OUT_CHANNELS", "16",
                   "MODEL.RESNETS.OUT_FEATURES", "['res3', 'res4', 'res5']")
    backbone = build_backbone(cfg)
    shapes = backbone.output_shape()
    assert [(shapes[k].channels, shapes[k].stride) for k in ("res3", "res4", "res5")] == [(32, 8), (64, 16), (128, 32)]
    out = backbone(torch.randn(2, 3, 64, 96))
    assert out["res5"].shape == (2, 128, 2, 3)


def test_narrow_resnet_rejects_bottleneck_depths(make_cfg):
    cfg = make_cfg("shapes/detr_fp32.yaml", "MODEL.BACKBONE.NAME", "build_narrow_resnet_backbone",
                   "MODEL.RESNETS.DEPTH", "50")
    with pytest.raises(ValueError, match="DEPTH 18 or 34"):
        build_backbone(cfg)
