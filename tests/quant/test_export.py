"""Packed integer export (pack/unpack, export -> reload gives identical outputs) and the size /
FLOPs / OPs report."""
import os

import pytest
import torch
from torch import nn

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from aqdetr_d2 import add_aqdetr_config

from aqdetr_d2.layers.ms_deform_attn import MSDeformAttn
from aqdetr_d2.modeling import meta_arch_class
from aqdetr_d2.quant import QuantConfig, QuantLinear, calibrate, quantize_model
from train_net_helpers import PLAIN_DETR
from aqdetr_d2.quant.export import (
    export_quantized,
    exported_state_dict,
    load_exported,
    pack_codes,
    packed_nbytes,
    unpack_codes,
)
from aqdetr_d2.quant.report import model_report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = {
    "detr_fp32.yaml": ("DETR", "MODEL.DETR"),
    "deformable_detr_fp32.yaml": ("DEFORMABLE_DETR", "MODEL.DEFORMABLE_DETR"),
}


def tiny_opts(config):
    node = TINY[config][1]
    return [f"{node}.HIDDEN_DIM", "32", f"{node}.NHEADS", "4", f"{node}.ENC_LAYERS", "1",
            f"{node}.DEC_LAYERS", "2", f"{node}.DIM_FEEDFORWARD", "64"]


def images(n, seed=0, size=(96, 112)):
    g = torch.Generator().manual_seed(seed)
    return [[{"image": torch.randint(0, 256, (3, *size), generator=g, dtype=torch.uint8),
              "height": size[0], "width": size[1]}] for _ in range(n)]


def parts_of(cfg):
    return meta_arch_class(cfg).part_patterns()


@torch.no_grad()
def predict(model, batch):
    return model.predict(model.preprocess_image(batch))


# ---------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [1, 3, 7, 13, 1001])
def test_pack_roundtrip(bits, signed, n):
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    codes = torch.randint(lo, hi + 1, (n,))
    codes[0], codes[-1] = lo, hi  # both ends of the range
    packed = pack_codes(codes, bits, signed)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits) == (n * bits + 7) // 8
    out = unpack_codes(packed, bits, signed, n)
    assert out.dtype == (torch.int8 if signed else torch.uint8)
    assert torch.equal(out.long(), codes)


def test_pack_layout():
    # 4 bit: two's complement nibbles, the first code in the low nibble, last byte zero-padded.
    assert pack_codes(torch.tensor([1, -1, 2]), 4, True).tolist() == [0xF1, 0x02]
    # 8 bit signed: the int8 byte.
    assert pack_codes(torch.tensor([-128, -1, 127]), 8, True).tolist() == [0x80, 0xFF, 0x7F]
    # 2 bit: four per byte from bit 0 up.
    assert pack_codes(torch.tensor([0, 1, 2, 3, 1]), 2, False).tolist() == [0b11100100, 0b01]
    # 3 bit: one LSB-first bit stream; code 2 straddles bytes 0 and 1.
    assert pack_codes(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0]), 3, False).tolist() == [0xD1, 0x58, 0x1F]


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="outside the 4-bit signed range"):
        pack_codes(torch.tensor([8]), 4, True)
    with pytest.raises(ValueError, match="2, 3, 4 or 8"):
        pack_codes(torch.tensor([1]), 5, False)


# ---------------------------------------------------------------- model export
@pytest.fixture(scope="module")
def quantized_models():
    """Tiny quantized DETR and Deformable-DETR, calibrated on two random images, and their exports."""
    return {config: _quantized(config) for config in TINY}


def _quantized(config, *opts):
    cfg = get_cfg()
    add_aqdetr_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "shapes", config))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.QUANT.ENABLED", "True", *tiny_opts(config), *opts])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    calibrate(model, images(2))
    return cfg, model


@pytest.mark.parametrize("config", list(TINY))
def test_export_reload_gives_identical_outputs(quantized_models, config, tmp_path):
    cfg, model = quantized_models[config]
    batch = images(1, seed=1)[0]
    expected = predict(model, batch)
    path = tmp_path / "export.pth"
    torch.save(export_quantized(model), path)
    exported = torch.load(path, map_location="cpu", weights_only=True)
    assert exported["packed"] and all(e["bits"] == 4 for n, e in exported["packed"].items()
                                      if "sampling_offsets" not in n)
    torch.manual_seed(123)  # different random weights
    fresh = build_model(cfg).eval()
    load_exported(fresh, exported)
    got = predict(fresh, batch)
    assert torch.equal(got["pred_logits"], expected["pred_logits"])
    assert torch.equal(got["pred_boxes"], expected["pred_boxes"])
    # Weights are the dequantized codes, which the weight quantizers give back unchanged.
    for name, entry in exported["packed"].items():
        layer = fresh.get_submodule(name)
        with torch.no_grad():
            assert torch.equal(layer.weight_quantizer(layer.weight), layer.weight)
            assert torch.equal(layer.weight, model.get_submodule(name).weight_quantizer(model.get_submodule(name).weight))
    # The state dict of the export equals the fake-quantized model's, key by key.
    state = exported_state_dict(exported)
    assert set(state) == set(fresh.state_dict())


