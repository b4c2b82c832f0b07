"""Small float models with quantization points, for the quantization tests."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import Conv2d, FrozenBatchNorm2d


class ToyMultiheadAttention(nn.Module):
    """Minimal copy of the project's sequence-first attention, with its quantization points."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.q_quant = nn.Identity()
        self.k_quant = nn.Identity()
        self.v_quant = nn.Identity()
        self.attn_quant = nn.Identity()

    def split_heads(self, x):
        """(L, B, C) -> (B, H, L, d)."""
        length, batch, _ = x.shape
        return x.reshape(length, batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    def forward(self, query, key, value):
        """query (L, B, C), key / value (S, B, C) -> (L, B, C) and attention (B, H, L, S)."""
        length, batch, dim = query.shape
        q = self.q_quant(self.split_heads(self.q_proj(query) * self.scaling))
        k = self.k_quant(self.split_heads(self.k_proj(key)))
        v = self.v_quant(self.split_heads(self.v_proj(value)))
        attn = self.attn_quant(F.softmax(q @ k.transpose(-2, -1), dim=-1))
        out = (attn @ v).permute(2, 0, 1, 3).reshape(length, batch, dim)
        return self.out_proj(out), attn


class ToyEncoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.self_attn = ToyMultiheadAttention(dim, num_heads)
        self.linear1 = nn.Linear(dim, 2 * dim)
        self.linear2 = nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.norm(x + self.self_attn(x, x, x)[0])
        return x + self.linear2(F.relu(self.linear1(x)))


class ToyDetector(nn.Module):
    """Conv backbone (Detectron2 stem with norm and activation) -> 1x1 projection -> encoder -> heads."""

    def __init__(self, dim: int = 16, num_heads: int = 4):
        super().__init__()
        self.backbone = nn.Sequential(
            Conv2d(3, 8, 3, padding=1, bias=False, norm=FrozenBatchNorm2d(8), activation=F.relu),
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.input_proj = nn.Conv2d(8, dim, 1)
        self.encoder = nn.ModuleList([ToyEncoderLayer(dim, num_heads) for _ in range(2)])
        self.class_embed = nn.Linear(dim, 5)
        self.bbox_embed = nn.Linear(dim, 4)

    def forward(self, images):
        """images (B, 3, H, W) -> class logits (B, H*W/4, 5) and boxes (B, H*W/4, 4)."""
        x = self.input_proj(self.backbone(images)).flatten(2).permute(2, 0, 1)  # (L, B, C)
        for layer in self.encoder:
            x = layer(x)
        x = x.transpose(0, 1)
        return self.class_embed(x), self.bbox_embed(x).sigmoid()


@pytest.fixture
def toy_attention():
    """`toy_attention(dim, num_heads)`: a float attention module with quantization points."""
    return ToyMultiheadAttention


@pytest.fixture
def toy_detector():
    """`toy_detector()`: a small float detector-like model."""

    def make(**kwargs):
        model = ToyDetector(**kwargs)
        # Non-trivial frozen BN statistics, so that keeping `norm` is visible in the outputs.
        norm = model.backbone[0].norm
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
        norm.running_mean.uniform_(-0.1, 0.1)
        norm.running_var.uniform_(0.5, 2.0)
        return model

    return make


@pytest.fixture
def images():
    return torch.randn(2, 3, 8, 8)
