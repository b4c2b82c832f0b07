"""LSQ / LSQ+ / min-max quantizers against PyTorch's fake-quantize ops and the LSQ formulas."""
import math

import pytest
import torch

from aqdetr_d2.quant import (
    LSQQuantizer,
    MinMaxQuantizer,
    build_quantizer,
    calibration,
    quant_range,
)

LOW_BITS = (2, 3, 4, 8)


def _set_scale(q, scale, offset=None):
    """Give an LSQ quantizer a known state through a state-dict load (the resume path)."""
    state = {"scale": torch.as_tensor(scale, dtype=torch.float32).reshape(-1), "initialized": torch.tensor(1, dtype=torch.uint8)}
    if offset is not None:
        state["offset"] = torch.as_tensor(offset, dtype=torch.float32).reshape(-1)
    q.load_state_dict(state)
    return q


def _zeros(n):
    return torch.zeros(n, dtype=torch.int32)


@pytest.mark.parametrize("bits", LOW_BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_per_tensor_forward_matches_torch(bits, signed):
    qmin, qmax = quant_range(bits, signed)
    scale = torch.tensor([0.0371])
    # Values spread over the range and beyond, plus exact rounding ties and their neighbours.
    x = torch.cat([torch.randn(4000) * qmax * 0.05, (torch.arange(qmin - 3, qmax + 3) + 0.5) * scale])
    x = torch.cat([x, x.nextafter(x + 1), x.nextafter(x - 1)])
    q = _set_scale(LSQQuantizer(bits, signed=signed), scale)
    ref = torch.fake_quantize_per_tensor_affine(x, scale, _zeros(1), qmin, qmax)
    assert torch.equal(q(x), ref)


@pytest.mark.parametrize("bits", LOW_BITS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("granularity,axis", [("channel", 0), ("head", 1), ("channel", -1)])
def test_per_channel_forward_matches_torch(bits, signed, granularity, axis):
    qmin, qmax = quant_range(bits, signed)
    x = torch.randn(3, 4, 5, 6)
    n = x.shape[axis]
    scale = torch.rand(n) * 0.2 + 0.01
    q = _set_scale(LSQQuantizer(bits, signed=signed, granularity=granularity, ch_axis=axis), scale)
    ref = torch.fake_quantize_per_channel_affine(x, scale, _zeros(n), axis % x.dim(), qmin, qmax)
    assert torch.equal(q(x), ref)



@pytest.mark.parametrize("granularity,axis", [("tensor", None), ("head", 1)])
def test_inference_matches_torch_while_the_step_size_changes(granularity, axis):
    """Under no_grad the clamped step size and its reciprocal are cached: every way a step size
    changes (optimizer step, state-dict load) must reach the next call."""
    qmin, qmax = quant_range(4, True)
    x = torch.randn(3, 4, 5, 6)
    n = 1 if axis is None else x.shape[axis]

    def reference(q, inp):
        s = q.scale.detach().clamp_min(q.eps).to(inp.dtype)
        if axis is None:
            return torch.fake_quantize_per_tensor_affine(inp, s, _zeros(1), qmin, qmax)
        return torch.fake_quantize_per_channel_affine(inp, s, _zeros(n), axis, qmin, qmax)

    q = _set_scale(LSQQuantizer(4, granularity=granularity, ch_axis=axis), torch.rand(n) * 0.2 + 0.01)
    with torch.no_grad():
        assert torch.equal(q(x), reference(q, x))
        q.scale.mul_(1.7)  # what an optimizer step does to the parameter
        assert torch.equal(q(x), reference(q, x))
        _set_scale(q, torch.rand(n) * 0.2 + 0.01)
        assert torch.equal(q(x), reference(q, x))
        assert torch.equal(q(x[:, :, 0]), reference(q, x[:, :, 0]))  # another rank, another view
        inferred = q(x)
    assert torch.equal(inferred, q(x))  # the uncached path, as in training


@pytest.mark.parametrize("bits", LOW_BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_per_tensor_gradients_match_lsq_formula_and_torch(bits, signed):
    qmin, qmax = quant_range(bits, signed)
    s = 0.05
    # v = x / s: inside the range, below Qn and above Qp; none in the half-step bands next
    # to the bounds, where PyTorch's op clips after rounding and LSQ before.
    v = torch.cat([torch.linspace(qmin + 0.01, qmax - 0.01, 50), torch.tensor([qmin - 3.0, qmin - 0.7, qmax + 0.7, qmax + 4.0])])
    x = (v * s).requires_grad_()
    upstream = torch.randn_like(x)
    q = _set_scale(LSQQuantizer(bits, signed=signed), [s])
    (q(x) * upstream).sum().backward()

    g = 1.0 / math.sqrt(x.numel() * qmax)
    inside = (v >= qmin) & (v <= qmax)
    v_exact = x.detach() / s
    ds = torch.where(inside, v_exact.round() - v_exact, v_exact.clamp(qmin, qmax))
    assert torch.allclose(q.scale.grad, (upstream * ds).sum().reshape(1) * g, rtol=1e-5, atol=1e-7)
    assert torch.equal(x.grad, upstream * inside)  # straight-through: 1 inside, 0 outside

    x2 = x.detach().clone().requires_grad_()
    scale = torch.tensor([s], requires_grad=True)
    zp = torch.tensor([0.0])
    out = torch._fake_quantize_learnable_per_tensor_affine(x2, scale, zp, qmin, qmax, g)
    (out * upstream).sum().backward()
    assert torch.allclose(q.scale.grad, scale.grad, rtol=1e-5, atol=1e-7)
    assert torch.equal(x.grad, x2.grad)


@pytest.mark.parametrize("signed", [True, False])
def test_per_channel_gradients_match_torch(signed):
    bits = 4
    qmin, qmax = quant_range(bits, signed)
    x = torch.randn(6, 8, 3)
    scale0 = torch.rand(6) * 0.2 + 0.05
    v = x / scale0[:, None, None]
    # Keep away from the half-step bands next to the bounds (see the per-tensor test).
    band = ((v > qmax) & (v < qmax + 0.5)) | ((v < qmin) & (v > qmin - 0.5))
    x = torch.where(band, x * 2, x).requires_grad_()
    upstream = torch.randn_like(x)
    q = _set_scale(LSQQuantizer(bits, signed=signed, granularity="channel"), scale0)
    (q(x) * upstream).sum().backward()

    g = 1.0 / math.sqrt(x[0].numel() * qmax)
    x2 = x.detach().clone().requires_grad_()
    scale = scale0.clone().requires_grad_()
    out = torch._fake_quantize_learnable_per_channel_affine(x2, scale, torch.zeros(6), 0, qmin, qmax, g)
    (out * upstream).sum().backward()
    assert torch.allclose(q.scale.grad, scale.grad, rtol=1e-4, atol=1e-6)
    assert torch.equal(x.grad, x2.grad)


def test_lsq_plus_forward_and_gradients():
    bits, qmin, qmax = 4, 0, 15
    s, b = 0.1, -0.3
    x = torch.randn(500).requires_grad_()
    upstream = torch.randn_like(x)
    q = _set_scale(LSQQuantizer(bits, signed=False, learnable_offset=True), [s], [b])
    out = q(x)
    v = (x.detach() - b) * (1.0 / torch.tensor(s))
    assert torch.allclose(out, v.round().clamp(qmin, qmax) * s + b)
    (out * upstream).sum().backward()
    g = 1.0 / math.sqrt(x.numel() * qmax)
    inside = (v >= qmin) & (v <= qmax)
    ds = torch.where(inside, v.round() - v, v.clamp(qmin, qmax))
    assert torch.allclose(q.scale.grad, (upstream * ds).sum() * g, rtol=1e-5)
    assert torch.allclose(q.offset.grad, (upstream * ~inside).sum() * g, rtol=1e-5)
    assert torch.equal(x.grad, upstream * inside)


@pytest.mark.parametrize("signed", [True, False])
def test_lsq_init_from_first_batch(signed):
    x = torch.randn(4, 3, 5) + 0.3
    q = LSQQuantizer(4, signed=signed, granularity="head", ch_axis=1)
    assert q.scale.numel() == 0 and not q.initialized  # sized on first use
    q(x)
    qmax = quant_range(4, signed)[1]
    expected = 2 * x.abs().mean(dim=(0, 2)) / math.sqrt(qmax)
    assert torch.allclose(q.scale.detach(), expected)
    assert q.initialized.item() == 1
    # Initialised once: later batches do not move the step size.
    q(x * 10)
    assert torch.allclose(q.scale.detach(), expected)


def test_lsq_plus_unsigned_init_puts_minimum_at_code_zero():
    x = torch.rand(1000) * 2 - 0.25
    q = LSQQuantizer(4, signed=False, learnable_offset=True)
    q(x)
    assert torch.allclose(q.offset.detach(), x.min().reshape(1))
    assert torch.allclose(q.scale.detach(), 2 * (x - x.min()).mean().reshape(1) / math.sqrt(15))


def test_calibration_over_batches_uses_all_data():
    batches = [torch.randn(2, 10) * (i + 1) for i in range(3)]
    q = LSQQuantizer(8)
    with calibration(q):
        for b in batches:
            assert q(b) is b  # observing, not quantizing
    expected = 2 * torch.cat(batches).abs().mean() / math.sqrt(127)
    assert torch.allclose(q.scale.detach(), expected.reshape(1))
    assert q.initialized.item() == 1


def test_failed_calibration_leaves_quantizer_untouched():
    q = LSQQuantizer(4)
    with pytest.raises(RuntimeError):
        with calibration(q):
            q(torch.randn(10))
            raise RuntimeError("data loader failed")
    assert q.initialized.item() == 0 and torch.equal(q.scale.detach(), torch.ones(1))


def test_step_size_stays_positive_and_recovers():
    q = _set_scale(LSQQuantizer(4), [-0.5])
    x = torch.randn(100)
    out = q(x)
    assert torch.isfinite(out).all()
    # A collapsed step size clips everything to ~0; the error's gradient pushes it up again.
    (out - x).pow(2).sum().backward()
    assert q.scale.grad.item() < 0


def test_state_dict_round_trip_into_fresh_quantizer():
    x = torch.randn(2, 4, 7, 3)
    q = LSQQuantizer(3, granularity="head", learnable_offset=True)  # lazily sized
    q(x)
    fresh = LSQQuantizer(3, granularity="head", learnable_offset=True)
    fresh.load_state_dict(q.state_dict())
    assert fresh.initialized.item() == 1
    assert torch.equal(fresh(x * 1.5), q(x * 1.5))


def test_32_bits_is_identity_without_state():
    x = torch.randn(5)
    for name in ("lsq", "lsq+", "minmax"):
        q = build_quantizer(name, 32, granularity="channel")
        assert q(x) is x
        assert len(q.state_dict()) == 0
        with pytest.raises(ValueError, match="32-bit"):
            q.quantize_to_int(x)


@pytest.mark.parametrize("name", ["lsq", "lsq+", "minmax"])
@pytest.mark.parametrize("signed", [True, False])
def test_integer_codes_reproduce_fake_quant(name, signed):
    x = torch.randn(6, 9)
    q = build_quantizer(name, 4, signed=signed, granularity="channel", num_channels=6)
    codes, scale, zero_point = q.quantize_to_int(x)
    assert codes.dtype == (torch.int8 if signed else torch.uint8)
    qmin, qmax = quant_range(4, signed)
    assert codes.min() >= qmin and codes.max() <= qmax
    recon = (codes.float() - zero_point[:, None]) * scale[:, None]
    assert torch.allclose(recon, q(x), atol=1e-6)


@pytest.mark.parametrize("bits", LOW_BITS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_minmax_matches_torch_and_covers_range(bits, signed, granularity):
    x = torch.randn(5, 40) + (0.0 if signed else 1.0)
    q = MinMaxQuantizer(bits, signed=signed, granularity=granularity)
    out = q(x)
    qmin, qmax = quant_range(bits, signed)
    if granularity == "tensor":
        ref = torch.fake_quantize_per_tensor_affine(x, q.scale, q.zero_point, qmin, qmax)
        lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    else:
        ref = torch.fake_quantize_per_channel_affine(x, q.scale, q.zero_point, 0, qmin, qmax)
        lo, hi = x.amin(1).clamp(max=0), x.amax(1).clamp(min=0)
    assert torch.equal(out, ref)
    expected = torch.maximum(-lo, hi) / qmax if signed else (hi - lo) / (qmax - qmin)
    assert torch.allclose(q.scale, expected.reshape(-1))


@pytest.mark.parametrize("bits", [5, 1, 16, "4", 4.0, True])
def test_invalid_bits_rejected(bits):
    with pytest.raises(ValueError, match="must be one of 2, 3, 4, 8, 32"):
        build_quantizer("lsq", bits)


def test_invalid_names_rejected():
    with pytest.raises(ValueError, match="unknown quantizer 'lsqq'"):
        build_quantizer("lsqq", 4)
    with pytest.raises(ValueError, match="granularity"):
        LSQQuantizer(4, granularity="row")


def test_channel_mismatch_is_reported():
    q = LSQQuantizer(4, granularity="channel", num_channels=3)
    with pytest.raises(ValueError, match="3 step sizes but the input has 4 channels"):
        q(torch.randn(4, 2))


def test_empty_input_does_not_initialise():
    q = LSQQuantizer(4, granularity="channel", num_channels=3)
    assert q(torch.empty(3, 0)).shape == (3, 0)
    assert q.initialized.item() == 0
    x = torch.randn(3, 5)
    q(x)
    assert torch.allclose(q.scale.detach(), 2 * x.abs().mean(1) / math.sqrt(7))


def _squared_error(x, scale, qmin, qmax):
    return ((x / scale).round().clamp(qmin, qmax) * scale - x).square().sum().item()


def test_mse_init_finds_the_least_squared_error_step():
    # Softmax rows over 400 keys, as in attention: mean 1/400, a few peaks near 1.
    gen = torch.Generator().manual_seed(0)
    probs = (torch.randn(2, 3, 50, 400, generator=gen) * 3).softmax(-1)
    q = LSQQuantizer(4, signed=False, granularity="head", ch_axis=1, num_channels=3, init="mse")
    lsq = LSQQuantizer(4, signed=False, granularity="head", ch_axis=1, num_channels=3)
    for quantizer in (q, lsq):
        with calibration(quantizer):
            quantizer(probs)
    for head in range(3):
        x = probs[:, head]
        # Naive reference: every step on a dense grid from 1e-4 to max / Qp.
        dense = torch.logspace(-4, math.log10(x.max().item() / 15), 2000)
        best = min(_squared_error(x, s, 0, 15) for s in dense)
        found = _squared_error(x, q.scale[head], 0, 15)
        assert found <= 1.002 * best
        assert found < 0.1 * _squared_error(x, lsq.scale[head], 0, 15)


def test_mse_init_averages_the_per_batch_steps():
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 300, generator=gen) * k).softmax(-1) for k in (2.0, 4.0)]
    single = []
    for batch in batches:
        q = LSQQuantizer(4, signed=False, init="mse")
        with calibration(q):
            q(batch)
        single.append(q.scale.item())
    both = LSQQuantizer(4, signed=False, init="mse")
    with calibration(both):
        for batch in batches:
            both(batch)
    assert single[0] != single[1]
    assert both.scale.item() == pytest.approx(sum(single) / 2, rel=1e-6)


def test_invalid_inits_rejected():
    with pytest.raises(ValueError, match="init must be one of"):
        LSQQuantizer(4, init="max")
    with pytest.raises(ValueError, match="offset"):
        LSQQuantizer(4, init="mse", learnable_offset=True)
