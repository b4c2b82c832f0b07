"""--resume continues exactly: a run killed at a checkpoint and resumed ends with the same tensors
as the run that was never stopped (data order, augmentation, dropout, quantizers, EMA, teacher)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from train_net_helpers import COMMON, STUDENTS, TINY, _log, _run, write_teacher

EMA = ["MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY", "0.5"]


def _final(output_dir):
    state = torch.load(os.path.join(output_dir, "model_final.pth"), map_location="cpu", weights_only=True)
    return {**{f"model.{k}": v for k, v in state["model"].items()},
            **{f"ema.{k}": v for k, v in state["model_ema"]["weights"].items()}}


def test_killed_and_resumed_run_equals_the_uninterrupted_one(train_net, tmp_path, project_root):
    config = "detr_fp32.yaml"
    _, _, student = write_teacher(train_net, config, tmp_path, project_root)
    # Dropout on, so that a step's random draws matter as well as the data's.
    opts = ["SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "1", "SEED", "3", "MODEL.DETR.DROPOUT", "0.1",
            *student, *EMA]
    straight = tmp_path / "straight"
    _run(train_net, STUDENTS[config], straight, *opts)

    killed = tmp_path / "killed"
    _run(train_net, STUDENTS[config], killed, *opts)
    # As after SIGKILL during iteration 4: only the checkpoints up to iteration 3 exist.
    for name in os.listdir(killed):
        if name == "model_final.pth" or name.startswith("model_00000") and int(name[6:13]) >= 3:
            os.remove(killed / name)
    (killed / "last_checkpoint").write_text("model_0000002.pth")
    _run(train_net, STUDENTS[config], killed, *opts, flags=["--resume"])
    assert "Starting training from iteration 3" in _log(killed)

    expected, resumed = _final(straight), _final(killed)
    assert expected.keys() == resumed.keys()
    differing = [k for k in expected if not torch.equal(expected[k], resumed[k])]
    assert not differing, f"{len(differing)} of {len(expected)} tensors differ, e.g. {differing[:5]}"


def test_checkpoint_holds_the_data_stream(train_net, tmp_path):
    _run(train_net, "detr_fp32.yaml", tmp_path, "SOLVER.MAX_ITER", "2", "SEED", "5")
    state = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)["train_data"]
    assert state["seed"] == 5
    # Two iterations of batch 2 on one process: 4 images drawn (shapes images are all square).
    assert state["ranks"] == [{"next_position": 4, "pending": [[], []]}]


def _train_net_cmd(project_root, config, output_dir, opts, flags=()):
    return [sys.executable, os.path.join(project_root, "projects", "AQDETR", "train_net.py"), *flags, "--config-file",
            os.path.join(project_root, "configs", "shapes", config), *COMMON, *TINY["detr_fp32.yaml"], *opts,
            "OUTPUT_DIR", str(output_dir)]


def _kill_after_checkpoint(cmd, output_dir, iteration, env):
    """Start `cmd` and SIGKILL it once it has tagged the checkpoint of `iteration` (0-based) as its last."""
    tag = f"model_{iteration:07d}.pth"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        last = output_dir / "last_checkpoint"
        if last.exists() and last.read_text().strip() == tag:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


@pytest.mark.parametrize("variant", ["float", "lsq"])
def test_sigkilled_run_resumes_to_the_uninterrupted_one(project_root, tmp_path, variant):
    quant = ["MODEL.QUANT.ENABLED", "True", "MODEL.QUANT.CALIB_BATCHES", "1"] if variant == "lsq" else []
    opts = ["SOLVER.MAX_ITER", "12", "SOLVER.CHECKPOINT_PERIOD", "1", "SEED", "4", "DATASETS.TEST", "()",
            "MODEL.DETR.DROPOUT", "0.1", *quant, "MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY", "0.5"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_train_net_cmd(project_root, "detr_fp32.yaml", straight, opts), env=env, check=True,
                   capture_output=True, timeout=600)
    _kill_after_checkpoint(_train_net_cmd(project_root, "detr_fp32.yaml", killed, opts), killed, 3, env)
    assert not (killed / "model_final.pth").exists()
    subprocess.run(_train_net_cmd(project_root, "detr_fp32.yaml", killed, opts, ["--resume"]), env=env, check=True,
                   capture_output=True, timeout=600)
    expected, resumed = _final(straight), _final(killed)
    differing = [k for k in expected if not torch.equal(expected[k], resumed[k])]
    assert not differing, f"{len(differing)} of {len(expected)} tensors differ, e.g. {differing[:5]}"
