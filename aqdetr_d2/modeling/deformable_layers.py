"""The encoder and decoder layers of Deformable-DETR (Zhu et al. 2021), every output exposed.

Names mirror fundamentalvision/Deformable-DETR (see deformable_transformer.py for the
differences, none of which changes the numbers); `DeformableTransformer` assembles them.
"""
import copy
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..layers.attention import MultiheadAttention
from ..layers.box_ops import inverse_sigmoid
from ..layers.ms_deform_attn import MSDeformAttn, level_shapes


def _activation(name: str) -> nn.Module:
    """A module rather than a function, so a quantizer can hook the post-activation tensor."""
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"activation must be 'relu' or 'gelu', got '{name}'")


def _with_pos_embed(tensor: Tensor, pos: Optional[Tensor]) -> Tensor:
    return tensor if pos is None else tensor + pos


def _clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


class DeformableTransformerEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention over all levels, then a feed-forward block."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, activation: str = "relu",
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _activation(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Optional[Tensor], reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """
        Args:
            src, pos: (B, S, C) features and level + position embeddings.
            reference_points: (B, S, n_levels, 2), every pixel centre seen from every level.
            spatial_shapes: (n_levels, 2); level_start_index: (n_levels,).
            padding_mask: (B, S) bool, True on padding.
        Returns:
            (B, S, C) output and attention weights (B, S, n_heads, n_levels, n_points).
        """
        src2, attn_weights = self.self_attn(_with_pos_embed(src, pos), reference_points, src, spatial_shapes,
                                            level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        src = self.norm2(src + self.dropout3(src2))
        return src, attn_weights


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, encoder_layer: DeformableTransformerEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = _clones(encoder_layer, num_layers)
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(spatial_shapes: Tensor, valid_ratios: Tensor) -> Tensor:
        """Pixel centres of every level, normalized by the valid (unpadded) image extent.

        Args:
            spatial_shapes: (n_levels, 2); valid_ratios: (B, n_levels, 2) valid fraction (w, h).
        Returns:
            (B, S, n_levels, 2): each pixel's centre expressed in every level's padded
            coordinates, so the same image point is sampled on all levels.
        """
        references = []
        for lvl, (h, w) in enumerate(level_shapes(spatial_shapes)):
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=valid_ratios.dtype, device=valid_ratios.device),
                torch.linspace(0.5, w - 0.5, w, dtype=valid_ratios.dtype, device=valid_ratios.device),
                indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            references.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(references, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(self, src: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, valid_ratios: Tensor,
                pos: Optional[Tensor] = None, padding_mask: Optional[Tensor] = None
                ) -> Tuple[List[Tensor], List[Tensor]]:
        """
        Args:
            src, pos: (B, S, C); spatial_shapes (n_levels, 2); level_start_index (n_levels,);
            valid_ratios (B, n_levels, 2); padding_mask (B, S) bool.
        Returns:
            per-layer outputs, each (B, S, C), and per-layer attention weights, each
            (B, S, n_heads, n_levels, n_points).
        """
        reference_points = self.get_reference_points(spatial_shapes, valid_ratios)
        states, attn_weights = [], []
        output = src
        for layer in self.layers:
            output, weights = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
            states.append(output)
            attn_weights.append(weights)
        return states, attn_weights


class DeformableTransformerDecoderLayer(nn.Module):
    """Post-norm layer: query self-attention, deformable cross-attention to the memory, feed-forward."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, activation: str = "relu",
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _activation(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Optional[Tensor], reference_points: Tensor, src: Tensor,
                src_spatial_shapes: Tensor, level_start_index: Tensor, src_padding_mask: Optional[Tensor] = None,
                self_attn_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            tgt, query_pos: (B, Q, C) query content and query position embedding.
            reference_points: (B, Q, n_levels, 2 or 4), already scaled by the valid ratios.
            src: (B, S, C) encoder memory; src_spatial_shapes (n_levels, 2);
            level_start_index (n_levels,); src_padding_mask (B, S) bool.
            self_attn_mask: (Q, Q) bool, True where query i must not attend to query j.
        Returns:
            (B, Q, C) output, self-attention map (B, n_heads, Q, Q) and cross-attention weights
            (B, Q, n_heads, n_levels, n_points).
        """
        q = k = _with_pos_embed(tgt, query_pos)
        tgt2, self_attn = self.self_attn(q.transpose(0, 1), k.transpose(0, 1), tgt.transpose(0, 1),
                                         attn_mask=self_attn_mask)
        tgt = self.norm2(tgt + self.dropout2(tgt2.transpose(0, 1)))

        tgt2, cross_weights = self.cross_attn(_with_pos_embed(tgt, query_pos), reference_points, src,
                                              src_spatial_shapes, level_start_index, src_padding_mask)
        tgt = self.norm1(tgt + self.dropout1(tgt2))

        tgt2 = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        tgt = self.norm3(tgt + self.dropout4(tgt2))
        return tgt, self_attn, cross_weights


class DeformableTransformerDecoder(nn.Module):
    """Stack of decoder layers; refines the reference points between layers when `bbox_embed` is set."""

    def __init__(self, decoder_layer: DeformableTransformerDecoderLayer, num_layers: int):
        super().__init__()
        self.layers = _clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        # Set by DeformableDETR: per-layer box heads (iterative refinement) and class heads (two-stage).
        self.bbox_embed: Optional[nn.ModuleList] = None
        self.class_embed: Optional[nn.ModuleList] = None

    def forward(self, tgt: Tensor, reference_points: Tensor, src: Tensor, src_spatial_shapes: Tensor,
                src_level_start_index: Tensor, src_valid_ratios: Tensor, query_pos: Optional[Tensor] = None,
                src_padding_mask: Optional[Tensor] = None, self_attn_mask: Optional[Tensor] = None
                ) -> Tuple[Tensor, Tensor, List[Tensor], List[Tensor]]:
        """
        Args:
            tgt, query_pos: (B, Q, C).
            reference_points: (B, Q, 2) normalized points or (B, Q, 4) normalized cxcywh boxes,
                relative to the valid image.
            src: (B, S, C) memory; src_spatial_shapes (n_levels, 2); src_level_start_index
            (n_levels,); src_valid_ratios (B, n_levels, 2); src_padding_mask (B, S) bool.
            self_attn_mask: (Q, Q) bool, True = blocked, passed to every layer's self-attention.
        Returns:
            hs (L, B, Q, C) every layer's output; references (L, B, Q, 2 or 4) the reference
            points after every layer (detached, equal to the input without refinement); lists of
            the per-layer self-attention maps (B, n_heads, Q, Q) and cross-attention weights
            (B, Q, n_heads, n_levels, n_points).
        """
        output = tgt
        states, references, self_attns, cross_weights = [], [], [], []
        for lid, layer in enumerate(self.layers):
            # The references are relative to the valid image; the sampling needs them relative
            # to each level's padded map.
            ratios = src_valid_ratios if reference_points.shape[-1] == 2 else src_valid_ratios.repeat(1, 1, 2)
            reference_points_input = reference_points[:, :, None] * ratios[:, None]
            output, self_attn, cross = layer(output, query_pos, reference_points_input, src, src_spatial_shapes,
                                             src_level_start_index, src_padding_mask, self_attn_mask)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[lid](output)
                if reference_points.shape[-1] == 4:
                    new_reference_points = delta + inverse_sigmoid(reference_points)
                else:
                    new_reference_points = torch.cat(
                        [delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1)
                # Detached: each layer's box head learns a correction, not the whole chain.
                reference_points = new_reference_points.sigmoid().detach()
            states.append(output)
            references.append(reference_points)
            self_attns.append(self_attn)
            cross_weights.append(cross)
        return torch.stack(states), torch.stack(references), self_attns, cross_weights
