"""`LayerDistiller`: the distillation terms of one training step."""
from typing import Dict

import torch
from torch import Tensor, nn

from .adapters import ADAPTERS
from .losses import CLASS_KL, attention_kl, box_l1, deformable_attention_kl, feature_mse, foreground_mask

MODES = ("teacher_forced", "parallel")

# Adapter attention kind -> KL of that kind of attention.
ATTENTION_KL = {"softmax_map": attention_kl, "deformable_weights": deformable_attention_kl}


class LayerDistiller(nn.Module):
    """Pulls each quantized layer of the student towards the frozen float teacher.

    Terms (each summed over layers, weighted, and logged under its own name):
    `loss_distill_enc_attn` (KL per head of encoder attention), `loss_distill_enc_out` (MSE
    of encoder layer outputs), `loss_distill_dec_hidden` (MSE of object-query states),
    `loss_distill_dec_cls` (KL of class scores), `loss_distill_dec_box` (L1 of boxes).
    With `foreground_only`, decoder terms use only the queries the student's matcher assigns
    to ground truth (Q-DETR's foreground-aware selection).

    The teacher is kept in a plain list so that it is not a submodule: it stays out of the
    student's state_dict, parameters(), optimizer and DDP. It is always in eval mode.
    """

    def __init__(self, teacher: nn.Module, meta_architecture: str, weights: Dict[str, float],
                 mode: str = "teacher_forced", foreground_only: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"MODEL.DISTILL.MODE must be one of {MODES}, got '{mode}'")
        if meta_architecture not in ADAPTERS:
            raise ValueError(f"No distillation adapter for meta-architecture '{meta_architecture}'; "
                             f"supported: {sorted(ADAPTERS)}")
        self._teacher = [teacher.eval()]
        self.adapter = ADAPTERS[meta_architecture]
        self.weights = dict(weights)
        self.mode = mode
        self.foreground_only = foreground_only

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def _apply(self, fn, *args, **kwargs):
        # Follow the student across devices (model.to(device)) although the teacher is hidden.
        self._teacher[0] = self.teacher._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def forward(self, student: nn.Module, images, outputs: Dict, targets) -> Dict[str, Tensor]:
        """
        Args:
            student: the meta-architecture being trained; images: its ImageList;
            outputs: its `predict()` output for this step; targets: its matcher targets.
        Returns:
            weighted distillation losses.
        """
        teacher = self.teacher
        teacher.eval()
        with torch.no_grad():
            teacher_out = teacher.predict(images) if self.mode == "parallel" else None
        # Not under no_grad: the student's side of each pair must keep its graph. Adapters run
        # teacher layers on detached inputs, so no gradient reaches the teacher or flows
        # through it into the student.
        enc_pairs = self.adapter.encoder_pairs(outputs, teacher, teacher_out) if self._encoder_on() else []
        dec_pairs = self.adapter.decoder_pairs(outputs, teacher, teacher_out) if self._decoder_on() else []
        # A term of weight 0 is not computed at all (the encoder-attention KL's forward alone took
        # ~130 ms of a 1.7 s DETR AQ-DETR step on the CPU); the others run in the order they
        # always had, so their values and gradients do not change.
        on = {k for k, w in self.weights.items() if w > 0}
        losses = {}
        if enc_pairs and "loss_distill_enc_attn" in on:
            attn_kl = ATTENTION_KL[self.adapter.attention_kind]
            losses["loss_distill_enc_attn"] = sum(attn_kl(p.student_attn, p.teacher_attn, p.valid) for p in enc_pairs)
        if enc_pairs and "loss_distill_enc_out" in on:
            losses["loss_distill_enc_out"] = sum(feature_mse(p.student_out, p.teacher_out, p.valid) for p in enc_pairs)
        if dec_pairs:
            class_kl = CLASS_KL["sigmoid" if student.criterion.focal else "softmax"]
            terms = {"loss_distill_dec_hidden": lambda p, valid: feature_mse(p.student_hidden, p.teacher_hidden, valid),
                     "loss_distill_dec_cls": lambda p, valid: class_kl(p.student_logits, p.teacher_logits, valid),
                     "loss_distill_dec_box": lambda p, valid: box_l1(p.student_boxes, p.teacher_boxes, valid)}
            per_layer = {k: [] for k in terms if k in on}
            for p in dec_pairs:
                valid = self._decoder_valid(student, targets, p)
                for k, values in per_layer.items():
                    values.append(terms[k](p, valid))
            losses.update({k: sum(values) for k, values in per_layer.items()})
        return {k: v * self.weights[k] for k, v in losses.items()}

    def _encoder_on(self) -> bool:
        return self.weights["loss_distill_enc_attn"] > 0 or self.weights["loss_distill_enc_out"] > 0

    def _decoder_on(self) -> bool:
        return any(self.weights[k] > 0 for k in ("loss_distill_dec_hidden", "loss_distill_dec_cls",
                                                 "loss_distill_dec_box"))

    def _decoder_valid(self, student, targets, pair):
        if not self.foreground_only:
            return None
        with torch.no_grad():
            indices = student.criterion.matcher({"pred_logits": pair.student_logits,
                                                 "pred_boxes": pair.student_boxes}, targets)
        batch, num_queries = pair.student_logits.shape[:2]
        return foreground_mask(indices, batch, num_queries, pair.student_logits.device)
