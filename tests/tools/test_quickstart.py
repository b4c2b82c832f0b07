"""tools/quickstart.py's own logic: result parsing, refusals, the results files.

The whole pipeline (five train_net runs and five COCO evaluations) takes minutes even with tiny
models, so it is run by hand (see the issue notes), not here.
"""
import argparse
import importlib.util
import json
import os

import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def quickstart(project_root):
    spec = importlib.util.spec_from_file_location("quickstart", os.path.join(project_root, "tools", "quickstart.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_final_metrics_reads_the_last_evaluation(quickstart, tmp_path):
    lines = [{"iteration": 9, "total_loss": 3.0},
             {"iteration": 9, "bbox/AP": 10.0, "bbox/AP50": 20.0, "bbox/AP-circle": 5.0},
             {"iteration": 19, "bbox/AP": 30.5, "bbox/AP50": 50.0, "bbox/AP-circle": 25.0}]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert quickstart.final_metrics(str(tmp_path)) == {"AP": 30.5, "AP50": 50.0}


def test_missing_evaluation_is_refused(quickstart, tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"iteration": 1, "total_loss": 1.0}) + "\n")
    with pytest.raises(SystemExit, match="no evaluation"):
        quickstart.final_metrics(str(tmp_path))


def test_corrupt_teacher_is_refused(quickstart, tmp_path):
    bad = tmp_path / "teacher.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot be read"):
        quickstart.check_teacher(str(bad))
    torch.save({"model": {"transformer.weight": torch.zeros(1)}}, bad)
    with pytest.raises(SystemExit, match="not a detector checkpoint"):
        quickstart.check_teacher(str(bad))


def test_unwritable_dataset_directory_is_refused(quickstart, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(locked))
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root ignores permission bits
    with pytest.raises(SystemExit, match="DETECTRON2_DATASETS"):
        quickstart.check_dataset_dir()


def test_results_files(quickstart, tmp_path, capsys):
    rows = [{"name": name, "AP": ap, "AP50": 2 * ap, "AP75": ap, "APs": ap, "APm": ap, "APl": float("nan"),
             "size_mb": 1.5, "gops": 0.05, "train_minutes": 3.0} for name, ap in [("LSQ", 40.0), ("AQ-DETR", 45.0)]]
    quickstart.write_results(argparse.Namespace(output=str(tmp_path)), rows)
    table = (tmp_path / "results.md").read_text()
    assert "| LSQ | 40.0 | 80.0 |" in table and "| AQ-DETR | 45.0 |" in table
    assert json.loads((tmp_path / "results.json").read_text())["rows"][1]["AP"] == 45.0
    image = Image.open(tmp_path / "ablation.png")
    assert image.size[0] > 200 and image.size[1] > 150
    assert "| AQ-DETR | 45.0 |" in capsys.readouterr().out


def test_evaluated_metrics_reads_the_copypaste_lines(quickstart, tmp_path):
    log = tmp_path / "run.log"
    log.write_text("[d2.evaluation.testing]: copypaste: Task: bbox\n"
                   "[d2.evaluation.testing]: copypaste: AP,AP50,AP75,APs,APm,APl\n"
                   "[d2.evaluation.testing]: copypaste: 73.3066,93.4934,84.9689,72.3022,77.2350,nan\n")
    metrics = quickstart.evaluated_metrics(str(log))
    assert metrics["AP"] == 73.3066 and metrics["APm"] == 77.235 and metrics["APl"] != metrics["APl"]
    log.write_text("nothing evaluated\n")
    with pytest.raises(SystemExit, match="no COCO evaluation"):
        quickstart.evaluated_metrics(str(log))