def test_export_size_matches_report(tmp_path):
    # The papers' DETR (res5, one set of heads): the shapes DETR's convergence aids add many
    # tiny tensors whose pickling overhead dominates the file size of a model this small.
    cfg, model = _quantized("detr_fp32.yaml", *PLAIN_DETR)
    path = tmp_path / "export.pth"
    torch.save(export_quantized(model), path)
    report = model_report(model, lambda: images(1)[0], parts_of(cfg))
    on_disk_mb = os.path.getsize(path) / 2**20
    assert on_disk_mb == pytest.approx(report.total.size_mb, rel=0.06)
    # W4: the quantized parts' weights take ~1/8 of float (the float stem conv and norms add a little).
    backbone = report["backbone"]
    assert backbone.lowbit_params > 0.99 * backbone.params
    assert 7.5 < backbone.compression <= 8.0
    assert 7.0 < report.total.compression < 8.0
    float_state = {k: v for k, v in model.state_dict().items() if "quant" not in k}
    torch.save(float_state, tmp_path / "float.pth")
    assert 7.0 < os.path.getsize(tmp_path / "float.pth") / os.path.getsize(path) < 8.0


def test_load_exported_refuses_other_config(quantized_models, make_cfg):
    _, model = quantized_models["detr_fp32.yaml"]
    exported = export_quantized(model)
    cfg8 = make_cfg("shapes/detr_fp32.yaml", "MODEL.QUANT.ENABLED", "True", "MODEL.QUANT.WEIGHT_BITS", "8",
                    *tiny_opts("detr_fp32.yaml"))
    with pytest.raises(ValueError, match="at 8 bit"):
        load_exported(build_model(cfg8), exported)
    float_cfg = make_cfg("shapes/detr_fp32.yaml", *tiny_opts("detr_fp32.yaml"))
    with pytest.raises(ValueError, match="not quantized in this model"):
        load_exported(build_model(float_cfg), exported)


def test_export_loads_as_model_weights(quantized_models, make_cfg, tmp_path):
    """What `MODEL.WEIGHTS export.pth` (train_net --eval-only, the tools) does: Detectron2's
    checkpointer reads the packed file into the fake-quantized model, outputs unchanged."""
    from aqdetr_d2.checkpoint import AQDETRCheckpointer, CheckpointMismatchError

    cfg, model = quantized_models["detr_fp32.yaml"]
    batch = images(1, seed=1)[0]
    expected = predict(model, batch)
    path = str(tmp_path / "export.pth")
    torch.save(export_quantized(model), path)
    torch.manual_seed(7)
    fresh = build_model(cfg).eval()
    AQDETRCheckpointer(fresh).load(path)
    got = predict(fresh, batch)
    assert torch.equal(got["pred_logits"], expected["pred_logits"])
    assert torch.equal(got["pred_boxes"], expected["pred_boxes"])

    cfg8 = make_cfg("shapes/detr_fp32.yaml", "MODEL.QUANT.ENABLED", "True", "MODEL.QUANT.WEIGHT_BITS", "8",
                    *tiny_opts("detr_fp32.yaml"))
    with pytest.raises(ValueError, match="at 8 bit"):
        AQDETRCheckpointer(build_model(cfg8)).load(path)
    float_cfg = make_cfg("shapes/detr_fp32.yaml", *tiny_opts("detr_fp32.yaml"))
    with pytest.raises(ValueError, match="not quantized in this model"):
        AQDETRCheckpointer(build_model(float_cfg)).load(path)
    # An ordinary checkpoint of another config is still refused as before.
    torch.save({"model": {"transformer.encoder.layers.0.linear1.weight": torch.zeros(3, 3)}}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError):
        AQDETRCheckpointer(build_model(cfg)).load(str(tmp_path / "bad.pth"))


