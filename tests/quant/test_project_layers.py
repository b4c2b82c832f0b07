"""The project's float attention layers declare the quantization points the library expects."""
import copy

import torch

from aqdetr_d2.layers.attention import MultiheadAttention
from aqdetr_d2.layers.ms_deform_attn import MSDeformAttn
from aqdetr_d2.quant import LSQQuantizer, QuantConfig, QuantLinear, iter_quantizers, quantize_model


def _deform_inputs(batch=2, len_q=3, dim=16):
    shapes = torch.tensor([[4, 4], [2, 2]])
    start = torch.tensor([0, 16])
    return (
        torch.randn(batch, len_q, dim),
        torch.rand(batch, len_q, 2, 2),
        torch.randn(batch, 20, dim),
        shapes,
        start,
    )


def test_multihead_attention_points():
    float_module = MultiheadAttention(16, 4)
    qmodule = quantize_model(copy.deepcopy(float_module), QuantConfig())
    q, mem = torch.randn(5, 2, 16), torch.randn(7, 2, 16)
    quantized = []
    qmodule.attn_quant.register_forward_hook(lambda _m, _i, output: quantized.append(output))
    out, probs = qmodule(q, mem, mem)
    attn = quantized[0]
    assert isinstance(qmodule.q_proj, QuantLinear)
    points = [qmodule.q_quant, qmodule.k_quant, qmodule.v_quant, qmodule.attn_quant]
    assert all(isinstance(p, LSQQuantizer) and p.scale.numel() == 4 for p in points)
    assert all(p.initialized.item() == 1 for p in iter_quantizers(qmodule))
    # Softmax probabilities on the unsigned 4-bit grid of their head's step size.
    codes = attn / qmodule.attn_quant.scale.detach().view(1, -1, 1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.max() <= 15 + 1e-4
    # The returned map is the softmax the quantizer received (what distillation compares).
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 5)) and not torch.allclose(probs, attn)


def test_deformable_attention_points():
    float_module = MSDeformAttn(16, n_levels=2, n_heads=4, n_points=2)
    torch.nn.init.normal_(float_module.attention_weights.weight)  # non-uniform weights
    qmodule = quantize_model(copy.deepcopy(float_module), QuantConfig(attn_bits=3))
    inputs = _deform_inputs()
    quantized = []
    qmodule.attn_weight_quant.register_forward_hook(lambda _m, _i, output: quantized.append(output))
    out, probs = qmodule(*inputs)
    weights = quantized[0]
    assert torch.allclose(probs.flatten(-2).sum(-1), torch.ones(probs.shape[:3]))
    assert qmodule.value_quant.scale.numel() == 4 and qmodule.attn_weight_quant.scale.numel() == 4
    codes = weights / qmodule.attn_weight_quant.scale.detach().view(1, 1, -1, 1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.max() <= 7 + 1e-4

    exact = quantize_model(copy.deepcopy(float_module), QuantConfig(weight_bits=32, act_bits=32, attn_bits=32))
    for a, b in zip(exact(*inputs), float_module(*inputs)):
        assert torch.equal(a, b)
