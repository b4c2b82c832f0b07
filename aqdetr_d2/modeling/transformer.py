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


def _with_pos(x: Tensor, pos: Optional[Tensor]) -> Tensor:
    return x if pos is None else x + pos


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
                memory_key_padding_mask: Tensor = None, pos: Tensor = None, query_pos: Tensor = None):
        """
        tgt, query_pos: (Q, B, C); memory, pos: (S, B, C); tgt_mask (Q, Q) bool, True = blocked;
        memory_key_padding_mask (B, S) -> (output (Q, B, C), self-attn (B, H, Q, Q),
        cross-attn (B, H, Q, S)).
        """
        pre = self.normalize_before
        x = self.norm1(tgt) if pre else tgt
        q = k = _with_pos(x, query_pos)
        out, self_attn = self.self_attn(q, k, x, attn_mask=tgt_mask)
        tgt = tgt + self.dropout1(out)
        tgt = tgt if pre else self.norm1(tgt)
        x = self.norm2(tgt) if pre else tgt
        out, cross_attn = self.multihead_attn(_with_pos(x, query_pos), _with_pos(memory, pos), memory,
                                              key_padding_mask=memory_key_padding_mask)
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
    def __init__(self, layer: nn.Module, num_layers: int, norm: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm

    def forward(self, tgt, memory, tgt_mask=None, memory_key_padding_mask=None, pos=None,
                query_pos=None):
        """-> lists per layer of normalized outputs (Q, B, C), raw outputs (the next layer's
        input), self-attention maps and cross-attention maps."""
        states, raw_states, self_attns, cross_attns = [], [], [], []
        for layer in self.layers:
            tgt, self_attn, cross_attn = layer(tgt, memory, tgt_mask=tgt_mask,
                                               memory_key_padding_mask=memory_key_padding_mask,
                                               pos=pos, query_pos=query_pos)
            raw_states.append(tgt)
            states.append(self.norm(tgt))
            self_attns.append(self_attn)
            cross_attns.append(cross_attn)
        return states, raw_states, self_attns, cross_attns


class Transformer(nn.Module):
    """DETR's transformer. The decoder always returns every layer's (normalized) output."""

    def __init__(self, d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
                 dim_feedforward=2048, dropout=0.1, normalize_before=False):
        super().__init__()
        enc_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, normalize_before)
        self.encoder = TransformerEncoder(enc_layer, num_encoder_layers,
                                          nn.LayerNorm(d_model) if normalize_before else None)
        dec_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, normalize_before)
        self.decoder = TransformerDecoder(dec_layer, num_decoder_layers, nn.LayerNorm(d_model))
        self.d_model = d_model
        self.nhead = nhead
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor,
                tgt_mask: Tensor = None) -> Dict[str, List[Tensor]]:
        """
        Args:
            src: (B, C, H, W) projected features; mask: (B, H, W) bool, True on padding.
            query_embed: (Q, C) learned query positions; pos_embed: (B, C, H, W).
            tgt_mask: (Q, Q) bool, True where query i must not attend to query j.
        Returns:
            dict with "hs" (L, B, Q, C) normalized decoder outputs, "memory" (S, B, C),
            "enc_states" and "enc_attn" (per encoder layer, (S, B, C) and (B, H, S, S)),
            "dec_raw_states" (per decoder layer (Q, B, C), before the shared norm),
            "dec_self_attn" and "dec_cross_attn" (per decoder layer), and the layer inputs
            "enc_input" (S, B, C), "pos" (S, B, C), "mask" (B, S), "query_pos" (Q, B, C), "tgt" (Q, B, C).
        """
        batch = src.shape[0]
        src = src.flatten(2).permute(2, 0, 1)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        mask = mask.flatten(1)
        query_pos = query_embed.unsqueeze(1).repeat(1, batch, 1)
        tgt = query_pos.new_zeros(query_pos.shape)
        memory, enc_states, enc_attn = self.encoder(src, src_key_padding_mask=mask, pos=pos_embed)
        states, raw_states, self_attn, cross_attn = self.decoder(
            tgt, memory, tgt_mask=tgt_mask, memory_key_padding_mask=mask, pos=pos_embed, query_pos=query_pos)
        hs = torch.stack(states).transpose(1, 2)  # (L, Q, B, C) -> (L, B, Q, C)
        return {"hs": hs, "memory": memory, "enc_states": enc_states, "enc_attn": enc_attn,
                "dec_raw_states": raw_states, "dec_self_attn": self_attn, "dec_cross_attn": cross_attn,
                "enc_input": src, "pos": pos_embed, "mask": mask, "query_pos": query_pos, "tgt": tgt}

