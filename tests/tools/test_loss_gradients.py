"""tools/loss_gradients.py: per-term gradient statistics, checked by hand and run as a user would."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from train_net_helpers import COMMON, TINY, load_script


@pytest.fixture(scope="module")
def tool(project_root):
    return load_script(os.path.join(project_root, "tools", "loss_gradients.py"), "loss_gradients")


def test_statistics_match_hand_computed_gradients(tool):
    w, b = torch.randn(5, requires_grad=True), torch.randn(3, requires_grad=True)
    c = {name: torch.randn(5) for name in ("loss_ce", "loss_bbox", "loss_ce_aux", "loss_distill_enc_out")}
    losses = {name: (w * v).sum() for name, v in c.items()}
    losses["loss_bbox"] = losses["loss_bbox"] + (b * b).sum()  # b's gradient 2b enters only here
    stats = tool.term_statistics(losses, [w, b])

    grads = {name: np.concatenate([v.numpy(), np.zeros(3)]) for name, v in c.items()}
    grads["loss_bbox"][5:] = 2 * b.detach().numpy()
    detection = grads["loss_ce"] + grads["loss_bbox"]  # *_aux and loss_distill_* are not detection
    for name, grad in grads.items():
        value, norm, cosine = stats[name]
        assert value == pytest.approx(losses[name].item())
        assert norm == pytest.approx(np.linalg.norm(grad), rel=1e-5)
        assert cosine == pytest.approx(grad @ detection / np.linalg.norm(grad) / np.linalg.norm(detection), abs=1e-5)
    assert stats["(detection total)"][1] == pytest.approx(np.linalg.norm(detection), rel=1e-5)


def test_tool_prints_every_term(project_root):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, os.path.join("tools", "loss_gradients.py"), "--config-file", "configs/shapes/detr_fp32.yaml",
         "--batches", "2", *COMMON, *TINY["detr_fp32.yaml"], "MODEL.QUANT.ENABLED", "True",
         "MODEL.AUX_QUERIES.ENABLED", "True", "MODEL.AUX_QUERIES.NUM_QUERIES", "12", "MODEL.AUX_QUERIES.K", "2",
         "DATALOADER.NUM_WORKERS", "0"],
        cwd=project_root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {line.split(" | ")[0].strip("| "): line for line in result.stdout.splitlines() if line.startswith("| loss")}
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_ce_aux", "loss_giou_0_aux"} <= set(rows)
    assert "| (detection total) |" in result.stdout and "+1.000 |" in result.stdout
