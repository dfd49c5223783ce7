"""The float64 reference every test compares to: batch norm written from its formulas.

μ, σ² (biased) over N and all spatial positions per channel; x̂ = (x − μ)/√(σ² + ε); y = γx̂ + β;
running ← (1 − f)·running + f·batch with the unbiased variance; and
dx = γ·invstd/m · (m·dy − Σdy − x̂·Σ(dy·x̂)), dγ = Σ(dy·x̂), dβ = Σdy.

Fused epilogue: out = act(u), u = y + z; the backward runs the formulas above on g = dy·act'(u) (ReLU:
[u > 0], ReLU6: [0 < u < 6], SiLU: σ(u)·(1 + u·(1 − σ(u)))), and dz = g (dy without an activation).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class RefForward:
    y: torch.Tensor
    mean: torch.Tensor        # statistics used to normalize (batch or running)
    invstd: torch.Tensor
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    pre: torch.Tensor | None = None   # the activation's input u (y + z)


def _channel_shape(x):
    return (1, -1) + (1,) * (x.dim() - 2)


def _reduce_dims(x):
    return [0] + list(range(2, x.dim()))


def bn_forward(x, running_mean, running_var, weight, bias, training, factor, eps, residual=None,
               activation=None) -> RefForward:
    """``factor`` is the running-average factor (momentum, or 1/num_batches_tracked). ``y`` is the output
    after the optional residual add and activation ("relu", "relu6", "silu", "hardswish"); ``pre`` is
    before it."""
    x = x.double()
    shape = _channel_shape(x)
    rm = running_mean.double().clone() if running_mean is not None else None
    rv = running_var.double().clone() if running_var is not None else None
    if training:
        dims = _reduce_dims(x)
        m = x.numel() // x.shape[1]
        mean = x.mean(dims)
        var = ((x - mean.view(shape)) ** 2).mean(dims)
        if rm is not None:
            rm = (1 - factor) * rm + factor * mean
            rv = (1 - factor) * rv + factor * var * m / (m - 1)
    else:
        mean, var = rm, rv
    invstd = 1.0 / torch.sqrt(var + eps)
    y = (x - mean.view(shape)) * invstd.view(shape)
    if weight is not None:
        y = y * weight.double().view(shape)
    if bias is not None:
        y = y + bias.double().view(shape)
    if residual is not None:
        y = y + residual.double()
    pre = y
    if activation == "relu":
        y = y.clamp_min(0)
    elif activation == "relu6":
        y = y.clamp(0, 6)
    elif activation == "silu":
        y = y * torch.sigmoid(y)
    elif activation == "hardswish":
        y = y * (y + 3).clamp(0, 6) / 6
    return RefForward(y, mean, invstd, rm, rv, pre)


def act_grad(activation, pre):
    """act'(u) in float64 (gates as torch's backward: closed at 0 and 6; Hardswish's as torch's: 0 up to
    −3, u/3 + ½ below 3, 1 from 3 on)."""
    u = pre.double()
    if activation == "relu":
        return (u > 0).double()
    if activation == "relu6":
        return ((u > 0) & (u < 6)).double()
    if activation == "silu":
        s = torch.sigmoid(u)
        return s * (1 + u * (1 - s))
    if activation == "hardswish":
        return torch.where(u <= -3, 0.0, torch.where(u < 3, u / 3 + 0.5, 1.0))
    return torch.ones_like(u)


def bn_backward(dy, x, weight, mean, invstd, training, dact=None):
    """(dx, dγ, dβ) in float64 from the formulas; ``mean``/``invstd`` as returned by ``bn_forward``.
    After an activation, ``dact`` is its derivative act'(u) (ReLU: the mask out > 0): the gradient entering
    batch norm is dy·act'(u) (and that is also the residual's gradient)."""
    x, dy = x.double(), dy.double()
    if dact is not None:
        dy = dy * dact.double().to(dy.device)
    shape = _channel_shape(x)
    dims = _reduce_dims(x)
    xhat = (x - mean.view(shape)) * invstd.view(shape)
    gamma = weight.double() if weight is not None else torch.ones_like(mean)
    sum_dy = dy.sum(dims)
    sum_dy_xhat = (dy * xhat).sum(dims)
    if training:
        m = x.numel() // x.shape[1]
        dx = (gamma * invstd / m).view(shape) * (
            m * dy - sum_dy.view(shape) - xhat * sum_dy_xhat.view(shape))
    else:
        dx = dy * (gamma * invstd).view(shape)
    return dx, sum_dy_xhat, sum_dy


# --- test inputs and error metric shared by the test modules ---------------------------------------

# (shape, layout): every rank; odd and prime C; spatial size 1; N = 2.
CASES = [
    ((6, 5), "contiguous"),
    ((5, 7), "transposed"),           # (N, C) with channel stride N
    ((2, 3, 11), "contiguous"),
    ((3, 13, 4), "noncontiguous"),    # every other position of a wider tensor
    ((2, 3, 5, 7), "contiguous"),
    ((3, 7, 4, 5), "channels_last"),
    ((4, 3, 1, 1), "contiguous"),     # spatial size 1
    ((4, 3, 1, 1), "channels_last"),
    ((2, 5, 3, 6), "permuted"),       # dense, but H and W swapped in memory: copied
    ((2, 3, 2, 3, 4), "contiguous"),
    ((2, 5, 3, 2, 3), "channels_last"),
    ((2, 3, 2, 6), "contiguous"),     # S = 12: planes 4-aligned, not 16 (vectorization hint DIV_S = 4)
    ((2, 12, 2, 3), "channels_last"),  # C = 12: rows 4-aligned (DIV_C = 4)
]


def make_input(shape, layout, dtype=torch.float32, device="cpu", scale=3.0, shift=2.0):
    n, c = shape[:2]
    if layout == "transposed":
        x = torch.randn(c, n, dtype=torch.float64).t()
    elif layout == "noncontiguous":
        x = torch.randn(*shape[:-1], shape[-1] * 2, dtype=torch.float64)[..., ::2]
    elif layout == "permuted":
        x = torch.randn(n, c, shape[3], shape[2], dtype=torch.float64).transpose(2, 3)
    else:
        x = torch.randn(shape, dtype=torch.float64)
    # Per-channel offsets so a wrong channel mapping cannot pass.
    x = x * scale + shift + torch.arange(c, dtype=torch.float64).view((1, c) + (1,) * (len(shape) - 2))
    x = x.to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    assert tuple(x.shape) == shape
    return x


def rel_err(actual, expected):
    expected = expected.double()
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual.double().cpu() - expected.cpu()).abs().max() / scale).item()
