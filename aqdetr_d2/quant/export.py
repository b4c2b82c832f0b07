"""
Deployment export: integer weight codes packed at their bit width, with their scales.

`export_quantized(model)` turns a fake-quantized model into a dict of plain tensors, ints,
strings and bools (loadable with `torch.load(path, weights_only=True)`):

    {
      "format": "aqdetr_d2.quant.export", "version": 1, "layout": PACKING_LAYOUT,
      "packed": {layer name: {
          "codes": uint8 (ceil(numel * bits / 8),)  the weight's integer codes, packed,
          "bits": int, "signed": bool, "shape": [C_out, ...], "ch_axis": 0,
          "scale": float32 (C_out,), "zero_point": int8 / uint8 (C_out,), "quantizer": "lsq" | "minmax"}},
      "state_dict": {key: tensor}   every other parameter and buffer in floating point: float
                                    layers, biases, norms, embeddings, activation and attention
                                    quantizer step sizes,
      "aliases": {key: key}         state-dict keys that name an exported tensor again (a module
                                    held by two parents), mapped to the name it is stored under,
      "metadata": {str: str}        free-form (the export tool stores the config).
    }

for every `QuantLinear` / `QuantConv2d` whose weight quantizer is enabled. The dequantized
weight is `(codes - zero_point) * scale` along `ch_axis`, computed in float32; it is exactly
what the weight quantizer produced (checked on export), and quantizing it again gives it back
unchanged (checked on load), so `load_exported` restores a model whose outputs are bit-identical
to the fake-quantized one.

Packing (`pack_codes` / `unpack_codes`), the same for every bit width b in {2, 3, 4, 8}:
codes are taken in row-major (C-contiguous) order of the weight and written as one
little-endian bit stream: code i occupies stream bits [i*b, (i+1)*b), least significant bit
first, and stream bit k is bit (k mod 8) of byte k // 8. Signed codes are stored as b-bit
two's complement, unsigned codes as they are. The last byte is padded with zero bits.
Hence 8 bit: one code per byte (int8 codes reinterpreted as uint8); 4 bit: two per byte,
the first in the low nibble (ONNX INT4 / UINT4 order); 2 bit: four per byte, first in bits
0-1; 3 bit: eight codes per three bytes, codes may straddle byte boundaries.
"""
import math
from typing import Dict, Optional, Union

import torch
from torch import nn

from .modules import QuantConv2d, QuantLinear
from .quantizers import LSQQuantizer, MinMaxQuantizer, QuantizerBase, quant_range

FORMAT = "aqdetr_d2.quant.export"
VERSION = 1
PACKABLE_BITS = (2, 3, 4, 8)

PACKING_LAYOUT = (
    "codes in row-major order of the weight as one little-endian bit stream: code i occupies "
    "stream bits [i*b, (i+1)*b), LSB first; stream bit k is bit k%8 of byte k//8; signed codes "
    "in b-bit two's complement; last byte zero-padded (8 bit: 1 code/byte; 4 bit: 2/byte, first "
    "in the low nibble; 2 bit: 4/byte; 3 bit: 8 codes per 3 bytes). "
    "weight = (codes - zero_point) * scale, per output channel (axis 0), float32"
)

# Codes packed per chunk, a multiple of 8 so that chunks start on a byte boundary for every b.
_CHUNK = 1 << 22