# ---------------------------------------------------------------- report
TOY_PARTS = {"backbone": ["backbone"], "encoder": ["encoder"], "heads": ["input_proj", "class_embed", "bbox_embed"]}
# ToyDetector on 2 images of 8x8, per image: stem conv 8x8x8 outputs x 27, conv 8x4x4 x 72, input_proj
# 16x16 x 8; per encoder layer (16 tokens, width 16, 4 heads of 4): q/k/v/out 4 x 16x16x16, q@k^T and
# attn@v 4x16x16x4 each, FFN 2 x 16x32x16; class 16x5x16, box 16x4x16.
TOY_BACKBONE = 2 * (512 * 27 + 128 * 72)
TOY_LAYER_LINEAR, TOY_LAYER_ATTN = 2 * (4 * 16 * 16 * 16 + 2 * 16 * 32 * 16), 2 * (2 * 4 * 16 * 16 * 4)
TOY_HEADS = 2 * (256 * 8 + 16 * 5 * 16 + 16 * 4 * 16)


def test_report_float_model_counts_macs_and_ops_equal_flops(toy_detector, images):
    model = toy_detector()
    report = model_report(model, lambda: images, TOY_PARTS)
    assert report["backbone"].flops == TOY_BACKBONE
    assert report["encoder"].flops == 2 * (TOY_LAYER_LINEAR + TOY_LAYER_ATTN)
    assert report["heads"].flops == TOY_HEADS
    assert report.total.ops == report.total.flops and report.total.lowbit_flops == 0
    assert report.total.params == sum(p.numel() for p in model.parameters())
    assert report.total.size_mb == pytest.approx(report.total.params * 4 / 2**20)
    assert report.total.weight_bits_str == "32" and report.total.compression == 1.0
    table = report.to_markdown()
    assert "| **total** |" in table and "OPs = FLOPs_fp + sum (b_w x b_a / 64) x FLOPs_lowbit" in table


def test_report_quantized_model_ops_formula(toy_detector, images):
    qcfg = QuantConfig(weight_bits=4, act_bits=4, attn_bits=8, keep_fp_patterns=["input_proj", "class_embed"],
                       int8_patterns=["backbone.0"])
    model = quantize_model(toy_detector(), qcfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = model_report(model, lambda: images, TOY_PARTS)
    # Uninitialised quantizers: the report ran on a copy and left the model untouched.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    backbone, encoder, heads = report["backbone"], report["encoder"], report["heads"]
    stem, conv = 2 * 512 * 27, 2 * 128 * 72
    assert backbone.ops == pytest.approx(stem * 8 * 8 / 64 + conv * 4 * 4 / 64)
    assert backbone.weight_bits_str == "mixed (4/8)"
    assert encoder.lowbit_flops == encoder.flops
    assert encoder.ops == pytest.approx(2 * (TOY_LAYER_LINEAR * 16 / 64 + TOY_LAYER_ATTN * 64 / 64))
    box = 2 * 16 * 4 * 16
    assert heads.lowbit_flops == box and heads.ops == pytest.approx(TOY_HEADS - box + box * 16 / 64)
    assert heads.weight_bits_str == "mixed (4/32)"
    # Size: 4-bit weights of the quantized layers, 32 bit for the rest.
    lowbit = sum(m.weight.numel() for m in model.modules() if isinstance(m, QuantLinear))
    assert encoder.lowbit_params + heads.lowbit_params == lowbit
    assert report.total.size_bits == 32 * report.total.params - 28 * (lowbit + 8 * 8 * 9) - 24 * (8 * 3 * 9)


class _DeformWrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)

    def forward(self, x):
        query, ref, value, shapes, start = x
        return self.attn(query, ref, value, shapes, start)[0]


def test_report_deformable_attention_flops():
    model = _DeformWrapper()
    shapes = torch.tensor([[4, 4], [2, 2]])
    batch, len_q, len_in = 2, 5, 20
    x = (torch.randn(batch, len_q, 32), torch.rand(batch, len_q, 2, 2), torch.randn(batch, len_in, 32),
         shapes, torch.tensor([0, 16]))
    report = model_report(model, lambda: x, {"attn": ["attn"]})
    linear = batch * (len_q * 32 * (4 * 2 * 3 * 2) + len_q * 32 * (4 * 2 * 3) + len_in * 32 * 32 + len_q * 32 * 32)
    sampling = batch * len_q * 4 * 2 * 3 * 8  # attention weights x head dim
    assert report["attn"].flops == linear + sampling


@pytest.mark.parametrize("quantizer,bits", [("minmax", 3), ("lsq", 2), ("lsq+", 8)])
def test_export_other_quantizers_and_bit_widths(toy_detector, images, quantizer, bits):
    def build():
        return quantize_model(toy_detector(), QuantConfig(weight_bits=bits, quantizer=quantizer,
                                                          keep_fp_patterns=["input_proj"]))

    model = build()
    calibrate(model, [images])
    model.eval()
    exported = export_quantized(model)
    assert {e["bits"] for e in exported["packed"].values()} == {bits}
    fresh = load_exported(build().eval(), exported)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(images), fresh(images)))
