"""
Model size and FLOPs / OPs per part of a (fake-)quantized model, in Q-DETR's accounting.

    report = model_report(model, example_input, {"backbone": ["backbone"], "encoder": [...], ...})
    print(report.to_markdown())

Parts are given as module-name patterns: a plain prefix ("transformer.encoder") or an fnmatch
glob ("detector.*class_embed"); a pattern selects a module when it matches the module's name
or the name of one of its ancestors. A module belongs to the first part (in the order given)
that selects it under any of its names (a module held by two parents has two); modules that no
part selects are reported as "other".

Accounting (also printed under the table):

- params: parameters of the model's layers, each counted once. Quantizer step sizes and
  offsets are excluded, as are buffers (batch-norm statistics).
- size = (32 bit x #FP params + b bit x #b-bit params) / 8 bytes, MB = 2^20 bytes. A weight
  of a QuantLinear / QuantConv2d with an enabled weight quantizer is b-bit; everything else
  (float layers, biases, norms, embeddings) is 32-bit.
- FLOPs = multiply-accumulates of one forward pass, measured with forward hooks: Linear
  (output elements x in_features), Conv2d (output elements x in_channels / groups x kernel
  area), and attention, read from the tensors at the quantization points: q @ k^T and
  attn @ v each cost (attention map elements) x head dim; multi-scale deformable attention
  costs (attention weights elements) x head dim, i.e. one MAC per sampled value channel and
  point for the attention-weighted sum (the bilinear interpolation and the softmax, norms and
  activations are not counted).
- an operation is low-bit when both its operands are quantized (< 32 bit): weight and input
  of a layer; q and k; attention map and v; deformable values and attention weights.
  OPs = FLOPs_fp + sum over low-bit operations of (b_w x b_a / 64) x FLOPs_lowbit
  (the Bi-Real / Q-DETR convention: a b_w x b_a-bit multiplication costs b_w b_a / 64 of an
  FP one), so a full-precision model has OPs == FLOPs.
"""
import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Set, Union

import torch
from torch import nn

from .attention import QUANT_POINTS
from .calibrate import iter_quantizers
from .convert import selects
from .modules import QuantConv2d, QuantLinear
from .quantizers import QuantizerBase

MB = 2**20
OTHER = "other"

ACCOUNTING = (
    "size = (32 bit x #FP params + b bit x #b-bit params) / 8, MB = 2^20 bytes; buffers and quantizer "
    "step sizes excluded. FLOPs = multiply-accumulates of one forward: Linear/Conv2d, q@k^T and "
    "attn@v (deformable attention: attention weights x head dim). "
    "OPs = FLOPs_fp + sum (b_w x b_a / 64) x FLOPs_lowbit, an op being low-bit when both operands "
    "are quantized. compression = 32-bit size / size; speed-up = FLOPs / OPs."
)


@dataclass
class PartStats:
    """Size and compute of one part of a model (or of the whole model)."""

    name: str
    params: int = 0  # parameters (quantizer step sizes excluded)
    lowbit_params: int = 0  # of which stored at < 32 bit
    size_bits: int = 0  # sum of bits x numel over the parameters
    weight_bits: Set[int] = field(default_factory=set)  # weight bit widths of its Linear/Conv2d layers
    act_bits: Set[int] = field(default_factory=set)  # input / attention operand bit widths
    flops: int = 0  # multiply-accumulates of one forward
    lowbit_flops: int = 0  # of which low-bit
    ops: float = 0.0  # FLOPs_fp + sum (b_w b_a / 64) FLOPs_lowbit

    @property
    def size_mb(self) -> float:
        return self.size_bits / 8 / MB

    @property
    def fp32_size_mb(self) -> float:
        return self.params * 32 / 8 / MB

    @property
    def compression(self) -> float:
        return self.params * 32 / self.size_bits if self.size_bits else 1.0

    @property
    def speedup(self) -> float:
        return self.flops / self.ops if self.ops else 1.0

    @staticmethod
    def _bits_str(bits: Set[int]) -> str:
        if not bits:
            return "-"
        if len(bits) == 1:
            return str(next(iter(bits)))
        return "mixed (" + "/".join(str(b) for b in sorted(bits)) + ")"

    @property
    def weight_bits_str(self) -> str:
        return self._bits_str(self.weight_bits)

    @property
    def act_bits_str(self) -> str:
        return self._bits_str(self.act_bits)

    def add(self, other: "PartStats"):
        self.params += other.params
        self.lowbit_params += other.lowbit_params
        self.size_bits += other.size_bits
        self.weight_bits |= other.weight_bits
        self.act_bits |= other.act_bits
        self.flops += other.flops
        self.lowbit_flops += other.lowbit_flops
        self.ops += other.ops

    def as_dict(self) -> Dict:
        return {"part": self.name, "params": self.params, "lowbit_params": self.lowbit_params,
                "weight_bits": self.weight_bits_str, "act_bits": self.act_bits_str,
                "size_mb": self.size_mb, "fp32_size_mb": self.fp32_size_mb, "compression": self.compression,
                "flops": self.flops, "lowbit_flops": self.lowbit_flops, "ops": self.ops, "speedup": self.speedup}