def _check_packable(bits: int):
    if bits not in PACKABLE_BITS:
        raise ValueError(f"codes can be packed at 2, 3, 4 or 8 bits; got {bits}")


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that `numel` codes of `bits` bits take once packed."""
    return (numel * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """
    Pack integer codes (any shape and integer dtype, in the `bits`-bit signed / unsigned range)
    into a uint8 tensor of `packed_nbytes(codes.numel(), bits)` bytes (layout: module docstring).
    """
    _check_packable(bits)
    qmin, qmax = quant_range(bits, signed)
    flat = codes.detach().reshape(-1).to("cpu", torch.int16)
    if flat.numel() and (int(flat.min()) < qmin or int(flat.max()) > qmax):
        raise ValueError(f"codes outside the {bits}-bit {'signed' if signed else 'unsigned'} range "
                         f"[{qmin}, {qmax}]: [{int(flat.min())}, {int(flat.max())}]")
    n = flat.numel()
    out = torch.empty(packed_nbytes(n, bits), dtype=torch.uint8)
    if bits == 8:
        return out.copy_(flat.to(torch.uint8))  # two's complement wraps -128..-1 to 128..255
    bit_index = torch.arange(bits, dtype=torch.int16)
    byte_weights = torch.tensor([1 << k for k in range(8)], dtype=torch.int16)
    for start in range(0, n, _CHUNK):
        chunk = flat[start:start + _CHUNK] & ((1 << bits) - 1)  # two's complement in b bits
        m = chunk.numel()
        padded = torch.zeros(math.ceil(m / 8) * 8, dtype=torch.int16)
        padded[:m] = chunk
        # (codes, b) bits, LSB first -> stream of bits -> bytes of 8 stream bits, LSB first.
        stream = ((padded[:, None] >> bit_index) & 1).reshape(-1, 8)
        packed = (stream * byte_weights).sum(1, dtype=torch.int16).to(torch.uint8)
        first = start * bits // 8
        nbytes = packed_nbytes(m, bits)
        out[first:first + nbytes] = packed[:nbytes]
    return out


def unpack_codes(packed: torch.Tensor, bits: int, signed: bool, numel: int) -> torch.Tensor:
    """Inverse of `pack_codes`: `numel` codes, int8 if signed else uint8, 1-D."""
    _check_packable(bits)
    packed = packed.detach().reshape(-1).to("cpu", torch.uint8)
    if packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(f"{numel} codes of {bits} bits take {packed_nbytes(numel, bits)} bytes; "
                         f"got {packed.numel()}")
    dtype = torch.int8 if signed else torch.uint8
    if bits == 8:
        return packed.view(dtype).clone()
    out = torch.empty(numel, dtype=torch.int16)
    bit_index = torch.arange(8, dtype=torch.int16)
    code_weights = torch.tensor([1 << k for k in range(bits)], dtype=torch.int16)
    for start in range(0, numel, _CHUNK):
        m = min(_CHUNK, numel - start)
        first = start * bits // 8
        chunk = packed[first:first + packed_nbytes(m, bits)].to(torch.int16)
        padded = torch.zeros(math.ceil(m / 8) * bits, dtype=torch.int16)
        padded[:chunk.numel()] = chunk
        stream = ((padded[:, None] >> bit_index) & 1).reshape(-1, bits)
        out[start:start + m] = (stream * code_weights).sum(1, dtype=torch.int16)[:m]
    if signed:
        out = torch.where(out >= (1 << (bits - 1)), out - (1 << bits), out)
    return out.to(dtype)


# ---------------------------------------------------------------- model export / load
def _quantizer_kind(q: QuantizerBase, name: str) -> str:
    if isinstance(q, LSQQuantizer):
        if q.offset is not None:
            raise NotImplementedError(
                f"{name}: weight quantizer has an LSQ+ offset; exported weights must be symmetric "
                "(QuantConfig quantizes weights without offset)")
        return "lsq"
    if isinstance(q, MinMaxQuantizer):
        return "minmax"
    raise NotImplementedError(f"{name}: cannot export a weight quantizer of type {type(q).__name__}")


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, shape) -> torch.Tensor:
    view = [-1] + [1] * (len(shape) - 1)
    codes = codes.reshape(shape).to(torch.float32)
    return (codes - zero_point.to(torch.float32).view(view)) * scale.to(torch.float32).view(view)


def _exported_layers(model: nn.Module):
    """(name, module) of each QuantLinear / QuantConv2d with an enabled weight quantizer, once."""
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantConv2d)) and m.weight_quantizer.enabled:
            yield name, m


@torch.no_grad()
def export_quantized(model: nn.Module, metadata: Optional[Dict[str, str]] = None) -> Dict:
    """
    Export `model` (fake-quantized, quantizers initialised) for deployment; see the module
    docstring for the format. Uninitialised weight quantizers are initialised from their weight
    (as a first forward would); activation quantizers are exported as they are.
    Save the result with `torch.save(exported, path)`.
    """
    packed = {}
    replaced = {}  # id(tensor) -> canonical state-dict key, for the tensors the packed entries hold
    for name, layer in _exported_layers(model):
        q = layer.weight_quantizer
        kind = _quantizer_kind(q, name)
        if q.ch_axis % layer.weight.dim() != 0 or q.per_tensor:
            raise NotImplementedError(f"{name}: only per-output-channel weight quantizers are exported")
        codes, scale, zero_point = q.quantize_to_int(layer.weight)
        code_dtype = torch.int8 if q.signed else torch.uint8
        integral = not zero_point.is_floating_point() or torch.equal(zero_point, zero_point.round())
        if not integral or zero_point.min() < q.qmin or zero_point.max() > q.qmax:
            raise NotImplementedError(f"{name}: weight zero point is not an integer code")
        scale = scale.detach().to("cpu", torch.float32).clone()
        zero_point = zero_point.detach().to("cpu").to(code_dtype)
        shape = list(layer.weight.shape)
        entry = {
            "codes": pack_codes(codes, q.bits, q.signed),
            "bits": int(q.bits),
            "signed": bool(q.signed),
            "shape": shape,
            "ch_axis": 0,
            "scale": scale,
            "zero_point": zero_point,
            "quantizer": kind,
        }
        # The deployed weight must be exactly what the fake-quantized model computes with.
        fake = q(layer.weight).detach().to("cpu", torch.float32)
        deq = _dequantize(unpack_codes(entry["codes"], q.bits, q.signed, layer.weight.numel()),
                          scale, zero_point, shape)
        if not torch.equal(fake, deq):
            raise RuntimeError(f"{name}: dequantized codes differ from the weight quantizer's output "
                               f"(max diff {(fake - deq).abs().max().item():.3g})")
        packed[name] = entry
        replaced[id(layer.weight)] = f"{name}.weight"
        for key, t in q.state_dict(prefix=f"{name}.weight_quantizer.", keep_vars=True).items():
            replaced[id(t)] = key

    state_dict, aliases = {}, {}
    for key, t in model.state_dict(keep_vars=True).items():
        if t is None:
            continue
        canonical = replaced.get(id(t))
        if canonical is not None:
            if canonical != key:
                aliases[key] = canonical
            continue
        state_dict[key] = t.detach().to("cpu")
    return {
        "format": FORMAT,
        "version": VERSION,
        "layout": PACKING_LAYOUT,
        "packed": packed,
        "state_dict": state_dict,
        "aliases": aliases,
        "metadata": {str(k): str(v) for k, v in (metadata or {}).items()},
    }


def _check_format(exported: Dict):
    if not isinstance(exported, dict) or exported.get("format") != FORMAT:
        raise ValueError("not an export of aqdetr_d2.quant.export_quantized (missing format tag)")
    if exported.get("version") != VERSION:
        raise ValueError(f"export version {exported.get('version')} is not supported (expected {VERSION})")


def _weight_quantizer_state(entry: Dict, prefix: str) -> Dict[str, torch.Tensor]:
    state = {prefix + "scale": entry["scale"].clone(), prefix + "initialized": torch.ones((), dtype=torch.uint8),
             prefix + "bit_width": torch.tensor(entry["bits"], dtype=torch.uint8)}
    if entry["quantizer"] == "minmax":
        state[prefix + "zero_point"] = entry["zero_point"].to(torch.int32)
    elif entry["zero_point"].any():
        raise ValueError(f"{prefix}: an LSQ weight quantizer has no zero point, but the export has one")
    return state


def exported_state_dict(exported: Dict) -> Dict[str, torch.Tensor]:
    """
    The export as a regular state dict of the fake-quantized model: dequantized weights, weight
    quantizer states rebuilt from the scales, the float remainder, and the aliases filled in.
    """
    _check_format(exported)
    state = dict(exported["state_dict"])
    for name, entry in exported["packed"].items():
        numel = math.prod(entry["shape"])
        codes = unpack_codes(entry["codes"], entry["bits"], entry["signed"], numel)
        state[f"{name}.weight"] = _dequantize(codes, entry["scale"], entry["zero_point"], entry["shape"])
        state.update(_weight_quantizer_state(entry, f"{name}.weight_quantizer."))
    for alias, key in exported["aliases"].items():
        state[alias] = state[key]
    return state


def is_export(obj) -> bool:
    """True for a dict written by `export_quantized` (any version)."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def check_export_fits(model: nn.Module, exported: Dict):
    """Raise ValueError unless `model` quantizes exactly the exported layers, at their bit widths."""
    _check_format(exported)
    layers = dict(_exported_layers(model))
    missing_layers = sorted(set(exported["packed"]) - set(layers))
    if missing_layers:
        raise ValueError(f"the export has packed weights for layers that are not quantized in this model: "
                         f"{missing_layers[:10]}; build the model with the config of the export")
    extra = sorted(set(layers) - set(exported["packed"]))
    if extra:
        raise ValueError(f"layers quantized in this model but not in the export: {extra[:10]}")
    for name, entry in exported["packed"].items():
        q = layers[name].weight_quantizer
        if (q.bits, q.signed, _quantizer_kind(q, name)) != (entry["bits"], entry["signed"], entry["quantizer"]):
            raise ValueError(f"{name}: the model quantizes weights at {q.bits} bit ({type(q).__name__}), "
                             f"the export at {entry['bits']} bit ({entry['quantizer']})")


