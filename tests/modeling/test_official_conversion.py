"""tools/convert_official_checkpoint.py's conversion of Deformable-DETR checkpoints: COCO's class
remap commutes with the model (two-stage proposals included), and a wrong --arch is refused."""
import os
import re

import pytest
import torch

from detectron2.modeling import build_model

from aqdetr_d2.checkpoint import convert_official_state_dict
from aqdetr_d2.checkpoint.official import _coco_contiguous_rows

TINY = ["MODEL.DEFORMABLE_DETR.HIDDEN_DIM", "32", "MODEL.DEFORMABLE_DETR.DIM_FEEDFORWARD", "64",
        "MODEL.DEFORMABLE_DETR.NHEADS", "4", "MODEL.DEFORMABLE_DETR.ENC_LAYERS", "1",
        "MODEL.DEFORMABLE_DETR.DEC_LAYERS", "2", "MODEL.DEFORMABLE_DETR.NUM_OBJECT_QUERIES", "20"]


def _official_name(key: str) -> str:
    """Our name -> the official repositories' (the inverse of the converter's renaming)."""
    if not key.startswith("backbone."):
        return key[len("detector."):]
    key = key[len("backbone."):]
    key = re.sub(r"^stem\.conv1\.weight$", "conv1.weight", key)
    key = re.sub(r"^stem\.conv1\.norm\.", "bn1.", key)
    key = re.sub(r"^res(\d)\.", lambda m: f"layer{int(m.group(1)) - 1}.", key)
    key = re.sub(r"\.conv(\d)\.norm\.", r".bn\1.", key)
    key = re.sub(r"\.shortcut\.weight$", ".downsample.0.weight", key)
    key = re.sub(r"\.shortcut\.norm\.", ".downsample.1.", key)
    return "backbone.0.body." + key


def _as_official(state):
    """Our state dict in the official layout: torchvision names, packed attention in-projections."""
    out = {}
    for key, value in state.items():
        m = re.match(r"^(.*)\.q_proj\.(weight|bias)$", key)
        if m:
            parts = [state[f"{m.group(1)}.{p}_proj.{m.group(2)}"] for p in "qkv"]
            out[_official_name(f"{m.group(1)}.in_proj_{m.group(2)}")] = torch.cat(parts)
        elif not re.search(r"\.[kv]_proj\.", key):
            out[_official_name(key)] = value
    return out


def _model(make_cfg, num_classes, mode):
    refine, two_stage = {"plain": (False, False), "refine": (True, False), "two_stage": (True, True)}[mode]
    cfg = make_cfg("shapes/deformable_detr_fp32.yaml", *TINY, "MODEL.DEFORMABLE_DETR.NUM_CLASSES", str(num_classes),
                   "MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE", str(refine), "MODEL.DEFORMABLE_DETR.TWO_STAGE", str(two_stage))
    return build_model(cfg).eval()


@pytest.mark.parametrize("mode", ["plain", "refine", "two_stage"])
def test_coco_remap_commutes_with_the_model(make_cfg, mode):
    official_model = _model(make_cfg, 91, mode)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every head its own random weights, as after training
        for p in official_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    converted = convert_official_state_dict(_as_official(official_model.state_dict()), "deformable_detr", "yes")
    ours = _model(make_cfg, 80, mode)
    ours.load_state_dict(converted)
    # A padded batch: two images of different sizes.
    image = [{"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8), "height": h, "width": w}
             for h, w in ((96, 128), (80, 104))]
    with torch.no_grad():
        want = official_model.predict(official_model.preprocess_image(image))
        got = ours.predict(ours.preprocess_image(image))
    keep = _coco_contiguous_rows(with_no_object=False)
    torch.testing.assert_close(got["pred_boxes"], want["pred_boxes"], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["pred_logits"], want["pred_logits"][..., keep], rtol=0, atol=1e-5)


def test_a_wrong_arch_is_refused(make_cfg):
    official = _as_official(_model(make_cfg, 91, "plain").state_dict())
    with pytest.raises(ValueError, match="convert it with --arch deformable_detr"):
        convert_official_state_dict(official, "detr")
    detr_like = {k: v for k, v in official.items() if "sampling_offsets" not in k}
    with pytest.raises(ValueError, match="convert it with --arch detr"):
        convert_official_state_dict(detr_like, "deformable_detr")


def test_the_tool_writes_where_the_coco_configs_read(make_cfg, project_root, tmp_path):
    import subprocess
    import sys

    official = tmp_path / "official.pth"
    torch.save({"model": _as_official(_model(make_cfg, 91, "plain").state_dict())}, official)
    tool = os.path.join(project_root, "tools", "convert_official_checkpoint.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, tool, "--arch", "deformable_detr", str(official)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    converted = torch.load(tmp_path / "checkpoints" / "deformable_detr_r50_coco_d2.pth", weights_only=True)["model"]
    assert converted["detector.class_embed.0.weight"].shape[0] == 80
    assert "remapped: class rows of 4 class-head tensors: COCO's 91 -> Detectron2's 80" in done.stdout
    # The wrong --arch, and a truncated file: one line each, no traceback.
    for args in (["--arch", "detr", str(official)], ["--arch", "detr", str(tmp_path / "cut.pth")]):
        (tmp_path / "cut.pth").write_bytes(official.read_bytes()[:3000])
        done = subprocess.run([sys.executable, tool, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("error: ")
