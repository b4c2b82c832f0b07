"""Checkpoints are read without running code from them, and a file that does not fit is refused
in one clear line: malicious .pkl / .pth, truncated files, another architecture, a teacher."""
import os
import pickle

import numpy as np
import pytest
import torch

from detectron2.modeling import build_model

from aqdetr_d2.checkpoint import AQDETRCheckpointer, CheckpointMismatchError, UnsafeCheckpointError
from train_net_helpers import COMMON, TINY, _run, write_teacher


class _Payload:
    """Unpickling this creates a directory: the stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _tiny_model(make_cfg, config="detr_fp32.yaml"):
    return build_model(make_cfg(os.path.join("shapes", config), *COMMON[2:], *TINY[config]))


def test_a_pkl_with_code_is_refused_before_it_runs(train_net, tmp_path, project_root):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"model": {"x": _Payload(str(marker))}, "__author__": "x"}, protocol=2))
    with pytest.raises(SystemExit, match="evil.pkl holds Python objects besides weights.*posix.mkdir"):
        _run(train_net, "detr_fp32.yaml", tmp_path / "eval", "MODEL.WEIGHTS", str(evil), flags=["--eval-only"])
    _, _, student = write_teacher(train_net, "detr_fp32.yaml", tmp_path, project_root)
    with pytest.raises(SystemExit, match="teacher checkpoint.*evil.pkl holds Python objects"):
        _run(train_net, "aqdetr_w4a4.yaml", tmp_path / "train", *student, "MODEL.DISTILL.TEACHER_WEIGHTS", str(evil),
             "SOLVER.MAX_ITER", "1")
    assert not marker.exists()


def test_a_pth_with_code_is_refused_even_when_torch_is_told_to_allow_it(make_cfg, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"x": _Payload(str(marker))}}, evil)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UnsafeCheckpointError, match="evil.pth is not a plain weights file"):
        AQDETRCheckpointer(_tiny_model(make_cfg)).load(str(evil))
    assert not marker.exists()


def test_a_truncated_checkpoint_is_one_clear_line(train_net, make_cfg, tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": _tiny_model(make_cfg).state_dict()}, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(SystemExit) as raised:
        _run(train_net, "detr_fp32.yaml", tmp_path / "eval", "MODEL.WEIGHTS", str(cut), flags=["--eval-only"])
    message = str(raised.value)
    assert "cut.pth cannot be read: it is truncated" in message and len(message.splitlines()) == 1


@pytest.mark.parametrize("protocol", [2, 5])
def test_a_model_zoo_pkl_of_numpy_arrays_loads(make_cfg, tmp_path, protocol):
    source = _tiny_model(make_cfg)
    arrays = {k: v.numpy() for k, v in source.state_dict().items()}
    path = tmp_path / "zoo.pkl"
    path.write_bytes(pickle.dumps({"model": arrays, "__author__": "someone"}, protocol=protocol))
    target = _tiny_model(make_cfg)
    AQDETRCheckpointer(target).load(str(path))
    for k, v in target.state_dict().items():
        assert np.array_equal(v.numpy(), arrays[k]), k


def test_a_checkpoint_of_another_architecture_is_refused(make_cfg, tmp_path):
    deformable = tmp_path / "deformable.pth"
    torch.save({"model": _tiny_model(make_cfg, "deformable_detr_fp32.yaml").state_dict()}, deformable)
    # Only the backbone matches: still a detector checkpoint, not an ImageNet backbone.
    with pytest.raises(CheckpointMismatchError, match=r"does not fit this model.*no place for, e\.g\. \['detector\."):
        AQDETRCheckpointer(_tiny_model(make_cfg)).load(str(deformable))
    # A backbone alone still loads into a detector (ImageNet initialisation).
    backbone = tmp_path / "backbone.pth"
    torch.save({"model": {k: v for k, v in _tiny_model(make_cfg).state_dict().items() if k.startswith("backbone.")}},
               backbone)
    AQDETRCheckpointer(_tiny_model(make_cfg)).load(str(backbone))


def test_a_qat_checkpoint_of_other_bit_widths_is_refused(train_net, tmp_path):
    quant = ["MODEL.QUANT.ENABLED", "True", "MODEL.QUANT.CALIB_BATCHES", "1"]
    _run(train_net, "detr_fp32.yaml", tmp_path / "w4", "SOLVER.MAX_ITER", "1", *quant)
    with pytest.raises(SystemExit, match=r"other bit widths than the config's \(.*is 4-bit in the checkpoint and 2-bit"):
        _run(train_net, "detr_fp32.yaml", tmp_path / "eval", *quant, "MODEL.QUANT.WEIGHT_BITS", "2",
             "MODEL.WEIGHTS", str(tmp_path / "w4" / "model_final.pth"), flags=["--eval-only"])


def _evil_files(tmp_path):
    """A .pkl and a .pth whose unpickling would create the directory `marker`."""
    marker = tmp_path / "pwned"
    pkl, pth = tmp_path / "evil.pkl", tmp_path / "evil.pth"
    pkl.write_bytes(pickle.dumps({"model": {"x": _Payload(str(marker))}, "__author__": "x"}, protocol=2))
    torch.save({"model": {"x": _Payload(str(marker))}}, pth)
    return marker, [pkl, pth]


# Every tool that reads a checkpoint, with the arguments that make it read `{w}`.
TOOL_LOADS = {
    "export_quantized.py": ["--output", "{out}/x.pth", "MODEL.QUANT.ENABLED", "True", "MODEL.WEIGHTS", "{w}"],
    "interpolate_weights.py": ["--fine-tuned", "{w}", "--alpha", "0.5", "--output", "{out}/x.pth",
                               "MODEL.QUANT.ENABLED", "True", "MODEL.WEIGHTS", "{w}"],
    "model_report.py": ["--load-weights", "MODEL.WEIGHTS", "{w}"],
    "visualize.py": ["predictions", "--output", "{out}/x.png", "MODEL.WEIGHTS", "{w}"],
    "duplicate_predictions.py": ["--weights", "{w}", "--num-images", "2"],
}


@pytest.mark.parametrize("tool", sorted(TOOL_LOADS))
def test_no_tool_runs_code_from_a_checkpoint(project_root, tmp_path, tool):
    import subprocess
    import sys

    marker, files = _evil_files(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    for weights in files:
        args = [a.format(w=weights, out=tmp_path) for a in TOOL_LOADS[tool]]
        if tool == "visualize.py":
            args[1:1] = ["--config-file", "configs/shapes/detr_fp32.yaml"]
        else:
            args = ["--config-file", "configs/shapes/detr_fp32.yaml", *args]
        done = subprocess.run([sys.executable, os.path.join("tools", tool), *args, "MODEL.DEVICE", "cpu",
                               *TINY["detr_fp32.yaml"]], cwd=project_root, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        assert f"{weights.name} " in done.stderr and "Traceback" not in done.stderr
    assert not marker.exists()


def test_the_committed_teachers_do_not_load_into_each_other(make_cfg, project_root):
    narrow = ["MODEL.BACKBONE.NAME", "build_narrow_resnet_backbone", "MODEL.RESNETS.STEM_OUT_CHANNELS", "32",
              "MODEL.RESNETS.RES2_OUT_CHANNELS", "32"]
    teachers = {"detr_fp32.yaml": "deformable_teacher.pth", "deformable_detr_fp32.yaml": "detr_teacher.pth"}
    for config, other in teachers.items():
        model = build_model(make_cfg(os.path.join("shapes", config), *narrow))
        with pytest.raises(CheckpointMismatchError, match="does not fit this model|tensors do not fit"):
            AQDETRCheckpointer(model).load(os.path.join(project_root, "docs", "quickstart", other))
