"""Gradient shapes of real models, built without downloading anything (and without torchvision)."""

from __future__ import annotations

import torch
from torch import nn


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """The 148 parameter shapes of GPT-2 small (124.4M values; the LM head is tied to the token embedding)."""
    shapes: list[tuple[int, ...]] = [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,)]  # ln_1, attn.c_attn, attn.c_proj
        shapes += [(768,), (768,), (768, 3072), (3072,), (3072, 768), (768,)]  # ln_2, mlp.c_fc, mlp.c_proj
    shapes += [(768,), (768,)]  # ln_f
    return shapes


def small_shapes(n: int = 5000, seed: int = 0) -> list[tuple[int, ...]]:
    """``n`` 1-d tensors of 16..2047 values."""
    g = torch.Generator().manual_seed(seed)
    return [(int(s),) for s in torch.randint(16, 2048, (n,), generator=g)]


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int, downsample: bool) -> None:
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) if downsample else None
        )


def resnet50() -> nn.Module:
    """A ResNet-50 with torchvision's parameter layout (161 tensors, 25.6M values); only the parameters matter."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)]
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for b in range(blocks):
            layers.append(_Bottleneck(cin, width, stride if b == 0 else 1, downsample=b == 0))
            cin = width * 4
    layers.append(nn.Linear(2048, 1000))
    return nn.Sequential(*layers)


def llama_1b_shapes() -> list[tuple[int, ...]]:
    """The 146 parameter shapes of a Llama-3.2-1B-style model (1.24B values; the LM head tied to the embedding):
    d=2048, 16 layers, 32 query / 8 key-value heads of 64, MLP 8192, vocabulary 128256."""
    shapes: list[tuple[int, ...]] = [(128256, 2048)]
    for _ in range(16):
        shapes += [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048)]  # q, k, v, o
        shapes += [(8192, 2048), (8192, 2048), (2048, 8192)]  # gate, up, down
        shapes += [(2048,), (2048,)]  # input and post-attention RMSNorm
    shapes.append((2048,))  # final norm
    return shapes


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The 161 parameter shapes of :func:`resnet50` (25.6M values)."""
    return [tuple(p.shape) for p in resnet50().parameters()]


def tiny_shapes(n: int, seed: int = 0) -> list[tuple[int, ...]]:
    """``n`` 1-d tensors of 1..64 values (biases, norm scales, gates)."""
    g = torch.Generator().manual_seed(seed)
    return [(int(s),) for s in torch.randint(1, 65, (n,), generator=g)]


def medium_shapes(n: int = 64, seed: int = 0) -> list[tuple[int, ...]]:
    """``n`` 2-d tensors of 16K..64K values each (rows of 128), the old CPU concatenation-cutoff cliff."""
    g = torch.Generator().manual_seed(seed)
    return [(int(s), 128) for s in torch.randint(128, 513, (n,), generator=g)]


def total_size_shapes(total: int, per_tensor: int = 1 << 22) -> list[tuple[int, ...]]:
    """``total`` values as 2-d tensors of at most ``per_tensor`` values (rows of 1024)."""
    shapes: list[tuple[int, ...]] = []
    left = total
    while left > 0:
        n = min(left, per_tensor)
        shapes.append((max(1, n // 1024), 1024) if n >= 1024 else (n,))
        left -= shapes[-1][0] * (shapes[-1][1] if len(shapes[-1]) == 2 else 1)
    return shapes
