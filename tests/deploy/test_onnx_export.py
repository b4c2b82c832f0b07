"""ONNX export with integer operators, checked in onnxruntime against PyTorch.

Per quantizer, onnxruntime (all optimisations on, so its integer kernels run) gives exactly
PyTorch's fake quantization, and per linear layer the same to float rounding. Elsewhere a code
can round the other way where a value lies within float noise (~1e-6) of a rounding boundary:
the two runtimes add in different orders, a folded batch norm multiplies in another order, an
int32 bias is rounded. Such a flip moves that value by exactly one step (checked on a conv
layer) and everything downstream a little, so whole models are compared tightly for the float
export and, for the quantized export, by the share of outputs that agree.
"""
import collections
import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling import build_model

from aqdetr_d2.deploy import ExportError, ExportedDetector, export_onnx, integer_model
from aqdetr_d2.deploy.int4 import pack_int4, widen_int4
from aqdetr_d2.deploy.qdq import QuantizeDequantize, to_integer_forms
from aqdetr_d2.deploy.runtime import OnnxRuntimeDetector, ort_session
from aqdetr_d2.quant import LSQQuantizer, MinMaxQuantizer, QuantConv2d, QuantLinear
from aqdetr_d2.quant.integer_bias import bias_shift

from quant.test_export import _quantized, images  # tests/ is on pytest's pythonpath


def run_ort(path, *inputs, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def optimized_ops(path, tmp_path):
    """Operator counts of the graph onnxruntime runs, loaded as `ort_session` loads it."""
    optimized = str(tmp_path / "optimized.onnx")
    ort_session(path, optimized_model_filepath=optimized)
    return collections.Counter(n.op_type for n in onnx.load(optimized).graph.node)


def export_module(module, example, path):
    # Dynamic sizes, as in a detector's graph: ONNX Runtime then fuses as it does there.
    with torch.no_grad():
        torch.onnx.export(module, (example,), path, dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {d: f"d{d}" for d in range(example.dim() - 1)}})
    return path


# ---------------------------------------------------------------- quantizers
QUANTIZERS = {
    "lsq4 signed": lambda: LSQQuantizer(4, signed=True),
    "lsq4 unsigned": lambda: LSQQuantizer(4, signed=False),
    "lsq2 signed": lambda: LSQQuantizer(2, signed=True),
    "lsq3 per head": lambda: LSQQuantizer(3, signed=True, granularity="head", ch_axis=1, num_channels=4),
    "lsq4 unsigned per head": lambda: LSQQuantizer(4, signed=False, granularity="head", ch_axis=1, num_channels=4),
    "minmax4 unsigned": lambda: MinMaxQuantizer(4, signed=False),
    "minmax8 signed": lambda: MinMaxQuantizer(8, signed=True),
}


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_quantizer_qdq_equals_fake_quantization(name, tmp_path):
    quantizer = QUANTIZERS[name]()
    x = torch.randn(2, 4, 50, 16) * 3 + (2 if "unsigned" in name else 0)
    quantizer(x)  # initialise from data
    x = torch.randn(2, 4, 50, 16) * 4  # then beyond the calibrated range, both ends
    expected = quantizer(x)
    qdq = QuantizeDequantize(quantizer, name)
    assert torch.equal(qdq(x), expected)
    path = export_module(qdq, x, str(tmp_path / "q.onnx"))
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        assert torch.equal(run_ort(path, x, level=level)[0], expected)


def test_minmax_qdq_equals_pytorch_fake_quantize_op(tmp_path):
    # Independent reference: PyTorch's own fake-quantize op with the observer's scale / zero point.
    quantizer = MinMaxQuantizer(4, signed=False)
    quantizer(torch.rand(1000) * 5 - 1)
    x = torch.randn(1000) * 4
    expected = torch.fake_quantize_per_tensor_affine(x, float(quantizer.scale), int(quantizer.zero_point), 0, 15)
    path = export_module(QuantizeDequantize(quantizer, "q"), x, str(tmp_path / "q.onnx"))
    assert torch.equal(run_ort(path, x)[0], expected)


