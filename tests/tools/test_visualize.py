"""tools/visualize.py and aqdetr_d2.utils.visualization: every picture is a real, non-blank PNG.

Tiny untrained models (narrow ResNet, hidden 32, 1 encoder / 2 decoder layers, 96 px images);
the quantized student is the float checkpoint loaded into a W4/A4/Attn4 model, calibrated on
one batch of two images.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
import torch
from PIL import Image

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from aqdetr_d2.utils.charts import ablation_bar_chart
from aqdetr_d2.utils.visualization import capture_deformable_sampling

from train_net_helpers import load_script

# "detr_plain": the shapes DETR without its convergence aids, whose learned queries pair up.
CONFIGS = {"detr": "shapes/detr_fp32.yaml", "detr_plain": "shapes/detr_fp32.yaml",
           "deformable": "shapes/deformable_detr_fp32.yaml"}
NODES = {"detr": "DETR", "detr_plain": "DETR", "deformable": "DEFORMABLE_DETR"}
PLAIN = {"FOCAL_LOSS": False, "BOX_REFINE": False, "TWO_STAGE": False, "SPATIAL_PRIOR": False}
BACKBONE = {"BACKBONE": {"NAME": "build_narrow_resnet_backbone"},
            "RESNETS": {"STEM_OUT_CHANNELS": 8, "RES2_OUT_CHANNELS": 8}}
INPUT = {"MIN_SIZE_TEST": 96}


SIZES = {"HIDDEN_DIM": 32, "DIM_FEEDFORWARD": 64, "NHEADS": 4, "ENC_LAYERS": 1, "DEC_LAYERS": 2}


def _flat(prefix, node):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _flat(f"{prefix}{key}.", value)
        else:
            yield f"{prefix}{key}"
            yield str(value)


def _overrides(arch):
    """The tiny model as KEY VALUE overrides (nested dict for the YAML)."""
    model = {**BACKBONE, NODES[arch]: {**SIZES, **(PLAIN if arch == "detr_plain" else {})}, "DEVICE": "cpu"}
    return {"MODEL": model, "INPUT": INPUT, "SOLVER": {"IMS_PER_BATCH": 2}}


@pytest.fixture(scope="module")
def visualize(project_root):
    return load_script(os.path.join(project_root, "tools", "visualize.py"), "aqdetr_visualize")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, project_root):
    """Per architecture: the float config file (tiny teacher yaml), its checkpoint and the
    student arguments (shapes config + tiny overrides, quantized, float weights)."""
    from aqdetr_d2.config import load_config

    root = tmp_path_factory.mktemp("visualize")
    made = {}
    torch.manual_seed(0)
    for arch, config in CONFIGS.items():
        base = os.path.join(project_root, "configs", config)
        opts = list(_flat("", _overrides(arch)))
        model = build_model(load_config(base, opts))
        DetectionCheckpointer(model, str(root)).save(f"{arch}_fp32")
        teacher_yaml = root / f"{arch}_teacher.yaml"
        teacher_yaml.write_text(yaml.safe_dump({"_BASE_": base, **_overrides(arch)}))
        weights = str(root / f"{arch}_fp32.pth")
        student = ["--config-file", base]
        student_opts = opts + ["MODEL.WEIGHTS", weights, "MODEL.QUANT.ENABLED", "True",
                               "MODEL.QUANT.CALIB_BATCHES", "1"]
        made[arch] = {"teacher_yaml": str(teacher_yaml), "weights": weights, "student": student,
                      "opts": student_opts}
    return made


def _read_png(path):
    assert os.path.isfile(path), path
    with Image.open(path) as im:
        assert im.format == "PNG"
        array = np.asarray(im.convert("RGB"), dtype=np.float32)
    return array


def _non_trivial(array, min_std=20.0, min_colors=50):
    assert array.std() > min_std, f"pixel std {array.std():.1f}: nearly blank"
    colors = np.unique(array.reshape(-1, 3)[::7].astype(np.uint8), axis=0)
    assert len(colors) > min_colors, f"only {len(colors)} colours"


def test_predictions_grid_in_process(visualize, tiny, tmp_path):
    t = tiny["deformable"]
    out = str(tmp_path / "pred" / "deformable.png")
    path = visualize.main(["predictions", *t["student"], "--num-images", "3", "--score-threshold", "0.0",
                           "--max-detections", "5", "--output", out, *t["opts"]])
    assert path == out
    array = _read_png(out)
    # 3 rows (images) x 2 columns (ground truth, predictions) of square panels.
    assert array.shape[0] > 1.3 * array.shape[1]
    _non_trivial(array)


def test_predictions_as_subprocess(tiny, tmp_path, project_root):
    t = tiny["detr"]
    out = tmp_path / "detr_pred.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(project_root, "tools", "visualize.py"), "predictions",
                           *t["student"], "--num-images", "2", "--score-threshold", "0.0", "--output", str(out),
                           *t["opts"]], cwd=project_root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout
    array = _read_png(str(out))
    assert array.shape[0] == array.shape[1]  # 2 rows x 2 columns
    _non_trivial(array)


@pytest.mark.parametrize("arch", ["detr", "deformable"])
def test_attention_teacher_vs_student(visualize, tiny, tmp_path, arch):
    t = tiny[arch]
    out = str(tmp_path / f"{arch}_attn.png")
    visualize.main(["attention", *t["student"], "--teacher-config", t["teacher_yaml"],
                    "--teacher-weights", t["weights"], "--image-index", "1", "--layer", "-1",
                    "--num-queries", "2", "--output", out, *t["opts"]])
    array = _read_png(out)
    # 2 rows (teacher, student) x 2 query columns (+ the encoder column for DETR).
    assert array.shape[1] > array.shape[0] * (1.4 if arch == "detr" else 0.9)
    _non_trivial(array)


@pytest.mark.parametrize("arch", ["detr", "detr_plain", "deformable"])
def test_histograms_teacher_vs_student(visualize, tiny, tmp_path, arch, capsys):
    t = tiny[arch]
    out = str(tmp_path / f"{arch}_hist.png")
    if arch.startswith("detr"):
        flags, opts = ["--teacher-config", t["teacher_yaml"], "--teacher-weights", t["weights"]], []
    else:  # the teacher named by the student config, as in the AQ-DETR configs
        flags, opts = [], ["MODEL.DISTILL.TEACHER_CONFIG", t["teacher_yaml"],
                           "MODEL.DISTILL.TEACHER_WEIGHTS", t["weights"]]
    visualize.main(["histograms", *t["student"], *flags, "--num-images", "2", "--output", out, *t["opts"], *opts])
    array = _read_png(out)
    assert array.shape[1] > array.shape[0]  # 2 decoder layers side by side
    _non_trivial(array, min_std=10.0, min_colors=10)
    printed = capsys.readouterr().out
    assert "decoder layer 0: KL" in printed and "decoder layer 1: KL" in printed
    # The 4-bit student differs from its float teacher: a positive histogram KL on every layer.
    kls = [float(line.split("KL ")[1].split()[0]) for line in printed.splitlines() if ": KL" in line]
    assert len(kls) == 2 and all(k > 0 for k in kls)
    # Learned queries pair up and get an elementwise difference; two-stage queries (both shapes
    # models) are different proposals in teacher and student, so none is reported.
    assert ("mean|diff| n/a (unpaired queries)" in printed) == (arch != "detr_plain")
    assert "nan" not in printed


def test_teacher_is_required(visualize, tiny, tmp_path):
    t = tiny["detr"]
    with pytest.raises(SystemExit, match="--teacher-config and --teacher-weights"):
        visualize.main(["attention", *t["student"], "--output", str(tmp_path / "x.png"), *t["opts"]])
    assert not (tmp_path / "x.png").exists()


def test_sampling_capture_reproduces_the_module_output(tiny):
    """The locations rebuilt by the hooks give back the deformable attention output exactly."""
    from aqdetr_d2.config import load_config
    from aqdetr_d2.layers.ms_deform_attn import MSDeformAttn, ms_deform_attn

    cfg = load_config(tiny["deformable"]["teacher_yaml"])
    model = build_model(cfg).eval()
    attn = next(m for n, m in model.named_modules() if isinstance(m, MSDeformAttn) and ".decoder." in n)
    seen = {}
    attn.register_forward_hook(lambda m, a, o: seen.update(args=a, out=o[0]))
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    image = torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8)
    with capture_deformable_sampling(model) as records, torch.no_grad():
        model.predict(model.preprocess_image([{"image": image}]))
    assert len(records) == 2  # one per decoder layer
    query, _, src, shapes = seen["args"][:4]
    value = attn.value_proj(src).view(*src.shape[:2], attn.n_heads, attn.d_head)
    rebuilt = attn.output_proj(ms_deform_attn(value, shapes, records[0]["locations"], records[0]["weights"]))
    torch.testing.assert_close(rebuilt, seen["out"])
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks  # the capture hooks are gone


def test_ablation_bar_chart(tmp_path):
    rows = [{"name": "fp32", "AP": 61.5, "AP50": 80.2}, {"name": "LSQ W4A4", "AP": 50.1, "AP50": 71.0},
            {"name": "+ aux queries", "AP": 53.4}, {"name": "+ distillation (AQ-DETR)", "AP": 55.0, "AP50": 74.3}]
    single = ablation_bar_chart(rows, metric="AP", output_path=str(tmp_path / "nested" / "ap.png"))
    array = _read_png(single)
    assert array.shape[1] > array.shape[0]
    _non_trivial(array, min_std=10.0, min_colors=10)
    grouped = _read_png(ablation_bar_chart(rows, ["AP", "AP50"], str(tmp_path / "ap_ap50.png")))
    assert grouped.std() > 10.0
    with pytest.raises(ValueError, match="name"):
        ablation_bar_chart([{"AP": 1.0}], output_path=str(tmp_path / "x.png"))
    # Per-seed values are drawn as dots over the mean's bar: the picture changes.
    seeded = [{**rows[1], "seeds": [{"AP": 48.0}, {"AP": 52.2}]}]
    plain = _read_png(ablation_bar_chart([rows[1]], "AP", str(tmp_path / "plain.png")))
    dots = _read_png(ablation_bar_chart(seeded, "AP", str(tmp_path / "dots.png")))
    assert plain.shape == dots.shape and (plain != dots).any(axis=-1).sum() > 20
