"""Deformable-DETR encoder / decoder (Zhu et al. 2021), with every layer's output exposed.

Module and parameter names mirror fundamentalvision/Deformable-DETR, so an official checkpoint
loads after prefix changes and the q/k/v split of the decoder self-attention (done by
`MultiheadAttention` itself). Differences from the official code, all without effect on
the numbers:
- the transformer returns a dict with the per-layer encoder states and attention weights,
  the decoder attention maps and the flattened inputs, so distillation can read them;
- the decoder self-attention takes an optional mask (auxiliary query groups), and two-stage
  can select extra proposals for auxiliary queries (`num_aux_proposals`);
- the two-stage query position embedding has d_model / 2 frequencies per coordinate
  (the official code hard-codes 128, which is the same for d_model = 256 and wrong otherwise).

Iterative box refinement and two-stage read the prediction heads from `decoder.bbox_embed`
and `decoder.class_embed`, which `DeformableDETR` sets (the official "hack").
"""
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..layers.attention import MultiheadAttention
from ..layers.ms_deform_attn import MSDeformAttn, spatial_shapes_tensor
from ..layers.proposals import box_sine_embed, encoder_proposals
from .deformable_layers import (DeformableTransformerDecoder, DeformableTransformerDecoderLayer,
                                DeformableTransformerEncoder, DeformableTransformerEncoderLayer)


