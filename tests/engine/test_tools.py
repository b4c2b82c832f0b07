"""tools/export_quantized.py and tools/model_report.py, run as subprocesses like a user would."""
import json
import os
import subprocess
import sys

import pytest
import torch

from detectron2.modeling import build_model

from aqdetr_d2.quant import calibrate
from aqdetr_d2.quant.export import load_exported

TINY = ["MODEL.DETR.HIDDEN_DIM", "32", "MODEL.DETR.NHEADS", "4", "MODEL.DETR.ENC_LAYERS", "1",
        "MODEL.DETR.DEC_LAYERS", "2", "MODEL.DETR.DIM_FEEDFORWARD", "64", "MODEL.DEVICE", "cpu"]
QUANT = ["MODEL.QUANT.ENABLED", "True"]


def _tool(project_root, name, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join("tools", name), *args], cwd=project_root, env=env,
                          capture_output=True, text=True, timeout=120)


def _image(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (3, 96, 112), generator=g, dtype=torch.uint8), "height": 96, "width": 112}]


def test_export_tool_writes_an_export_that_reloads_exactly(project_root, make_cfg, tmp_path):
    cfg = make_cfg("shapes/detr_fp32.yaml", *QUANT, *TINY)
    model = build_model(cfg).eval()
    calibrate(model, [_image(0), _image(1)])
    checkpoint = tmp_path / "quantized.pth"
    torch.save({"model": model.state_dict()}, checkpoint)

    out = tmp_path / "deploy" / "detr_w4.pth"
    result = _tool(project_root, "export_quantized.py", "--config-file", "configs/shapes/detr_fp32.yaml",
                   "--output", str(out), *QUANT, *TINY, "MODEL.WEIGHTS", str(checkpoint))
    assert result.returncode == 0, result.stderr
    assert "| 4-bit weight codes, packed |" in result.stdout
    assert "| **export file on disk** |" in result.stdout and "compression on disk:" in result.stdout
    assert "Calibrated" not in result.stderr  # a quantized checkpoint needs no calibration

    exported = torch.load(out, map_location="cpu", weights_only=True)
    assert "MODEL" in exported["metadata"]["config"]
    fresh = build_model(cfg).eval()
    load_exported(fresh, exported)
    with torch.no_grad():
        want = model.predict(model.preprocess_image(_image(2)))
        got = fresh.predict(fresh.preprocess_image(_image(2)))
    assert torch.equal(got["pred_logits"], want["pred_logits"]) and torch.equal(got["pred_boxes"], want["pred_boxes"])


def test_export_tool_refuses_a_float_config(project_root, tmp_path):
    out = tmp_path / "x.pth"
    result = _tool(project_root, "export_quantized.py", "--config-file", "configs/shapes/detr_fp32.yaml",
                   "--output", str(out), *TINY)
    assert result.returncode != 0
    assert "MODEL.QUANT.ENABLED is False" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("config,quant", [("detr_fp32.yaml", False), ("deformable_detr_fp32.yaml", True)])
def test_model_report_tool_prints_the_table(project_root, config, quant, tmp_path):
    opts = ["MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", "64"] + (QUANT if quant else [])
    result = _tool(project_root, "model_report.py", "--config-file", f"configs/shapes/{config}",
                   "--json", str(tmp_path / "report.json"), *opts)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for part in ("backbone", "encoder", "decoder", "heads", "**total**"):
        assert any(line.startswith(f"| {part} |") for line in lines), result.stdout
    assert "OPs = FLOPs_fp + sum (b_w x b_a / 64) x FLOPs_lowbit" in result.stdout
    assert "one 64x64 image" in result.stdout
    total = json.load(open(tmp_path / "report.json"))["total"]
    if quant:
        assert total["weight_bits"] == "mixed (4/8/32)" and total["ops"] < total["flops"]
        assert 7.0 < total["compression"] < 8.0
    else:
        assert total["weight_bits"] == "32" and total["ops"] == total["flops"] and total["lowbit_flops"] == 0


def test_interpolate_tool_blends_the_calibrated_start_with_the_fine_tune(project_root, make_cfg, tmp_path):
    from aqdetr_d2.engine import build_calibrated_model, calibrated_start, interpolate_state_dicts

    opts = [*TINY, "MODEL.QUANT.CALIB_BATCHES", "1", "SOLVER.IMS_PER_BATCH", "2"]
    teacher = tmp_path / "teacher.pth"
    torch.save({"model": build_model(make_cfg("shapes/detr_fp32.yaml", *opts)).state_dict()}, teacher)
    cfg = make_cfg("shapes/detr_fp32.yaml", *QUANT, *opts, "MODEL.WEIGHTS", str(teacher))
    # A stand-in fine-tune: the calibrated start with every float tensor moved.
    g = torch.Generator().manual_seed(1)
    fine_tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                  for k, v in build_calibrated_model(cfg).state_dict().items()}
    fine_path = tmp_path / "model_final.pth"
    torch.save({"model": fine_tuned}, fine_path)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cfg.dump())

    out = tmp_path / "interpolated.pth"
    result = _tool(project_root, "interpolate_weights.py", "--config-file", str(config_file),
                   "--fine-tuned", str(fine_path), "--alpha", "0.25", "--output", str(out))
    assert result.returncode == 0, result.stderr
    saved = torch.load(out, map_location="cpu", weights_only=True)
    assert saved["interpolation"]["alpha"] == 0.25 and saved["interpolation"]["start"] == str(teacher)
    want = interpolate_state_dicts(calibrated_start(cfg), fine_tuned, 0.25)
    assert saved["model"].keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(saved["model"][key], value, rtol=0, atol=1e-6, msg=key)
    # The float checkpoint holds no step sizes: the start's come from calibration, as in training.
    assert any(k.endswith("quantizer.scale") for k in want) and not any("quantizer" in k for k in torch.load(
        teacher, weights_only=True)["model"])

    refused = _tool(project_root, "interpolate_weights.py", "--config-file", str(config_file),
                    "--fine-tuned", str(fine_path), "--alpha", "1.5", "--output", str(tmp_path / "x.pth"))
    assert refused.returncode != 0 and "must be in [0, 1]" in refused.stderr
