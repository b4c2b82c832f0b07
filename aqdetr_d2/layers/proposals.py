"""Two-stage helpers shared by DETR and Deformable-DETR: encoder proposals and box embeddings."""
import math
from typing import Tuple

import torch
from torch import Tensor

from .ms_deform_attn import SpatialShapes, level_shapes


def box_sine_embed(boxes: Tensor, num_pos_feats: int, temperature: int = 10000) -> Tensor:
    """Sine / cosine embedding of normalized boxes, as DETR embeds pixel positions.

    Args:
        boxes: (..., 4) normalized (cx, cy, w, h) in [0, 1].
        num_pos_feats: frequencies per coordinate (d_model / 2 gives a 2 * d_model embedding).
    Returns:
        (..., 4 * num_pos_feats): per coordinate, sin and cos interleaved.
    """
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos = boxes[..., None] * (2 * math.pi) / dim_t  # (..., 4, num_pos_feats)
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-3)


def cell_centers(padding_mask: Tensor, spatial_shapes: SpatialShapes) -> Tensor:
    """Normalized (x, y) centre of every encoder position, relative to each image's valid area.

    Args:
        padding_mask: (B, S) bool, True on padding, levels flattened one after another.
        spatial_shapes: (n_levels, 2) (H, W) of each level; S = sum of H * W.
    Returns:
        (B, S, 2); positions on padding lie beyond 1.
    """
    batch = padding_mask.shape[0]
    centers = []
    start = 0
    for h, w in level_shapes(spatial_shapes):
        mask = padding_mask[:, start:start + h * w].view(batch, h, w)
        start += h * w
        valid_h = torch.sum(~mask[:, :, 0], 1)
        valid_w = torch.sum(~mask[:, 0, :], 1)
        grid_y, grid_x = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=padding_mask.device),
                                        torch.arange(w, dtype=torch.float32, device=padding_mask.device),
                                        indexing="ij")
        grid = torch.stack([grid_x, grid_y], -1)  # (h, w, 2)
        scale = torch.stack([valid_w, valid_h], -1).view(batch, 1, 1, 2)
        centers.append(((grid[None] + 0.5) / scale).view(batch, -1, 2))
    return torch.cat(centers, 1)


def encoder_proposals(padding_mask: Tensor, spatial_shapes: SpatialShapes) -> Tuple[Tensor, Tensor]:
    """One proposal per encoder position: a box centred on the pixel, 0.05 * 2^level wide.

    Args:
        padding_mask: (B, S) bool, True on padding, levels flattened one after another.
        spatial_shapes: (n_levels, 2) (H, W) of each level; S = sum of H * W.
    Returns:
        proposals (B, S, 4) as logits (inverse sigmoid of normalized cxcywh), +inf at padding
        and at boxes too close to the image border; valid (B, S, 1) bool, False there.
    """
    centers = cell_centers(padding_mask, spatial_shapes)
    sizes = [torch.full((h * w,), 0.05 * 2.0 ** lvl, device=padding_mask.device)
             for lvl, (h, w) in enumerate(level_shapes(spatial_shapes))]
    wh = torch.cat(sizes)[None, :, None].expand(centers.shape[0], -1, 2)
    proposals = torch.cat((centers, wh), -1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True) & ~padding_mask[..., None]
    proposals = torch.log(proposals / (1 - proposals))
    return proposals.masked_fill(~valid, float("inf")), valid


def gaussian_attention_prior(boxes: Tensor, centers: Tensor, min_size: float) -> Tensor:
    """Additive cross-attention prior around each query's box (SMCA, Gao et al. 2021).

    The log of a Gaussian centred on the box with standard deviation half its width / height
    (at least `min_size` / 2), so attention starts local and is still free to move.

    Args:
        boxes: (B, Q, 4) normalized (cx, cy, w, h); centers: (B, S, 2) normalized (x, y).
    Returns:
        (B, 1, Q, S) to add to the attention logits of every head.
    """
    sigma = (boxes[..., None, 2:] / 2).clamp(min=min_size / 2)  # (B, Q, 1, 2)
    dist = (centers[:, None] - boxes[..., None, :2]) / sigma  # (B, Q, S, 2)
    return (-0.5 * dist.pow(2).sum(-1)).unsqueeze(1)
