"""MODEL_EMA: the average against a naive loop, what training evaluates, checkpoints, resume."""
import json
import os

import pytest
import torch
from torch import nn

from aqdetr_d2.engine.ema import ModelEMA
from train_net_helpers import SMALL_VAL, _log, _run

QUANT = ["MODEL.QUANT.ENABLED", "True", "MODEL.QUANT.WEIGHT_BITS", "4", "MODEL.QUANT.ACT_BITS", "4",
         "MODEL.QUANT.ATTN_BITS", "4", "MODEL.QUANT.CALIB_BATCHES", "1", "MODEL.RESNETS.NORM", "FrozenBN"]
EMA = ["MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY", "0.5"]


def test_average_matches_a_naive_loop_and_copies_integer_state():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    model.register_buffer("count", torch.zeros((), dtype=torch.int64))
    ema = ModelEMA(0.9)
    ema.reset(model)
    expected = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    for step in range(5):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
            model.bias.mul_(-2.0)
            model.count += 1
        ema.update(model)
        for k, v in model.state_dict().items():
            if k in expected:
                expected[k] = 0.9 * expected[k] + 0.1 * v
    for k, v in expected.items():
        torch.testing.assert_close(ema.weights[k], v)
    assert ema.weights["count"].item() == 5

    trained = model.weight.detach().clone()
    with ema.applied(model):
        torch.testing.assert_close(model.weight.detach(), expected["weight"])
    assert torch.equal(model.weight.detach(), trained)


def test_an_average_of_another_model_is_refused():
    ema = ModelEMA(0.9)
    ema.load_state_dict({"decay": 0.9, "weights": nn.Linear(3, 2).state_dict()})
    ema.follow_devices(nn.Linear(3, 2))
    with pytest.raises(RuntimeError, match="another config"):
        ema.update(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(RuntimeError, match="another config"):  # at resume, before the first step
        ema.follow_devices(nn.Sequential(nn.Linear(3, 2)))


@pytest.mark.parametrize("decay", [1.0, -0.1])
def test_invalid_decay_is_refused(decay):
    with pytest.raises(ValueError, match="MODEL_EMA.DECAY"):
        ModelEMA(decay)


def _predictions(output_dir):
    with open(os.path.join(output_dir, "inference", SMALL_VAL, "coco_instances_results.json")) as f:
        return json.load(f)


def test_training_evaluates_checkpoints_and_resumes_the_average(train_net, tmp_path):
    config = "detr_fp32.yaml"
    float_dir = tmp_path / "float"
    _run(train_net, config, float_dir, "SOLVER.MAX_ITER", "2", "MODEL.RESNETS.NORM", "FrozenBN")
    start = ["MODEL.WEIGHTS", str(float_dir / "model_final.pth"), *QUANT, *EMA]

    straight = tmp_path / "straight"
    _run(train_net, config, straight, "SOLVER.MAX_ITER", "4", *start)
    final = torch.load(straight / "model_final.pth", map_location="cpu", weights_only=True)
    trained, averaged = final["model"], final["model_ema"]["weights"]
    assert trained.keys() == averaged.keys()
    step_sizes = [k for k in trained if k.endswith("weight_quantizer.scale")]
    assert step_sizes and any(not torch.equal(trained[k], averaged[k]) for k in step_sizes)
    assert "averaging from the weights at iteration 0" in _log(straight)

    # --eval-only loads the average and reproduces the evaluation that ended training.
    at_end = _predictions(straight)
    _run(train_net, config, tmp_path / "eval_ema", "MODEL.WEIGHTS", str(straight / "model_final.pth"),
         *QUANT, *EMA, flags=["--eval-only"])
    assert _predictions(tmp_path / "eval_ema") == at_end
    _run(train_net, config, tmp_path / "eval_trained", "MODEL.WEIGHTS", str(straight / "model_final.pth"),
         *QUANT, flags=["--eval-only"])
    assert _predictions(tmp_path / "eval_trained") != at_end

    # Stopped after 2 iterations and resumed: the average continues from the checkpointed one.
    resumed = tmp_path / "resumed"
    _run(train_net, config, resumed, "SOLVER.MAX_ITER", "2", *start)
    os.remove(resumed / "model_final.pth")  # resume from the iteration-2 checkpoint, as after a kill
    with open(resumed / "last_checkpoint", "w") as f:
        f.write("model_0000001.pth")
    _run(train_net, config, resumed, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "1", *start,
         flags=["--resume"])
    log = _log(resumed)
    assert "Starting training from iteration 2" in log
    assert log.count("averaging from the weights") == 1, "resume must restore the average, not restart it"
    before, after = (torch.load(resumed / f"model_000000{i}.pth", map_location="cpu", weights_only=True)
                     for i in (1, 2))
    for k, v in after["model_ema"]["weights"].items():
        if v.is_floating_point():
            expected = 0.5 * before["model_ema"]["weights"][k] + 0.5 * after["model"][k]
            torch.testing.assert_close(v, expected, msg=k)
