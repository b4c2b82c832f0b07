"""End to end through projects/AQDETR/train_net.py: train, checkpoint, resume, evaluate, errors."""
import copy
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser

SMALL_VAL = "shapes_val_first40"

# Small enough for a CPU test, same code paths as the real configs.
TINY = {
    "detr_fp32.yaml": ["MODEL.DETR.HIDDEN_DIM", "32", "MODEL.DETR.DIM_FEEDFORWARD", "64",
                       "MODEL.DETR.NHEADS", "4", "MODEL.DETR.ENC_LAYERS", "1", "MODEL.DETR.DEC_LAYERS", "2"],
    "deformable_detr_fp32.yaml": ["MODEL.DEFORMABLE_DETR.HIDDEN_DIM", "32",
                                  "MODEL.DEFORMABLE_DETR.DIM_FEEDFORWARD", "64",
                                  "MODEL.DEFORMABLE_DETR.NHEADS", "4", "MODEL.DEFORMABLE_DETR.ENC_LAYERS", "1",
                                  "MODEL.DEFORMABLE_DETR.DEC_LAYERS", "2"],
}
COMMON = ["MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(96,)",
          "INPUT.MIN_SIZE_TEST", "96", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "0"]


@pytest.fixture(scope="module")
def train_net(project_root):
    path = os.path.join(project_root, "projects", "AQDETR", "train_net.py")
    spec = importlib.util.spec_from_file_location("aqdetr_train_net", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if SMALL_VAL not in DatasetCatalog.list():
        DatasetCatalog.register(SMALL_VAL, lambda: copy.deepcopy(DatasetCatalog.get("shapes_val")[:40]))
        MetadataCatalog.get(SMALL_VAL).set(thing_classes=MetadataCatalog.get("shapes_val").thing_classes,
                                           evaluator_type="coco")
    return module


def _run(train_net, config, output_dir, *extra, flags=()):
    args = default_argument_parser().parse_args(
        ["--config-file", os.path.join(os.path.dirname(train_net.__file__), "..", "..", "configs", "shapes", config),
         *flags, *COMMON, *TINY[config], "OUTPUT_DIR", str(output_dir), "DATASETS.TEST", f"('{SMALL_VAL}',)", *extra])
    return train_net.main(args)


def _log(output_dir):
    with open(os.path.join(output_dir, "log.txt")) as f:
        return f.read()


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
    assert torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)["iteration"] == 5

    results = _run(train_net, config, tmp_path / "eval", "MODEL.WEIGHTS", str(tmp_path / "model_final.pth"),
                   flags=["--eval-only"])
    bbox = results[SMALL_VAL]["bbox"] if SMALL_VAL in results else results["bbox"]
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(bbox)
    assert re.search(r"\|\s+AP\s+\|\s+AP50\s+\|", _log(tmp_path / "eval"))


def test_eval_only_rejects_mismatched_checkpoint(train_net, tmp_path):
    from aqdetr_d2.engine import CheckpointMismatchError

    _run(train_net, "detr_fp32.yaml", tmp_path, "SOLVER.MAX_ITER", "1")
    with pytest.raises(CheckpointMismatchError, match=r"class_embed\.weight"):
        _run(train_net, "detr_fp32.yaml", tmp_path / "eval", "MODEL.WEIGHTS", str(tmp_path / "model_final.pth"),
             "MODEL.DETR.NUM_CLASSES", "7", flags=["--eval-only"])


def test_unknown_config_key_is_rejected(train_net, tmp_path):
    with pytest.raises(KeyError, match="MODEL.DETR.NUM_QUERIES.*did you mean MODEL.DETR.NUM_OBJECT_QUERIES"):
        _run(train_net, "detr_fp32.yaml", tmp_path, "MODEL.DETR.NUM_QUERIES", "10")


def test_num_classes_smaller_than_dataset_is_rejected(train_net, tmp_path):
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        _run(train_net, "detr_fp32.yaml", tmp_path, "MODEL.DETR.NUM_CLASSES", "3")


def test_two_process_cpu_ddp_takes_steps(project_root, tmp_path):
    """`--num-gpus 2` on a machine without GPUs runs two gloo processes."""
    cmd = [sys.executable, os.path.join(project_root, "projects", "AQDETR", "train_net.py"),
           "--config-file", os.path.join(project_root, "configs", "shapes", "detr_fp32.yaml"),
           "--num-gpus", "2", *COMMON, *TINY["detr_fp32.yaml"], "SOLVER.MAX_ITER", "2",
           "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = _log(tmp_path)
    assert "world size: 2" in log.lower() or "Rank of current process: 0. World size: 2" in log
    assert os.path.exists(tmp_path / "model_final.pth")


def test_malformed_boxes_are_rejected_before_training(train_net, tmp_path):
    name = "shapes_train_with_a_flat_box"
    if name not in DatasetCatalog.list():
        def load():
            dicts = copy.deepcopy(DatasetCatalog.get("shapes_train")[:10])
            dicts[3]["annotations"][0]["bbox"][2] = 0.0  # zero width
            return dicts

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(thing_classes=MetadataCatalog.get("shapes_train").thing_classes)
    with pytest.raises(ValueError, match=name):
        _run(train_net, "detr_fp32.yaml", tmp_path, "DATASETS.TRAIN", f"('{name}',)")
