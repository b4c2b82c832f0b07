"""Auxiliary queries (MODEL.AUX_QUERIES): masking, target expansion, matching, losses, inference."""
import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from aqdetr_d2.engine import AQDETRCheckpointer
from aqdetr_d2.engine import build_detr_optimizer
from aqdetr_d2.modeling.aux_queries import (DEFORMABLE_DETR_QUERY_AXES, DETR_QUERY_AXES, TARGET_EXPANSIONS,
                                            AuxQueries, aux_query_loss)
from aqdetr_d2.modeling.criterion import SetCriterion
from aqdetr_d2.modeling.matcher import HungarianMatcher

NUM_QUERIES, NUM_AUX, K, DEC_LAYERS = 10, 24, 3, 2
# name -> (config, config node, extra options)
ARCHS = {
    "detr": ("shapes/detr_fp32.yaml", "DETR", ()),  # two-stage, anchor boxes, focal loss
    "detr_anchors": ("shapes/detr_fp32.yaml", "DETR", ("MODEL.DETR.TWO_STAGE", "False")),
    "detr_plain": ("shapes/detr_fp32.yaml", "DETR", ("MODEL.DETR.TWO_STAGE", "False", "MODEL.DETR.BOX_REFINE", "False",
                                                     "MODEL.DETR.FOCAL_LOSS", "False",
                                                     "MODEL.DETR.SPATIAL_PRIOR", "False")),
    "deformable_two_stage": ("shapes/deformable_detr_fp32.yaml", "DEFORMABLE_DETR", ()),
    "deformable_plain": ("shapes/deformable_detr_fp32.yaml", "DEFORMABLE_DETR",
                         ("MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE", "False", "MODEL.DEFORMABLE_DETR.TWO_STAGE", "False")),
}
# Two-stage auxiliary queries are the next-best encoder proposals: no embedding.
WITH_EMBEDDING = ["detr_anchors", "detr_plain", "deformable_plain"]
TWO_STAGE = ["detr", "deformable_two_stage"]


def _cfg(make_cfg, arch, aux=True, mode="group", *opts):
    config, node, extra = ARCHS[arch]
    return make_cfg(config, f"MODEL.{node}.HIDDEN_DIM", "32", f"MODEL.{node}.NHEADS", "4",
                    f"MODEL.{node}.DIM_FEEDFORWARD", "64", f"MODEL.{node}.ENC_LAYERS", "1",
                    f"MODEL.{node}.DEC_LAYERS", str(DEC_LAYERS), f"MODEL.{node}.NUM_OBJECT_QUERIES", str(NUM_QUERIES),
                    "MODEL.AUX_QUERIES.ENABLED", str(aux), "MODEL.AUX_QUERIES.NUM_QUERIES", str(NUM_AUX),
                    "MODEL.AUX_QUERIES.K", str(K), "MODEL.AUX_QUERIES.MODE", mode, *extra, *opts)


def _batch():
    """Two 64x64 images with 2 and 3 boxes."""
    gen = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[4.0, 4, 30, 30], [20, 10, 60, 50], [0, 0, 10, 12]])
    batch = []
    for i, n in enumerate((2, 3)):
        inst = Instances((64, 64))
        inst.gt_boxes = Boxes(boxes[:n])
        inst.gt_classes = torch.tensor([1, 3, 2])[:n]
        batch.append({"image": torch.randint(0, 256, (3, 64, 64), generator=gen, dtype=torch.uint8),
                      "height": 64, "width": 64, "instances": inst})
    return batch


def _twin_without_aux(make_cfg, arch, model, mode="group"):
    """A model without auxiliary queries holding `model`'s other weights."""
    twin = build_model(_cfg(make_cfg, arch, False, mode))
    result = twin.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys and set(result.unexpected_keys) <= {"aux_query_embed.weight", "aux_anchor_embed.weight"}
    return twin


def _predictions(outputs):
    return [outputs] + list(outputs.get("aux_outputs", []))


# ---------------------------------------------------------------- settings, mask, targets


def test_self_attn_mask_blocks_between_query_sets():
    def expected(sizes):
        ids = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
        return ids[:, None] != ids[None, :]

    assert torch.equal(AuxQueries(6, "hybrid", k=3).self_attn_mask(4), expected([4, 6]))
    assert torch.equal(AuxQueries(6, "group", k=3).self_attn_mask(4), expected([4, 2, 2, 2]))
    mask = AuxQueries(6, "group", k=3).self_attn_mask(4)
    assert mask.dtype == torch.bool and mask.shape == (10, 10) and not mask.diagonal().any()


