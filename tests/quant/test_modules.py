"""QuantLinear / QuantConv2d: integer reference, identity at 32 bits, state dicts, weight cache."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import Conv2d, FrozenBatchNorm2d

from aqdetr_d2.quant import LSQQuantizer, QuantConv2d, QuantLinear, build_quantizer


def _quantizers(bits, out_channels, act_signed=True, name="lsq"):
    w = build_quantizer(name, bits, signed=True, granularity="channel", num_channels=out_channels)
    a = build_quantizer(name, bits, signed=act_signed, granularity="tensor")
    return w, a


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("act_signed", [True, False])
def test_linear_integer_reference(bits, act_signed):
    layer = QuantLinear.from_float(nn.Linear(12, 7), *_quantizers(bits, 7, act_signed))
    x = torch.randn(5, 12)
    y = layer(x)
    w_codes, s_w, _ = layer.weight_quantizer.quantize_to_int(layer.weight)
    x_codes, s_x, _ = layer.input_quantizer.quantize_to_int(x)
    acc = x_codes.to(torch.int32) @ w_codes.to(torch.int32).t()  # int32 accumulation
    assert acc.dtype == torch.int32
    y_int = acc.float() * (s_x * s_w) + layer.bias  # one rescale per output channel
    assert torch.allclose(y, y_int, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [3, 8])
def test_conv_integer_reference(bits):
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    layer = QuantConv2d.from_float(conv, *_quantizers(bits, 6, act_signed=False))
    x = torch.rand(2, 4, 9, 9)
    y = layer(x)
    w_codes, s_w, _ = layer.weight_quantizer.quantize_to_int(layer.weight)
    x_codes, s_x, _ = layer.input_quantizer.quantize_to_int(x)
    # Integer convolution, exact in float64 for these magnitudes.
    acc = F.conv2d(x_codes.double(), w_codes.double(), None, 2, 1, 1, 2)
    assert torch.equal(acc, acc.round())
    y_int = acc.float() * (s_x * s_w)[None, :, None, None] + layer.bias[None, :, None, None]
    assert torch.allclose(y, y_int, rtol=1e-5, atol=1e-5)


def _d2_conv():
    norm = FrozenBatchNorm2d(6)
    norm.weight.uniform_(0.5, 1.5)
    norm.running_mean.uniform_(-1, 1)
    return Conv2d(4, 6, 3, padding=1, bias=False, norm=norm, activation=F.relu)


@pytest.mark.parametrize("make", [lambda: nn.Linear(8, 6), lambda: nn.Conv2d(4, 6, 3, padding=1), _d2_conv])
def test_32_bits_is_bit_identical(make):
    float_module = make()
    x = torch.randn(2, 8) if isinstance(float_module, nn.Linear) else torch.randn(2, 4, 5, 5)
    cls = QuantLinear if isinstance(float_module, nn.Linear) else QuantConv2d
    qmodule = cls.from_float(float_module, *_quantizers(32, 6))
    assert torch.equal(qmodule(x), float_module(x))
    assert list(qmodule.state_dict()) == list(float_module.state_dict())


def test_detectron2_conv_keeps_norm_and_activation():
    float_conv = _d2_conv()
    qconv = QuantConv2d.from_float(float_conv, *_quantizers(4, 6))
    assert qconv.norm is float_conv.norm and qconv.activation is F.relu
    assert qconv.weight is float_conv.weight  # shared, not copied
    x = torch.randn(2, 4, 5, 5)
    y = qconv(x)
    manual = F.relu(float_conv.norm(F.conv2d(qconv.input_quantizer(x), qconv.weight_quantizer(qconv.weight), None, 1, 1)))
    assert torch.equal(y, manual)


@pytest.mark.parametrize("cls,make", [(QuantLinear, lambda: nn.Linear(8, 6)), (QuantConv2d, _d2_conv)])
def test_float_state_dict_loads(cls, make):
    float_module = make()
    qmodule = cls.from_float(copy.deepcopy(float_module), *_quantizers(4, 6))
    for p in qmodule.parameters():
        p.data.zero_()
    result = qmodule.load_state_dict(float_module.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert all("quantizer" in k for k in result.missing_keys)
    for k, v in float_module.state_dict().items():
        assert torch.equal(qmodule.state_dict()[k], v)


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_training_quantizes_weight_once_per_forward():
    layer = QuantLinear.from_float(nn.Linear(8, 6), *_quantizers(4, 6))
    calls = _count_calls(layer.weight_quantizer)
    for _ in range(3):
        layer(torch.randn(2, 8)).sum().backward()
    assert len(calls) == 3 and layer._weight_cache is None


@pytest.mark.parametrize("cls,make", [(QuantLinear, lambda: nn.Linear(8, 6)), (QuantConv2d, _d2_conv)])
def test_eval_weight_cache(cls, make):
    layer = cls.from_float(make(), *_quantizers(4, 6))
    x = torch.randn(2, 8) if cls is QuantLinear else torch.randn(2, 4, 5, 5)
    layer(x)  # initialise the quantizers
    calls = _count_calls(layer.weight_quantizer)

    layer.eval()
    with torch.no_grad():
        uncached, cached = layer(x), layer(x)
    assert len(calls) == 1  # quantized once, then served from the cache
    assert torch.equal(uncached, cached)

    # A training step changes the weight and the step size: the cache must not survive it.
    layer.train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).pow(2).sum().backward()
    opt.step()
    with torch.no_grad():
        trained = layer(x)  # training mode: not cached
        layer.eval()
        assert not torch.equal(trained, cached)
        assert torch.equal(layer(x), trained)

    # So must an in-place change outside training, e.g. loading a checkpoint in eval mode.
    state = {k: v * 0.5 if k == "weight" else v for k, v in layer.state_dict().items()}
    with torch.no_grad():
        layer.load_state_dict(state)
        cached = layer(x)
        layer._weight_cache = None
        assert torch.equal(cached, layer(x))


def test_eval_with_gradients_does_not_cache():
    layer = QuantLinear.from_float(nn.Linear(8, 6), *_quantizers(4, 6)).eval()
    x = torch.randn(2, 8)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.weight_quantizer.scale.grad is not None
    assert layer._weight_cache is None


def test_lazy_quantizers_resume_through_state_dict():
    # Quantizers created without a channel count take it from the checkpoint.
    def make():
        return QuantLinear.from_float(
            nn.Linear(8, 6),
            LSQQuantizer(4, granularity="channel", learnable_offset=False),
            LSQQuantizer(4, learnable_offset=True),
        )

    trained = make()
    x = torch.randn(3, 8)
    trained(x).sum().backward()
    fresh = make()
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh(x), trained(x))
