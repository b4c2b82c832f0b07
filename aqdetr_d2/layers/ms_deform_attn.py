"""Multi-scale deformable attention (Zhu et al., "Deformable DETR", ICLR 2021) in pure PyTorch.

The official code samples with a compiled CUDA kernel; here each level is sampled with
`F.grid_sample`, which runs on every device, supports autograd (float64 included, for
gradcheck) and needs no build step. Levels are processed one after the other and their
weighted samples summed, so the extra memory at any time is one level's samples
(B * n_heads, d_head, Lq, n_points) instead of all levels stacked.

Quantization points are `nn.Identity` placeholders that `aqdetr_d2.quant` swaps for
quantizers: `value_quant` (the projected values) and `attn_weight_quant` (the softmaxed
attention weights). Sampling locations stay full precision: sub-pixel positions are what
deformable attention learns, and rounding them would move every sample. The weights returned
beside the output are taken before `attn_weight_quant`, for the same reason as in
`aqdetr_d2.layers.attention`: a KL to low-bit weights with exact zeros is unbounded.
"""
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SpatialShapes = Union[Tensor, Sequence[Tuple[int, int]]]


def spatial_shapes_tensor(shapes: Sequence[Tuple[int, int]], device) -> Tensor:
    """(n_levels, 2) long tensor of the levels' (H, W), taken from `feature.shape[-2:]`. While
    an exporter traces, those sizes are 0-d tensors and are stacked, not copied as constants."""
    if torch.jit.is_tracing():
        return torch.stack([torch.stack([torch.as_tensor(h), torch.as_tensor(w)]) for h, w in shapes]).to(device)
    return torch.as_tensor(shapes, dtype=torch.long, device=device)


