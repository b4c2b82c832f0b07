"""quantize_model: what gets swapped, checkpoints, calibration, and the errors it raises."""
import copy

import pytest
import torch
from torch import nn

from aqdetr_d2.quant import (
    LSQQuantizer,
    MinMaxQuantizer,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    calibrate,
    iter_quantizers,
    quantize_model,
)

# Q-DETR's full-precision parts of this toy model: input projection and class head.
KEEP_FP = ("input_proj", "class_embed")


def _qcfg(**kwargs):
    kwargs.setdefault("keep_fp_patterns", KEEP_FP)
    return QuantConfig(**kwargs)


def test_swaps_selected_modules(toy_detector):
    model = quantize_model(
        toy_detector(),
        _qcfg(int8_patterns=["backbone.0"], unsigned_act_patterns=["backbone.1", "encoder.*.linear2"]),
    )
    stem, conv = model.backbone[0], model.backbone[1]
    assert isinstance(stem, QuantConv2d) and stem.norm is not None
    assert stem.weight_quantizer.bits == 8 and stem.input_quantizer.bits == 8  # int8 pattern
    assert isinstance(conv, QuantConv2d) and conv.weight_quantizer.bits == 4
    assert not conv.input_quantizer.signed and stem.input_quantizer.signed
    assert conv.weight_quantizer.scale.numel() == 8  # per output channel
    assert type(model.input_proj) is nn.Conv2d and type(model.class_embed) is nn.Linear
    assert isinstance(model.bbox_embed, QuantLinear)
    layer = model.encoder[1]
    assert not layer.linear2.input_quantizer.signed and layer.linear1.input_quantizer.signed
    attn = layer.self_attn
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert isinstance(getattr(attn, name), QuantLinear)
    for name, signed in (("q_quant", True), ("k_quant", True), ("v_quant", True), ("attn_quant", False)):
        q = getattr(attn, name)
        assert isinstance(q, LSQQuantizer) and q.signed == signed
        assert q.granularity == "head" and q.scale.numel() == 4  # num_heads read from the module


def test_part_patterns_and_quantizer_choice(toy_detector):
    model = quantize_model(
        toy_detector(),
        _qcfg(quantizer="minmax", conv_patterns=[], linear_patterns=["encoder.0.*"], attn_patterns=["encoder.1"]),
    )
    assert type(model.backbone[1]) is nn.Conv2d
    assert isinstance(model.encoder[0].linear1, QuantLinear) and type(model.encoder[1].linear1) is nn.Linear
    assert isinstance(model.encoder[0].linear1.weight_quantizer, MinMaxQuantizer)
    assert isinstance(model.encoder[0].self_attn.q_quant, nn.Identity)
    assert isinstance(model.encoder[1].self_attn.q_quant, MinMaxQuantizer)


def test_lsq_plus_offsets_activations_only(toy_detector):
    model = quantize_model(toy_detector(), _qcfg(quantizer="lsq+"))
    linear = model.encoder[0].linear1
    assert linear.input_quantizer.learnable_offset and not linear.weight_quantizer.learnable_offset
    assert model.encoder[0].self_attn.attn_quant.learnable_offset


def test_32_bits_everywhere_is_bit_identical(toy_detector, images):
    float_model = toy_detector()
    qmodel = quantize_model(copy.deepcopy(float_model), QuantConfig(weight_bits=32, act_bits=32, attn_bits=32))
    assert isinstance(qmodel.encoder[0].linear1, QuantLinear)
    for train in (True, False):
        float_model.train(train)
        qmodel.train(train)
        for a, b in zip(qmodel(images), float_model(images)):
            assert torch.equal(a, b)
    assert list(qmodel.state_dict()) == list(float_model.state_dict())


def test_float_checkpoint_loads_into_quantized_model(toy_detector, images):
    float_model = toy_detector()
    qmodel = quantize_model(toy_detector(), _qcfg())  # other random weights
    result = qmodel.load_state_dict(float_model.state_dict(), strict=False)
    assert result.unexpected_keys == []
    # Only quantizer state is missing; it is initialised on first use.
    assert result.missing_keys and all("quantizer." in k or "_quant." in k for k in result.missing_keys)
    for k, v in float_model.state_dict().items():
        assert torch.equal(qmodel.state_dict()[k], v)
    qmodel(images)
    assert all(q.initialized.item() == 1 for q in iter_quantizers(qmodel))


