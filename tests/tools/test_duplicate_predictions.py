"""tools/duplicate_predictions.py: duplicate counting by hand, and the tool run as a user would."""
import os
import subprocess
import sys

import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from train_net_helpers import COMMON, TINY, load_script


@pytest.fixture(scope="module")
def tool(project_root):
    return load_script(os.path.join(project_root, "tools", "duplicate_predictions.py"), "duplicate_predictions")


def _instances(boxes, scores, classes):
    inst = Instances((100, 100))
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.scores = torch.tensor(scores)
    inst.pred_classes = torch.tensor(classes)
    return inst


def test_duplicates_are_same_class_overlaps_of_better_confident_predictions(tool):
    a = [10.0, 10.0, 50.0, 50.0]
    shifted = [12.0, 10.0, 52.0, 50.0]  # IoU with a: 38 * 40 / (2 * 1600 - 1520) = 0.905
    far = [60.0, 60.0, 90.0, 90.0]
    inst = _instances([shifted, a, a, far, a], [0.5, 0.9, 0.8, 0.7, 0.1], [1, 1, 2, 1, 1])
    # Confident (>= 0.3): a/1 (0.9), a/2 (0.8), far/1 (0.7), shifted/1 (0.5). Only shifted/1
    # overlaps a better one of its class; a/2 is another class; a/1 at 0.1 is not confident.
    assert tool.count_duplicates(inst, score=0.3, iou=0.6) == (4, 1)
    assert tool.count_duplicates(inst, score=0.3, iou=0.95) == (4, 0)
    assert tool.count_duplicates(inst, score=0.05, iou=0.6) == (5, 2)
    assert tool.count_duplicates(inst, score=0.95, iou=0.6) == (0, 0)


def test_tool_prints_a_row_per_checkpoint(project_root, make_cfg, tmp_path):
    opts = [*COMMON, *TINY["detr_fp32.yaml"]]
    model = build_model(make_cfg("shapes/detr_fp32.yaml", *opts))
    torch.save({"model": model.state_dict()}, tmp_path / "a.pth")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, os.path.join("tools", "duplicate_predictions.py"), "--config-file",
         "configs/shapes/detr_fp32.yaml", "--weights", str(tmp_path / "a.pth"), "--weights", str(tmp_path / "a.pth"),
         "--num-images", "6", "--score", "0.0", *opts],
        cwd=project_root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(f"| {tmp_path}")]
    assert len(rows) == 2 and rows[0] == rows[1]
    ground_truth, confident, duplicates = (int(x) for x in rows[0].strip("| ").split(" | ")[1:])
    # Score 0: every prediction is confident; the shapes DETR (focal loss) keeps TOPK_TEST = 100
    # (query, class) pairs per image.
    assert ground_truth > 0 and confident == 6 * 100 and 0 <= duplicates < confident
