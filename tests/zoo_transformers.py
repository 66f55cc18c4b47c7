"""Small models in the style of the ones people download: a BERT-style encoder, a GPT-2-style
decoder, a ViT and a timm-style CNN (squeeze-excite, hardswish, shape reads). Random weights,
CI-sized. The transformers use Python that torch.fx's symbolic tracing cannot follow (iterating
over a shape, item assignment, a loop over a tensor's size), as Hugging Face's models do: they take
optimize()'s torch.export route.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        shape = list(x.shape)                                    # (B, T, D): item assignment below
        b, t, d = shape
        q, k, v = (y.view(b, t, self.heads, d // self.heads).transpose(1, 2) for y in self.qkv(x).split(d, -1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)   # (B, H, T, T)
        if self.causal:
            scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        if mask is not None:
            scores = scores + (1.0 - mask[:, None, None, :]) * -10000.0
        y = (scores.softmax(-1) @ v).transpose(1, 2)
        shape[-1] = d
        return self.out(y.reshape(shape))


def new_gelu(x: torch.Tensor) -> torch.Tensor:  # Hugging Face's NewGELUActivation (GPT-2), as written there
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool = False, pre_norm: bool = False, gelu=None):
        super().__init__()
        self.pre_norm, self.gelu = pre_norm, gelu or (lambda y: F.gelu(y, approximate="tanh"))
        self.attn = SelfAttention(dim, heads, causal)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_norm:                                        # GPT-2, ViT
            x = x + self.attn(self.ln1(x), mask)
            return x + self.fc2(self.gelu(self.fc1(self.ln2(x))))
        x = self.ln1(x + self.attn(x, mask))                     # BERT
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))


class BertStyle(nn.Module):
    def __init__(self, vocab: int = 100, dim: int = 32, heads: int = 4, layers: int = 2, positions: int = 64):
        super().__init__()
        self.words, self.positions = nn.Embedding(vocab, dim), nn.Embedding(positions, dim)
        self.ln = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.pooler = nn.Linear(dim, dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length = ids.shape
        x = self.ln(self.words(ids) + self.positions(torch.arange(length)))
        for layer in self.layers:
            x = layer(x, mask)
        return x, torch.tanh(self.pooler(x[:, 0]))


class GPT2Style(nn.Module):
    def __init__(self, vocab: int = 100, dim: int = 32, heads: int = 4, layers: int = 2, positions: int = 64):
        super().__init__()
        self.words, self.positions = nn.Embedding(vocab, dim), nn.Embedding(positions, dim)
        self.layers = nn.ModuleList(Block(dim, heads, causal=True, pre_norm=True, gelu=new_gelu) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.words(ids) + self.positions(torch.arange(ids.shape[1]))
        for layer in self.layers:
            x = layer(x)
        return self.ln(x) @ self.words.weight.T                 # tied output embedding: (B, T, vocab)


class ViTStyle(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, layers: int = 2, patch: int = 4, image: int = 16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.layers = nn.ModuleList(Block(dim, heads, pre_norm=True) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)             # (B, N, D)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.head(self.ln(x)[:, 0])


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(channels, channels // 4, 1), nn.Conv2d(channels // 4, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.hardsigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


class TimmStyleCNN(nn.Module):
    """MobileNetV3-like: depthwise separable blocks with squeeze-excite and hardswish, timm's shape checks."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.se = SqueezeExcite(16)
        self.pw = nn.Sequential(nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expected (N, C, H, W)")
        n, c, h, w = x.shape
        y = self.pw(self.se(self.dw(self.stem(x))))
        return self.head(F.hardswish(y).reshape(n, 24, -1).mean(-1))


TRANSFORMER_ZOO = {
    "bert_style": (BertStyle, lambda n: (torch.randint(0, 100, (n, 12)), torch.ones(n, 12))),
    "gpt2_style": (GPT2Style, lambda n: (torch.randint(0, 100, (n, 12)),)),
    "vit_style": (ViTStyle, lambda n: (torch.randn(n, 3, 16, 16),)),
    "timm_style_cnn": (TimmStyleCNN, lambda n: (torch.randn(n, 3, 16, 16),)),
}