def test_target_expansion():
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.rand(2, 4)}, {"labels": torch.tensor([], dtype=torch.long),
                                                                            "boxes": torch.zeros(0, 4)}]
    (hybrid,) = AuxQueries(6, "hybrid", k=3).expand_targets(targets)
    assert hybrid[0]["labels"].tolist() == [1, 2] * 3 and torch.equal(hybrid[0]["boxes"], targets[0]["boxes"].repeat(3, 1))
    assert hybrid[1]["boxes"].shape == (0, 4)
    groups = AuxQueries(6, "group", k=3).expand_targets(targets)
    assert len(groups) == 3 and all(g is targets for g in groups)
    assert set(TARGET_EXPANSIONS) == {"hybrid", "group"}


@pytest.mark.parametrize("opts,match", [
    (("MODEL.AUX_QUERIES.MODE", "dn"), r"MODEL\.AUX_QUERIES\.MODE.*\['group', 'hybrid'\].*'dn'"),
    (("MODEL.AUX_QUERIES.NUM_QUERIES", "0"), r"MODEL\.AUX_QUERIES\.NUM_QUERIES"),
    (("MODEL.AUX_QUERIES.NUM_QUERIES", "25"), r"divisible"),  # group mode, K = 3
])
def test_invalid_settings_raise_at_build(make_cfg, opts, match):
    with pytest.raises(ValueError, match=match):
        build_model(_cfg(make_cfg, "detr", True, "group", *opts))


def test_disabled_settings_are_not_validated(make_cfg):
    model = build_model(_cfg(make_cfg, "detr", False, "dn", "MODEL.AUX_QUERIES.NUM_QUERIES", "0"))
    assert model.aux_queries is None and model.aux_query_embed is None


# ---------------------------------------------------------------- matching and losses


def _criterion(focal):
    matcher = HungarianMatcher(2.0, 5.0, 2.0, focal=focal)
    return SetCriterion(5, matcher, 2.0, 5.0, 2.0, focal=focal)


def _random_outputs(gen, num_queries, classes, layers=3):
    def layer():
        return {"pred_logits": torch.randn(2, num_queries, classes, generator=gen),
                "pred_boxes": torch.rand(2, num_queries, 4, generator=gen) * 0.5 + 0.25}
    out = layer()
    out["aux_outputs"] = [layer() for _ in range(layers - 1)]
    return out


def _targets(gen, sizes=(3, 2)):
    return [{"labels": torch.randint(0, 5, (n,), generator=gen),
             "boxes": torch.rand(n, 4, generator=gen) * 0.4 + 0.3} for n in sizes]


def _spy(criterion):
    calls = []
    match = criterion.matcher.forward

    def recording(outputs, targets):
        indices = match(outputs, targets)
        calls.append((outputs["pred_logits"].shape[1], [len(t["labels"]) for t in targets], indices))
        return indices
    criterion.matcher.forward = recording
    return calls


@pytest.mark.parametrize("focal", [False, True])
def test_hybrid_matches_one_to_many(focal):
    gen = torch.Generator().manual_seed(0)
    criterion = _criterion(focal)
    calls = _spy(criterion)
    targets = _targets(gen)
    outputs = _random_outputs(gen, NUM_AUX, 5 if focal else 6)
    losses = aux_query_loss(criterion, outputs, targets, AuxQueries(NUM_AUX, "hybrid", k=K, loss_weight=0.5))
    assert len(calls) == 3  # one matching per decoder layer, all K x T targets at once
    for num_queries, sizes, indices in calls:
        assert num_queries == NUM_AUX and sizes == [K * len(t["labels"]) for t in targets]
        for (src, tgt), t in zip(indices, targets):
            n = len(t["labels"])
            assert len(src) == K * n and len(set(src.tolist())) == K * n  # K x T positives
            # every original target is the match of K distinct queries
            assert torch.bincount(tgt % n, minlength=n).tolist() == [K] * n
    # The same as the criterion on repeated targets, x LOSS_WEIGHT, with the suffix.
    repeated = [{"labels": t["labels"].repeat(K), "boxes": t["boxes"].repeat(K, 1)} for t in targets]
    reference = criterion(outputs, repeated)
    assert set(losses) == {f"{k}_aux" for k in reference}
    for k, v in reference.items():
        torch.testing.assert_close(losses[f"{k}_aux"], 0.5 * v)