def test_integer_codes_stay_in_the_bit_range(tmp_path):
    quantizer = LSQQuantizer(4, signed=True)
    quantizer(torch.randn(100))
    path = export_module(QuantizeDequantize(quantizer, "q"), torch.randn(100), str(tmp_path / "q.onnx"))
    graph = onnx.load(path)
    # The Q -> DQ codes: expose the Clip output and read the raw codes for a far-out input.
    clip = next(n for n in graph.graph.node if n.op_type == "Clip")
    graph.graph.output.append(onnx.helper.make_tensor_value_info(clip.output[0], onnx.TensorProto.UINT8, None))
    onnx.save(graph, str(tmp_path / "codes.onnx"))
    x = torch.linspace(-100, 100, 100)
    _, codes = run_ort(str(tmp_path / "codes.onnx"), x)
    codes = codes.long() - 128  # signed codes ride in uint8 shifted by 128
    assert codes.min() == -8 and codes.max() == 7
    assert torch.equal(codes, quantizer.quantize_to_int(x)[0].long())


# ---------------------------------------------------------------- layers
def _lsq(bits, signed=True, channels=None):
    if channels:
        return LSQQuantizer(bits, signed=signed, granularity="channel", num_channels=channels)
    return LSQQuantizer(bits, signed=signed)


