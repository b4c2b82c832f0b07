"""Deformable-DETR network (no backbone): shapes, official names, heads, query masking."""
import pytest
import torch
import torch.nn.functional as F

from aqdetr_d2.layers.position_encoding import PositionEmbeddingSine
from aqdetr_d2.modeling.deformable_detr import DeformableDETR
from aqdetr_d2.modeling.deformable_transformer import DeformableTransformer

D_MODEL = 32  # the input projections' GroupNorm(32, d) needs a multiple of 32
IN_CHANNELS = [8, 16, 24]
STRIDES = [8, 16, 32]
NUM_CLASSES = 5
NUM_QUERIES = 10
ENC_LAYERS, DEC_LAYERS = 2, 3
MODES = {"plain": (False, False), "box_refine": (True, False), "two_stage": (True, True)}


def _build(with_box_refine=False, two_stage=False, num_feature_levels=4, in_channels=IN_CHANNELS, deep_supervision=True):
    transformer = DeformableTransformer(
        d_model=D_MODEL, nhead=4, num_encoder_layers=ENC_LAYERS, num_decoder_layers=DEC_LAYERS,
        dim_feedforward=64, dropout=0.0, activation="relu", num_feature_levels=num_feature_levels,
        dec_n_points=2, enc_n_points=3, two_stage=two_stage, two_stage_num_proposals=NUM_QUERIES)
    return DeformableDETR(in_channels, transformer, NUM_CLASSES, NUM_QUERIES, num_feature_levels,
                          PositionEmbeddingSine(D_MODEL // 2, normalize=True, offset=-0.5), deep_supervision=deep_supervision,
                          with_box_refine=with_box_refine, two_stage=two_stage).eval()


def _perturb(model):
    """Random weights where the official initialisation puts zeros, so that every input
    (level embedding, query content, ...) reaches the outputs."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("sampling_offsets.weight", "attention_weights.weight", "layers.2.weight")):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model


def _inputs(model, in_channels=IN_CHANNELS, strides=STRIDES):
    """Two images, 64x96 and 40x56, padded to 64x96; random backbone features and their masks."""
    image_mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    image_mask[1, 40:] = True
    image_mask[1, :, 56:] = True
    features, masks, pos = [], [], []
    for c, s in zip(in_channels, strides):
        feature = torch.randn(2, c, 64 // s, 96 // s)
        mask = F.interpolate(image_mask[None].float(), size=feature.shape[-2:]).to(torch.bool)[0]
        features.append(feature)
        masks.append(mask)
        pos.append(model.position_embedding(mask))
    return features, masks, pos


@pytest.mark.parametrize("mode", MODES)
def test_output_shapes(mode):
    with_box_refine, two_stage = MODES[mode]
    model = _build(with_box_refine, two_stage)
    with torch.no_grad():
        out = model(*_inputs(model))
    assert out["pred_logits"].shape == (2, NUM_QUERIES, NUM_CLASSES)
    assert out["pred_boxes"].shape == (2, NUM_QUERIES, 4)
    assert len(out["aux_outputs"]) == DEC_LAYERS - 1
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, NUM_QUERIES, NUM_CLASSES)
        assert aux["pred_boxes"].shape == (2, NUM_QUERIES, 4)
    boxes = torch.stack([out["pred_boxes"]] + [a["pred_boxes"] for a in out["aux_outputs"]])
    assert torch.isfinite(boxes).all() and (boxes >= 0).all() and (boxes <= 1).all()
    assert torch.isfinite(out["pred_logits"]).all()

    states = out["states"]
    assert states.decoder_states is states.internals["hs"] and states.padding_mask is states.internals["mask_flatten"]
    assert states.encoder_states is states.internals["enc_states"]
    assert states.encoder_attention is states.internals["enc_attn_weights"]
    t = states.internals
    # 8x12, 4x6, 2x3 from the backbone, then 1x2 from the extra stride-2 conv.
    assert t["spatial_shapes"].tolist() == [[8, 12], [4, 6], [2, 3], [1, 2]]
    assert t["level_start_index"].tolist() == [0, 96, 120, 126]
    num_tokens = 128
    assert t["mask_flatten"].shape == (2, num_tokens) and t["mask_flatten"][0].sum() == 0
    assert t["valid_ratios"].shape == (2, 4, 2) and (t["valid_ratios"][0] == 1).all()
    assert (t["valid_ratios"][1, 0] < 1).all()
    assert t["memory"].shape == (2, num_tokens, D_MODEL)
    assert len(t["enc_states"]) == ENC_LAYERS and len(t["enc_attn_weights"]) == ENC_LAYERS
    assert t["enc_states"][-1] is t["memory"]
    assert all(s.shape == (2, num_tokens, D_MODEL) for s in t["enc_states"])
    assert all(w.shape == (2, num_tokens, 4, 4, 3) for w in t["enc_attn_weights"])
    assert t["hs"].shape == (DEC_LAYERS, 2, NUM_QUERIES, D_MODEL)
    assert len(t["dec_self_attn"]) == DEC_LAYERS and t["dec_self_attn"][0].shape == (2, 4, NUM_QUERIES, NUM_QUERIES)
    assert t["dec_cross_attn_weights"][0].shape == (2, NUM_QUERIES, 4, 4, 2)
    ref_dim = 4 if two_stage else 2
    assert t["init_reference"].shape == (2, NUM_QUERIES, ref_dim)
    assert t["inter_references"].shape == (DEC_LAYERS, 2, NUM_QUERIES, 4 if with_box_refine else 2)
    if two_stage:
        enc = out["enc_outputs"]
        assert enc["pred_logits"].shape == (2, num_tokens, NUM_CLASSES)
        assert enc["pred_boxes"].shape == (2, num_tokens, 4)
        assert (enc["pred_boxes"] >= 0).all() and (enc["pred_boxes"] <= 1).all()
    else:
        assert "enc_outputs" not in out and t["enc_outputs_class"] is None


def test_no_extra_level_and_no_deep_supervision():
    model = _build(num_feature_levels=3, deep_supervision=False)
    with torch.no_grad():
        out = model(*_inputs(model))
    assert out["pred_boxes"].shape == (2, NUM_QUERIES, 4) and "aux_outputs" not in out
    assert len(model.input_proj) == 3


def test_backward_reaches_all_parts():
    model = _perturb(_build(with_box_refine=True, two_stage=True)).train()
    out = model(*_inputs(model))
    loss = out["pred_logits"].sum() + out["pred_boxes"].sum() + out["enc_outputs"]["pred_logits"].sum()
    loss = loss + sum(a["pred_boxes"].sum() for a in out["aux_outputs"])
    loss.backward()
    for name in ["input_proj.0.0.weight", "input_proj.3.0.weight", "transformer.level_embed",
                 "transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
                 "transformer.decoder.layers.0.cross_attn.value_proj.weight",
                 "transformer.decoder.layers.0.self_attn.q_proj.weight",
                 "transformer.pos_trans.weight", "class_embed.3.weight", "bbox_embed.0.layers.0.weight"]:
        grad = dict(model.named_parameters(remove_duplicate=False))[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def _official_names(with_box_refine, two_stage):
    """Keys of fundamentalvision/Deformable-DETR's state dict for this model (minus backbone),
    with the decoder's packed in_proj written as our q/k/v split."""
    names = ["transformer.level_embed", "input_proj.0.0.weight", "input_proj.0.1.weight", "input_proj.3.0.weight",
             "input_proj.3.0.bias", "input_proj.3.1.weight", "input_proj.3.1.bias"]
    for i in range(ENC_LAYERS):
        prefix = f"transformer.encoder.layers.{i}."
        for sub in ["self_attn.sampling_offsets", "self_attn.attention_weights", "self_attn.value_proj",
                    "self_attn.output_proj", "norm1", "linear1", "linear2", "norm2"]:
            names += [prefix + sub + ".weight", prefix + sub + ".bias"]
    for i in range(DEC_LAYERS):
        prefix = f"transformer.decoder.layers.{i}."
        for sub in ["cross_attn.sampling_offsets", "cross_attn.attention_weights", "cross_attn.value_proj",
                    "cross_attn.output_proj", "norm1", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                    "self_attn.out_proj", "norm2", "linear1", "linear2", "norm3"]:
            names += [prefix + sub + ".weight", prefix + sub + ".bias"]
    num_pred = DEC_LAYERS + (1 if two_stage else 0)
    heads = [f"class_embed.{i}.{p}" for i in range(num_pred) for p in ("weight", "bias")]
    heads += [f"bbox_embed.{i}.layers.{j}.{p}" for i in range(num_pred) for j in range(3) for p in ("weight", "bias")]
    names += heads
    if with_box_refine:
        names += ["transformer.decoder." + h for h in heads if h.startswith("bbox_embed")]
    if two_stage:
        names += ["transformer.decoder." + h for h in heads if h.startswith("class_embed")]
        for sub in ["enc_output", "enc_output_norm", "pos_trans", "pos_trans_norm"]:
            names += [f"transformer.{sub}.weight", f"transformer.{sub}.bias"]
    else:
        names += ["query_embed.weight", "transformer.reference_points.weight", "transformer.reference_points.bias"]
    return names


@pytest.mark.parametrize("mode", MODES)
def test_official_parameter_names(mode):
    with_box_refine, two_stage = MODES[mode]
    keys = set(_build(with_box_refine, two_stage).state_dict())
    expected = set(_official_names(with_box_refine, two_stage))
    assert expected <= keys, sorted(expected - keys)
    # Nothing beyond the official keys except the levels' input projections not spelled out above.
    extra = {k for k in keys - expected if not k.startswith("input_proj.")}
    assert not extra, sorted(extra)


def test_loads_packed_in_proj_layout():
    """Official checkpoints store the decoder self-attention as nn.MultiheadAttention (in_proj_*)."""
    model = _build(with_box_refine=True)
    packed = {}
    for key, value in model.state_dict().items():
        if ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            continue
        if ".self_attn.q_proj." in key:
            prefix, kind = key.split(".self_attn.q_proj.")
            parts = [model.state_dict()[f"{prefix}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            packed[f"{prefix}.self_attn.in_proj_{kind}"] = torch.cat(parts)
        else:
            packed[key] = value
    fresh = _build(with_box_refine=True)
    fresh.load_state_dict(packed, strict=True)
    inputs = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(fresh(*inputs)["pred_boxes"], model(*inputs)["pred_boxes"])


def test_heads_layout_and_initialisation():
    plain = _build()
    assert all(h is plain.class_embed[0] for h in plain.class_embed)
    assert all(h is plain.bbox_embed[0] for h in plain.bbox_embed)
    assert plain.transformer.decoder.bbox_embed is None and plain.transformer.decoder.class_embed is None
    torch.testing.assert_close(plain.class_embed[0].bias, torch.full((NUM_CLASSES,), -4.59512), rtol=0, atol=1e-5)
    last = plain.bbox_embed[0].layers[-1]
    assert last.weight.abs().max() == 0 and last.bias.tolist() == [0.0, 0.0, -2.0, -2.0]
    for proj in plain.input_proj:
        assert proj[0].bias.abs().max() == 0

    refine = _build(with_box_refine=True)
    assert len({id(h) for h in refine.bbox_embed}) == DEC_LAYERS
    assert refine.transformer.decoder.bbox_embed is refine.bbox_embed
    assert refine.bbox_embed[0].layers[-1].bias.tolist() == [0.0, 0.0, -2.0, -2.0]
    assert refine.bbox_embed[1].layers[-1].bias.abs().max() == 0

    two_stage = _build(with_box_refine=True, two_stage=True)
    assert len(two_stage.class_embed) == DEC_LAYERS + 1
    assert two_stage.transformer.decoder.class_embed is two_stage.class_embed
    assert all(h.layers[-1].bias.abs().max() == 0 for h in two_stage.bbox_embed)
    assert not hasattr(two_stage, "query_embed") and not hasattr(two_stage.transformer, "reference_points")


@pytest.mark.parametrize("mode", ["plain", "box_refine"])
def test_self_attn_mask_isolates_query_groups(mode):
    """Appending a second query group that the mask keeps apart leaves the first group unchanged."""
    model = _perturb(_build(*MODES[mode]))
    inputs = _inputs(model)
    first = model.query_embed.weight
    second = torch.randn(7, 2 * D_MODEL)
    both = torch.cat([first, second])
    n = first.shape[0]
    mask = torch.zeros(len(both), len(both), dtype=torch.bool)
    mask[:n, n:] = True
    mask[n:, :n] = True
    with torch.no_grad():
        alone = model(*inputs)
        grouped = model(*inputs, self_attn_mask=mask, query_embeds=both)
        unmasked = model(*inputs, query_embeds=both)
    assert grouped["pred_boxes"].shape == (2, n + 7, 4)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(grouped[key][:, :n], alone[key], rtol=1e-5, atol=1e-6)
        assert (unmasked[key][:, :n] - alone[key]).abs().max() > 1e-4
    for got, ref in zip(grouped["aux_outputs"], alone["aux_outputs"]):
        torch.testing.assert_close(got["pred_boxes"][:, :n], ref["pred_boxes"], rtol=1e-5, atol=1e-6)
    assert grouped["states"].internals["dec_self_attn"][0][:, :, :n, n:].abs().max() == 0


def test_invalid_configurations_raise():
    with pytest.raises(ValueError, match="with_box_refine"):
        _build(with_box_refine=False, two_stage=True)
    with pytest.raises(ValueError, match="feature levels"):
        _build(num_feature_levels=2)
    model = _build(with_box_refine=True, two_stage=True)
    with pytest.raises(ValueError, match="query_embeds"):
        model(*_inputs(model), query_embeds=torch.zeros(NUM_QUERIES, 2 * D_MODEL))
    plain = _build()
    features, masks, pos = _inputs(plain)
    with pytest.raises(ValueError, match="backbone levels"):
        plain(features[:2], masks[:2], pos[:2])
