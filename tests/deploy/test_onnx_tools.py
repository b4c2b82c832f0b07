"""tools/export_onnx.py and tools/eval_onnx.py, run as subprocesses like a user would, on the
committed DETR teacher quantized W4A4A4 (post-training) and 24 shapes_val images."""
import collections
import json
import os
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import convert_to_coco_json

from aqdetr_d2.deploy.int4 import widen_int4

BACKBONE = ["MODEL.BACKBONE.NAME", "build_narrow_resnet_backbone", "MODEL.RESNETS.STEM_OUT_CHANNELS", "32",
            "MODEL.RESNETS.RES2_OUT_CHANNELS", "32", "MODEL.DEVICE", "cpu"]
CONFIG = "configs/shapes/detr_lsq_w4a4.yaml"
TEACHER = "docs/quickstart/detr_teacher.pth"


def run(project_root, script, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, script, *args], cwd=project_root, env=env, capture_output=True,
                          text=True, timeout=600)


def copypaste_ap(stdout_and_err: str) -> float:
    return float(re.findall(r"copypaste: ([\d.]+),", stdout_and_err)[-1])


@pytest.fixture(scope="module")
def small_val(tmp_path_factory):
    """24 shapes_val images as a COCO json, registered in the tools through DATASETS.COCO_INSTANCES."""
    name = "shapes_val_24_for_onnx_test"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: DatasetCatalog.get("shapes_val")[:24])
        MetadataCatalog.get(name).set(thing_classes=MetadataCatalog.get("shapes_val").thing_classes)
    path = str(tmp_path_factory.mktemp("coco") / "val24.json")
    convert_to_coco_json(name, path, allow_cached=False)
    return ["DATASETS.COCO_INSTANCES", f"[['onnx_val24', '{path}', '']]", "DATASETS.TEST", "('onnx_val24',)"]


@pytest.fixture(scope="module")
def exported(project_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("onnx") / "detr_w4.onnx")
    result = run(project_root, "tools/export_onnx.py", "--config-file", CONFIG, "--output", out, "--calibrate",
                 *BACKBONE, "MODEL.WEIGHTS", TEACHER, "SEED", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_export_tool_writes_an_integer_graph(exported):
    path, stdout = exported
    assert re.search(r"integer kernels after onnxruntime's optimisations: QLinearConv x\d+, MatMulIntegerToFloat x\d+",
                     stdout), stdout
    model = onnx.load(path)
    assert {p.key: p.value for p in model.metadata_props}["meta_architecture"] == "AQDETR"
    int4 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4]
    assert int4, "4-bit weight codes are stored as INT4"
    # Two codes per byte on disk; widened, the same codes in int8 for the integer kernels, those of
    # a convolution times 2^j for its finer bias steps (integer_bias.bias_shift): with 4-bit inputs (codes
    # up to 15, no int16 pair sum near its limit) as far as int8 allows.
    widened = {i.name: i for i in widen_int4(onnx.load(path)).graph.initializer}
    shifts = collections.Counter()
    for init in int4:
        codes, stored = onnx.numpy_helper.to_array(widened[init.name]), onnx.numpy_helper.to_array(init).astype(np.int8)
        assert len(init.raw_data) == (codes.size + 1) // 2
        assert codes.dtype == np.int8 and stored.min() >= -8 and stored.max() <= 7
        shift = next(j for j in range(7) if np.array_equal(codes, stored * np.int8(2 ** j)))
        assert shift == 0 or 64 <= np.abs(codes.astype(np.int16)).max() <= 128
        shifts[len(init.dims), shift > 0] += 1
    assert shifts[2, True] == 0 and shifts[4, True] > 0  # linear layers as stored; convolutions scaled up


def test_onnxruntime_ap_matches_eval_only(project_root, exported, small_val, tmp_path):
    path, _ = exported
    ort_run = run(project_root, "tools/eval_onnx.py", "--config-file", CONFIG, "--onnx", path, *BACKBONE, *small_val,
                  "OUTPUT_DIR", str(tmp_path / "ort"))
    assert ort_run.returncode == 0, ort_run.stderr[-3000:]
    torch_run = run(project_root, "projects/AQDETR/train_net.py", "--config-file", CONFIG, "--eval-only", *BACKBONE,
                    *small_val, "MODEL.WEIGHTS", TEACHER, "SEED", "1", "OUTPUT_DIR", str(tmp_path / "torch"))
    assert torch_run.returncode == 0, torch_run.stderr[-3000:]
    ort_ap, torch_ap = copypaste_ap(ort_run.stdout + ort_run.stderr), copypaste_ap(torch_run.stdout + torch_run.stderr)
    # A real model (the committed teacher, calibrated as --eval-only calibrates it): on 24 images
    # a few boxes that move by a rounding flip can shift AP by up to ~1.5 points (on the 1000
    # shapes_val images, docs/deploy.md, Agreement).
    assert torch_ap > 10 and abs(ort_ap - torch_ap) < 1.5, (ort_ap, torch_ap)

    # tools/integer_gap.py: its fake-quantized row is --eval-only's AP, and its integer forms, which
    # onnxruntime computes to float rounding, give onnxruntime's AP. Not to the last digit: PyTorch
    # sums a convolution in float32, QLinearConv in int32 exactly, so a value within float noise of
    # a rounding boundary may take the neighbouring code (on these 24 images: 0.06 AP).
    gap = run(project_root, "tools/integer_gap.py", "--config-file", CONFIG, "--calibrate", "--row", "integer forms",
              "--row", "convolutions, float bias", "--row", "convolutions, jittered bias 1", *BACKBONE, *small_val,
              "MODEL.WEIGHTS", TEACHER, "SEED", "1", "OUTPUT_DIR", str(tmp_path / "gap"))
    assert gap.returncode == 0, gap.stderr[-3000:]
    rows = dict(re.findall(r"^(\S.*?)\s+AP\s+([\d.]+) ", gap.stdout, re.M))
    assert list(rows) == ["fake-quantized", "integer forms", "convolutions, float bias",
                          "convolutions, jittered bias 1"], gap.stdout
    assert float(rows["fake-quantized"]) == pytest.approx(torch_ap, abs=0.006)
    assert float(rows["integer forms"]) == pytest.approx(ort_ap, abs=0.15), (rows, ort_ap)

    # MODEL.QUANT.INTEGER_EVAL: --eval-only computes the integer forms, as tools/integer_gap.py does.
    integer_run = run(project_root, "projects/AQDETR/train_net.py", "--config-file", CONFIG, "--eval-only", *BACKBONE,
                      *small_val, "MODEL.WEIGHTS", TEACHER, "SEED", "1", "MODEL.QUANT.INTEGER_EVAL", "True",
                      "OUTPUT_DIR", str(tmp_path / "integer"))
    assert integer_run.returncode == 0, integer_run.stderr[-3000:]
    assert copypaste_ap(integer_run.stdout + integer_run.stderr) == pytest.approx(float(rows["integer forms"]), abs=0.006)


