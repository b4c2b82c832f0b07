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
    name = _source(producers, name)
    init = initializers.get(name)
    if init is None:
        node = producers.get(name)
        init = None if node is None or node.op_type != "Constant" else next(
            (a.t for a in node.attribute if a.name == "value"), None)
    return init is not None and not numpy_helper.to_array(init).any()


def pack_int4(model: onnx.ModelProto) -> onnx.ModelProto:
    """Store the int8 weight codes that lie in [-8, 7] (and have zero points 0) as INT4."""
    model = onnx.version_converter.convert_version(model, INT4_OPSET)
    graph = model.graph
    producers, initializers = _producers(graph), {i.name: i for i in graph.initializer}
    inits, readers = _weight_dequantizers(graph, onnx.TensorProto.INT8, producers)
    for name, nodes in readers.items():
        codes = numpy_helper.to_array(inits[name])
        zero_points = all(len(n.input) < 3 or _zero(n.input[2], producers, initializers) for n in nodes)
        if codes.min() < -8 or codes.max() > 7 or not zero_points:
            continue  # 8-bit layers, or batch-norm-negated -8 codes: stay int8
        inits[name].CopyFrom(numpy_helper.from_array(codes.astype(ml_dtypes.int4), name))
        for node in nodes:
            del node.input[2:]  # a zero point must have the codes' type; absent means 0
    # The converter's inferred shapes: dead weight in the file, runtimes infer them again.
    del graph.value_info[:]
    return model


def widen_int4(model: onnx.ModelProto) -> onnx.ModelProto:
    """INT4 weight initializers back to INT8 (same values), for ONNX Runtime's integer kernels."""
    inits, _ = _weight_dequantizers(model.graph, onnx.TensorProto.INT4, _producers(model.graph))
    for name, init in inits.items():
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.int8), name))
    return model
