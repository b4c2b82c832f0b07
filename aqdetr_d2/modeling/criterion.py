"""Set criterion: losses of matched predictions at every decoder layer."""
from typing import Dict, List

import torch
import torch.nn.functional as F
from fvcore.nn import sigmoid_focal_loss
from torch import Tensor, nn

from detectron2.utils import comm

from ..layers.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class SetCriterion(nn.Module):
    """DETR / Deformable-DETR loss.

    Classification is softmax cross-entropy with a down-weighted no-object class (DETR) or
    sigmoid focal loss (Deformable-DETR, `focal=True`); boxes get L1 and GIoU. The same
    losses are computed for every entry of `outputs["aux_outputs"]` (suffix `_{i}`) and
    for two-stage proposals `outputs["enc_outputs"]` (suffix `_enc`, class-agnostic).
    Returned losses are already multiplied by their weights.
    """

    def __init__(self, num_classes: int, matcher: nn.Module, class_weight: float = 1.0,
                 l1_weight: float = 5.0, giou_weight: float = 2.0, no_object_weight: float = 0.1,
                 focal: bool = False, focal_alpha: float = 0.25):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weights = {"loss_ce": class_weight, "loss_bbox": l1_weight, "loss_giou": giou_weight}
        self.focal = focal
        self.focal_alpha = focal_alpha
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def loss_labels(self, logits: Tensor, targets, indices, num_boxes: float) -> Tensor:
        """logits (B, Q, K) or (B, Q, K + 1)."""
        batch_idx, src_idx = _batch_indices(indices)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64,
                                    device=logits.device)
        target_classes[batch_idx, src_idx] = torch.cat(
            [t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        if not self.focal:
            return F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)
        # One-hot over K + 1 then drop the last column: unmatched queries get all-zero targets.
        onehot = F.one_hot(target_classes, logits.shape[-1] + 1)[..., :-1].to(logits.dtype)
        loss = sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=2.0, reduction="sum")
        return loss / num_boxes

    def loss_boxes(self, pred_boxes: Tensor, targets, indices, num_boxes: float):
        """pred_boxes (B, Q, 4) normalized cxcywh -> (L1 loss, GIoU loss)."""
        batch_idx, src_idx = _batch_indices(indices)
        src = pred_boxes[batch_idx, src_idx]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src)
        loss_bbox = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
        loss_giou = (1 - giou).sum() / num_boxes
        return loss_bbox, loss_giou

    def single_layer_losses(self, outputs: Dict[str, Tensor], targets, num_boxes: float):
        """Weighted losses of one prediction set: "pred_logits" (B, Q, K), "pred_boxes" (B, Q, 4)."""
        indices = self.matcher(outputs, targets)
        loss_bbox, loss_giou = self.loss_boxes(outputs["pred_boxes"], targets, indices, num_boxes)
        losses = {
            "loss_ce": self.loss_labels(outputs["pred_logits"], targets, indices, num_boxes),
            "loss_bbox": loss_bbox,
            "loss_giou": loss_giou,
        }
        return {k: v * self.weights[k] for k, v in losses.items()}

    def forward(self, outputs: Dict, targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """
        Args:
            outputs: "pred_logits", "pred_boxes", optional "aux_outputs" (list of the same)
                and "enc_outputs".
            targets: per image, "labels" (T_i,) int64 and "boxes" (T_i, 4) normalized cxcywh.
        """
        num_boxes = num_boxes_across_ranks(targets, outputs["pred_boxes"].device)
        losses = self.single_layer_losses(outputs, targets, num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self.single_layer_losses(aux, targets, num_boxes).items()})
        if "enc_outputs" in outputs:
            binary = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets]
            enc = self.single_layer_losses(outputs["enc_outputs"], binary, num_boxes)
            losses.update({f"{k}_enc": v for k, v in enc.items()})
        return losses


def _batch_indices(indices):
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx, src_idx


def num_boxes_across_ranks(targets, device) -> float:
    """Average number of target boxes per rank, at least 1, so every rank normalizes alike."""
    num = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if comm.get_world_size() > 1:
        torch.distributed.all_reduce(num)
    return max(num.item() / comm.get_world_size(), 1.0)
