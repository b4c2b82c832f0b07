"""DETR's optional convergence aids: focal loss, anchor-box queries with refinement, two-stage selection."""
import math

import pytest
import torch

from detectron2.modeling import build_model

from aqdetr_d2.layers.box_ops import inverse_sigmoid
from aqdetr_d2.layers.proposals import box_sine_embed, cell_centers, encoder_proposals, gaussian_attention_prior
from aqdetr_d2.modeling.query_selection import EncoderQuerySelection
from aqdetr_d2.quant import QuantLinear
from detection_targets import training_batch

NUM_QUERIES, DEC_LAYERS = 6, 3
MODES = {
    "two_stage": (),
    "anchors": ("MODEL.DETR.TWO_STAGE", "False"),
    "focal_only": ("MODEL.DETR.TWO_STAGE", "False", "MODEL.DETR.BOX_REFINE", "False", "MODEL.DETR.SPATIAL_PRIOR", "False"),
}


def _cfg(make_cfg, *opts):
    return make_cfg("shapes/detr_fp32.yaml", "MODEL.DETR.HIDDEN_DIM", "32", "MODEL.DETR.NHEADS", "4",
                    "MODEL.DETR.DIM_FEEDFORWARD", "64", "MODEL.DETR.ENC_LAYERS", "1",
                    "MODEL.DETR.DEC_LAYERS", str(DEC_LAYERS), "MODEL.DETR.NUM_OBJECT_QUERIES", str(NUM_QUERIES),
                    "MODEL.DETR.TOPK_TEST", "7", *opts)