def test_linear_runs_as_integer_matmul(tmp_path):
    layer = QuantLinear.from_float(nn.Linear(32, 24), _lsq(4, channels=24), _lsq(4))
    x = torch.randn(3, 10, 32)
    layer(x)  # initialise the step sizes
    layer.eval()
    with torch.no_grad():
        expected = layer(x)
    path = export_module(to_integer_forms(nn.Sequential(layer)), x, str(tmp_path / "linear.onnx"))
    assert optimized_ops(path, tmp_path)["MatMulIntegerToFloat"] == 1
    # int32 accumulation then one float scale: equal to the float product of exact codes to rounding.
    torch.testing.assert_close(run_ort(path, x)[0], expected, rtol=1e-5, atol=1e-5)
    codes = [i for i in onnx.load(path).graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert len(codes) == 1 and onnx.numpy_helper.to_array(codes[0]).min() >= -8


def test_conv_with_batch_norm_runs_as_qlinearconv(tmp_path):
    norm = FrozenBatchNorm2d(8)
    norm.weight.copy_(torch.randn(8))  # some negative scales: folded into the codes' signs
    norm.running_var.copy_(torch.rand(8) + 0.5)
    norm.running_mean.copy_(torch.randn(8))
    conv = Conv2d(6, 8, 3, padding=1, bias=False, norm=norm, activation=torch.relu)
    qconv = QuantConv2d.from_float(conv, _lsq(4, channels=8), _lsq(4, signed=False))
    model = nn.Sequential(qconv, _lsq(4, signed=False)).eval()
    x = torch.rand(1, 6, 20, 24) * 3
    with torch.no_grad():
        model(x)  # initialise
        expected = model(x)
    integer = to_integer_forms(copy.deepcopy(model))
    with torch.no_grad():
        exact = integer(x)
    path = export_module(integer, x, str(tmp_path / "conv.onnx"))
    assert optimized_ops(path, tmp_path)["QLinearConv"] == 1
    got = run_ort(path, x)[0]
    step = float(model[1].scale)
    # The graph's own arithmetic (batch norm folded into the step sizes, int32 bias), in
    # PyTorch: QLinearConv gives the same codes but where its fixed-point requantization rounds
    # a value on a boundary the other way.
    assert (got - exact).abs().max() <= step * 1.0001 and (got != exact).float().mean() < 1e-3
    # Against conv -> batch norm -> ReLU -> quantizer in float: the folded norm and the rounded
    # bias move values by float noise and by under half a bias step, so a value near a boundary
    # may take the neighbouring code, never a farther one.
    assert (exact - expected).abs().max() <= step * 1.0001 and (exact != expected).float().mean() < 0.05


@pytest.mark.parametrize("weight_bits", [2, 4])
def test_conv_bias_takes_steps_finer_than_the_accumulator(weight_bits, tmp_path):
    """The int32 bias of an integer convolution is rounded to steps 2^k finer than input step x
    weight step; widened for the session, the weight codes are multiplied by 2^k, so QLinearConv
    adds that bias exactly. Against the float conv -> batch norm, the bias moves outputs by under
    half a fine step (at 2 bits a coarse step moved them by up to 4% of their range)."""
    norm = FrozenBatchNorm2d(8)
    norm.weight.copy_(torch.rand(8) + 0.5)  # positive scales: the codes stay INT4, and are shifted
    norm.bias.copy_(torch.randn(8))
    norm.running_var.copy_(torch.rand(8) + 0.5)
    norm.running_mean.copy_(torch.randn(8))
    conv = Conv2d(6, 8, 3, padding=1, bias=False, norm=norm)
    qconv = QuantConv2d.from_float(conv, _lsq(weight_bits, channels=8), _lsq(4, signed=False)).eval()
    x = torch.rand(1, 6, 20, 24) * 3
    with torch.no_grad():
        qconv(x)  # initialise
        expected = qconv(x)
        integer = to_integer_forms(nn.Sequential(copy.deepcopy(qconv)))[0]
        exact = integer(x)
    trained_codes = qconv.weight_quantizer.quantize_to_int(qconv.weight.detach())[0]
    shift = next(k for k in range(8) if torch.equal(integer.codes.long(), trained_codes.long() * 2 ** k))
    # 4-bit inputs (codes up to 15): every int16 pair sum stays far from its limit, so the codes
    # grow as far as int8 allows (the next doubling would leave it).
    widest = integer.codes.long().abs().max()
    assert shift >= 3 and 64 <= widest <= 128
    bound = (integer.bias_scale / 2).view(1, -1, 1, 1) * 1.001 + 1e-5
    assert ((exact - expected).abs() <= bound).all()

    model = nn.Sequential(qconv, _lsq(8, signed=False)).eval()
    with torch.no_grad():
        model(x)
        model.eval()
        reference = to_integer_forms(copy.deepcopy(model))(x)
    path = export_module(to_integer_forms(copy.deepcopy(model)), x, str(tmp_path / "conv.onnx"))
    onnx.save(pack_int4(onnx.load(path)), path)  # as tools/export_onnx.py stores it
    stored = [i for i in onnx.load(path).graph.initializer if len(i.dims) == 4]
    assert [i.data_type for i in stored] == [onnx.TensorProto.INT4]  # on disk, the trained 4-bit codes
    assert np.array_equal(onnx.numpy_helper.to_array(stored[0]).astype(np.int8), trained_codes.numpy())
    widened = [onnx.numpy_helper.to_array(i) for i in widen_int4(onnx.load(path)).graph.initializer
               if len(i.dims) == 4]
    assert np.array_equal(widened[0], integer.codes.numpy())  # in the session, scaled up again
    assert optimized_ops(path, tmp_path)["QLinearConv"] == 1
    got = torch.from_numpy(ort_session(path, threads=1).run(None, {"x": x.numpy()})[0])
    assert (got - reference).abs().max() <= float(model[1].scale) * 1.0001
    assert (got != reference).float().mean() < 1e-3


@pytest.mark.parametrize("input_max, codes, shift", [
    (3, [-2, 1], 6),      # 2-bit weights and inputs: -128..64, the most widen_int4 multiplies by
    (15, [-8, 7], 4),     # 4-bit: -128..112
    (15, [-7, 8], 3),     # a batch-norm-negated channel: +8 * 16 would leave int8
    (255, [-8, 7], 3),    # 8-bit inputs: -64..56, 255 x 64 x 2 pair sums still fit int16 without VNNI
    (255, [-9, 7], 2),    # -72 would not
    (135, [-1, 1], 6),    # signed inputs shifted into uint8 (up to 128 + 7): 121 x 135 x 2 fits
])
def test_bias_shift_keeps_codes_within_int8_and_int16_pair_sums(input_max, codes, shift):
    codes = torch.tensor(codes, dtype=torch.int16)
    assert bias_shift(codes, torch.zeros(1), input_max) == shift
    widened = codes.int() * 2 ** shift
    assert -128 <= widened.min() and widened.max() <= 127 and 2 * input_max * widened.abs().max() <= 32767
    assert bias_shift(codes, torch.ones(1), input_max) == 0  # asymmetric codes are left as they are


def test_lsq_plus_offset_is_refused_with_its_layer_name():
    layer = QuantLinear.from_float(nn.Linear(8, 8), _lsq(4, channels=8), LSQQuantizer(4, learnable_offset=True))
    layer(torch.randn(4, 8))
    with pytest.raises(ExportError, match=r"0\.input_quantizer: an LSQ\+ offset"):
        to_integer_forms(nn.Sequential(layer.eval()))


def test_uncalibrated_quantizer_is_refused():
    layer = QuantLinear.from_float(nn.Linear(8, 8), _lsq(4, channels=8), _lsq(4))
    with pytest.raises(ExportError, match="never calibrated"):
        to_integer_forms(nn.Sequential(layer.eval()))


# ---------------------------------------------------------------- whole detectors
def _float(config):
    cfg, _ = _quantized(config)
    cfg = cfg.clone()
    cfg.MODEL.QUANT.ENABLED = False
    torch.manual_seed(0)
    return cfg, build_model(cfg).eval()


SIZES = [(96, 112), (80, 128)]  # traced on the first; the second checks dynamic height and width


def outputs_at_each_size(model, path):
    """(onnxruntime output, PyTorch output) pairs, both outputs, on a random image of each size."""
    for size in SIZES:
        image = torch.rand(1, 3, *size) * 255
        with torch.no_grad():
            expected = ExportedDetector(model)(image)
        for got, ref in zip(run_ort(path, image), expected):
            assert got.shape == ref.shape
            yield size, got, ref


def test_integer_eval_of_a_float_model_is_refused():
    cfg, model = _float("detr_fp32.yaml")
    with pytest.raises(ExportError, match="INTEGER_EVAL needs a quantized model"):
        integer_model(cfg, model)


@pytest.mark.parametrize("config", ["detr_fp32.yaml", "deformable_detr_fp32.yaml"])
def test_float_export_equals_pytorch(config, tmp_path):
    _, model = _float(config)
    path = str(tmp_path / "float.onnx")
    export_onnx(model, path, torch.rand(1, 3, *SIZES[0]) * 255)
    for _, got, ref in outputs_at_each_size(model, path):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Tiny W4A4A4 DETR and Deformable-DETR, calibrated, exported."""
    out = {}
    for config in ("detr_fp32.yaml", "deformable_detr_fp32.yaml"):
        _, model = _quantized(config)
        path = str(tmp_path_factory.mktemp("onnx") / "model.onnx")
        traced = export_onnx(model, path, torch.rand(1, 3, *SIZES[0]) * 255)
        out[config] = (model, traced, path)
    return out


@pytest.mark.parametrize("config", ["detr_fp32.yaml", "deformable_detr_fp32.yaml"])
def test_quantized_export_runs_integer_kernels(config, exported, tmp_path):
    _, traced, path = exported[config]
    ops = optimized_ops(path, tmp_path)
    graph = onnx.load(str(tmp_path / "optimized.onnx")).graph
    codes = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2}
    dequantized_codes = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in codes}
    float_matmuls = [n.name for n in graph.node if n.op_type in ("MatMul", "FusedMatMul", "Gemm")
                     and set(n.input) & dequantized_codes]
    # Every quantized linear layer whose input is quantized runs as an integer MatMul: none is
    # left computing in float on dequantized weights.
    assert ops["MatMulIntegerToFloat"] > 0 and not float_matmuls
    assert ops["QLinearConv"] > 0
    if config.startswith("deformable"):
        assert ops["GridSample"] > 0
    int4 = [i for i in onnx.load(path).graph.initializer if i.data_type == onnx.TensorProto.INT4]
    assert len(int4) >= len(codes) // 2  # on disk, 4-bit codes are INT4 (a few batch-norm-negated ones int8)


@pytest.mark.parametrize("config", ["detr_fp32.yaml", "deformable_detr_fp32.yaml"])
def test_quantized_export_matches_pytorch(config, exported):
    model, _, path = exported[config]
    for size, got, ref in outputs_at_each_size(model, path):
        # Most outputs agree to float precision; rounding flips (module docstring) move a few.
        close = ((got - ref).abs() <= 1e-3 + 1e-3 * ref.abs()).float().mean()
        assert close > 0.9, f"{size}: only {close:.1%} of the outputs agree"


def test_runtime_detector_gives_detectron2_instances(exported):
    model, _, path = exported["detr_fp32.yaml"]
    batch = images(1, seed=3)[0]
    detector = OnnxRuntimeDetector(ort_session(path, threads=1), model)
    with torch.no_grad():
        expected = model(batch)[0]["instances"]
    got = detector(batch)[0]["instances"]
    assert len(got) == len(expected) and got.image_size == expected.image_size
    # The same top detections (rounding flips aside) in Detectron2's format.
    assert set(got.get_fields()) == set(expected.get_fields())
    top = expected.scores.argsort(descending=True)[:5]
    torch.testing.assert_close(got.scores.sort(descending=True).values[:5], expected.scores[top], atol=0.05, rtol=0)
