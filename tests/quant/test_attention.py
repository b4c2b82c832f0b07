"""Attention quantization points: integer reference for q.k and attn.v, identity at 32 bits."""
import copy

import pytest
import torch

from aqdetr_d2.quant import MHA_POINTS, install_quantizers, point_quantizer


def attention_quantizers(bits, quantizer="lsq", num_heads=None, per_head=True, points=MHA_POINTS):
    """One quantizer per point of a multi-head attention module, as quantize_model installs them."""
    return {p: point_quantizer(p, bits, quantizer, num_heads, per_head) for p in points}


def _inputs():
    return torch.randn(5, 2, 16), torch.randn(7, 2, 16)  # query (L, B, C), memory (S, B, C)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("per_head", [True, False])
def test_scores_and_output_from_integer_codes(toy_attention, bits, per_head):
    attn_module = toy_attention(16, 4)
    install_quantizers(attn_module, attention_quantizers(bits, num_heads=4, per_head=per_head))
    query, memory = _inputs()
    out, attn = attn_module(query, memory, memory)

    m = attn_module
    q = m.split_heads(m.q_proj(query) * m.scaling)  # (B, H, L, d)
    k = m.split_heads(m.k_proj(memory))
    v = m.split_heads(m.v_proj(memory))
    q_codes, s_q, _ = m.q_quant.quantize_to_int(q)
    k_codes, s_k, _ = m.k_quant.quantize_to_int(k)
    v_codes, s_v, _ = m.v_quant.quantize_to_int(v)
    heads = (1, -1, 1, 1)  # scales broadcast over the head axis

    scores_int = q_codes.to(torch.int32) @ k_codes.to(torch.int32).transpose(-2, -1)
    scores = scores_int.float() * (s_q * s_k).view(heads)
    fake_scores = m.q_quant(q) @ m.k_quant(k).transpose(-2, -1)
    assert torch.allclose(scores, fake_scores, rtol=1e-5, atol=1e-6)

    # The softmax itself stays in floating point (on the fake-quant scores, as in the module).
    attn_codes, s_a, _ = m.attn_quant.quantize_to_int(fake_scores.softmax(-1))
    assert attn_codes.dtype == torch.uint8  # softmax output: unsigned
    assert torch.allclose(attn_codes.float() * s_a.view(heads), attn, atol=1e-6)
    context_int = attn_codes.to(torch.int32) @ v_codes.to(torch.int32)
    context = (context_int.float() * (s_a * s_v).view(heads)).permute(2, 0, 1, 3).reshape(5, 2, 16)
    assert torch.allclose(m.out_proj(context), out, rtol=1e-5, atol=1e-5)


def test_quantizers_are_per_head_and_signed_as_specified(toy_attention):
    quantizers = attention_quantizers(4, num_heads=4)
    assert [q.signed for q in quantizers.values()] == [True, True, True, False]
    assert all(q.granularity == "head" and q.ch_axis == 1 and q.scale.numel() == 4 for q in quantizers.values())
    lazy = attention_quantizers(4, quantizer="minmax")  # heads counted on first use
    attn_module = install_quantizers(toy_attention(16, 4), lazy)
    query, memory = _inputs()
    attn_module(query, memory, memory)
    assert all(q.scale.numel() == 4 for q in lazy.values())


def test_32_bits_is_bit_identical(toy_attention):
    float_module = toy_attention(16, 4)
    qmodule = install_quantizers(copy.deepcopy(float_module), attention_quantizers(32, num_heads=4))
    query, memory = _inputs()
    for a, b in zip(qmodule(query, memory, memory), float_module(query, memory, memory)):
        assert torch.equal(a, b)


def test_install_requires_placeholder(toy_attention):
    with pytest.raises(ValueError, match="no nn.Identity placeholder 'value_quant'"):
        install_quantizers(toy_attention(16, 4), attention_quantizers(4, points=["value_quant"]))
    with pytest.raises(ValueError, match="unknown quantization point"):
        attention_quantizers(4, points=["score_quant"])
