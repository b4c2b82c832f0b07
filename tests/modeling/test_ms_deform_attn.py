"""Multi-scale deformable attention against a per-point bilinear loop, gradcheck, module checks."""
import math

import pytest
import torch

from aqdetr_d2.layers.ms_deform_attn import MSDeformAttn, ms_deform_attn
from aqdetr_d2.layers.ms_deform_attn_reference import ms_deform_attn_reference

SHAPES = [(6, 4), (3, 2), (1, 1), (5, 7)]


def _bilinear_loop(value, shapes, locations, weights):
    """One sample at a time: the four neighbours of x_pix = x * W - 0.5, zeros outside the map."""
    batch, _, n_heads, d_head = value.shape
    len_q, n_points = locations.shape[1], locations.shape[4]
    out = torch.zeros(batch, len_q, n_heads, d_head, dtype=value.dtype)
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    for b in range(batch):
        for q in range(len_q):
            for m in range(n_heads):
                for lvl, (h, w) in enumerate(shapes):
                    for p in range(n_points):
                        x = locations[b, q, m, lvl, p, 0].item() * w - 0.5
                        y = locations[b, q, m, lvl, p, 1].item() * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        sample = torch.zeros(d_head, dtype=value.dtype)
                        for yi, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            for xi, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                                if 0 <= xi < w and 0 <= yi < h:
                                    sample += wx * wy * value[b, starts[lvl] + yi * w + xi, m]
                        out[b, q, m] += weights[b, q, m, lvl, p] * sample
    return out.reshape(batch, len_q, n_heads * d_head)


