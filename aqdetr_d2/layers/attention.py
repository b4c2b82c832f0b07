"""Multi-head attention written out step by step, so every tensor can be quantized and
the attention map read for distillation.

Quantization points are `nn.Identity` placeholders (`q_quant`, `k_quant`, `v_quant`,
`attn_quant`) that `aqdetr_d2.quant.quantize_model` swaps for quantizers; in a float
model they cost nothing. The map returned beside the output is the softmax before
`attn_quant`: a low-bit map holds exact zeros where the teacher's has mass, so a KL to it
is unbounded and, through the straight-through estimator, so is its gradient.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MultiheadAttention(nn.Module):
    """Sequence-first multi-head attention, numerically equal to `nn.MultiheadAttention`.

    Checkpoints in `nn.MultiheadAttention` layout (`in_proj_weight`, `in_proj_bias`) load
    directly: they are split into `q_proj`, `k_proj`, `v_proj` when the state dict is read.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim ** -0.5
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.attn_drop = nn.Dropout(dropout)
        self.q_quant = nn.Identity()
        self.k_quant = nn.Identity()
        self.v_quant = nn.Identity()
        self.attn_quant = nn.Identity()
        self._reset_parameters()

    def _reset_parameters(self):
        # Same initialisation as nn.MultiheadAttention (xavier on the packed in-projection).
        in_proj = torch.empty(3 * self.embed_dim, self.embed_dim)
        nn.init.xavier_uniform_(in_proj)
        for proj, w in zip((self.q_proj, self.k_proj, self.v_proj), in_proj.chunk(3)):
            proj.weight.data.copy_(w)
            nn.init.zeros_(proj.bias)
        nn.init.zeros_(self.out_proj.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("weight", "bias"):
            packed = state_dict.pop(prefix + "in_proj_" + name, None)
            if packed is not None:
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), packed.chunk(3)):
                    state_dict[f"{prefix}{proj}.{name}"] = part
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _split_heads(self, x: Tensor) -> Tensor:
        """(L, B, C) -> (B, H, L, d)."""
        length, batch, _ = x.shape
        return x.reshape(length, batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor = None,
                attn_mask: Tensor = None):
        """
        Args:
            query: (L, B, C); key, value: (S, B, C).
            key_padding_mask: (B, S) bool, True where the key is padding.
            attn_mask: (L, S) or (B * H, L, S) bool (True = blocked) or additive float.
        Returns:
            output (L, B, C) and the attention probabilities (B, H, L, S), before `attn_quant`.
        """
        length, batch, _ = query.shape
        q = self.q_quant(self._split_heads(self.q_proj(query) * self.scaling))
        k = self.k_quant(self._split_heads(self.k_proj(key)))
        v = self.v_quant(self._split_heads(self.v_proj(value)))
        # The masks go in place: the product's backward does not read the scores, and the
        # encoder's maps are the largest tensors of a step, whose fresh allocations cost more than the adds.
        scores = q @ k.transpose(-2, -1)  # (B, H, L, S)
        if attn_mask is not None:
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.view(batch, self.num_heads, length, -1)
            if attn_mask.dtype == torch.bool:
                scores.masked_fill_(attn_mask, float("-inf"))
            else:
                scores.add_(attn_mask)
        if key_padding_mask is not None:
            # Added as 0 / -inf per key, which gives the same scores as masked_fill: ONNX Runtime
            # broadcasts an Add fast and a Where slowly (40 % of an exported DETR's time).
            padding = torch.zeros_like(key_padding_mask, dtype=scores.dtype).masked_fill(key_padding_mask, float("-inf"))
            scores.add_(padding[:, None, None, :])
        probs = F.softmax(scores, dim=-1)
        out = self.attn_drop(self.attn_quant(probs)) @ v  # (B, H, L, d)
        out = out.permute(2, 0, 1, 3).reshape(length, batch, self.embed_dim)
        return self.out_proj(out), probs
