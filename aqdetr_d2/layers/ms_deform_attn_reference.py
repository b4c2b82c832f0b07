"""Slow oracle for multi-scale deformable attention, for tests and benchmarks.

`ms_deform_attn_reference` writes the bilinear formula out by hand (four neighbours, explicit
zero padding, explicit gathers) instead of calling `F.grid_sample`, so it checks
`aqdetr_d2.layers.ms_deform_attn.ms_deform_attn` independently. It materialises every
neighbour of every sample at once: much more memory and time than the real op; do not use it
in a model.
"""
import torch
from torch import Tensor

from .ms_deform_attn import SpatialShapes, level_shapes


def ms_deform_attn_reference(value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor,
                             attention_weights: Tensor) -> Tensor:
    """Same contract as `ms_deform_attn`, computed in the inputs' dtype.

    Args:
        value: (B, S, n_heads, d_head).
        spatial_shapes: (n_levels, 2) long tensor or sequence of (H_l, W_l).
        sampling_locations: (B, Lq, n_heads, n_levels, n_points, 2), normalized (x, y).
        attention_weights: (B, Lq, n_heads, n_levels, n_points).
    Returns:
        (B, Lq, n_heads * d_head).
    """
    batch, _, n_heads, d_head = value.shape
    len_q = sampling_locations.shape[1]
    batch_idx = torch.arange(batch, device=value.device).view(batch, 1, 1, 1)
    head_idx = torch.arange(n_heads, device=value.device).view(1, 1, n_heads, 1)
    output = value.new_zeros(batch, len_q, n_heads, d_head)
    start = 0
    for lvl, (h, w) in enumerate(level_shapes(spatial_shapes)):
        value_l = value[:, start:start + h * w]  # (B, h*w, n_heads, d_head), row-major pixels
        start += h * w
        # align_corners=False: pixel j covers [j, j + 1) / W, its centre sits at x_pix = j.
        x = sampling_locations[:, :, :, lvl, :, 0] * w - 0.5  # (B, Lq, n_heads, P)
        y = sampling_locations[:, :, :, lvl, :, 1] * h - 0.5
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        sampled = 0
        for dy in (0, 1):
            for dx in (0, 1):
                xi, yi = (x0 + dx).long(), (y0 + dy).long()
                corner_weight = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
                inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
                # Outside neighbours read zeros (padding_mode="zeros"); clamp only to index safely.
                flat = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1))
                neighbour = value_l[batch_idx, flat, head_idx]  # (B, Lq, n_heads, P, d_head)
                sampled = sampled + neighbour * (corner_weight * inside)[..., None]
        output = output + (sampled * attention_weights[:, :, :, lvl, :, None]).sum(-2)
    return output.reshape(batch, len_q, n_heads * d_head)
