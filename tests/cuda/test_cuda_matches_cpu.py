"""The same computations on a GPU as on the CPU: quantizers, deformable attention, AQ-DETR
training with auxiliary queries and distillation, evaluation and export.

Skipped where no CUDA device is visible (CI). `AQDETR_TEST_DEVICE=cpu` runs them against the
CPU itself, which checks the tests' own logic on a machine without a GPU.
"""
import os

import pytest
import torch

from train_net_helpers import SMALL_VAL, STUDENTS, _run, student_cfg, write_teacher

from aqdetr_d2.checkpoint import AQDETRCheckpointer
from aqdetr_d2.engine import AQDETRTrainer
from aqdetr_d2.layers.ms_deform_attn import ms_deform_attn
from aqdetr_d2.layers.ms_deform_attn_reference import ms_deform_attn_reference
from aqdetr_d2.quant import LSQQuantizer, calibration, export_quantized, load_exported, quant_range

DEVICE = os.environ.get("AQDETR_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    # TF32 would make GPU matrix products differ from the CPU's in the 3rd digit.
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("channels", [None, 6])
def test_lsq_forward_and_gradients_match_cpu_and_torch(bits, channels):
    qmin, qmax = quant_range(bits, True)
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(6, 500, generator=gen) * qmax * 0.05
    scale = torch.rand(channels or 1, generator=gen) * 0.05 + 0.02
    grad = torch.randn(x.shape, generator=gen)
    results = {}
    for device in ("cpu", DEVICE):
        q = LSQQuantizer(bits, signed=True, granularity="channel" if channels else "tensor", ch_axis=0,
                         num_channels=channels).to(device)
        q.load_state_dict({"scale": scale, "initialized": torch.tensor(1, dtype=torch.uint8)})
        xd = x.to(device, copy=True).requires_grad_()
        out = q(xd)
        out.backward(grad.to(device))
        zero = torch.zeros(scale.numel(), dtype=torch.int32, device=device)
        if channels:
            ref = torch.fake_quantize_per_channel_affine(xd.detach(), scale.to(device), zero, 0, qmin, qmax)
        else:
            ref = torch.fake_quantize_per_tensor_affine(xd.detach(), scale.to(device), zero, qmin, qmax)
        assert torch.equal(out.detach(), ref)
        results[device] = (out.detach().cpu(), xd.grad.cpu(), q.scale.grad.cpu())
    cpu, dev = results["cpu"], results[DEVICE]
    assert torch.equal(dev[0], cpu[0]) and torch.equal(dev[1], cpu[1])
    torch.testing.assert_close(dev[2], cpu[2], rtol=1e-5, atol=1e-6)  # a sum: order of additions differs


def test_least_squares_step_search_matches_cpu():
    gen = torch.Generator().manual_seed(0)
    probs = (torch.randn(4, 8, 100, 432, generator=gen) * 3).softmax(-1)
    scales, errors = {}, {}
    for device in ("cpu", DEVICE):
        q = LSQQuantizer(4, signed=False, granularity="head", ch_axis=1, num_channels=8, init="mse").to(device)
        with calibration(q):
            q(probs.to(device))
        scales[device] = q.scale.detach().cpu()
        with torch.no_grad():
            errors[device] = (q(probs.to(device)).cpu() - probs).square().sum((0, 2, 3))
    assert (scales["cpu"] > 0.02).all()  # far above the LSQ rule's 2 / (432 sqrt(15))
    # Sums in another order may tip the search to a neighbouring grid point: compare its error.
    torch.testing.assert_close(errors[DEVICE], errors["cpu"], rtol=1e-3, atol=0)


def test_deformable_attention_matches_float64_reference():
    gen = torch.Generator().manual_seed(0)
    shapes = torch.tensor([(16, 16), (8, 8), (4, 4), (2, 2)])
    length = int(shapes.prod(1).sum())
    value = torch.randn(2, length, 8, 16, generator=gen)
    locations = torch.rand(2, 50, 8, 4, 4, 2, generator=gen) * 1.2 - 0.1
    weights = torch.rand(2, 50, 8, 4, 4, generator=gen).softmax(-1)
    inputs = [t.to(DEVICE, copy=True).requires_grad_() for t in (value, locations, weights)]
    out = ms_deform_attn(inputs[0], shapes.to(DEVICE), inputs[1], inputs[2])
    grad = torch.randn(out.shape, generator=gen)
    out.backward(grad.to(DEVICE))

    reference_inputs = [t.double().requires_grad_() for t in (value, locations, weights)]
    expected = ms_deform_attn_reference(reference_inputs[0], shapes, reference_inputs[1], reference_inputs[2])
    expected.backward(grad.double())
    torch.testing.assert_close(out.detach().cpu().double(), expected.detach(), rtol=1e-5, atol=1e-5)
    for got, want in zip(inputs, reference_inputs):
        torch.testing.assert_close(got.grad.cpu().double(), want.grad, rtol=1e-4, atol=1e-4)


def _predictions(model, images):
    """Boxes, scores and classes of a float64 copy of `model` on its own device, moved to the CPU."""
    model = model.double().eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        outputs = model([{"image": image.to(device), "height": 96, "width": 96} for image in images])
    return [(o["instances"].pred_boxes.tensor.cpu(), o["instances"].scores.cpu(), o["instances"].pred_classes.cpu())
            for o in outputs]


@pytest.mark.parametrize("teacher_config", list(STUDENTS))
def test_aqdetr_trains_on_the_device_and_matches_the_cpu(train_net, make_cfg, project_root, tmp_path,
                                                        teacher_config):
    _, _, teacher_opts = write_teacher(train_net, teacher_config, tmp_path, project_root)
    opts = [*teacher_opts, "OUTPUT_DIR", str(tmp_path / "student"), "SOLVER.MAX_ITER", "3",
            "DATASETS.TEST", f"('{SMALL_VAL}',)"]
    cfg = student_cfg(make_cfg, teacher_config, [*opts, "MODEL.DEVICE", DEVICE])
    trainer = AQDETRTrainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    assert {"AP", "AP50"} <= set(results["bbox"])
    losses = {k: v.latest() for k, v in trainer.storage.histories().items() if k.startswith("loss")}
    assert {"loss_distill_dec_hidden", "loss_ce_aux", "loss_ce"} <= set(losses)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    assert all(p.device.type == torch.device(DEVICE).type for p in trainer.model.parameters())

    # The GPU-trained checkpoint on the CPU: same predictions, computed in float64 on both so
    # that no activation lands on the other side of a rounding boundary.
    cpu_model = AQDETRTrainer.build_model(student_cfg(make_cfg, teacher_config, opts))
    AQDETRCheckpointer(cpu_model).load(str(tmp_path / "student" / "model_final.pth"))
    images = [torch.randint(0, 255, (3, 96, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
              for i in range(2)]
    del trainer.model.distiller
    for got, want in zip(_predictions(trainer.model, images), _predictions(cpu_model, images)):
        torch.testing.assert_close(got[:2], want[:2], rtol=1e-6, atol=1e-6)
        assert torch.equal(got[2], want[2])

    # The packed export of the GPU model, loaded into a CPU model, predicts the same.
    exported = export_quantized(trainer.model.float())
    loaded = load_exported(AQDETRTrainer.build_model(student_cfg(make_cfg, teacher_config, opts)), exported)
    for got, want in zip(_predictions(loaded, images), _predictions(cpu_model, images)):
        torch.testing.assert_close(got[:2], want[:2], rtol=1e-6, atol=1e-6)
        assert torch.equal(got[2], want[2])


def test_train_net_resumes_and_evaluates_on_the_device(train_net, tmp_path):
    _run(train_net, "detr_fp32.yaml", tmp_path, "SOLVER.MAX_ITER", "4", "MODEL.DEVICE", DEVICE)
    _run(train_net, "detr_fp32.yaml", tmp_path, "SOLVER.MAX_ITER", "6", "MODEL.DEVICE", DEVICE, flags=["--resume"])
    with open(tmp_path / "log.txt") as f:
        assert "Starting training from iteration 4" in f.read()
    results = _run(train_net, "detr_fp32.yaml", tmp_path / "eval", "MODEL.DEVICE", DEVICE,
                   "MODEL.WEIGHTS", str(tmp_path / "model_final.pth"), flags=["--eval-only"])
    bbox = results[SMALL_VAL]["bbox"] if SMALL_VAL in results else results["bbox"]
    assert {"AP", "AP50", "AP75"} <= set(bbox)