@dataclass
class ModelReport:
    parts: List[PartStats]
    total: PartStats
    input_desc: str = ""

    def __getitem__(self, name: str) -> PartStats:
        for p in self.parts + [self.total]:
            if p.name == name:
                return p
        raise KeyError(name)

    def as_dict(self) -> Dict:
        return {"input": self.input_desc, "parts": [p.as_dict() for p in self.parts],
                "total": self.total.as_dict(), "accounting": ACCOUNTING}

    def to_markdown(self) -> str:
        header = ("| part | params (M) | W bits | A bits | size (MB) | compression | FLOPs (G) | "
                  "low-bit FLOPs (G) | OPs (G) | speed-up |")
        lines = [header, "|" + "---|" * 10]
        for p in self.parts + [self.total]:
            name = f"**{p.name}**" if p is self.total else p.name
            lines.append(
                f"| {name} | {_num(p.params / 1e6)} | {p.weight_bits_str} | {p.act_bits_str} | {_num(p.size_mb)} | "
                f"{p.compression:.2f}x | {_num(p.flops / 1e9)} | {_num(p.lowbit_flops / 1e9)} | {_num(p.ops / 1e9)} | "
                f"{p.speedup:.2f}x |")
        notes = [f"Input: {self.input_desc}." if self.input_desc else "", ACCOUNTING]
        return "\n".join(lines) + "\n\n" + "\n".join(n for n in notes if n)


def _num(x: float) -> str:
    """Four significant digits, without exponent down to 1e-4."""
    if x == 0:
        return "0"
    return f"{x:.4g}" if abs(x) >= 1e-4 else f"{x:.1e}"


def _bits(module: Optional[nn.Module]) -> int:
    """Bit width of a quantizer (32 for an identity placeholder or a disabled quantizer)."""
    return module.bits if isinstance(module, QuantizerBase) else 32


def _op_cost(macs: int, b1: int, b2: int):
    """(lowbit MACs, OPs) of `macs` multiply-accumulates between b1- and b2-bit operands."""
    if b1 < 32 and b2 < 32:
        return macs, macs * b1 * b2 / 64
    return 0, float(macs)


def _run(model: nn.Module, example_input):
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    if callable(example_input):
        inputs = example_input()
    elif isinstance(example_input, torch.Tensor):
        inputs = example_input.to(device)
    else:
        inputs = torch.randn(*example_input, device=device)
    return model(inputs)


