"""DETR encoder-decoder transformer with explicit attention and per-layer outputs.

Parameter names mirror facebookresearch/detr (`encoder.layers.{i}.self_attn`, `linear1`,
`norm1`, `decoder.layers.{i}.multihead_attn`, `decoder.norm`), so its checkpoints load
after only the backbone is renamed.
"""
import copy
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.attention import MultiheadAttention
from ..layers.box_ops import inverse_sigmoid
from ..layers.mlp import MLP
from ..layers.proposals import box_sine_embed, cell_centers, gaussian_attention_prior


def _with_pos(x: Tensor, pos: Optional[Tensor]) -> Tensor:
    return x if pos is None else x + pos


def _shorter_side(spatial_shape):
    """min(H, W); traced sizes (0-d tensors, while exporting) stay in the graph."""
    height, width = spatial_shape
    if isinstance(height, Tensor):
        return torch.minimum(height, width)
    return min(height, width)


class TransformerEncoderLayer(nn.Module):
    """Self-attention + FFN, post-norm (DETR) or pre-norm."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, normalize_before=False):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def _ffn(self, x):
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, src: Tensor, src_key_padding_mask: Tensor = None, pos: Tensor = None):
        """src, pos: (S, B, C); mask (B, S) -> (output (S, B, C), attention (B, H, S, S))."""
        if self.normalize_before:
            x = self.norm1(src)
            q = k = _with_pos(x, pos)
            out, attn = self.self_attn(q, k, x, key_padding_mask=src_key_padding_mask)
            src = src + self.dropout1(out)
            return src + self.dropout2(self._ffn(self.norm2(src))), attn
        q = k = _with_pos(src, pos)
        out, attn = self.self_attn(q, k, src, key_padding_mask=src_key_padding_mask)
        src = self.norm1(src + self.dropout1(out))
        return self.norm2(src + self.dropout2(self._ffn(src))), attn


class TransformerDecoderLayer(nn.Module):
    """Self-attention among queries, cross-attention to the memory, FFN."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, normalize_before=False):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor = None,
                memory_key_padding_mask: Tensor = None, pos: Tensor = None, query_pos: Tensor = None,
                memory_mask: Tensor = None):
        """
        tgt, query_pos: (Q, B, C); memory, pos: (S, B, C); tgt_mask (Q, Q) bool, True = blocked;
        memory_key_padding_mask (B, S); memory_mask: additive cross-attention prior (B, 1, Q, S)
        -> (output (Q, B, C), self-attn (B, H, Q, Q), cross-attn (B, H, Q, S)).
        """
        pre = self.normalize_before
        x = self.norm1(tgt) if pre else tgt
        q = k = _with_pos(x, query_pos)
        out, self_attn = self.self_attn(q, k, x, attn_mask=tgt_mask)
        tgt = tgt + self.dropout1(out)
        tgt = tgt if pre else self.norm1(tgt)
        x = self.norm2(tgt) if pre else tgt
        out, cross_attn = self.multihead_attn(_with_pos(x, query_pos), _with_pos(memory, pos), memory,
                                              key_padding_mask=memory_key_padding_mask, attn_mask=memory_mask)
        tgt = tgt + self.dropout2(out)
        tgt = tgt if pre else self.norm2(tgt)
        x = self.norm3(tgt) if pre else tgt
        tgt = tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        tgt = tgt if pre else self.norm3(tgt)
        return tgt, self_attn, cross_attn


class TransformerEncoder(nn.Module):
    def __init__(self, layer: nn.Module, num_layers: int, norm: nn.Module = None):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm

    def forward(self, src, src_key_padding_mask=None, pos=None):
        """(S, B, C) -> (memory (S, B, C), per-layer outputs, per-layer attention maps)."""
        states, attns = [], []
        for layer in self.layers:
            src, attn = layer(src, src_key_padding_mask=src_key_padding_mask, pos=pos)
            states.append(src)
            attns.append(attn)
        if self.norm is not None:
            src = self.norm(src)
        return src, states, attns