def test_checkpoint_resume_is_exact(toy_detector, images):
    qcfg = _qcfg(quantizer="lsq+", weight_bits=3, act_bits=4, attn_bits=4)
    model = quantize_model(toy_detector(), qcfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        logits, boxes = model(images)
        (logits.pow(2).mean() + boxes.mean()).backward()
        opt.step()
        opt.zero_grad()
    fresh = quantize_model(toy_detector(), qcfg)
    fresh.load_state_dict(model.state_dict())  # strict: every key present on both sides
    for train in (True, False):
        model.train(train)
        fresh.train(train)
        with torch.no_grad():
            for a, b in zip(fresh(images * 3), model(images * 3)):
                assert torch.equal(a, b)


def test_training_reaches_every_step_size(toy_detector, images):
    model = quantize_model(toy_detector(), _qcfg())
    logits, boxes = model(images)
    (logits.pow(2).mean() + boxes.mean()).backward()
    for q in iter_quantizers(model):
        assert q.scale.grad is not None and torch.isfinite(q.scale.grad).all()


def test_calibrate_over_batches(toy_detector):
    model = quantize_model(toy_detector(), _qcfg())
    model.train()
    batches = [torch.randn(2, 3, 8, 8) * (i + 1) for i in range(4)]
    assert calibrate(model, iter(batches), num_batches=2) == 2
    assert model.training and model.encoder[0].training  # modes restored
    assert all(q.initialized.item() == 1 for q in iter_quantizers(model))
    stem_input = model.backbone[0].input_quantizer
    expected = 2 * torch.cat(batches[:2]).abs().mean() / 7**0.5
    assert torch.allclose(stem_input.scale.detach(), expected.reshape(1))


def test_shared_module_is_swapped_everywhere(toy_detector):
    model = toy_detector()
    model.heads = nn.ModuleList([model.bbox_embed, model.bbox_embed])  # DETR-style sharing
    quantize_model(model, _qcfg())
    assert model.heads[0] is model.bbox_embed and model.heads[1] is model.bbox_embed
    assert isinstance(model.bbox_embed, QuantLinear)


def test_keep_fp_on_any_alias_keeps_shared_module_float(toy_detector):
    model = toy_detector()
    model.heads = nn.ModuleList([model.bbox_embed])
    quantize_model(model, _qcfg(keep_fp_patterns=["heads"]))
    assert type(model.bbox_embed) is nn.Linear and model.heads[0] is model.bbox_embed


def test_converting_twice_changes_nothing(toy_detector):
    model = quantize_model(toy_detector(), _qcfg())
    before = {name: type(m) for name, m in model.named_modules()}
    quantize_model(model, _qcfg())
    assert {name: type(m) for name, m in model.named_modules()} == before


@pytest.mark.parametrize("field", ["weight_bits", "act_bits", "attn_bits"])
def test_invalid_bits(field):
    with pytest.raises(ValueError, match=f"{field.upper()} must be one of 2, 3, 4, 8, 32; got 5"):
        QuantConfig(**{field: 5})


def test_unmatched_pattern_names_it(toy_detector):
    with pytest.raises(ValueError, match=r"keep_fp_patterns pattern 'class_embd' matches no module") as info:
        quantize_model(toy_detector(), _qcfg(keep_fp_patterns=["class_embd"]))
    assert "class_embed" in str(info.value)  # close names are listed
    with pytest.raises(ValueError, match=r"linear_patterns pattern 'decoder\.\*' matches no module"):
        quantize_model(toy_detector(), _qcfg(linear_patterns=["decoder.*"]))


def test_config_errors():
    with pytest.raises(ValueError, match="must be a list of glob patterns"):
        QuantConfig(keep_fp_patterns="class_embed")
    with pytest.raises(ValueError, match="quantizer must be one of"):
        QuantConfig(quantizer="lsq2")
    with pytest.raises(ValueError, match="learnable_offset needs an LSQ quantizer"):
        QuantConfig(quantizer="minmax", learnable_offset=True)
    with pytest.raises(ValueError, match=r"attn_prob_init \(MODEL.QUANT.ATTN_PROB_INIT\) must be one of"):
        QuantConfig(attn_prob_init="max")
    for other in ({"quantizer": "minmax"}, {"quantizer": "lsq+"}, {"learnable_offset": True}):
        with pytest.raises(ValueError, match=r"ATTN_PROB_INIT\) 'mse' initialises LSQ step sizes without an offset"):
            QuantConfig(attn_prob_init="mse", **other)


def test_unswappable_modules_are_refused():
    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(ValueError, match="its own forward"):
        quantize_model(nn.Sequential(ScaledLinear(4, 4)), QuantConfig())
    with pytest.raises(ValueError, match="nn.MultiheadAttention"):
        quantize_model(nn.Sequential(nn.MultiheadAttention(8, 2)), QuantConfig())
    # Kept float, they are fine.
    quantize_model(nn.Sequential(nn.MultiheadAttention(8, 2)), QuantConfig(keep_fp_patterns=["0"]))


def test_per_head_points_need_head_count(toy_detector):
    model = toy_detector()
    for layer in model.encoder:
        del layer.self_attn.num_heads
        layer.self_attn.heads = 4
    with pytest.raises(ValueError, match="no `num_heads` or `n_heads` attribute"):
        quantize_model(model, _qcfg())
    quantize_model(model, _qcfg(attn_per_head=False))
    assert model.encoder[0].self_attn.q_quant.granularity == "tensor"