def _perturb(model):
    """Random box heads: they start at zero, which would make every refinement an identity."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bbox_embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _batch():
    return training_batch(torch.Generator().manual_seed(0), [(64, 80), (56, 64)],
                          [[4.0, 4, 30, 30], [20, 10, 50, 40]], [1, 3])


def test_box_sine_embed_matches_naive_formula():
    boxes = torch.tensor([[0.3, 0.7, 0.1, 0.45], [0.0, 1.0, 0.5, 0.25]])
    feats = 8
    got = box_sine_embed(boxes, feats)
    assert got.shape == (2, 4 * feats)
    for b in range(2):
        want = []
        for c in boxes[b].tolist():
            for k in range(feats // 2):
                angle = c * 2 * math.pi / 10000 ** (2 * k / feats)
                want += [math.sin(angle), math.cos(angle)]
        torch.testing.assert_close(got[b], torch.tensor(want), rtol=1e-5, atol=1e-5)


def test_gaussian_attention_prior_matches_naive_formula():
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.2], [0.1, 0.9, 0.01, 0.3]]])
    centers = torch.tensor([[[0.5, 0.5], [0.7, 0.5], [0.1, 0.95], [0.9, 0.1]]])
    got = gaussian_attention_prior(boxes, centers, min_size=0.1)
    assert got.shape == (1, 1, 2, 4)
    for q, (cx, cy, w, h) in enumerate(boxes[0].tolist()):
        sx, sy = max(w / 2, 0.05), max(h / 2, 0.05)
        for s, (x, y) in enumerate(centers[0].tolist()):
            want = -0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2)
            assert got[0, 0, q, s].item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert got[0, 0, 0, 0] == 0  # no penalty at the box centre


def test_encoder_proposals_match_naive_loop():
    # Two levels; image 1 is padded on the right and bottom of each level.
    shapes = [(4, 5), (2, 3)]
    masks = []
    for h, w in shapes:
        m = torch.zeros(2, h, w, dtype=torch.bool)
        m[1, h - 1:, :] = True
        m[1, :, w - 2:] = True
        masks.append(m.flatten(1))
    proposals, valid = encoder_proposals(torch.cat(masks, 1), torch.tensor(shapes))
    assert proposals.shape == (2, 20 + 6, 4) and valid.shape == (2, 26, 1)
    for b in range(2):
        s = 0
        for lvl, (h, w) in enumerate(shapes):
            vh, vw = (h - 1, w - 2) if b == 1 else (h, w)
            for y in range(h):
                for x in range(w):
                    box = [(x + 0.5) / vw, (y + 0.5) / vh, 0.05 * 2 ** lvl, 0.05 * 2 ** lvl]
                    ok = y < vh and x < vw and all(0.01 < v < 0.99 for v in box)
                    assert bool(valid[b, s, 0]) == ok, (b, lvl, y, x)
                    if ok:
                        want = torch.logit(torch.tensor(box))
                        torch.testing.assert_close(proposals[b, s], want, rtol=1e-5, atol=1e-5)
                    else:
                        assert torch.isinf(proposals[b, s]).all()
                    s += 1


@pytest.mark.parametrize("mode", ["two_stage", "anchors"])
def test_each_layer_refines_the_previous_layers_boxes(make_cfg, mode):
    model = _perturb(build_model(_cfg(make_cfg, *MODES[mode]))).eval()
    with torch.no_grad():
        out = model.predict(model.preprocess_image(_batch()))
    tr = out["states"].internals
    refs, boxes = tr["dec_references"], tr["dec_boxes"]
    assert len(refs) == len(boxes) == DEC_LAYERS
    for lvl in range(DEC_LAYERS):
        want = (model.bbox_embed[lvl](tr["hs"][lvl]) + inverse_sigmoid(refs[lvl])).sigmoid()
        torch.testing.assert_close(boxes[lvl], want)
        if lvl + 1 < DEC_LAYERS:
            torch.testing.assert_close(refs[lvl + 1], boxes[lvl])
            assert not torch.equal(refs[lvl + 1], refs[lvl])
        # The query position is the anchor's sine embedding through ref_point_head.
        pos = model.transformer.decoder.ref_point_head(box_sine_embed(refs[lvl], 16)).transpose(0, 1)
        torch.testing.assert_close(tr["dec_query_pos"][lvl], pos)
    torch.testing.assert_close(out["pred_boxes"], boxes[-1])
    assert out["pred_logits"].shape[-1] == 5  # focal: no "no-object" class
    if mode == "anchors":
        torch.testing.assert_close(refs[0][0], model.anchor_embed.weight.sigmoid())


def test_refinement_does_not_backpropagate_through_references(make_cfg):
    model = _perturb(build_model(_cfg(make_cfg, *MODES["anchors"]))).train()
    out = model.predict(model.preprocess_image(_batch()))
    tr = out["states"].internals
    assert all(not r.requires_grad for r in tr["dec_references"][1:])
    # The first layer's boxes become the next anchors only detached, as in Deformable-DETR.
    grad = torch.autograd.grad(out["pred_boxes"].sum(), tr["dec_boxes"][0], allow_unused=True)[0]
    assert grad is None
    assert tr["dec_boxes"][0].requires_grad


def test_two_stage_queries_are_the_best_scored_proposals(make_cfg):
    model = _perturb(build_model(_cfg(make_cfg))).eval()
    images = model.preprocess_image(_batch())
    with torch.no_grad():
        out = model.predict(images)
        tr = out["states"].internals
        # Encoder features of every position, as the selection computes them (res3: stride 8).
        shape = (images.tensor.shape[-2] // 8, images.tensor.shape[-1] // 8)
        _, valid = encoder_proposals(tr["mask"], [shape])
        sel = model.query_selection
        features = sel.enc_output_norm(sel.enc_output(tr["memory"].transpose(0, 1).masked_fill(~valid, 0.0)))
    enc = out["enc_outputs"]
    assert not valid.all()  # padding and borders: positions without a proposal box
    for b in range(2):
        # The best-scored positions that have a proposal box: an invalid one (box of 1s) never wins.
        candidates = [i for i in range(enc["pred_logits"].shape[1]) if valid[b, i, 0]]
        order = sorted(candidates, key=lambda i: -float(enc["pred_logits"][b, i, 0]))
        best = order[:NUM_QUERIES]
        torch.testing.assert_close(tr["dec_references"][0][b], enc["pred_boxes"][b, best])
        torch.testing.assert_close(tr["tgt"][:, b], features[b, best])
    assert model.query_embed is None


def test_focal_inference_keeps_the_top_query_class_pairs(make_cfg):
    model = _perturb(build_model(_cfg(make_cfg, *MODES["focal_only"]))).eval()
    batch = _batch()
    with torch.no_grad():
        out = model.predict(model.preprocess_image(batch))
        results = model(batch)
    for b, r in enumerate(results):
        probs = out["pred_logits"][b].sigmoid()
        pairs = sorted(((float(probs[q, c]), q, c) for q in range(NUM_QUERIES) for c in range(5)), reverse=True)[:7]
        inst = r["instances"]
        assert len(inst) == 7
        torch.testing.assert_close(inst.scores, torch.tensor([p[0] for p in pairs]))
        assert inst.pred_classes.tolist() == [p[2] for p in pairs]


@pytest.mark.parametrize("mode", list(MODES))
def test_losses_finite_and_named(make_cfg, mode):
    model = build_model(_cfg(make_cfg, *MODES[mode])).train()
    losses = model(_batch())
    base = {"loss_ce", "loss_bbox", "loss_giou"}
    expected = base | {f"{k}_{i}" for k in base for i in range(DEC_LAYERS - 1)}
    if mode == "two_stage":
        expected |= {f"{k}_enc" for k in base}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("opts,match", [
    (("MODEL.DETR.BOX_REFINE", "False", "MODEL.DETR.SPATIAL_PRIOR", "False"), "TWO_STAGE needs MODEL.DETR.BOX_REFINE"),
    (("MODEL.DETR.BOX_REFINE", "False", "MODEL.DETR.TWO_STAGE", "False"), "SPATIAL_PRIOR needs MODEL.DETR.BOX_REFINE"),
    (("MODEL.DETR.FOCAL_LOSS", "False"), "TWO_STAGE needs MODEL.DETR.BOX_REFINE and MODEL.DETR.FOCAL_LOSS"),
])
def test_two_stage_without_its_prerequisites_is_a_clear_error(make_cfg, opts, match):
    with pytest.raises(ValueError, match=match):
        build_model(_cfg(make_cfg, *opts))


def test_quantized_heads_follow_the_layout(make_cfg):
    model = build_model(_cfg(make_cfg, "MODEL.QUANT.ENABLED", "True"))
    modules = dict(model.named_modules())
    for lvl in range(DEC_LAYERS + 1):
        assert not isinstance(modules[f"class_embed.{lvl}"], QuantLinear)
        assert not isinstance(modules[f"bbox_embed.{lvl}.layers.2"], QuantLinear)
        assert isinstance(modules[f"bbox_embed.{lvl}.layers.0"], QuantLinear)
    assert isinstance(modules["transformer.decoder.ref_point_head.layers.0"], QuantLinear)
    assert isinstance(modules["query_selection.enc_output"], QuantLinear)


def test_spatial_prior_draws_cross_attention_to_the_anchor(make_cfg):
    with_prior = _perturb(build_model(_cfg(make_cfg))).eval()
    without = build_model(_cfg(make_cfg, "MODEL.DETR.SPATIAL_PRIOR", "False")).eval()
    without.load_state_dict(with_prior.state_dict())  # the prior has no parameters
    images = with_prior.preprocess_image(_batch())
    with torch.no_grad():
        tr = with_prior.predict(images)["states"].internals
        tr_plain = without.predict(images)["states"].internals
    assert "dec_cross_attn_prior" not in tr_plain
    shape = (images.tensor.shape[-2] // 8, images.tensor.shape[-1] // 8)
    centers = cell_centers(tr["mask"], [shape])
    refs = tr["dec_references"][0]
    torch.testing.assert_close(tr["dec_cross_attn_prior"][0], gaussian_attention_prior(refs, centers, 1 / min(shape)))
    # Same layer-0 inputs; only the prior differs. Attention mass inside each anchor box grows.
    inside = ((centers[:, None] - refs[..., None, :2]).abs() <= refs[..., None, 2:] / 2 + 1 / min(shape)).all(-1)
    mass = (tr["dec_cross_attn"][0].mean(1) * inside).sum(-1).mean()
    mass_plain = (tr_plain["dec_cross_attn"][0].mean(1) * inside).sum(-1).mean()
    assert mass > mass_plain + 0.05, (mass, mass_plain)


def test_positions_without_a_proposal_box_are_never_selected():
    """Even when their (constant) features score best: padding and border positions have no box."""
    torch.manual_seed(0)
    selection = EncoderQuerySelection(16)
    padding = torch.zeros(1, 6, 6, dtype=torch.bool)
    padding[:, :, 4:] = True  # two padded columns
    memory = torch.randn(36, 1, 16)
    with torch.no_grad():
        invalid_features = selection.enc_output_norm(selection.enc_output(torch.zeros(16)))
    # Scores peak at the features every invalid position gets (its memory is zeroed).
    class_head = lambda x: -((x - invalid_features) ** 2).sum(-1, keepdim=True)  # noqa: E731
    out = selection(memory, padding.flatten(1), (6, 6), class_head, lambda x: torch.zeros(*x.shape[:-1], 4), 10)
    _, valid = encoder_proposals(padding.flatten(1), [(6, 6)])
    assert valid.sum() >= 10
    assert (out["reference_boxes"] < 1).all(), "an invalid position (box of 1s) was selected"