@torch.no_grad()
def model_report(model: nn.Module, example_input: Union[Callable, Sequence[int], torch.Tensor],
                 parts: Dict[str, Sequence[str]], input_desc: Optional[str] = None) -> ModelReport:
    """
    Per-part parameter count, weight bits, size, FLOPs and OPs of `model` (accounting: module
    docstring), measured on one forward pass in eval mode without gradients.

    Args:
        example_input: a function returning the model's input (e.g. Detectron2's list of
            dicts), a tensor, or a shape for a random tensor.
        parts: part name -> module-name prefixes / globs, in display order.
        input_desc: how the input is described under the table (default: its shape if known).
    The model is left as it was: if some of its quantizers are uninitialised, the forward runs
    on a copy (it would otherwise initialise them from the example input).
    """
    if any(q.enabled and not bool(q.initialized) for q in iter_quantizers(model)):
        model = copy.deepcopy(model)
    names: Dict[int, List[str]] = {}
    modules: Dict[int, nn.Module] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
        modules[id(m)] = m
    order = list(parts) + [OTHER]
    stats = {p: PartStats(p) for p in order}

    def part_of(m: nn.Module) -> str:
        for part, patterns in parts.items():
            if selects(names[id(m)], patterns):
                return part
        return OTHER

    # ---- parameters and size
    seen = set()
    for m in modules.values():
        if isinstance(m, QuantizerBase):
            continue
        s = stats[part_of(m)]
        quantized = isinstance(m, (QuantLinear, QuantConv2d)) and m.weight_quantizer.enabled
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            bits = m.weight_quantizer.bits if quantized and pname == "weight" else 32
            s.params += p.numel()
            s.size_bits += bits * p.numel()
            if bits < 32:
                s.lowbit_params += p.numel()
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            s.weight_bits.add(m.weight_quantizer.bits if quantized else 32)
            s.act_bits.add(_bits(getattr(m, "input_quantizer", None)))
        for point in QUANT_POINTS:
            if isinstance(m._modules.get(point), (nn.Identity, QuantizerBase)):
                s.act_bits.add(_bits(m._modules[point]))

    # ---- FLOPs through forward hooks
    def account(m: nn.Module, macs: int, b1: int, b2: int):
        s = stats[part_of(m)]
        low, ops = _op_cost(macs, b1, b2)
        s.flops += macs
        s.lowbit_flops += low
        s.ops += ops

    def layer_hook(m, inputs, output):
        if isinstance(m, nn.Linear):
            macs = output.numel() * m.in_features
        else:
            macs = output.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        wq = getattr(m, "weight_quantizer", None)
        account(m, macs, _bits(wq), _bits(getattr(m, "input_quantizer", None)))

    # Attention operands, per attention module: the last head dims seen at q / v / value.
    last: Dict[int, Dict[str, int]] = {}

    def point_hook(parent: nn.Module, point: str):
        def hook(m, inputs, output):
            seen_dims = last.setdefault(id(parent), {})
            if point in ("q_quant", "v_quant", "value_quant"):
                seen_dims[point] = output.shape[-1]
            elif point == "attn_quant" and "q_quant" in seen_dims and "v_quant" in seen_dims:
                account(parent, output.numel() * seen_dims["q_quant"],
                        _bits(getattr(parent, "q_quant")), _bits(getattr(parent, "k_quant", None)))
                account(parent, output.numel() * seen_dims["v_quant"],
                        _bits(getattr(parent, "attn_quant")), _bits(getattr(parent, "v_quant")))
            elif point == "attn_weight_quant" and "value_quant" in seen_dims:
                account(parent, output.numel() * seen_dims["value_quant"],
                        _bits(getattr(parent, "value_quant")), _bits(getattr(parent, "attn_weight_quant")))
        return hook

    handles = []
    try:
        for m in modules.values():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                handles.append(m.register_forward_hook(layer_hook))
            for point in QUANT_POINTS:
                child = m._modules.get(point)
                if isinstance(child, (nn.Identity, QuantizerBase)):
                    handles.append(child.register_forward_hook(point_hook(m, point)))
        modes = [(m, m.training) for m in modules.values()]
        model.eval()
        try:
            _run(model, example_input)
        finally:
            for m, mode in modes:
                m.training = mode
    finally:
        for h in handles:
            h.remove()

    if input_desc is None:
        input_desc = f"random tensor {tuple(example_input)}" if isinstance(example_input, (tuple, list)) else ""
    rows = [stats[p] for p in order if p != OTHER or stats[OTHER].params or stats[OTHER].flops]
    total = PartStats("total")
    for r in rows:
        total.add(r)
    return ModelReport(rows, total, input_desc)