def test_group_mode_matches_one_to_one_per_group():
    gen = torch.Generator().manual_seed(1)
    criterion = _criterion(True)
    calls = _spy(criterion)
    targets = _targets(gen)
    outputs = _random_outputs(gen, NUM_AUX, 5)
    losses = aux_query_loss(criterion, outputs, targets, AuxQueries(NUM_AUX, "group", k=K))
    assert len(calls) == 3 * K
    for num_queries, sizes, indices in calls:
        assert num_queries == NUM_AUX // K and sizes == [3, 2]
        for (src, tgt), n in zip(indices, sizes):
            assert sorted(tgt.tolist()) == list(range(n)) and len(set(src.tolist())) == n
    # Group-DETR: every group weighted like the object queries' group, i.e. the sum over groups
    # of the criterion on each group's slice (times LOSS_WEIGHT, 1 here).
    size = NUM_AUX // K
    per_group = []
    for g in range(K):
        cut = slice(g * size, (g + 1) * size)
        part = {"pred_logits": outputs["pred_logits"][:, cut], "pred_boxes": outputs["pred_boxes"][:, cut],
                "aux_outputs": [{k: v[:, cut] for k, v in a.items()} for a in outputs["aux_outputs"]]}
        per_group.append(criterion(part, targets))
    for k in per_group[0]:
        torch.testing.assert_close(losses[f"{k}_aux"], sum(p[k] for p in per_group))


# ---------------------------------------------------------------- the models