class DeformableTransformer(nn.Module):
    """Encoder + decoder of Deformable-DETR on multi-scale features, with optional two-stage queries.

    Args:
        d_model, nhead: width and number of heads.
        num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, activation ("relu"/"gelu").
        num_feature_levels: number of input levels.
        dec_n_points, enc_n_points: sampling points per head and level.
        two_stage: decoder queries are the top-scoring encoder proposals (needs the heads set
            by `DeformableDETR` on `decoder.class_embed` / `decoder.bbox_embed`).
        two_stage_num_proposals: number of proposals kept, i.e. decoder queries, in two-stage.
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 1024, dropout: float = 0.1,
                 activation: str = "relu", num_feature_levels: int = 4, dec_n_points: int = 4,
                 enc_n_points: int = 4, two_stage: bool = False, two_stage_num_proposals: int = 300):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.num_feature_levels = num_feature_levels
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals

        encoder_layer = DeformableTransformerEncoderLayer(d_model, dim_feedforward, dropout, activation,
                                                          num_feature_levels, nhead, enc_n_points)
        self.encoder = DeformableTransformerEncoder(encoder_layer, num_encoder_layers)
        decoder_layer = DeformableTransformerDecoderLayer(d_model, dim_feedforward, dropout, activation,
                                                          num_feature_levels, nhead, dec_n_points)
        self.decoder = DeformableTransformerDecoder(decoder_layer, num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            # MSDeformAttn has its own scheme; MultiheadAttention redoes nn.MultiheadAttention's
            # xavier on the packed (3C, C) in-projection, which the loop above applied per (C, C).
            if isinstance(m, (MSDeformAttn, MultiheadAttention)):
                m._reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def get_proposal_pos_embed(self, proposals: Tensor) -> Tensor:
        """(B, K, 4) unnormalized (logit) boxes -> (B, K, 2 * d_model) sine embedding of the sigmoid."""
        return box_sine_embed(proposals.sigmoid(), self.d_model // 2)

    def gen_encoder_output_proposals(self, memory: Tensor, memory_padding_mask: Tensor, spatial_shapes: Tensor
                                     ) -> Tuple[Tensor, Tensor]:
        """The encoder proposals (`encoder_proposals`) and the memory features that score them.

        Args:
            memory: (B, S, C); memory_padding_mask: (B, S) bool; spatial_shapes: (n_levels, 2).
        Returns:
            output_memory (B, S, C), the memory through `enc_output` + `enc_output_norm` (zeroed
            first at padding and invalid proposals), and output_proposals (B, S, 4) from
            `encoder_proposals`.
        """
        output_proposals, valid = encoder_proposals(memory_padding_mask, spatial_shapes)
        output_memory = self.enc_output_norm(self.enc_output(memory.masked_fill(~valid, 0.0)))
        return output_memory, output_proposals

    @staticmethod
    def get_valid_ratio(mask: Tensor) -> Tensor:
        """(B, H, W) bool padding mask -> (B, 2) valid fraction (w, h) of the padded map."""
        _, h, w = mask.shape
        valid_h = torch.sum(~mask[:, :, 0], 1)
        valid_w = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)

    def forward(self, srcs: List[Tensor], masks: List[Tensor], pos_embeds: List[Tensor],
                query_embed: Optional[Tensor] = None, self_attn_mask: Optional[Tensor] = None,
                num_aux_proposals: int = 0) -> Dict[str, Any]:
        """
        Args:
            srcs: per level (B, C, H_l, W_l) projected features.
            masks: per level (B, H_l, W_l) bool, True on padding.
            pos_embeds: per level (B, C, H_l, W_l) position embeddings.
            query_embed: (Q, 2C) learned queries, [position | content]; required unless two-stage.
            self_attn_mask: (Q, Q) bool, True = blocked, for the decoder self-attention.
            num_aux_proposals: two-stage only: select the top `two_stage_num_proposals +
                num_aux_proposals` proposals (H-DETR); the first `two_stage_num_proposals`, the
                object queries, are those selected without auxiliary ones.
        Returns:
            dict with
            - "hs": (L_dec, B, Q, C) decoder outputs of every layer;
            - "init_reference": (B, Q, 2) (or (B, Q, 4) two-stage) references of the first layer;
            - "inter_references": (L_dec, B, Q, 2 or 4) references after each layer;
            - "enc_outputs_class": (B, S, num_classes), "enc_outputs_coord_unact": (B, S, 4)
              logit boxes (+inf where invalid) of the two-stage proposals, None otherwise;
            - "enc_states": per encoder layer (B, S, C); "enc_attn_weights": per encoder layer
              (B, S, n_heads, n_levels, enc_n_points);
            - "dec_self_attn": per decoder layer (B, n_heads, Q, Q); "dec_cross_attn_weights":
              per decoder layer (B, Q, n_heads, n_levels, dec_n_points);
            - "memory": (B, S, C) encoder output; "src_flatten": (B, S, C) encoder input;
              "pos_flatten": (B, S, C) level + position embeddings; "mask_flatten": (B, S);
              "spatial_shapes": (n_levels, 2) long; "level_start_index": (n_levels,);
              "valid_ratios": (B, n_levels, 2);
            - "query_pos", "tgt": (B, Q, C) decoder query position embedding and initial content.
        """
        if not self.two_stage and query_embed is None:
            raise ValueError("query_embed is required unless two_stage=True")
        if num_aux_proposals and not self.two_stage:
            raise ValueError("num_aux_proposals is for two-stage; pass auxiliary queries in query_embed")
        if not (len(srcs) == len(masks) == len(pos_embeds) == self.num_feature_levels):
            raise ValueError(f"expected {self.num_feature_levels} levels of srcs / masks / pos_embeds, "
                             f"got {len(srcs)} / {len(masks)} / {len(pos_embeds)}")

        src_flatten, mask_flatten, pos_flatten, shapes = [], [], [], []
        for lvl, (src, mask, pos_embed) in enumerate(zip(srcs, masks, pos_embeds)):
            shapes.append(src.shape[-2:])
            src_flatten.append(src.flatten(2).transpose(1, 2))
            mask_flatten.append(mask.flatten(1))
            pos_flatten.append(pos_embed.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src_flatten = torch.cat(src_flatten, 1)
        mask_flatten = torch.cat(mask_flatten, 1)
        pos_flatten = torch.cat(pos_flatten, 1)
        spatial_shapes = spatial_shapes_tensor(shapes, src_flatten.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self.get_valid_ratio(m) for m in masks], 1)

        enc_states, enc_attn_weights = self.encoder(src_flatten, spatial_shapes, level_start_index, valid_ratios,
                                                    pos_flatten, mask_flatten)
        memory = enc_states[-1] if enc_states else src_flatten

        batch, _, c = memory.shape
        enc_outputs_class = enc_outputs_coord_unact = None
        if self.two_stage:
            if self.decoder.class_embed is None or self.decoder.bbox_embed is None:
                raise RuntimeError("two-stage needs decoder.class_embed and decoder.bbox_embed "
                                   "(DeformableDETR sets them)")
            output_memory, output_proposals = self.gen_encoder_output_proposals(memory, mask_flatten, spatial_shapes)
            # The heads after the last decoder layer's score the proposals.
            enc_outputs_class = self.decoder.class_embed[self.decoder.num_layers](output_memory)
            enc_outputs_coord_unact = self.decoder.bbox_embed[self.decoder.num_layers](output_memory) + output_proposals
            # Ranked by the first class's score, as in the official code.
            num_proposals = self.two_stage_num_proposals + num_aux_proposals
            if num_proposals > memory.shape[1]:
                raise ValueError(f"two-stage selects {num_proposals} proposals (object + auxiliary queries) "
                                 f"but the encoder has only {memory.shape[1]} positions; use larger images "
                                 "or fewer queries")
            topk = torch.topk(enc_outputs_class[..., 0], num_proposals, dim=1)[1]
            topk_coords_unact = torch.gather(enc_outputs_coord_unact, 1, topk[..., None].expand(-1, -1, 4))
            # No gradient from the decoder into the proposal boxes: they are supervised by the
            # encoder loss only.
            topk_coords_unact = topk_coords_unact.detach()
            reference_points = topk_coords_unact.sigmoid()
            pos_trans_out = self.pos_trans_norm(self.pos_trans(self.get_proposal_pos_embed(topk_coords_unact)))
            query_pos, tgt = torch.split(pos_trans_out, c, dim=2)
        else:
            query_pos, tgt = torch.split(query_embed, c, dim=1)
            query_pos = query_pos[None].expand(batch, -1, -1)
            tgt = tgt[None].expand(batch, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
        init_reference = reference_points

        hs, inter_references, dec_self_attn, dec_cross_attn_weights = self.decoder(
            tgt, reference_points, memory, spatial_shapes, level_start_index, valid_ratios, query_pos,
            mask_flatten, self_attn_mask)

        return {
            "hs": hs,
            "init_reference": init_reference,
            "inter_references": inter_references,
            "enc_outputs_class": enc_outputs_class,
            "enc_outputs_coord_unact": enc_outputs_coord_unact,
            "enc_states": enc_states,
            "enc_attn_weights": enc_attn_weights,
            "dec_self_attn": dec_self_attn,
            "dec_cross_attn_weights": dec_cross_attn_weights,
            "memory": memory,
            "src_flatten": src_flatten,
            "pos_flatten": pos_flatten,
            "mask_flatten": mask_flatten,
            "spatial_shapes": spatial_shapes,
            "level_start_index": level_start_index,
            "valid_ratios": valid_ratios,
            "query_pos": query_pos,
            "tgt": tgt,
        }
