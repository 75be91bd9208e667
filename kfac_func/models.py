"""Example models for the demo and the layer-coverage tests: a ResNet-style CNN with BatchNorm and skip
connections, and a small character-level transformer language model (``nn.TransformerEncoderLayer``:
packed multi-head attention, LayerNorm, token and position embeddings). Every parameter of both is
tracked (see :func:`kfac_func.describe`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ResidualBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``; a 1×1 conv + BatchNorm shortcut when the
    shape changes. No in-place ops (they would break autograd through the shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


def resnet(side: int, classes: int, width: int = 16, channels: int = 1) -> nn.Module:
    """A small ResNet on flattened ``channels × side × side`` images: stem, two residual blocks (the
    second downsamples), global average pooling and a linear classifier."""
    return nn.Sequential(
        nn.Unflatten(1, (channels, side, side)),
        nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        ResidualBlock(width, width), ResidualBlock(width, 2 * width, stride=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes),
    )


class CharTransformer(nn.Module):
    """A causal character-level transformer: token + position embeddings, pre-norm encoder layers with a
    causal mask, a final LayerNorm and a linear head. ``(N, L)`` indices → ``(N, vocab, L)`` logits, the
    layout ``F.cross_entropy`` takes for a per-position (sequence) loss."""

    def __init__(self, vocab: int, context: int, dim: int = 32, heads: int = 4, layers: int = 2):
        super().__init__()
        self.token = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        n, length = idx.shape
        positions = torch.arange(length, device=idx.device).expand(n, length)  # batch-first, like the tokens
        h = self.token(idx) + self.position(positions)
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=idx.device, dtype=h.dtype)
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h)).transpose(1, 2)
