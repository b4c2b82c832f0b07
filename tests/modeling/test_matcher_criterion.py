"""Hungarian matcher and set criterion on their own."""
import itertools

import pytest
import torch

from detection_targets import random_targets

from aqdetr_d2.layers.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from aqdetr_d2.modeling.criterion import SetCriterion
from aqdetr_d2.modeling.matcher import HungarianMatcher


def _outputs(gen, batch, queries, classes):
    return {"pred_logits": torch.randn(batch, queries, classes, generator=gen),
            "pred_boxes": torch.rand(batch, queries, 4, generator=gen) * 0.4 + 0.1}


@pytest.mark.parametrize("focal", [False, True])
def test_batched_matching_equals_per_image(focal):
    gen = torch.Generator().manual_seed(0)
    targets = random_targets(gen, [4, 0, 7, 1], 5)
    outputs = _outputs(gen, 4, 10, 5 if focal else 6)
    matcher = HungarianMatcher(2, 5, 2, focal=focal)
    batched = matcher(outputs, targets)
    for i, target in enumerate(targets):
        single = matcher({k: v[i:i + 1] for k, v in outputs.items()}, [target])[0]
        assert torch.equal(batched[i][0], single[0]) and torch.equal(batched[i][1], single[1])
        assert len(batched[i][0]) == len(target["labels"])


def test_matching_is_optimal_against_brute_force():
    gen = torch.Generator().manual_seed(1)
    target = random_targets(gen, [3], 4)[0]
    outputs = _outputs(gen, 1, 5, 5)
    matcher = HungarianMatcher(1, 5, 2)
    rows, cols = matcher(outputs, [target])[0]

    prob = outputs["pred_logits"][0].softmax(-1)
    boxes = outputs["pred_boxes"][0]
    giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target["boxes"]))

    def cost(q, t):
        return (5 * (boxes[q] - target["boxes"][t]).abs().sum() - prob[q, target["labels"][t]]
                - 2 * giou[q, t]).item()

    best = min(sum(cost(q, t) for t, q in enumerate(perm)) for perm in itertools.permutations(range(5), 3))
    assert sum(cost(q, t) for q, t in zip(rows.tolist(), cols.tolist())) == pytest.approx(best, abs=1e-5)


@pytest.mark.parametrize("focal", [False, True])
def test_empty_targets_give_finite_losses(focal):
    gen = torch.Generator().manual_seed(2)
    classes = 3
    outputs = _outputs(gen, 2, 6, classes if focal else classes + 1)
    outputs["pred_logits"].requires_grad_(True)
    outputs["aux_outputs"] = [_outputs(gen, 2, 6, classes if focal else classes + 1)]
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    criterion = SetCriterion(classes, HungarianMatcher(2, 5, 2, focal=focal), focal=focal)
    losses = criterion(outputs, targets)
    assert set(losses) == {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"] == 0 and losses["loss_giou"] == 0 and losses["loss_ce"] > 0
    sum(losses.values()).backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0


def test_two_stage_proposals_are_class_agnostic():
    gen = torch.Generator().manual_seed(4)
    targets = random_targets(gen, [2], 4)
    outputs = _outputs(gen, 1, 5, 4)
    outputs["enc_outputs"] = _outputs(gen, 1, 5, 4)
    losses = SetCriterion(4, HungarianMatcher(2, 5, 2, focal=True), focal=True)(outputs, targets)
    relabeled = [{"labels": torch.zeros(2, dtype=torch.int64), "boxes": targets[0]["boxes"]}]
    single = SetCriterion(4, HungarianMatcher(2, 5, 2, focal=True), focal=True).single_layer_losses(
        outputs["enc_outputs"], relabeled, 2.0)
    for key, value in single.items():
        torch.testing.assert_close(losses[key + "_enc"], value)


def test_matcher_rejects_all_zero_costs():
    with pytest.raises(ValueError, match="COST_"):
        HungarianMatcher(0, 0, 0)
