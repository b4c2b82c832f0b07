"""The fused (compiled) LSQ kernels on a GPU: bit-equal to the eager ops there, forward and
gradients. CUDA is kept off the fused path (aqdetr_d2/quant/fused.py, `_CHECKED_DEVICES`) until
this passes on a GPU. Skipped without CUDA; `AQDETR_TEST_DEVICE=cpu` runs it on the CPU."""
import os

import pytest
import torch

from aqdetr_d2.quant import LSQQuantizer, fused

DEVICE = os.environ.get("AQDETR_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")


def _step(x, q, grad):
    x = x.detach().clone().requires_grad_()
    q.zero_grad()
    out = q(x)
    out.backward(grad)
    return out.detach(), x.grad, q.scale.grad.clone()


@pytest.mark.parametrize("granularity,axis,shape", [("tensor", None, (4, 8, 40, 40)), ("head", 1, (4, 8, 40, 40)),
                                                    ("channel", 0, (96, 64))])
@pytest.mark.parametrize("bits,signed", [(4, True), (2, False), (8, True)])
def test_fused_kernels_equal_eager_ops_on_the_device(monkeypatch, granularity, axis, shape, bits, signed):
    monkeypatch.setattr(fused, "_CHECKED_DEVICES", ("cpu", DEVICE))
    monkeypatch.setattr(fused, "_MIN_NUMEL_FORWARD", 0)
    monkeypatch.setattr(fused, "_MIN_NUMEL_BACKWARD", 0)
    gen = torch.Generator().manual_seed(bits)
    x = (torch.randn(shape, generator=gen) * 2 + (0 if signed else 1)).to(DEVICE)
    grad = torch.randn(shape, generator=gen).to(DEVICE)
    q = LSQQuantizer(bits, signed=signed, granularity=granularity, ch_axis=axis,
                     num_channels=None if granularity == "tensor" else shape[axis]).to(DEVICE)
    q(x)  # initialise
    compiled = _step(x, q, grad)
    with fused.eager_ops():
        eager = _step(x, q, grad)
    for got, want in zip(compiled, eager):
        assert torch.equal(got, want)
    assert not fused._failed
