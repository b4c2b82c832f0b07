"""Distillation KL terms against the plain formula, KL(t || s) = sum t (log(t + eps) - log(s + eps))."""
import torch
import torch.nn.functional as F

from aqdetr_d2.distill.losses import attention_kl, deformable_attention_kl

EPS = 1e-8


def _maps(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=gen) * 3
    logits[..., :2] = -100.0  # near-zero probabilities, where the eps matters
    return logits


def _reference_kl(student, teacher):
    return (teacher * ((teacher + EPS).log() - (student + EPS).log())).sum(-1)


def _check_against_mean_reference(loss, s_logits, t):
    """`loss` (computed from softmax(s_logits)) and its gradient equal the mean reference KL's."""
    (grad,) = torch.autograd.grad(loss, s_logits)
    ref_logits = s_logits.detach().clone().requires_grad_()
    ref = _reference_kl(ref_logits.softmax(-1), t).mean()
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    assert torch.allclose(loss, ref, rtol=1e-5)
    assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_attention_kl_value_and_gradient_match_the_formula():
    s_logits, t = _maps((2, 3, 5, 7), 0).requires_grad_(), _maps((2, 3, 5, 7), 1).softmax(-1)
    valid = torch.tensor([[True] * 5, [True, True, False, True, False]])
    loss = attention_kl(s_logits.softmax(-1), t, valid)
    (grad,) = torch.autograd.grad(loss, s_logits)

    ref_logits = s_logits.detach().clone().requires_grad_()
    kl = _reference_kl(ref_logits.softmax(-1), t)  # (B, H, L)
    mask = valid[:, None, :].expand_as(kl)
    ref = kl[mask].mean()
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    assert torch.allclose(loss, ref, rtol=1e-5)
    assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_attention_kl_is_torchs_kl_away_from_zero():
    gen = torch.Generator().manual_seed(4)
    s_logits, t_logits = torch.randn(2, 3, 5, 7, generator=gen), torch.randn(2, 3, 5, 7, generator=gen)
    ref = F.kl_div(s_logits.log_softmax(-1), t_logits.log_softmax(-1), reduction="batchmean", log_target=True)
    # kl_div's "batchmean" divides by B only; attention_kl averages over B, H and L.
    assert torch.allclose(attention_kl(s_logits.softmax(-1), t_logits.softmax(-1)) * 3 * 5, ref, rtol=1e-4)


def test_attention_kl_keeps_quantized_zeros_finite():
    t = torch.tensor([[[[0.5, 0.5, 0.0]]]])
    s = torch.tensor([[[[1.0, 0.0, 0.0]]]], requires_grad=True)  # a probability quantized to 0
    loss = attention_kl(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert torch.allclose(loss, _reference_kl(s.detach(), t).mean())


def test_deformable_attention_kl_matches_the_formula():
    shape = (2, 6, 4, 3, 4)  # (B, Lq, H, levels, points)
    s_logits = _maps(shape[:3] + (12,), 2).requires_grad_()
    t = _maps(shape[:3] + (12,), 3).softmax(-1)
    loss = deformable_attention_kl(s_logits.softmax(-1).view(shape), t.view(shape))
    _check_against_mean_reference(loss, s_logits, t)


def test_attention_kl_of_non_contiguous_maps():
    # Maps sliced or transposed out of a larger tensor take the same value and gradient.
    s_logits = _maps((2, 5, 3, 7), 5).requires_grad_()
    t = _maps((2, 5, 3, 7), 6).softmax(-1)
    s_map, t_map = s_logits.softmax(-1).transpose(1, 2), t.transpose(1, 2)  # (B, H, L, S) views
    assert not s_map.is_contiguous()
    _check_against_mean_reference(attention_kl(s_map, t_map), s_logits, t)



def test_compiled_kl_matches_the_eager_ops(monkeypatch):
    """Where fusion is on, the KL's value comes from one compiled kernel: the same value up to
    rounding, and the very same gradient (the backward is the eager ops either way)."""
    from aqdetr_d2.distill import losses
    from aqdetr_d2.quant import fused

    calls = []
    compiled = losses._compiled_kl_rows
    monkeypatch.setattr(losses, "_compiled_kl_rows", lambda *a: calls.append(1) or compiled(*a))
    monkeypatch.setattr(losses, "_MIN_NUMEL_COMPILED", 0)
    s_logits, t = _maps((2, 3, 5, 7), 7).requires_grad_(), _maps((2, 3, 5, 7), 8).softmax(-1)

    def kl_and_grad():
        # Transposed views, as the maps of a batch-first attention come.
        loss = attention_kl(s_logits.softmax(-1).transpose(2, 3), t.transpose(2, 3))
        return loss, torch.autograd.grad(loss, s_logits)[0]

    with fused.eager_ops():
        eager, eager_grad = kl_and_grad()
    assert not calls
    value, grad = kl_and_grad()
    assert calls  # the compiled kernel ran
    assert torch.allclose(value, eager, rtol=1e-6)
    assert torch.equal(grad, eager_grad)
