"""AQDETR reproduces the original DETR (PyPI detr==0.1.4) after checkpoint conversion."""
import argparse
import os
import re
import sys
import zipfile

import pytest
import torch
import torchvision

from detectron2.modeling import build_model

from detection_targets import random_targets

from aqdetr_d2.checkpoint import convert_official_state_dict



@pytest.fixture(scope="module")
def original_detr_module(tmp_path_factory, project_root):
    """The original `models` package, imported from the unpacked 2020 wheel."""
    wheel = os.path.join(project_root, ".cache", "detr-0.1.4-py3-none-any.whl")
    if not os.path.exists(wheel):
        pytest.fail(f"{wheel} is missing: run `bash scripts/install.sh`, which downloads it")
    root = tmp_path_factory.mktemp("detr_original")
    zipfile.ZipFile(wheel).extractall(root)
    saved_version = torchvision.__version__
    saved_resnet = {n: getattr(torchvision.models, n) for n in ("resnet18", "resnet50")}

    def no_download(fn):
        # The 2020 code passes `pretrained=`; newer torchvision only knows `weights=`.
        def build(pretrained=False, **kwargs):
            return fn(weights=None, **kwargs)
        return build

    # util.misc parses the version as float(version[:3]); "0.29" would read as 0.2.
    torchvision.__version__ = "1.0.0"
    for name, fn in saved_resnet.items():
        setattr(torchvision.models, name, no_download(fn))
    sys.path.insert(0, str(root))
    try:
        import models.detr as detr_module

        yield detr_module
    finally:
        sys.path.remove(str(root))
        for mod in [m for m in sys.modules if m.split(".")[0] in ("models", "util", "datasets")]:
            del sys.modules[mod]
        torchvision.__version__ = saved_version
        for name, fn in saved_resnet.items():
            setattr(torchvision.models, name, fn)


def _original_args(backbone, pre_norm):
    return argparse.Namespace(
        backbone=backbone, lr_backbone=1e-5, masks=False, dilation=False, hidden_dim=64,
        position_embedding="sine", dropout=0.0, nheads=4, dim_feedforward=96, enc_layers=2,
        dec_layers=3, pre_norm=pre_norm, num_queries=7, aux_loss=True, dataset_file="voc",
        device="cpu", frozen_weights=None, set_cost_class=1, set_cost_bbox=5, set_cost_giou=2,
        bbox_loss_coef=5, giou_loss_coef=2, eos_coef=0.1)


def _randomize_frozen_bn(model):
    for name, buf in model.named_buffers():
        if name.endswith("running_var"):
            buf.uniform_(0.5, 2.0)
        elif name.endswith(("running_mean", "bias")):
            buf.normal_(0, 0.1)
        elif name.endswith("weight"):
            buf.uniform_(0.5, 1.5)


@pytest.mark.parametrize("depth,pre_norm", [(50, False), (18, True)])
def test_aqdetr_matches_original_detr(original_detr_module, make_cfg, depth, pre_norm):
    from models import build_model as build_original

    torch.manual_seed(1)
    original, _, _ = build_original(_original_args(f"resnet{depth}", pre_norm))
    _randomize_frozen_bn(original)
    original.eval()

    cfg = make_cfg("Base-DETR.yaml", "MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", str(depth),
                   "MODEL.DETR.NUM_CLASSES", "20", "MODEL.DETR.NUM_OBJECT_QUERIES", "7",
                   "MODEL.DETR.HIDDEN_DIM", "64", "MODEL.DETR.NHEADS", "4",
                   "MODEL.DETR.DIM_FEEDFORWARD", "96", "MODEL.DETR.ENC_LAYERS", "2",
                   "MODEL.DETR.DEC_LAYERS", "3", "MODEL.DETR.DROPOUT", "0.0",
                   "MODEL.DETR.PRE_NORM", str(pre_norm))
    if depth == 18:
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    ours = build_model(cfg)
    converted = convert_official_state_dict(original.state_dict(), "detr", coco_to_contiguous="no")
    ours.load_state_dict(converted, strict=True)
    ours.eval()

    gen = torch.Generator().manual_seed(2)
    images = [torch.randint(0, 256, (3, 96, 128), generator=gen, dtype=torch.uint8),
              torch.randint(0, 256, (3, 80, 64), generator=gen, dtype=torch.uint8)]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        ref = original([(img.float() / 255 - mean) / std for img in images])
        out = ours.predict(ours.preprocess_image([{"image": img} for img in images]))

    layers = [(ref, out)] + list(zip(ref["aux_outputs"], out["aux_outputs"]))
    assert len(layers) == 3
    for r, o in layers:
        torch.testing.assert_close(o["pred_logits"], r["pred_logits"], atol=1e-4, rtol=0)
        torch.testing.assert_close(o["pred_boxes"], r["pred_boxes"], atol=1e-4, rtol=0)


def test_criterion_matches_original_detr(original_detr_module):
    """Our weighted losses equal the original SetCriterion's, deep supervision and an empty image included."""
    from models.detr import SetCriterion as OriginalCriterion
    from models.matcher import HungarianMatcher as OriginalMatcher

    from aqdetr_d2.modeling.criterion import SetCriterion
    from aqdetr_d2.modeling.matcher import HungarianMatcher

    num_classes, gen = 6, torch.Generator().manual_seed(3)
    targets = random_targets(gen, [3, 0, 5], num_classes)

    def outputs():
        return {"pred_logits": torch.randn(3, 9, num_classes + 1, generator=gen),
                "pred_boxes": torch.rand(3, 9, 4, generator=gen) * 0.4 + 0.1}

    out = outputs()
    out["aux_outputs"] = [outputs(), outputs()]
    weights = {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}
    ref_crit = OriginalCriterion(num_classes, OriginalMatcher(1, 5, 2), weights, 0.1, ["labels", "boxes"])
    ref = ref_crit(out, targets)
    ours = SetCriterion(num_classes, HungarianMatcher(1, 5, 2), 1, 5, 2, 0.1)(out, targets)
    assert len(ours) == 9
    for key, value in ours.items():
        torch.testing.assert_close(value, ref[key] * weights[re.sub(r"_\d+$", "", key)])