class TransformerDecoder(nn.Module):
    """DETR's decoder; with `anchor_queries`, DAB-DETR-style anchor boxes and box refinement.

    With anchor boxes each query carries a reference box; its position embedding is
    `ref_point_head` of the box's sine embedding, recomputed before every layer from the box
    the previous layer predicted (detached, as in Deformable-DETR's refinement). With
    `spatial_prior`, a Gaussian around the box is added to the cross-attention logits (SMCA).
    """

    def __init__(self, layer: nn.Module, num_layers: int, norm: nn.Module, anchor_queries: bool = False,
                 spatial_prior: bool = False):
        super().__init__()
        if spatial_prior and not anchor_queries:
            raise ValueError("spatial_prior needs anchor_queries (MODEL.DETR.SPATIAL_PRIOR needs MODEL.DETR.BOX_REFINE)")
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm
        self.num_layers = num_layers
        self.spatial_prior = spatial_prior
        if anchor_queries:
            d_model = norm.normalized_shape[0]
            self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)

    def forward(self, tgt, memory, tgt_mask=None, memory_key_padding_mask=None, pos=None,
                query_pos=None, reference_boxes=None, box_heads=None, memory_centers=None,
                cell_size: float = 0.0) -> Dict[str, List[Tensor]]:
        """
        Args:
            tgt: (Q, B, C) initial query content; memory, pos: (S, B, C).
            query_pos: (Q, B, C) fixed query positions (plain DETR), or None with anchors.
            reference_boxes: (B, Q, 4) normalized initial anchor boxes (with `anchor_queries`).
            box_heads: per layer, a module (B, Q, C) -> (B, Q, 4) box correction in logit space.
            memory_centers: (B, S, 2) normalized memory positions; cell_size: the normalized
                size of one memory cell, the prior's smallest width (with `spatial_prior`).
        Returns:
            per layer, lists of "states" (Q, B, C) normalized outputs, "raw_states" (the next
            layer's input), "self_attn", "cross_attn", "query_pos" (Q, B, C) and, with anchors,
            "references" (B, Q, 4) the layer's input boxes and "boxes" (B, Q, 4) its output
            boxes, with the spatial prior "cross_attn_prior" (B, 1, Q, S).
        """
        anchors = reference_boxes is not None
        if anchors and (box_heads is None or len(box_heads) < self.num_layers):
            raise ValueError("anchor-box decoding needs one box head per decoder layer")
        if self.spatial_prior and anchors and memory_centers is None:
            raise ValueError("the spatial prior needs memory_centers")
        out = {k: [] for k in ("states", "raw_states", "self_attn", "cross_attn", "query_pos", "references", "boxes",
                               "cross_attn_prior")}
        for lid, layer in enumerate(self.layers):
            prior = None
            if anchors:
                query_pos = self.ref_point_head(box_sine_embed(reference_boxes, self.norm.normalized_shape[0] // 2))
                query_pos = query_pos.transpose(0, 1)
                if self.spatial_prior:
                    prior = gaussian_attention_prior(reference_boxes, memory_centers, cell_size)
                    out["cross_attn_prior"].append(prior)
            tgt, self_attn, cross_attn = layer(tgt, memory, tgt_mask=tgt_mask,
                                               memory_key_padding_mask=memory_key_padding_mask,
                                               pos=pos, query_pos=query_pos, memory_mask=prior)
            state = self.norm(tgt)
            for key, value in zip(("states", "raw_states", "self_attn", "cross_attn", "query_pos"),
                                  (state, tgt, self_attn, cross_attn, query_pos)):
                out[key].append(value)
            if anchors:
                boxes = (box_heads[lid](state.transpose(0, 1)) + inverse_sigmoid(reference_boxes)).sigmoid()
                out["references"].append(reference_boxes)
                out["boxes"].append(boxes)
                reference_boxes = boxes.detach()
        return out


class Transformer(nn.Module):
    """DETR's transformer. The decoder always returns every layer's (normalized) output.

    `encode` and `decode` run the two halves (two-stage query selection sits between them);
    `forward` runs both with learned query positions, as DETR does.
    """

    def __init__(self, d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
                 dim_feedforward=2048, dropout=0.1, normalize_before=False, anchor_queries=False,
                 spatial_prior=False):
        super().__init__()
        enc_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, normalize_before)
        self.encoder = TransformerEncoder(enc_layer, num_encoder_layers,
                                          nn.LayerNorm(d_model) if normalize_before else None)
        dec_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, normalize_before)
        self.decoder = TransformerDecoder(dec_layer, num_decoder_layers, nn.LayerNorm(d_model), anchor_queries,
                                          spatial_prior)
        self.d_model = d_model
        self.nhead = nhead
        self.anchor_queries = anchor_queries
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def encode(self, src: Tensor, mask: Tensor, pos_embed: Tensor) -> Dict:
        """
        Args:
            src: (B, C, H, W) projected features; mask: (B, H, W) bool, True on padding;
            pos_embed: (B, C, H, W).
        Returns:
            "memory" (S, B, C), "enc_states" and "enc_attn" (per encoder layer, (S, B, C) and
            (B, H, S, S)), the encoder input "enc_input" (S, B, C), "pos" (S, B, C), "mask" (B, S),
            "spatial_shape" (H, W).
        """
        spatial_shape = tuple(src.shape[-2:])
        src = src.flatten(2).permute(2, 0, 1)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        mask = mask.flatten(1)
        memory, enc_states, enc_attn = self.encoder(src, src_key_padding_mask=mask, pos=pos_embed)
        return {"memory": memory, "enc_states": enc_states, "enc_attn": enc_attn, "enc_input": src,
                "pos": pos_embed, "mask": mask, "spatial_shape": spatial_shape}

    def decode(self, enc: Dict, tgt: Tensor, query_pos: Optional[Tensor] = None, tgt_mask: Tensor = None,
               reference_boxes: Optional[Tensor] = None, box_heads=None) -> Dict:
        """
        Args:
            enc: `encode`'s dict; tgt: (Q, B, C) initial query content.
            query_pos: (Q, B, C) learned query positions (plain DETR; None with anchor boxes).
            tgt_mask: (Q, Q) bool, True where query i must not attend to query j.
            reference_boxes, box_heads: anchor boxes (B, Q, 4) and per-layer box heads.
        Returns:
            `enc` plus "hs" (L, B, Q, C) normalized decoder outputs, "dec_raw_states" (per decoder
            layer (Q, B, C), before the shared norm), "dec_self_attn" and "dec_cross_attn" (per
            decoder layer), "dec_query_pos" (per layer (Q, B, C)), the first layer's "query_pos"
            and "tgt" (Q, B, C), with anchor boxes "dec_references" and "dec_boxes" (per layer
            (B, Q, 4), input and refined boxes) and with the spatial prior "dec_cross_attn_prior"
            (per layer (B, 1, Q, S)).
        """
        centers = None
        if self.decoder.spatial_prior and reference_boxes is not None:
            centers = cell_centers(enc["mask"], [enc["spatial_shape"]])
        dec = self.decoder(tgt, enc["memory"], tgt_mask=tgt_mask, memory_key_padding_mask=enc["mask"],
                           pos=enc["pos"], query_pos=query_pos, reference_boxes=reference_boxes,
                           box_heads=box_heads, memory_centers=centers,
                           cell_size=1.0 / _shorter_side(enc["spatial_shape"]))
        out = {**enc, "hs": torch.stack(dec["states"]).transpose(1, 2),  # (L, Q, B, C) -> (L, B, Q, C)
               "dec_raw_states": dec["raw_states"], "dec_self_attn": dec["self_attn"],
               "dec_cross_attn": dec["cross_attn"], "dec_query_pos": dec["query_pos"],
               "query_pos": dec["query_pos"][0], "tgt": tgt}
        if reference_boxes is not None:
            out.update(dec_references=dec["references"], dec_boxes=dec["boxes"])
        if dec["cross_attn_prior"]:
            out["dec_cross_attn_prior"] = dec["cross_attn_prior"]
        return out

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor,
                tgt_mask: Tensor = None) -> Dict[str, List[Tensor]]:
        """DETR: `encode`, then `decode` from zero content with query positions `query_embed` (Q, C)."""
        enc = self.encode(src, mask, pos_embed)
        query_pos = query_embed.unsqueeze(1).repeat(1, src.shape[0], 1)
        return self.decode(enc, query_pos.new_zeros(query_pos.shape), query_pos, tgt_mask)