def _inputs(batch=2, len_q=5, n_heads=2, d_head=3, n_points=3, shapes=SHAPES, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    len_in = sum(h * w for h, w in shapes)
    value = torch.randn(batch, len_in, n_heads, d_head, generator=gen, dtype=dtype)
    # Beyond the map on both sides, to exercise zero padding.
    locations = torch.rand(batch, len_q, n_heads, len(shapes), n_points, 2, generator=gen, dtype=dtype) * 1.6 - 0.3
    weights = torch.rand(batch, len_q, n_heads, len(shapes), n_points, generator=gen, dtype=dtype)
    return value, torch.tensor(shapes, dtype=torch.long), locations, weights


def test_matches_bilinear_loop_float64():
    value, shapes, locations, weights = _inputs()
    # Exact borders, pixel centres and corners in some of the samples.
    locations[0, 0, 0, :, 0] = 0.0
    locations[0, 0, 1, :, 1] = 1.0
    locations[1, 1, 0, :, 2, 0] = 0.0
    locations[1, 1, 0, :, 2, 1] = 1.0
    for lvl, (h, w) in enumerate(SHAPES):
        locations[0, 2, 0, lvl, 0] = torch.tensor([0.5 / w, 1.5 / h if h > 1 else 0.5 / h])
        locations[1, 3, 1, lvl, 1] = torch.tensor([1.0 + 0.5 / w, -0.5 / h])  # one pixel outside
    expected = _bilinear_loop(value, SHAPES, locations, weights)
    out = ms_deform_attn(value, shapes, locations, weights)
    assert out.shape == (2, 5, 6) and out.dtype == torch.float64
    assert (out - expected).abs().max().item() <= 1e-10
    reference = ms_deform_attn_reference(value, shapes, locations, weights)
    assert (reference - expected).abs().max().item() <= 1e-10


def test_far_outside_reads_zero():
    value, shapes, locations, weights = _inputs()
    out = ms_deform_attn(value, shapes, locations + 3.0, weights)
    assert out.abs().max().item() == 0.0


def test_gradcheck_value_locations_weights():
    value, shapes, locations, weights = _inputs(batch=1, len_q=2, n_heads=2, d_head=2, n_points=2,
                                                shapes=[(3, 2), (2, 3)])
    # Random locations lie off the pixel-centre lines where bilinear interpolation has kinks,
    # and some are partly outside the map, so the zero-padding gradients are checked too.
    inputs = (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_())
    assert torch.autograd.gradcheck(lambda v, loc, w: ms_deform_attn(v, shapes, loc, w), inputs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(dtype):
    value, shapes, locations, weights = _inputs(dtype=torch.float32)
    out = ms_deform_attn(value.to(dtype), shapes, locations, weights.to(dtype))
    expected = ms_deform_attn(value.to(dtype).float(), shapes, locations, weights.to(dtype).float())
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected.to(dtype))


def test_bad_shapes_raise():
    value, shapes, locations, weights = _inputs()
    with pytest.raises(ValueError, match="cover"):
        ms_deform_attn(value[:, :-1], shapes, locations, weights)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn(value, shapes, locations, weights[..., :-1])
    with pytest.raises(ValueError, match="levels"):
        ms_deform_attn(value, shapes[:-1], locations, weights)


def _module_inputs(module, batch=2, len_q=4, shapes=((4, 5), (2, 3)), ref_dim=2):
    shapes = torch.tensor(shapes, dtype=torch.long)
    len_in = int(shapes.prod(1).sum())
    query = torch.randn(batch, len_q, module.d_model)
    reference = torch.rand(batch, len_q, module.n_levels, ref_dim)
    src = torch.randn(batch, len_in, module.d_model)
    start_index = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    return query, reference, src, shapes, start_index


def test_module_initialisation():
    module = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    bias = module.sampling_offsets.bias.view(4, 2, 3, 2)
    # Head 0 looks right, head 1 down (x, y); point p at p + 1 pixels; same on every level.
    torch.testing.assert_close(bias[0, 1, :, 0], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(bias[1, 0, :, 1], torch.tensor([1.0, 2.0, 3.0]))
    assert bias[1, 0, :, 0].abs().max() < 1e-6
    assert module.sampling_offsets.weight.abs().max() == 0
    assert module.attention_weights.weight.abs().max() == 0 and module.attention_weights.bias.abs().max() == 0
    assert module.value_proj.bias.abs().max() == 0 and module.output_proj.bias.abs().max() == 0
    assert isinstance(module.value_quant, torch.nn.Identity)
    assert isinstance(module.attn_weight_quant, torch.nn.Identity)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_matches_reference(ref_dim):
    module = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    torch.nn.init.normal_(module.sampling_offsets.weight, std=0.1)
    torch.nn.init.normal_(module.attention_weights.weight)
    query, reference, src, shapes, start_index = _module_inputs(module, ref_dim=ref_dim)
    out, weights = module(query, reference, src, shapes, start_index)
    assert out.shape == (2, 4, 16) and weights.shape == (2, 4, 4, 2, 3)
    torch.testing.assert_close(weights.sum((-1, -2)), torch.ones(2, 4, 4))

    offsets = module.sampling_offsets(query).view(2, 4, 4, 2, 3, 2)
    ref = reference[:, :, None, :, None]
    if ref_dim == 2:
        locations = ref + offsets / shapes.flip(-1)[None, None, None, :, None].float()
    else:
        locations = ref[..., :2] + offsets / 3 * ref[..., 2:] * 0.5
    value = module.value_proj(src).view(2, -1, 4, 4)
    expected = module.output_proj(ms_deform_attn_reference(value, shapes, locations, weights))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_module_padding_mask_zeroes_values():
    module = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    query, reference, src, shapes, start_index = _module_inputs(module)
    mask = torch.zeros(src.shape[:2], dtype=torch.bool)
    mask[0, 3:9] = True
    mask[1, -4:] = True
    out, _ = module(query, reference, src, shapes, start_index, mask)
    # Whatever sits at padded positions, it does not reach the output...
    changed = src.masked_fill(mask[..., None], 1e3)
    out_changed, _ = module(query, reference, changed, shapes, start_index, mask)
    torch.testing.assert_close(out, out_changed)
    # ...while without the mask it would.
    out_unmasked, _ = module(query, reference, changed, shapes, start_index)
    assert (out_unmasked - out).abs().max() > 1e-3


def test_module_bad_shapes_raise():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=30, n_levels=2, n_heads=4, n_points=3)
    module = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    query, reference, src, shapes, start_index = _module_inputs(module)
    with pytest.raises(ValueError, match="cover"):
        module(query, reference, src[:, :-1], shapes, start_index)
    with pytest.raises(ValueError, match="levels"):
        module(query, reference, src[:, :20], shapes[:1], start_index[:1])
    with pytest.raises(ValueError, match="reference_points"):
        module(query, reference[..., :1], src, shapes, start_index)
