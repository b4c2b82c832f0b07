"""MODEL.QUANT.INTEGER_BIAS: a fake-quantized convolution that adds its bias as its integer
form does (batch norm folded, bias rounded to the int32 accumulator's steps), checked against
onnxruntime's QLinearConv and against the plain fake-quantized convolution."""
import copy

import pytest
import torch
from torch import nn

from detectron2.layers import Conv2d, FrozenBatchNorm2d

from aqdetr_d2.deploy.qdq import to_integer_forms
from aqdetr_d2.quant import LSQQuantizer, QuantConfig, QuantConv2d, quantize_model
from aqdetr_d2.quant.integer_bias import conv_bias_layout, fold_norm_sign, frozen_norm_affine

from deploy.test_onnx_export import export_module, optimized_ops, run_ort  # tests/ is on pytest's pythonpath


def _conv(weight_bits, act_bits=2, seed=0):
    """A 2-bit-input conv -> frozen batch norm (some negative scales) -> ReLU, initialised."""
    torch.manual_seed(seed)
    norm = FrozenBatchNorm2d(8)
    norm.weight.copy_(torch.randn(8))
    norm.bias.copy_(torch.randn(8))
    norm.running_var.copy_(torch.rand(8) + 0.5)
    norm.running_mean.copy_(torch.randn(8))
    conv = Conv2d(6, 8, 3, padding=1, bias=True, norm=norm, activation=torch.relu)
    qconv = QuantConv2d.from_float(
        conv, LSQQuantizer(weight_bits, granularity="channel", num_channels=8), LSQQuantizer(act_bits, signed=False))
    x = torch.rand(2, 6, 20, 24) * 3
    with torch.no_grad():
        qconv(x)  # initialise the step sizes
    return qconv.eval(), x


def _bias_step(conv):
    """(C_out,) step of the int32 bias of `conv`'s integer form."""
    norm_scale, _ = frozen_norm_affine(conv.norm)
    codes, _, zero_point = conv.weight_quantizer.quantize_to_int(conv.weight.detach())
    _, step = conv_bias_layout(conv, fold_norm_sign(codes, norm_scale), zero_point, norm_scale)
    return step


@pytest.mark.parametrize("weight_bits", [2, 4])
def test_integer_bias_conv_computes_its_integer_form(weight_bits):
    plain, x = _conv(weight_bits)
    rounded = copy.deepcopy(plain)
    rounded.integer_bias = True
    with torch.no_grad():
        expected = plain(x)
        got = rounded(x)
        exported = to_integer_forms(nn.Sequential(copy.deepcopy(plain)))[0](x)
    # The export's arithmetic (codes x steps, int32 bias codes x bias step) to float rounding.
    torch.testing.assert_close(got, exported, rtol=1e-5, atol=1e-5)
    # The bias moved by at most half a step of the int32 accumulator from the float one, and
    # by something: at 2-bit inputs the steps are coarse enough that rounding shows.
    step = _bias_step(plain)
    moved = (got - expected)[expected > 0]  # where the ReLU passes both
    assert moved.abs().max() <= step.max() / 2 * 1.001 + 1e-5
    assert moved.abs().max() > 1e-4


def test_integer_bias_conv_agrees_with_onnxruntime(tmp_path):
    conv, x = _conv(2)
    conv.integer_bias = True
    model = nn.Sequential(conv, LSQQuantizer(8, signed=False)).eval()
    # Output steps a few bias steps wide: where the float bias and its int32 rounding fall on
    # either side of an output rounding boundary, the codes differ (with a float bias, 2% of them).
    bias_step = _bias_step(conv)
    with torch.no_grad():
        model(x)  # initialise the output quantizer, then narrow it
        model[1].scale.fill_(float(bias_step.min()) * 3.3)
        expected = model(x)
    path = export_module(to_integer_forms(copy.deepcopy(model)), x, str(tmp_path / "conv.onnx"))
    assert optimized_ops(path, tmp_path)["QLinearConv"] == 1
    # QLinearConv's int32 sums and fixed-point requantisation give the same codes.
    assert torch.equal(run_ort(path, x)[0], expected)


def test_integer_bias_trains_straight_through():
    plain, x = _conv(2)
    plain.activation = None  # so that both convs pass gradients at the same places
    rounded = copy.deepcopy(plain)
    rounded.integer_bias = True
    grads = []
    for module in (plain, rounded):
        module.train()
        module(x).pow(2).sum().backward()
        grads.append({n: p.grad for n, p in module.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) == {"weight", "bias", "input_quantizer.scale", "weight_quantizer.scale"}
    # Straight through the rounding: every gradient is the float-bias conv's at the rounded
    # outputs, which differ by under half a bias step.
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0.05, atol=0.05 * grads[0][name].abs().max())


def test_calibration_passes_the_float_conv():
    plain, x = _conv(2)
    rounded = copy.deepcopy(plain)
    rounded.integer_bias = True
    for module in (plain, rounded):
        module.input_quantizer.start_calibration()
    with torch.no_grad():
        torch.testing.assert_close(rounded(x), plain(x))


def test_updating_batch_norm_is_refused_by_name():
    model = nn.Sequential(Conv2d(3, 4, 3, bias=False, norm=nn.BatchNorm2d(4)))
    with pytest.raises(ValueError, match="0: MODEL.QUANT.INTEGER_BIAS .* BatchNorm2d"):
        quantize_model(model, QuantConfig(integer_bias=True))
    with pytest.raises(ValueError, match="0: MODEL.QUANT.INTEGER_BIAS .* not a GroupNorm"):  # no statistics to fold
        quantize_model(nn.Sequential(Conv2d(3, 4, 3, norm=nn.GroupNorm(2, 4))), QuantConfig(integer_bias=True))
    quantized = quantize_model(nn.Sequential(Conv2d(3, 4, 3, norm=FrozenBatchNorm2d(4))), QuantConfig(integer_bias=True))
    assert quantized[0].integer_bias


def test_inference_keeps_the_rounded_bias_until_a_tensor_changes():
    conv, x = _conv(2)
    conv.integer_bias = True
    with torch.no_grad():
        first = conv(x)
        assert conv._bias_cache is not None and torch.equal(conv(x), first)
        conv.norm.running_mean.add_(0.5)  # in place, as a state-dict load writes
        moved = conv(x)
        expected = to_integer_forms(nn.Sequential(copy.deepcopy(conv)))[0](x)
    assert not torch.equal(moved, first)
    torch.testing.assert_close(moved, expected, rtol=1e-5, atol=1e-5)
    # Calibrating again flips no tensor: the input passes unquantized, and so does the bias.
    conv.input_quantizer.start_calibration()
    plain = copy.deepcopy(conv)
    plain.integer_bias = False
    with torch.no_grad():
        torch.testing.assert_close(conv(x), plain(x))
