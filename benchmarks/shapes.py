"""Benchmark shapes: where batch norm sits in real networks.

Each `Case` is one input shape (N, C, *spatial). `count` is how many BatchNorm layers of that shape a
ResNet-50 has (torchvision layout, 224x224 input; 53 layers in all); it weights the per-network totals.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]  # (N, C, *spatial)
    group: str
    count: int = 1

    @property
    def ndim_bn(self) -> int:
        """1, 2 or 3: which BatchNormNd takes this input (BatchNorm1d takes both (N, C) and (N, C, L))."""
        return max(1, len(self.shape) - 2)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def has_layouts(self) -> bool:
        """(N, C) has one layout; everything with a spatial dim also has a channels-last one."""
        return len(self.shape) >= 3


# (C, H, W, number of such BN layers in ResNet-50)
_RN50 = [
    (64, 112, 112, 1),
    (64, 56, 56, 6),
    (256, 56, 56, 4),
    (128, 56, 56, 1),
    (128, 28, 28, 7),
    (512, 28, 28, 5),
    (256, 28, 28, 1),
    (256, 14, 14, 11),
    (1024, 14, 14, 7),
    (512, 14, 14, 1),
    (512, 7, 7, 5),
    (2048, 7, 7, 4),
]
assert sum(c[3] for c in _RN50) == 53


def _rn50(batch: int) -> list[Case]:
    return [Case(f"rn50_b{batch}_{c}x{h}x{w}", (batch, c, h, w), f"rn50_b{batch}", k) for c, h, w, k in _RN50]


FULL: list[Case] = [
    *_rn50(32),
    *_rn50(128),
    # MobileNetV2 inverted-residual blocks (BN after the expanded depthwise conv), batch 64
    Case("mbv2_b64_96x112x112", (64, 96, 112, 112), "depthwise"),
    Case("mbv2_b64_144x56x56", (64, 144, 56, 56), "depthwise"),
    Case("mbv2_b64_384x14x14", (64, 384, 14, 14), "depthwise"),
    Case("mbv2_b64_960x7x7", (64, 960, 7, 7), "depthwise"),
    # few channels, large images (segmentation / super-resolution stems): one CTA per channel starves SMs
    Case("smallc_b16_8x512x512", (16, 8, 512, 512), "small_c"),
    Case("smallc_b8_3x1024x1024", (8, 3, 1024, 1024), "small_c"),
    Case("smallc_b32_16x256x256", (32, 16, 256, 256), "small_c"),
    # BatchNorm1d: MLP features (N, C) and sequences (N, C, L)
    Case("bn1d_8192x1024", (8192, 1024), "bn1d"),
    Case("bn1d_65536x256", (65536, 256), "bn1d"),
    Case("bn1d_64x256x1024", (64, 256, 1024), "bn1d_seq"),
    Case("bn1d_32x512x256", (32, 512, 256), "bn1d_seq"),
    # BatchNorm3d: video (R(2+1)D / I3D-style clip of 16 frames)
    Case("bn3d_b8_64x16x56x56", (8, 64, 16, 56, 56), "bn3d"),
    Case("bn3d_b8_256x8x28x28", (8, 256, 8, 28, 28), "bn3d"),
]

_QUICK_NAMES = [
    "rn50_b32_64x112x112",
    "rn50_b32_256x56x56",
    "rn50_b32_2048x7x7",
    "mbv2_b64_144x56x56",
    "smallc_b16_8x512x512",
    "bn1d_8192x1024",
    "bn1d_64x256x1024",
    "bn3d_b8_64x16x56x56",
]
QUICK: list[Case] = [c for c in FULL if c.name in _QUICK_NAMES]
assert len(QUICK) == len(_QUICK_NAMES)

# Interpreter-sized (a few hundred elements each): the Triton interpreter runs ~1M elements/s.
SMOKE: list[Case] = [
    Case("smoke_2d_2x4x6x6", (2, 4, 6, 6), "smoke"),
    Case("smoke_1d_16x5", (16, 5), "smoke"),
    Case("smoke_1d_3x4x7", (3, 4, 7), "smoke"),
    Case("smoke_3d_2x3x2x3x4", (2, 3, 2, 3, 4), "smoke"),
]


def select(cases: list[Case], patterns: str | None) -> list[Case]:
    """Keep cases whose name or group matches any comma-separated pattern (glob, or plain substring)."""
    if not patterns:
        return list(cases)
    pats = [p.strip() for p in patterns.split(",") if p.strip()]

    def hit(c: Case) -> bool:
        return any(
            fnmatch.fnmatchcase(c.name, p) or fnmatch.fnmatchcase(c.group, p) or p in c.name for p in pats
        )

    return [c for c in cases if hit(c)]
