"""Quantization-aware training end to end: QAT from a float checkpoint, resume, exact re-evaluation."""
import json
import os

import pytest
import torch

from train_net_helpers import SMALL_VAL, TINY, _log, _run

QUANT = ["MODEL.QUANT.ENABLED", "True", "MODEL.QUANT.WEIGHT_BITS", "4", "MODEL.QUANT.ACT_BITS", "4",
         "MODEL.QUANT.ATTN_BITS", "4", "MODEL.QUANT.CALIB_BATCHES", "2", "MODEL.RESNETS.NORM", "FrozenBN"]


def _predictions(output_dir):
    with open(os.path.join(output_dir, "inference", SMALL_VAL, "coco_instances_results.json")) as f:
        return json.load(f)


def _same_metrics(a, b):
    """Equal metric dicts, NaN (no object of that size) equal to NaN."""
    return a.keys() == b.keys() and all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a)


@pytest.mark.parametrize("config", ["detr_fp32.yaml", "deformable_detr_fp32.yaml"])
def test_qat_from_float_checkpoint_resumes_and_reevaluates_exactly(train_net, config, tmp_path):
    float_dir, qat_dir = tmp_path / "float", tmp_path / "qat"
    _run(train_net, config, float_dir, "SOLVER.MAX_ITER", "2", "MODEL.RESNETS.NORM", "FrozenBN")
    float_ckpt = str(float_dir / "model_final.pth")

    results = _run(train_net, config, qat_dir, "SOLVER.MAX_ITER", "3", "MODEL.WEIGHTS", float_ckpt, *QUANT)
    log = _log(qat_dir)
    assert "Initialised" in log and "quantizers from 2 batch(es)" in log
    assert all(torch.isfinite(torch.tensor(v)) for v in results["bbox"].values() if v == v)  # NaN = no such box size
    saved = torch.load(qat_dir / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert any(k.endswith("weight_quantizer.scale") for k in saved)
    assert all(saved[k].item() == 1 for k in saved if k.endswith(".initialized"))
    trained = _predictions(qat_dir)

    evaluated = _run(train_net, config, tmp_path / "eval", "MODEL.WEIGHTS", str(qat_dir / "model_final.pth"),
                     *QUANT, flags=["--eval-only"])
    assert "Initialised" not in _log(tmp_path / "eval")
    assert _predictions(tmp_path / "eval") == trained
    assert _same_metrics(evaluated["bbox"], results["bbox"])

    _run(train_net, config, qat_dir, "SOLVER.MAX_ITER", "5", "MODEL.WEIGHTS", float_ckpt, *QUANT, flags=["--resume"])
    assert "Starting training from iteration 3" in _log(qat_dir)


def test_quantized_eval_is_bit_identical_at_32_bits(make_cfg):
    """MODEL.QUANT.ENABLED with every width at 32 gives exactly the float model's outputs."""
    from detectron2.modeling import build_model

    cfg = make_cfg("shapes/detr_fp32.yaml", *TINY["detr_fp32.yaml"])
    float_model = build_model(cfg).eval()
    cfg32 = make_cfg("shapes/detr_fp32.yaml", *TINY["detr_fp32.yaml"], "MODEL.QUANT.ENABLED", "True",
                     "MODEL.QUANT.WEIGHT_BITS", "32", "MODEL.QUANT.ACT_BITS", "32", "MODEL.QUANT.ATTN_BITS", "32")
    quant_model = build_model(cfg32).eval()
    quant_model.load_state_dict(float_model.state_dict(), strict=False)
    images = [{"image": torch.randint(0, 256, (3, 96, 120), dtype=torch.uint8)}]
    with torch.no_grad():
        a = float_model.predict(float_model.preprocess_image(images))
        b = quant_model.predict(quant_model.preprocess_image(images))
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])
