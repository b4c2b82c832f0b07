"""The training path learns: a small model overfits four fixed images."""
import pytest

from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from aqdetr_d2.data import DetrDatasetMapper
from aqdetr_d2.engine import build_detr_optimizer


@pytest.mark.parametrize("config,node", [("shapes/detr_fp32.yaml", "DETR"),
                                         ("shapes/deformable_detr_fp32.yaml", "DEFORMABLE_DETR")])
def test_small_model_overfits_four_images(make_cfg, config, node):
    cfg = make_cfg(config, f"MODEL.{node}.HIDDEN_DIM", "64", f"MODEL.{node}.DIM_FEEDFORWARD", "128",
                   f"MODEL.{node}.NHEADS", "4", "INPUT.RANDOM_FLIP", "none", "INPUT.MIN_SIZE_TRAIN", "(96,)",
                   "SOLVER.BASE_LR", "0.0005")
    mapper = DetrDatasetMapper(cfg, is_train=True)
    batch = [mapper(d) for d in DatasetCatalog.get("shapes_train")[:4]]
    model = build_model(cfg)
    model.train()
    optimizer = build_detr_optimizer(cfg, model)
    losses = []
    for _ in range(60):
        loss = sum(model(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, f"loss went from {first:.2f} to {last:.2f}"
