"""tools/training_curve.py: the curve from metrics.json and the last-quarter convergence rule."""
import json
import os

import pytest

from train_net_helpers import load_script


@pytest.fixture(scope="module")
def tool(project_root):
    return load_script(os.path.join(project_root, "tools", "training_curve.py"), "training_curve_tool")


def _metrics(path, aps, period=100):
    with open(path, "w") as f:
        for i, ap in enumerate(aps):
            it = (i + 1) * period - 1
            f.write(json.dumps({"iteration": it, "lr": 1e-4, "total_loss": 1.0}) + "\n")
            f.write(json.dumps({"iteration": it, "bbox/AP": ap, "bbox/AP50": ap + 30, "bbox/AP75": ap}) + "\n")


@pytest.mark.parametrize("aps, converged", [
    ([10, 30, 40, 50, 55, 56, 56.2, 56.4], True),  # 56.0 at 600 (< 3/4 of 800), 56.4 at the end: +0.4
    ([10, 30, 40, 50, 55, 56, 56.5, 56.6], False),  # +0.6
])
def test_last_quarter_rule(tool, tmp_path, capsys, aps, converged):
    path = tmp_path / "metrics.json"
    _metrics(path, aps)
    assert tool.main([str(path), "--output", str(tmp_path / "curve.png")]) == (0 if converged else 1)
    out = capsys.readouterr().out
    assert "| 800 | " in out and ("converged" in out) and (tmp_path / "curve.png").stat().st_size > 1000


def test_an_unfinished_run_is_not_converged(tool, tmp_path, capsys):
    path = tmp_path / "metrics.json"
    _metrics(path, [10, 20, 20, 20])
    assert tool.main([str(path), "--max-iter", "800"]) == 1
    assert "not finished" in capsys.readouterr().out