@pytest.mark.parametrize("arch", ARCHS)
def test_object_queries_unaffected_by_aux_queries(make_cfg, arch):
    """Train mode, dropout 0: object-query outputs equal those of a forward without aux queries."""
    model = build_model(_cfg(make_cfg, arch)).train()
    twin = _twin_without_aux(make_cfg, arch, model).train()
    batch = _batch()
    images = model.preprocess_image(batch)
    with torch.no_grad():
        out = model.predict(images)
        ref = twin.predict(images)
    assert "aux_query_outputs" not in ref
    aux = out["aux_query_outputs"]
    for got, want, extra in zip(_predictions(out), _predictions(ref), _predictions(aux)):
        assert got["pred_logits"].shape == want["pred_logits"].shape
        torch.testing.assert_close(got["pred_logits"], want["pred_logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["pred_boxes"], want["pred_boxes"], rtol=1e-5, atol=1e-5)
        assert extra["pred_logits"].shape[:2] == extra["pred_boxes"].shape[:2] == (2, NUM_AUX)

    # The states are cut too: the object part equals the forward without aux queries.
    axes = DETR_QUERY_AXES if arch.startswith("detr") else DEFORMABLE_DETR_QUERY_AXES
    torch.testing.assert_close(out["states"].decoder_states, ref["states"].decoder_states, rtol=1e-5, atol=1e-5)
    assert aux["states"].decoder_states.shape[2] == NUM_AUX
    tr, tr_ref, tr_aux = out["states"].internals, ref["states"].internals, aux["states"].internals
    assert set(tr) == set(tr_ref) == set(tr_aux)
    for name, want in tr_ref.items():
        got = tr[name]
        if want is None:
            assert got is None
            continue
        got_list = [got] if isinstance(got, torch.Tensor) else list(got)
        want_list = [want] if isinstance(want, torch.Tensor) else list(want)
        for g, w in zip(got_list, want_list):
            if not isinstance(w, torch.Tensor):  # e.g. the feature map's (H, W)
                assert g == w, name
                continue
            assert g.shape == w.shape, name
            if g.is_floating_point():
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)
            else:
                assert torch.equal(g, w), name
    # Every transformer entry with a query axis is listed in the axes table: an unlisted
    # tensor never has a dimension of size Q_total (chosen to collide with no other size).
    total = NUM_QUERIES + NUM_AUX
    for name, value in tr.items():
        values = [value] if isinstance(value, torch.Tensor) else list(value or [])
        if name not in axes:
            assert all(total not in v.shape for v in values if isinstance(v, torch.Tensor)), name
    assert tr_aux["hs"].shape[2] == NUM_AUX and tr_aux["dec_self_attn"][0].shape[-2:] == (NUM_AUX, NUM_AUX)


@pytest.mark.parametrize("mode", ["hybrid", "group"])
@pytest.mark.parametrize("arch", ARCHS)
def test_training_losses_named_finite_with_gradients(make_cfg, arch, mode):
    model = build_model(_cfg(make_cfg, arch, True, mode)).train()
    losses = model(_batch())
    base = {"loss_ce", "loss_bbox", "loss_giou"}
    per_layer = base | {f"{k}_{i}" for k in base for i in range(DEC_LAYERS - 1)}
    expected = per_layer | {f"{k}_aux" for k in per_layer}
    if arch in TWO_STAGE:
        expected |= {f"{k}_enc" for k in base}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    aux_total = sum(v for k, v in losses.items() if k.endswith("_aux"))
    aux_total.backward()
    params = dict(model.named_parameters())
    if arch in WITH_EMBEDDING:
        grad = model.aux_query_embed.weight.grad
        assert grad is not None and grad.abs().sum() > 0
    else:
        assert model.aux_query_embed is None
    decoder = "transformer.decoder" if arch.startswith("detr") else "detector.transformer.decoder"
    grad = params[f"{decoder}.layers.{DEC_LAYERS - 1}.self_attn.q_proj.weight"].grad
    assert grad is not None and grad.abs().sum() > 0
    if arch in WITH_EMBEDDING:
        # object queries take no part in the aux loss (masked apart)
        query_embed = model.detector.query_embed if arch == "deformable_plain" else model.query_embed
        assert query_embed.weight.grad is None or query_embed.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_inference_identical_without_aux_queries(make_cfg, arch, tmp_path, monkeypatch):
    """Checkpoints load both ways, and eval outputs equal those of the model without aux queries."""
    model = build_model(_cfg(make_cfg, arch))
    path = str(tmp_path / "with_aux.pth")
    torch.save({"model": model.state_dict()}, path)
    plain = build_model(_cfg(make_cfg, arch, False))
    AQDETRCheckpointer(plain).load(path)  # extra aux_query_embed keys: warned only
    plain_path = str(tmp_path / "without_aux.pth")
    torch.save({"model": plain.state_dict()}, plain_path)
    again = build_model(_cfg(make_cfg, arch, True))
    AQDETRCheckpointer(again).load(plain_path)  # missing aux_query_embed: optional

    def fail(*args, **kwargs):
        raise AssertionError("auxiliary queries must not run at inference")
    monkeypatch.setattr(AuxQueries, "self_attn_mask", fail)
    model.eval()
    plain.eval()
    batch = _batch()
    with torch.no_grad():
        assert "aux_query_outputs" not in model.predict(model.preprocess_image(batch))
        got, want = model(batch), plain(batch)
    for g, w in zip(got, want):
        g, w = g["instances"], w["instances"]
        assert len(g) > 0
        assert torch.equal(g.pred_boxes.tensor, w.pred_boxes.tensor)
        assert torch.equal(g.scores, w.scores) and torch.equal(g.pred_classes, w.pred_classes)


@pytest.mark.parametrize("arch", TWO_STAGE)
def test_two_stage_rejects_more_proposals_than_positions(make_cfg, arch):
    model = build_model(_cfg(make_cfg, arch, True, "group",
                             "MODEL.AUX_QUERIES.NUM_QUERIES", "300")).train()
    with pytest.raises(ValueError, match="proposals"):
        model(_batch())


@pytest.mark.parametrize("arch", ["detr", "detr_plain", "deformable_two_stage"])
def test_quantized_model_trains_one_step_with_aux_queries(make_cfg, arch):
    cfg = _cfg(make_cfg, arch, True, "hybrid", "MODEL.QUANT.ENABLED", "True")
    model = build_model(cfg).train()
    decoder = model.transformer.decoder if arch.startswith("detr") else model.detector.transformer.decoder
    q_quant = decoder.layers[0].self_attn.q_quant
    assert not isinstance(q_quant, torch.nn.Identity)
    seen = []
    q_quant.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    optimizer = build_detr_optimizer(cfg, model)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    losses = model(_batch())
    assert any(k.endswith("_aux") for k in losses) and all(torch.isfinite(v) for v in losses.values())
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    # (B, H, Q_total, d): the auxiliary queries went through the same quantizer
    assert seen and seen[0][2] == NUM_QUERIES + NUM_AUX
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert any("decoder" in k for k in changed)
    assert all(torch.isfinite(v).all() for v in model.parameters())
