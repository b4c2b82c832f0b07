"""--resume continues exactly: a run killed at a checkpoint and resumed ends with the same tensors
as the run that was never stopped (data order, augmentation, dropout, quantizers, EMA, teacher)."""
import os

import torch

from train_net_helpers import STUDENTS, _log, _run, write_teacher

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
