"""4-bit weight codes on disk, 8-bit in the session.

The exported graph holds every weight whose codes fit 4 bits as an ONNX INT4 initializer, two
codes per byte (opset 21). ONNX Runtime 1.32 runs DequantizeLinear on INT4 correctly but fuses
only 8-bit codes into its integer kernels (MatMulIntegerToFloat, QLinearConv); with INT4 weights
every layer falls back to a float MatMul / Conv on dequantized weights (1.6x slower on the
shapes DETR). `widen_int4` therefore turns the codes back into INT8 initializers in memory
before a session is made: the same integers, the fast kernels. Any ONNX runtime can still read
the file as it is.
"""
import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

# Blocked / INT4 DequantizeLinear.
INT4_OPSET = 21


def _source(producers, name: str) -> str:
    """The tensor that `name` copies through Identity nodes (the exporter leaves them where it
    merged equal constants, e.g. a box head shared by two modules)."""
    while name in producers and producers[name].op_type == "Identity":
        name = producers[name].input[0]
    return name


def _producers(graph: onnx.GraphProto) -> dict:
    return {o: n for n in graph.node for o in n.output}


def _weight_dequantizers(graph: onnx.GraphProto, dtype: int, producers: dict):
    """{initializer name: [DequantizeLinear nodes reading it]} for `dtype` initializers of >= 2 dims."""
    inits = {i.name: i for i in graph.initializer if i.data_type == dtype and len(i.dims) >= 2}
    readers = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear":
            source = _source(producers, node.input[0])
            if source in inits:
                readers.setdefault(source, []).append(node)
    return inits, readers


def _zero(name: str, producers: dict, initializers: dict) -> bool:
    """Whether tensor `name` is a constant of zeros (an initializer or a Constant node)."""
    value = _constant(name, producers, initializers)
    return value is not None and not value.any()


def _int4_shift(codes: np.ndarray):
    """The largest j for which `codes` / 2^j are integers within [-8, 7] (the codes of a
    convolution scaled up by 2^j for its bias: `integer_bias.bias_shift`), or None."""
    for shift in reversed(range(7)):
        if codes.min() >= -8 << shift and codes.max() <= 7 << shift and not (codes % (1 << shift)).any():
            return shift
    return None


def pack_int4(model: onnx.ModelProto) -> onnx.ModelProto:
    """Store the int8 weight codes that are 4-bit codes times 2^j (and have zero points 0) as INT4:
    the 4-bit codes, their DequantizeLinear steps multiplied by 2^j (`widen_int4` undoes it)."""
    model = onnx.version_converter.convert_version(model, INT4_OPSET)
    graph = model.graph
    producers, initializers = _producers(graph), {i.name: i for i in graph.initializer}
    inits, readers = _weight_dequantizers(graph, onnx.TensorProto.INT8, producers)
    for name, nodes in readers.items():
        codes = numpy_helper.to_array(inits[name])
        zero_points = all(len(n.input) < 3 or _zero(n.input[2], producers, initializers) for n in nodes)
        shift = _int4_shift(codes)
        if shift is None or not zero_points:
            continue  # 8-bit layers, or batch-norm-negated -8 codes: stay int8
        inits[name].CopyFrom(numpy_helper.from_array((codes >> shift).astype(ml_dtypes.int4), name))
        for node in nodes:
            del node.input[2:]  # a zero point must have the codes' type; absent means 0
            if shift:
                _set_step(graph, node, _constant(node.input[1], producers, initializers) * 2 ** shift)
    # The converter's inferred shapes: dead weight in the file, runtimes infer them again.
    del graph.value_info[:]
    return model


def _set_step(graph: onnx.GraphProto, dequantize: onnx.NodeProto, step: np.ndarray):
    """Give `dequantize` its own step-size initializer holding `step` (made, or replaced)."""
    name = f"{dequantize.output[0]}_step"
    mine = next((i for i in graph.initializer if i.name == name), None) or graph.initializer.add()
    mine.CopyFrom(numpy_helper.from_array(step, name))
    dequantize.input[1] = name


def _constant(name: str, producers: dict, initializers: dict):
    """The value of tensor `name` if it is a constant (an initializer or a Constant node), else None."""
    name = _source(producers, name)
    if name in initializers:
        return numpy_helper.to_array(initializers[name])
    node = producers.get(name)
    value = None if node is None or node.op_type != "Constant" else next(
        (a.t for a in node.attribute if a.name == "value"), None)
    return None if value is None else numpy_helper.to_array(value)


def _bias_shift(conv: onnx.NodeProto, producers: dict, initializers: dict) -> int:
    """k where the int32 bias of `conv` (DequantizeLinear inputs) is in steps 2^k finer than its
    input step times its weight step (`integer_bias.bias_shift`), else 0."""
    dequantized = [producers.get(_source(producers, i)) for i in conv.input[:3]]
    if len(conv.input) < 3 or any(n is None or n.op_type != "DequantizeLinear" for n in dequantized):
        return 0
    x_step, w_step, b_step = (_constant(n.input[1], producers, initializers) for n in dequantized)
    if x_step is None or w_step is None or b_step is None or x_step.size != 1:
        return 0
    ratio = np.log2(x_step.astype(np.float64) * w_step / b_step)
    shift = int(np.rint(ratio).max())
    if shift <= 0 or np.abs(ratio - shift).max() > 1e-3:
        return 0
    return shift


def widen_int4(model: onnx.ModelProto) -> onnx.ModelProto:
    """INT4 weight initializers back to INT8, for ONNX Runtime's integer kernels. A convolution
    whose int32 bias is in steps 2^j finer than its input step times its weight step gets its
    codes times 2^j and its weight steps divided by 2^j, as `qdq.DequantConv2d` made them: the
    same weights, and QLinearConv's accumulator steps are again the bias's."""
    graph = model.graph
    producers, initializers = _producers(graph), {i.name: i for i in graph.initializer}
    inits, readers = _weight_dequantizers(graph, onnx.TensorProto.INT4, producers)
    shifts = {}
    for conv in graph.node:
        if conv.op_type == "Conv" and len(conv.input) == 3:
            reader = producers.get(_source(producers, conv.input[1]))
            source = None if reader is None else _source(producers, reader.input[0])
            if source in inits and len(readers[source]) == 1:
                shifts[source] = (_bias_shift(conv, producers, initializers), reader)
    for name, init in inits.items():
        codes = numpy_helper.to_array(init).astype(np.int8)
        shift, reader = shifts.get(name, (0, None))
        if shift:
            codes = codes * np.int8(2 ** shift)
            step = _constant(reader.input[1], producers, initializers)
            _set_step(graph, reader, (step / 2 ** shift).astype(step.dtype))
        init.CopyFrom(numpy_helper.from_array(codes, name))
    return model
