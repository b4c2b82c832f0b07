"""Hungarian matching between predictions and ground truth (Carion et al. 2020)."""
from typing import Dict, List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ..layers.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising class + L1 + GIoU cost.

    `focal=True` uses Deformable-DETR's focal-loss class cost (sigmoid scores, no
    no-object class); otherwise DETR's negative softmax probability.
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal: bool = False, focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all matching costs are 0; set MODEL.*.COST_*")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal = focal
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def _class_cost(self, logits: Tensor, tgt_ids: Tensor) -> Tensor:
        """logits (N, K) -> (N, T) cost of giving each prediction each target's class."""
        if not self.focal:
            return -logits.softmax(-1)[:, tgt_ids]
        prob = logits.sigmoid()[:, tgt_ids]
        alpha, gamma = self.focal_alpha, self.focal_gamma
        neg = (1 - alpha) * prob ** gamma * -(1 - prob + 1e-8).log()
        pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        return pos - neg

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]]
                ) -> List[Tuple[Tensor, Tensor]]:
        """
        Args:
            outputs: "pred_logits" (B, Q, K), "pred_boxes" (B, Q, 4) normalized cxcywh.
            targets: per image, "labels" (T_i,) and "boxes" (T_i, 4) normalized cxcywh.
        Returns:
            per image, (prediction indices, target indices), both int64 of length min(Q, T_i).
        """
        batch, num_queries = outputs["pred_logits"].shape[:2]
        logits = outputs["pred_logits"].flatten(0, 1).float()
        boxes = outputs["pred_boxes"].flatten(0, 1).float()
        tgt_ids = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).float()
        sizes = [len(t["boxes"]) for t in targets]
        if tgt_ids.numel() == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [(empty, empty) for _ in targets]

        cost = (
            self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
            + self.cost_class * self._class_cost(logits, tgt_ids)
            - self.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        )
        cost = cost.view(batch, num_queries, -1).cpu()
        if not torch.isfinite(cost).all():
            raise FloatingPointError("HungarianMatcher: matching cost has NaN/inf; the model diverged")
        indices = []
        for i, c in enumerate(cost.split(sizes, -1)):
            rows, cols = linear_sum_assignment(c[i].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
