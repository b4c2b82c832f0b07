"""The committed model zoo (docs/models/<name>/): each entry loads the way its own
`train_net.py --eval-only` command loads it, with nothing left to calibrate, and matches its
metrics.json. (The AP itself is the command's to reproduce: a 1000-image evaluation per entry.)"""
import json
import os

import pytest
import torch

from aqdetr_d2.config import load_config
from aqdetr_d2.engine import AQDETRCheckpointer, AQDETRTrainer
from aqdetr_d2.engine.calibration import uninitialized_quantizers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ZOO = os.path.join(ROOT, "docs", "models")
ENTRIES = sorted(n for n in os.listdir(ZOO) if os.path.isfile(os.path.join(ZOO, n, "metrics.json"))) \
    if os.path.isdir(ZOO) else []


@pytest.mark.parametrize("name", ENTRIES)
def test_entry_loads_as_its_command_loads_it(name, tmp_path, monkeypatch):
    folder = f"docs/models/{name}"
    with open(os.path.join(ROOT, folder, "metrics.json")) as f:
        metrics = json.load(f)
    config, weights = f"{folder}/config.yaml", f"{folder}/model.pth"
    assert metrics["name"] == name
    assert metrics["eval_command"] == (f"python projects/AQDETR/train_net.py --eval-only --config-file {config} "
                                       f"MODEL.WEIGHTS {weights}")
    with open(os.path.join(ROOT, config)) as f:
        text = f.read()
    assert ROOT not in text, "an entry's config names no path of the machine that made it"

    cfg = load_config(os.path.join(ROOT, config), ["MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path)])
    q = cfg.MODEL.QUANT
    assert q.ENABLED and metrics["precision"] == f"W{q.WEIGHT_BITS}A{q.ACT_BITS}A{q.ATTN_BITS}"
    assert cfg.MODEL.META_ARCHITECTURE == metrics["meta_architecture"]
    assert os.path.getsize(os.path.join(ROOT, weights)) / 2**20 == pytest.approx(metrics["model_mb"])
    torch.load(os.path.join(ROOT, weights), weights_only=True)  # plain tensors: loads safely

    model = AQDETRTrainer.build_model(cfg)
    monkeypatch.chdir(ROOT)  # the command runs from the project root, where the entry's paths are relative
    AQDETRCheckpointer(model, save_dir=str(tmp_path), use_ema=cfg.MODEL_EMA.ENABLED).resume_or_load(
        cfg.MODEL.WEIGHTS, resume=False)
    assert not uninitialized_quantizers(model), "every step size comes from the packed weights"
    model.eval()
    image = torch.randint(0, 256, (3, 128, 170), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        instances = model([{"image": image, "height": 128, "width": 170}])[0]["instances"]
    assert len(instances) > 0 and torch.isfinite(instances.pred_boxes.tensor).all()
