"""Layer-by-layer distillation losses between a quantized student and a float teacher."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..quant.fused import compiled_or_none

_EPS = 1e-8
# Maps at least this large take the compiled KL (below it a compiled call's overhead outweighs it).
_MIN_NUMEL_COMPILED = 1 << 15


def _masked_mean(values: Tensor, valid: Optional[Tensor]) -> Tensor:
    """Mean of `values` over positions where `valid` (broadcastable bool) is True."""
    if valid is None:
        return values.mean()
    valid = valid.expand_as(values).to(values.dtype)
    return (values * valid).sum() / valid.sum().clamp(min=1)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """sum(a * b) over the last axis, (...) from (..., N): one batched matrix product, which on
    a CPU takes under half the time of `linalg.vecdot` or a product and a sum on attention maps."""
    n = a.shape[-1]
    return torch.bmm(a.reshape(-1, 1, n), b.reshape(-1, n, 1)).view(a.shape[:-1])


def _kl_rows(s: Tensor, t: Tensor) -> Tensor:
    return (t * torch.log((t + _EPS) / (s + _EPS))).sum(-1)


# One pass over both maps instead of five: the elementwise ops and the row sum fused (and
# Inductor's vectorised log, several times faster than the eager one on a CPU).
_compiled_kl_rows = torch.compile(_kl_rows, dynamic=True)


class _RowKL(torch.autograd.Function):
    """KL(t || s) = sum t * log((t + eps) / (s + eps)) over the last axis, differentiable in s only.

    The value is computed by one compiled kernel where fusion is on (`quant/fused.py`'s rules),
    else by eager ops with one log per element; either way it differs from the two-log form
    sum t log(t + eps) - sum t log(s + eps) in rounding only, and nothing but the logged value
    reads it. The gradient, -t / (s + eps), is the same eager ops as ever, so training is
    bit-equal. No intermediates are kept: dense attention maps are the largest tensors of a
    DETR training step, and each would be a fresh allocation.
    """

    @staticmethod
    def forward(ctx, s, t):
        ctx.save_for_backward(s, t)
        rows = compiled_or_none(_compiled_kl_rows, s, _MIN_NUMEL_COMPILED, t)
        if rows is not None:
            return rows
        log_ratio = torch.add(t, _EPS)
        log_ratio.div_(torch.add(s, _EPS)).log_()
        return _row_dot(t, log_ratio)

    @staticmethod
    def backward(ctx, grad):
        s, t = ctx.saved_tensors
        ratio = torch.add(s, _EPS)
        torch.div(t, ratio, out=ratio)
        return ratio.mul_(-grad.unsqueeze(-1)), None


def _distribution_kl(student: Tensor, teacher: Tensor) -> Tensor:
    """KL(teacher || student) over the last axis, with eps inside both logs; (...) from (..., N)."""
    return _RowKL.apply(student, teacher.detach())


def attention_kl(student: Tensor, teacher: Tensor, query_valid: Optional[Tensor] = None) -> Tensor:
    """KL(teacher || student) of attention distributions over the last axis, per head.

    student, teacher: (B, H, L, S) softmax maps (padded keys carry zero probability in both,
    so they add nothing). query_valid: (B, L) bool, False for padded queries, which are
    excluded. Returns the mean over batch, heads and valid queries.
    """
    kl = _distribution_kl(student, teacher)  # (B, H, L)
    return _masked_mean(kl, None if query_valid is None else query_valid[:, None, :])


def deformable_attention_kl(student: Tensor, teacher: Tensor, query_valid: Optional[Tensor] = None) -> Tensor:
    """KL(teacher || student) of deformable attention weights over levels x points, per head.

    student, teacher: (B, Lq, H, n_levels, n_points), each head's weights summing to 1.
    query_valid: (B, Lq) bool.
    """
    s, t = student.flatten(-2), teacher.flatten(-2)
    kl = _distribution_kl(s, t)  # (B, Lq, H)
    return _masked_mean(kl, None if query_valid is None else query_valid[:, :, None])


def feature_mse(student: Tensor, teacher: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Mean squared error over features (..., C), averaged over `valid` positions (...)."""
    mse = (student - teacher).pow(2).mean(-1)
    return _masked_mean(mse, valid)


def softmax_kl(student_logits: Tensor, teacher_logits: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """KL(softmax(teacher) || softmax(student)) per query: logits (B, Q, K), valid (B, Q)."""
    kl = F.kl_div(F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1),
                  reduction="none", log_target=True).sum(-1)
    return _masked_mean(kl, valid)


def sigmoid_kl(student_logits: Tensor, teacher_logits: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Binary KL(sigmoid(teacher) || sigmoid(student)) summed over classes, per query."""
    p = teacher_logits.sigmoid()
    log_s_pos, log_s_neg = F.logsigmoid(student_logits), F.logsigmoid(-student_logits)
    log_t_pos, log_t_neg = F.logsigmoid(teacher_logits), F.logsigmoid(-teacher_logits)
    kl = (p * (log_t_pos - log_s_pos) + (1 - p) * (log_t_neg - log_s_neg)).sum(-1)
    return _masked_mean(kl, valid)


def box_l1(student_boxes: Tensor, teacher_boxes: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """L1 between (B, Q, 4) normalized boxes, summed over coordinates, mean over valid queries."""
    return _masked_mean((student_boxes - teacher_boxes).abs().sum(-1), valid)


# Classification head type -> KL of its scores.
CLASS_KL = {"softmax": softmax_kl, "sigmoid": sigmoid_kl}


def foreground_mask(indices, batch: int, num_queries: int, device) -> Tensor:
    """(B, Q) bool, True for queries the Hungarian matcher assigned to a ground-truth box."""
    mask = torch.zeros(batch, num_queries, dtype=torch.bool, device=device)
    for i, (src, _) in enumerate(indices):
        mask[i, src.to(device)] = True
    return mask
