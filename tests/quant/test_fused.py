"""The fused (torch.compile) LSQ arithmetic is bit-equal to the eager ops it replaces, forward
and gradients, for every layout a detector uses."""
import shutil

import pytest
import torch

from detectron2.modeling import build_model

from aqdetr_d2.quant import LSQQuantizer, fused
from detection_targets import training_batch


@pytest.fixture
def compile_every_size(monkeypatch):
    """The compiled kernels for every tensor (by default small ones take the eager ops)."""
    monkeypatch.setattr(fused, "_MIN_NUMEL_FORWARD", 0)
    monkeypatch.setattr(fused, "_MIN_NUMEL_BACKWARD", 0)


def _eager_reference(x, scale, offset, qmin, qmax, grad_factor, grad):
    """The LSQ forward and backward as the eager chain of ops used before fusion."""
    inv = 1.0 / scale
    v = x * inv if offset is None else (x - offset) * inv
    out = v.clone().round_().clamp_(qmin, qmax).mul_(scale)
    out = out if offset is None else out.add_(offset)
    clipped = v.clamp(qmin, qmax)
    inside = clipped == v
    grad_x = torch.where(inside, grad, 0.0)
    ds = clipped.round_().sub_(v.mul_(inside))
    if scale.numel() == 1:
        grad_scale = torch.dot(grad.reshape(-1), ds.reshape(-1)).reshape(scale.shape)
    else:
        grad_scale = (grad * ds).sum_to_size(scale.shape)
    grads = {"x": grad_x, "scale": grad_scale * grad_factor}
    if offset is not None:
        grads["offset"] = (grad.sum_to_size(offset.shape) - grad_x.sum_to_size(offset.shape)) * grad_factor
    return out, grads


# (x shape, granularity, channel axis, transpose x to make it non-contiguous)
LAYOUTS = [
    ((6, 4, 32), "tensor", None, False),  # a linear layer's input (S, B, C)
    ((16, 24), "channel", 0, False),  # a linear weight
    ((8, 4, 3, 3), "channel", 0, False),  # a conv weight
    ((2, 4, 20, 20), "head", 1, True),  # attention (B, H, L, S), from a transpose
    ((2, 30, 4, 3, 2), "head", 2, False),  # deformable attention weights (B, Lq, H, L, P)
]


@pytest.mark.parametrize("shape,granularity,axis,transpose", LAYOUTS)
@pytest.mark.parametrize("bits,signed,offset", [(4, True, False), (2, False, False), (3, True, True), (8, False, True)])
@pytest.mark.parametrize("grad_strides_of_x", [False, True])
def test_fused_lsq_is_bit_equal_to_eager_ops(shape, granularity, axis, transpose, bits, signed, offset,
                                             grad_strides_of_x, compile_every_size):
    torch.manual_seed(bits)
    x = torch.randn(shape) * 2 + (0 if signed else 1)
    if transpose:
        x = x.transpose(-1, -2)
    q = LSQQuantizer(bits, signed=signed, granularity=granularity, ch_axis=axis, learnable_offset=offset,
                     num_channels=None if granularity == "tensor" else x.shape[axis])
    q(x)  # initialise
    with torch.no_grad():  # step sizes that put many values on both sides of the clipping bounds
        q.scale.mul_(torch.rand_like(q.scale) + 0.5)
    x = x.requires_grad_()
    grad = torch.randn(x.shape)
    if grad_strides_of_x:  # else contiguous: the strides of the product in the step-size gradient differ
        grad = torch.empty_like(x).copy_(grad)
    out = q(x)
    out.backward(grad)
    grad_factor = 1.0 / (x.numel() / q.scale.numel() * q.qmax) ** 0.5
    scale, b = q._view(q.scale.detach(), x), None if q.offset is None else q._view(q.offset.detach(), x)
    want, want_grads = _eager_reference(x.detach(), scale.clamp_min(q.eps), b, q.qmin, q.qmax, grad_factor, grad)
    assert torch.equal(out, want)
    assert torch.equal(x.grad, want_grads["x"])
    assert torch.equal(q.scale.grad, want_grads["scale"].reshape(q.scale.shape))
    if offset:
        assert torch.equal(q.offset.grad, want_grads["offset"].reshape(q.offset.shape))
    with torch.no_grad():  # the inference path, without the autograd function
        assert torch.equal(q(x), want)


def test_fused_kernels_ran_compiled(compile_every_size):
    """The comparison above is with the compiled kernels, not with their eager fallback."""
    if not fused._ENABLED:
        pytest.skip("AQDETR_FUSED_QUANT=0")
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler: torch.compile cannot build CPU kernels here")
    q = LSQQuantizer(4)
    q(torch.randn(10, 10)).sum()
    assert not fused._failed, "torch.compile failed here; the eager fallback ran"


@pytest.mark.parametrize("config", ["shapes/aqdetr_w4a4.yaml", "shapes/aq_deformable_detr_w4a4.yaml"])
def test_quantized_model_gradients_equal_with_and_without_fusion(config, make_cfg, monkeypatch, compile_every_size):
    """One training step of a W4A4A4 model with auxiliary queries (distillation off: it adds no
    quantizer): every parameter's gradient is bit-equal with the fused kernels and with eager ops."""
    cfg = make_cfg(config, "MODEL.DISTILL.ENABLED", "False", "MODEL.WEIGHTS", "")
    model = build_model(cfg).train()
    batch = training_batch(torch.Generator().manual_seed(0), [(96, 128), (112, 80)],
                           [[10.0, 12.0, 50.0, 60.0], [30.0, 5.0, 70.0, 40.0]], [1, 3])
    model(batch)  # initialises every quantizer from this batch
    grads = []
    for enabled in (True, False):
        monkeypatch.setattr(fused, "_ENABLED", enabled)
        model.zero_grad()
        torch.manual_seed(1)  # dropout
        sum(model(batch).values()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 100
    unequal = [n for n in grads[0] if not torch.equal(grads[0][n], grads[1][n])]
    assert not unequal, f"gradients differ with fusion: {unequal[:5]}"