def test_float_checkpoint_is_refused_without_calibrate(project_root, tmp_path):
    result = run(project_root, "tools/export_onnx.py", "--config-file", CONFIG, "--output", str(tmp_path / "x.onnx"),
                 *BACKBONE, "MODEL.WEIGHTS", TEACHER)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {TEACHER} has no step sizes")
    assert "--calibrate" in result.stderr and not (tmp_path / "x.onnx").exists()


def test_onnx_file_of_another_model_is_refused(project_root, exported, small_val):
    path, _ = exported
    other = run(project_root, "tools/eval_onnx.py", "--config-file", "configs/shapes/deformable_detr_lsq_w4a4.yaml",
                "--onnx", path, *small_val)
    assert other.returncode == 2 and "the ONNX file is a AQDETR and the config builds a AQDeformableDETR" in other.stderr
    classes = run(project_root, "tools/eval_onnx.py", "--config-file", CONFIG, "--onnx", path, *BACKBONE, *small_val,
                  "MODEL.DETR.NUM_OBJECT_QUERIES", "20")
    assert classes.returncode == 2 and "queries or classes differ" in classes.stderr


def test_zoo_entry_evaluates_as_written_and_renders(project_root, small_val, tmp_path):
    from aqdetr_d2.utils.results import zoo_table

    result = run(project_root, "tools/zoo_entry.py", "--name", "detr_w4a4_ptq", "--config-file", CONFIG,
                 "--made-by", "post-training quantization of the committed teacher", "--root", str(tmp_path),
                 *BACKBONE, *small_val, "MODEL.WEIGHTS", TEACHER, "SEED", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    entry = tmp_path / "detr_w4a4_ptq"
    metrics = json.loads((entry / "metrics.json").read_text())
    assert {"config.yaml", "model.pth", "metrics.json"} <= {p.name for p in entry.iterdir()}
    # The entry's own command, run again by hand, gives the AP it records.
    again = run(project_root, *metrics["eval_command"].split()[1:], "OUTPUT_DIR", str(tmp_path / "again"))
    assert again.returncode == 0 and copypaste_ap(again.stdout + again.stderr) == metrics["AP"]
    assert metrics["onnx"]["mb"] < metrics["onnx"]["float_mb"] / 3
    # onnxruntime's AP on the same 24 images, within the rounding flips of the test above.
    assert abs(metrics["onnx"]["AP"] - metrics["AP"]) < 1.5, (metrics["onnx"]["AP"], metrics["AP"])
    # The integer forms in PyTorch (MODEL.QUANT.INTEGER_EVAL): onnxruntime's AP but for float32 sums.
    assert metrics["integer"]["eval_command"] == metrics["eval_command"] + " MODEL.QUANT.INTEGER_EVAL True"
    assert metrics["integer"]["AP"] == pytest.approx(metrics["onnx"]["AP"], abs=0.15)
    assert "TEACHER_WEIGHTS: ''" in (entry / "config.yaml").read_text()  # no path of this machine
    assert "[detr_w4a4_ptq](docs/models/detr_w4a4_ptq/config.yaml) | AQDETR | W4A4A4 |" in zoo_table([metrics])

    # --refresh-onnx-ap measures the committed entry in onnxruntime and its integer forms again, and
    # changes nothing else.
    stale = {**metrics, "onnx": {**metrics["onnx"], "AP": -1.0, "AP50": -1.0, "AP75": -1.0}, "integer": {}}
    (entry / "metrics.json").write_text(json.dumps(stale))
    refresh = run(project_root, "tools/zoo_entry.py", "--name", "detr_w4a4_ptq", "--refresh-onnx-ap", "--root", str(tmp_path))
    assert refresh.returncode == 0, refresh.stderr[-3000:]
    assert json.loads((entry / "metrics.json").read_text()) == metrics
    missing = run(project_root, "tools/zoo_entry.py", "--name", "no_such_entry", "--refresh-onnx-ap", "--root", str(tmp_path))
    assert missing.returncode == 2 and "is not a zoo entry" in missing.stderr
