"""Pure BatchNorm folding arithmetic, shared by the module and the ONNX passes.

Everything is computed in float64 and returned in float64; callers cast once to the layer's dtype,
so an fp16 fold equals the exact fold rounded once (folding step by step in fp16 loses 1-2 ulps).

Eval-mode BN is the per-channel affine map ``y = x * s + t`` with
``s = gamma / sqrt(running_var + eps)`` and ``t = beta - running_mean * s``.

Weight layouts (``kind``), one table for every layer form:

* ``"conv"``: ``[Cout, Cin/g, k...]``: Conv1d/2d/3d, Linear ``[out, in]``, Gemm with transB=1.
* ``"conv_transpose"``: ``[Cin, Cout/g, k...]``: ConvTranspose1d/2d/3d, Gemm with transB=0 and
  MatMul ``[in, out]`` (both with g=1).

For a grouped weight, element ``[a, b, ...]`` belongs to one output and one input channel; the
table below gives, for the first two axes, which axis indexes the channel directly and which one
is an offset inside a group.
"""

from __future__ import annotations

import numpy as np

# kind -> (axis that holds the output channel, axis that holds the input channel).  The axis that
# does not hold a channel directly is a within-group offset; the group comes from the other axis.
CHANNEL_AXES = {"conv": (0, 1), "conv_transpose": (1, 0)}


def bn_scale_shift(running_mean, running_var, eps, weight=None, bias=None):
    """Return ``(s, t)`` in float64 for an eval-mode BN (``weight``/``bias`` None when affine=False)."""
    mean = np.asarray(running_mean, dtype=np.float64)
    var = np.asarray(running_var, dtype=np.float64)
    gamma = np.ones_like(mean) if weight is None else np.asarray(weight, dtype=np.float64)
    beta = np.zeros_like(mean) if bias is None else np.asarray(bias, dtype=np.float64)
    s = gamma / np.sqrt(var + float(eps))
    return s, beta - mean * s


def out_channels(shape, kind: str, groups: int = 1) -> int:
    return shape[0] if kind == "conv" else shape[1] * groups


def in_channels(shape, kind: str, groups: int = 1) -> int:
    return shape[1] * groups if kind == "conv" else shape[0]


def channel_index(shape, kind: str, side: str, groups: int = 1) -> np.ndarray:
    """Channel (output or input, ``side`` in {"out", "in"}) of every ``[a, b]`` weight position.

    Returns an int array of shape ``shape[:2] + (1,) * (len(shape) - 2)``, ready to index a
    per-channel vector and broadcast against the weight.
    """
    if kind not in CHANNEL_AXES:
        raise ValueError(f"unknown layer kind {kind!r}")
    if len(shape) < 2:
        raise ValueError(f"weight must have at least 2 dims, got shape {tuple(shape)}")
    direct_axis = CHANNEL_AXES[kind][0 if side == "out" else 1]
    other_axis = 1 - direct_axis
    a, b = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    pos = (a, b)
    if direct_axis == 0:
        # channel indexed directly by axis 0 (conv out / conv_transpose in)
        idx = pos[0]
    else:
        # channel = group * (axis-1 length) + offset; the group comes from the axis-0 position
        per_group_other = shape[other_axis] // groups
        idx = (pos[other_axis] // per_group_other) * shape[direct_axis] + pos[direct_axis]
    return idx.reshape(tuple(shape[:2]) + (1,) * (len(shape) - 2))


def _check_groups(shape, groups: int) -> None:
    if groups < 1 or shape[0] % groups:
        raise ValueError(f"weight axis 0 ({shape[0]}) is not divisible by groups={groups}")


def fold_after(weight, bias, s, t, kind: str = "conv", groups: int = 1):
    """Fold a BN that follows the layer: ``W' = W * s[out]``, ``b' = b * s + t``. float64 results."""
    w = np.asarray(weight, dtype=np.float64)
    _check_groups(w.shape, groups)
    n_out = out_channels(w.shape, kind, groups)
    if len(s) != n_out:
        raise ValueError(f"BN has {len(s)} channels but the layer has {n_out} outputs")
    b = np.zeros(n_out) if bias is None else np.asarray(bias, dtype=np.float64)
    w_new = w * s[channel_index(w.shape, kind, "out", groups)]
    return w_new, b * s + t


def fold_before(weight, bias, s, t, kind: str = "conv", groups: int = 1):
    """Fold a BN that feeds the layer: ``W'[o, i] = W[o, i] * s[i]``, ``b'[o] = b[o] + sum W[o, i, k] t[i]``.

    Exact only when every input element the layer reads is a BN output (no zero padding).
    """
    w = np.asarray(weight, dtype=np.float64)
    _check_groups(w.shape, groups)
    n_in, n_out = in_channels(w.shape, kind, groups), out_channels(w.shape, kind, groups)
    if len(s) != n_in:
        raise ValueError(f"BN has {len(s)} channels but the layer has {n_in} inputs")
    b = np.zeros(n_out) if bias is None else np.asarray(bias, dtype=np.float64)
    in_idx = channel_index(w.shape, kind, "in", groups)
    out_idx = np.broadcast_to(channel_index(w.shape, kind, "out", groups), w.shape)
    contrib = w * t[in_idx]
    b_new = b + np.bincount(out_idx.ravel(), weights=contrib.ravel(), minlength=n_out)
    return w * s[in_idx], b_new


def max_abs_scale(s) -> float:
    return float(np.max(np.abs(s))) if len(s) else 0.0
