"""End to end through projects/AQDETR/train_net.py: train, checkpoint, resume, evaluate, errors."""
import copy
import os
import re
import subprocess
import sys

import pytest
import torch

from train_net_helpers import COMMON, SMALL_VAL, TINY, _log, _run

from detectron2.data import DatasetCatalog, MetadataCatalog

from aqdetr_d2.utils.numerics import NUMERICS_TAG, numerics_summary


@pytest.mark.parametrize("config", ["detr_fp32.yaml", "deformable_detr_fp32.yaml"])
def test_train_resume_and_evaluate(train_net, config, tmp_path):
    _run(train_net, config, tmp_path, "SOLVER.MAX_ITER", "4")
    assert {"model_0000001.pth", "model_0000003.pth", "model_final.pth", "last_checkpoint"} <= set(os.listdir(tmp_path))
    assert "Evaluation results for bbox" in _log(tmp_path)
    saved = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)
    assert saved["iteration"] == 3

    _run(train_net, config, tmp_path, "SOLVER.MAX_ITER", "6", flags=["--resume"])
    log = _log(tmp_path)
    assert "Starting training from iteration 4" in log
    # Each process says under which CPU instructions it ran (what decides whether runs match).
    assert log.count(f"{NUMERICS_TAG} {numerics_summary()}") == 2
    assert torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)["iteration"] == 5

    results = _run(train_net, config, tmp_path / "eval", "MODEL.WEIGHTS", str(tmp_path / "model_final.pth"),
                   flags=["--eval-only"])
    bbox = results[SMALL_VAL]["bbox"] if SMALL_VAL in results else results["bbox"]
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(bbox)
    assert re.search(r"\|\s+AP\s+\|\s+AP50\s+\|", _log(tmp_path / "eval"))


def test_same_seed_gives_the_same_low_bit_run(train_net, tmp_path):
    # What lets a committed table be repeated to the digit on a machine with the same instructions.
    w2a2 = ["MODEL.QUANT.ENABLED", "True", "MODEL.QUANT.WEIGHT_BITS", "2", "MODEL.QUANT.ACT_BITS", "2",
            "MODEL.QUANT.ATTN_BITS", "2", "MODEL.QUANT.CALIB_BATCHES", "1"]
    weights = {}
    for name, seed in [("first", 5), ("again", 5), ("other_seed", 6)]:
        _run(train_net, "detr_fp32.yaml", tmp_path / name, "SOLVER.MAX_ITER", "3", "SEED", str(seed), *w2a2)
        weights[name] = torch.load(tmp_path / name / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(weights["first"][k], weights["again"][k]) for k in weights["first"])
    assert not all(torch.equal(weights["first"][k], weights["other_seed"][k]) for k in weights["first"])


def test_eval_only_rejects_mismatched_checkpoint(train_net, tmp_path):
    _run(train_net, "detr_fp32.yaml", tmp_path, "SOLVER.MAX_ITER", "1")
    with pytest.raises(SystemExit, match=r"tensors do not fit the model.*\n.*linear1\.weight: checkpoint \(64, 32\) vs model \(48, 32\)"):
        _run(train_net, "detr_fp32.yaml", tmp_path / "eval", "MODEL.WEIGHTS", str(tmp_path / "model_final.pth"),
             "MODEL.DETR.DIM_FEEDFORWARD", "48", flags=["--eval-only"])


def test_unknown_config_key_is_rejected(train_net, tmp_path):
    with pytest.raises(SystemExit, match="MODEL.DETR.NUM_QUERIES.*did you mean MODEL.DETR.NUM_OBJECT_QUERIES") as e:
        _run(train_net, "detr_fp32.yaml", tmp_path, "MODEL.DETR.NUM_QUERIES", "10")
    assert e.value.code == 2


def test_a_refused_quantization_setting_is_one_line(train_net, tmp_path):
    # The quantization library's own checks (bits, layers) reach the user as config errors.
    with pytest.raises(SystemExit, match="backbone.*INTEGER_BIAS .* not a BatchNorm2d; use FrozenBN") as e:
        _run(train_net, "detr_fp32.yaml", tmp_path, "MODEL.QUANT.ENABLED", "True", "MODEL.QUANT.INTEGER_BIAS", "True",
             "MODEL.RESNETS.NORM", "BN")
    assert e.value.code == 2


def test_num_classes_smaller_than_dataset_is_rejected(train_net, tmp_path):
    with pytest.raises(SystemExit, match="NUM_CLASSES"):
        _run(train_net, "detr_fp32.yaml", tmp_path, "MODEL.DETR.NUM_CLASSES", "3")