def check_requantization(model: nn.Module, exported: Dict):
    """Raise RuntimeError unless every exported layer's weight quantizer gives its loaded weight back."""
    with torch.no_grad():
        for name in exported["packed"]:
            layer = model.get_submodule(name)
            quantizer, training = layer.weight_quantizer, layer.weight_quantizer.training
            quantizer.eval()  # a training-mode min-max quantizer would re-observe the weight
            requantized = quantizer(layer.weight)
            quantizer.train(training)
            if not torch.equal(requantized, layer.weight):
                raise RuntimeError(f"{name}: re-quantizing the dequantized weight changed it")


def load_exported(model: nn.Module, exported: Union[Dict, str]) -> nn.Module:
    """
    Restore an export into `model`, built from the same config and quantized the same way
    (its quantizers may be uninitialised). `exported` is the dict or a path to it. Weights
    become the dequantized values; every exported layer's weight quantizer is checked to give
    them back unchanged. Returns `model`. (`AQDETRCheckpointer`, hence `MODEL.WEIGHTS`, reads
    export files the same way.)
    """
    if not isinstance(exported, dict):
        exported = torch.load(exported, map_location="cpu", weights_only=True)
    check_export_fits(model, exported)
    model.load_state_dict(exported_state_dict(exported), strict=True)
    check_requantization(model, exported)
    return model