def level_shapes(spatial_shapes: SpatialShapes) -> List[Tuple[int, int]]:
    """(n_levels, 2) tensor or sequence of (H, W) -> list of (H, W) Python ints.

    While an exporter traces, the sizes stay traced 0-d tensors (see `spatial_shapes_tensor`),
    so that the exported graph follows the input's height and width."""
    if torch.jit.is_tracing():
        return [(h, w) for h, w in spatial_shapes]
    if isinstance(spatial_shapes, Tensor):
        # One host sync per call: the per-level views below need the sizes as Python ints.
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def ms_deform_attn(value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor,
                   attention_weights: Tensor) -> Tensor:
    """Bilinear sampling of every level at the given locations, weighted and summed.

    Pixel convention of `grid_sample(align_corners=False)`: location (0, 0) is the top-left
    corner of the map and (1, 1) the bottom-right one, so pixel column `j` is centred at
    x = (j + 0.5) / W. Samples outside the map read zeros.

    Args:
        value: (B, S, n_heads, d_head) with S = sum(H_l * W_l), levels concatenated in order,
            each level flattened row-major.
        spatial_shapes: (n_levels, 2) long tensor or sequence of (H_l, W_l).
        sampling_locations: (B, Lq, n_heads, n_levels, n_points, 2), normalized (x, y).
        attention_weights: (B, Lq, n_heads, n_levels, n_points).
    Returns:
        (B, Lq, n_heads * d_head) in the dtype of `value`. Computed in at least float32:
        half-precision inputs are cast up, because bilinear weights and the sum over
        levels x points lose too much in fp16.
    """
    shapes = level_shapes(spatial_shapes)
    if value.dim() != 4:
        raise ValueError(f"value must be (B, S, n_heads, d_head), got shape {tuple(value.shape)}")
    batch, len_in, n_heads, d_head = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError("sampling_locations must be (B, Lq, n_heads, n_levels, n_points, 2), "
                         f"got shape {tuple(sampling_locations.shape)}")
    _, len_q, _, n_levels, n_points, _ = sampling_locations.shape
    if sampling_locations.shape[:3] != (batch, len_q, n_heads) or n_levels != len(shapes):
        raise ValueError(f"sampling_locations shape {tuple(sampling_locations.shape)} does not fit "
                         f"value {tuple(value.shape)} and {len(shapes)} levels")
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(f"attention_weights shape {tuple(attention_weights.shape)} must be "
                         f"{tuple(sampling_locations.shape[:-1])}")
    if sum(h * w for h, w in shapes) != len_in:
        raise ValueError(f"spatial shapes {shapes} cover {sum(h * w for h, w in shapes)} positions, "
                         f"but value has {len_in}")

    out_dtype = value.dtype
    dtype = torch.promote_types(value.dtype, torch.float32)
    dtype = torch.promote_types(dtype, sampling_locations.dtype)
    # (B, S, H, d) -> (B*H, d, S): each head becomes one image of the grid_sample batch.
    value = value.to(dtype).permute(0, 2, 3, 1).reshape(batch * n_heads, d_head, len_in)
    # grid_sample wants [-1, 1] coordinates: (B, Lq, H, L, P, 2) -> (B*H, Lq, L, P, 2).
    grids = (2 * sampling_locations.to(dtype) - 1).transpose(1, 2)
    grids = grids.reshape(batch * n_heads, len_q, n_levels, n_points, 2)
    weights = attention_weights.to(dtype).transpose(1, 2)
    weights = weights.reshape(batch * n_heads, 1, len_q, n_levels, n_points)

    output = None
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        value_l = value[:, :, start:start + h * w].reshape(batch * n_heads, d_head, h, w)
        start += h * w
        sampled = F.grid_sample(value_l, grids[:, :, lvl], mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # (B*H, d, Lq, P)
        level_out = (sampled * weights[..., lvl, :]).sum(-1)  # (B*H, d, Lq)
        output = level_out if output is None else output + level_out
    # (B*H, d, Lq) -> (B, H*d, Lq) -> (B, Lq, H*d): channels are head-major, as in the official op.
    output = output.reshape(batch, n_heads * d_head, len_q).transpose(1, 2)
    return output.to(out_dtype)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module with the official parameter names.

    Each query attends to `n_points` locations per head and level around its reference
    point; the offsets and the attention weights are predicted from the query alone.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.d_head = d_model // n_heads

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.value_quant = nn.Identity()
        self.attn_weight_quant = nn.Identity()
        self._reset_parameters()

    def _reset_parameters(self):
        # Offsets start independent of the query: head h looks in direction 2*pi*h/n_heads,
        # point p at (p + 1) pixels along it (the direction scaled so its larger component is 1),
        # so the heads initially cover a ring of growing squares around the reference point.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([thetas.cos(), thetas.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        radii = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        grid = directions[:, None, None, :] * radii[None, None, :, None]  # (H, 1, P, 2)
        grid = grid.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        # Zero weights and bias: uniform attention over all levels and points at the start.
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor,
                input_spatial_shapes: Tensor, input_level_start_index: Tensor,
                input_padding_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """
        Args:
            query: (B, Lq, C), position embedding already added.
            reference_points: (B, Lq, n_levels, 2) normalized (x, y) in [0, 1] of the padded
                map, offsets then measured in pixels of each level; or (B, Lq, n_levels, 4)
                reference boxes (cx, cy, w, h), offsets then measured in units of
                half the box size / n_points.
            input_flatten: (B, S, C), the levels flattened and concatenated.
            input_spatial_shapes: (n_levels, 2) long, (H_l, W_l) of each level.
            input_level_start_index: (n_levels,) start of each level in S. Not needed by the
                pure-PyTorch sampling (the shapes give the same offsets); kept so calls match
                the official module's signature.
            input_padding_mask: (B, S) bool, True on padding, or None.
        Returns:
            output (B, Lq, C) and the attention weights (B, Lq, n_heads, n_levels, n_points)
            after softmax, before `attn_weight_quant`.
        """
        batch, len_q, _ = query.shape
        _, len_in, _ = input_flatten.shape
        shapes = level_shapes(input_spatial_shapes)
        if len(shapes) != self.n_levels:
            raise ValueError(f"got {len(shapes)} spatial shapes for a module with {self.n_levels} levels")
        if sum(h * w for h, w in shapes) != len_in:
            raise ValueError(f"spatial shapes {shapes} cover {sum(h * w for h, w in shapes)} positions, "
                             f"but input_flatten has {len_in}")
        if reference_points.shape[:3] != (batch, len_q, self.n_levels) or reference_points.shape[-1] not in (2, 4):
            raise ValueError(f"reference_points must be (B, Lq, n_levels, 2 or 4) = ({batch}, {len_q}, "
                             f"{self.n_levels}, 2 or 4), got {tuple(reference_points.shape)}")

        value = self.value_proj(input_flatten).view(batch, len_in, self.n_heads, self.d_head)
        value = self.value_quant(value)
        if input_padding_mask is not None:
            # Zeroed after quantization so padding reads exactly zero whatever the quantizer does.
            value = value.masked_fill(input_padding_mask[:, :, None, None], 0.0)

        offsets = self.sampling_offsets(query).view(
            batch, len_q, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(batch, len_q, self.n_heads, self.n_levels * self.n_points)
        probs = F.softmax(weights, -1).view(batch, len_q, self.n_heads, self.n_levels, self.n_points)

        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: divide by (W_l, H_l).
            normalizer = input_spatial_shapes.flip(-1).to(reference_points.dtype)
            locations = (reference_points[:, :, None, :, None, :]
                         + offsets / normalizer[None, None, None, :, None, :])
        else:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        output = ms_deform_attn(value, shapes, locations, self.attn_weight_quant(probs))
        return self.output_proj(output), probs