def test_two_process_cpu_ddp_takes_steps(project_root, tmp_path):
    """`--num-gpus 2` on a machine without GPUs runs two gloo processes."""
    cmd = [sys.executable, os.path.join(project_root, "projects", "AQDETR", "train_net.py"),
           "--config-file", os.path.join(project_root, "configs", "shapes", "detr_fp32.yaml"),
           "--num-gpus", "2", "--dist-url", "auto", *COMMON, *TINY["detr_fp32.yaml"], "SOLVER.MAX_ITER", "2",
           "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = _log(tmp_path)
    assert "world size: 2" in log.lower() or "Rank of current process: 0. World size: 2" in log
    # Each rank's data-stream position reaches the checkpoint that only rank 0 writes.
    state = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)["train_data"]
    assert state["ranks"] == [{"next_position": 2, "pending": [[], []]}] * 2


def test_malformed_boxes_are_rejected_before_training(train_net, tmp_path):
    name = "shapes_train_with_a_flat_box"
    if name not in DatasetCatalog.list():
        def load():
            dicts = copy.deepcopy(DatasetCatalog.get("shapes_train")[:10])
            dicts[3]["annotations"][0]["bbox"][2] = 0.0  # zero width
            return dicts

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(thing_classes=MetadataCatalog.get("shapes_train").thing_classes)
    with pytest.raises(SystemExit, match=name):
        _run(train_net, "detr_fp32.yaml", tmp_path, "DATASETS.TRAIN", f"('{name}',)")


def test_eval_only_without_weights_is_refused_unless_asked_for(train_net, tmp_path):
    with pytest.raises(SystemExit, match="--eval-only needs MODEL.WEIGHTS.*MODEL.WEIGHTS scratch"):
        _run(train_net, "detr_fp32.yaml", tmp_path / "a", flags=["--eval-only"])
    _run(train_net, "detr_fp32.yaml", tmp_path / "b", "MODEL.WEIGHTS", "scratch", flags=["--eval-only"])


def test_num_classes_larger_than_the_datasets_is_refused_before_training(train_net, tmp_path):
    with pytest.raises(SystemExit, match=r"NUM_CLASSES is 7 but dataset 'shapes_\w+' has 5 categories; set .* to 5"):
        _run(train_net, "detr_fp32.yaml", tmp_path, "MODEL.DETR.NUM_CLASSES", "7")
    assert not os.path.exists(tmp_path / "model_final.pth")


def _register_copy(name, source, edit=None, **metadata):
    if name not in DatasetCatalog.list():
        def load():
            dicts = copy.deepcopy(DatasetCatalog.get(source)[:6])
            return edit(dicts) if edit else dicts

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(thing_classes=MetadataCatalog.get(source).thing_classes, **metadata)


def test_a_test_set_without_evaluator_type_is_refused_before_training(train_net, tmp_path):
    _register_copy("shapes_val_without_evaluator", "shapes_val")
    with pytest.raises(SystemExit, match="'shapes_val_without_evaluator' has evaluator_type None.*register_coco_instances"):
        _run(train_net, "detr_fp32.yaml", tmp_path, "DATASETS.TEST", "('shapes_val_without_evaluator',)")
    assert not os.path.exists(tmp_path / "model_final.pth")


def test_an_unreadable_image_is_named_before_training(train_net, tmp_path):
    def truncate(dicts):
        data = open(dicts[2]["file_name"], "rb").read()
        cut = tmp_path / "cut.png"
        cut.write_bytes(data[: len(data) // 2])
        dicts[2]["file_name"] = str(cut)
        return dicts

    _register_copy("shapes_train_with_a_truncated_image", "shapes_train", truncate)
    with pytest.raises(SystemExit, match=r"image '.*cut.png' cannot be read \(.*truncated"):
        _run(train_net, "detr_fp32.yaml", tmp_path, "DATASETS.TRAIN", "('shapes_train_with_a_truncated_image',)")


def test_a_refused_input_is_one_line_with_status_2_and_a_traceback_on_request(project_root, tmp_path):
    cut = tmp_path / "cut.pth"
    cut.write_bytes(b"PK\x03\x04 not a whole zip file")
    cmd = [sys.executable, os.path.join(project_root, "projects", "AQDETR", "train_net.py"), "--config-file",
           os.path.join(project_root, "configs", "shapes", "detr_fp32.yaml"), "--eval-only", *COMMON,
           *TINY["detr_fp32.yaml"], "MODEL.WEIGHTS", str(cut), "OUTPUT_DIR", str(tmp_path / "out")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: checkpoint {cut} cannot be read")
    debug = subprocess.run(cmd, env={**env, "AQDETR_TRACEBACK": "1"}, capture_output=True, text=True, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "UnsafeCheckpointError" in debug.stderr
