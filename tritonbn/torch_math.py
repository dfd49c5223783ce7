"""tritonbn's forward and backward written with torch ops.

Used where the Triton kernels do not run (the custom ops on a device tritonbn does not handle) and for
double backward (these are differentiable). Same conventions as ``tritonbn.ops``: statistics in the
accumulation dtype (fp32, fp64 for fp64 input), the gate of a ReLU or ReLU6 as int32 words in the input's
memory order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dims(x):
    return [0] + list(range(2, x.dim()))


def _channel(t, x):
    return t.view((1, -1) + (1,) * (x.dim() - 2))


def pack_mask(positive: torch.Tensor) -> torch.Tensor:
    """Bool tensor → int32 words, bit i of word i // 32 = element i in memory order (dense tensors)."""
    mem = torch.empty_like(positive, dtype=torch.int64).copy_(positive)
    flat = mem.as_strided((mem.numel(),), (1,))
    pad = (-flat.numel()) % 32
    bits = F.pad(flat, (0, pad)).view(-1, 32) << torch.arange(32, device=flat.device)
    words = bits.sum(1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_mask(words: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_mask`` for a tensor laid out as ``like`` (dense)."""
    bits = (words.to(torch.int64)[:, None] >> torch.arange(32, device=words.device)) & 1
    flat = bits.flatten()[:like.numel()].bool()
    mem = torch.empty_like(like, dtype=torch.bool)
    return flat.as_strided(like.shape, mem.stride())


# ACTIVATIONS codes (tritonbn.ops) -> torch's function (also what the export tool's split graphs call).
ACT_FN = {1: torch.relu, 2: F.relu6, 3: F.silu, 4: F.hardswish}
_GATE = {1: lambda u: u > 0, 2: lambda u: (u > 0) & (u < 6)}


def activate(y, activation: int):
    return ACT_FN[activation](y) if activation else y


def epilogue(y, residual, activation: int, in_place: bool = False):
    """``activation(y + residual)`` (the unfused path); ``in_place``: as ``y += residual`` (y's dtype kept,
    y never broadcast), for a fused model whose original code updated the BN output in place."""
    if residual is not None:
        y = y.add_(residual) if in_place else y + residual
    return activate(y, activation)


def batch_stats(x, running_mean, running_var, num_batches_tracked, momentum, eps):
    """``(mean, invstd)`` of ``x`` in training; the running stats (when given) updated in place as
    ``F.batch_norm`` does (momentum None: 1/num_batches_tracked, read on the host)."""
    if running_mean is not None:
        if momentum is None:
            momentum = 1.0 / float(num_batches_tracked.item()) if num_batches_tracked is not None else 0.0
        F.batch_norm(x.detach(), running_mean, running_var, None, None, True, momentum, eps)
    var, mean = torch.var_mean(x.detach().to(acc_dtype(x)), _dims(x), correction=0)
    return mean, torch.rsqrt(var + eps)


def normalize(x, weight, bias, mean, invstd, residual, activation):
    """``(y, mask)``: ``activation((x − mean)·invstd·γ + β [+ residual])`` from given statistics, computed
    in the accumulation dtype as the kernels do (the pre-activation rounded to x's dtype first); ``mask``
    (residual + gated activation) is the packed gate."""
    u = _affine(x, weight, bias, mean, invstd)
    if residual is not None:
        u = u + residual.to(u.dtype)
    u = u.to(x.dtype).to(u.dtype)
    mask = pack_mask(_GATE[activation](u)) if activation in _GATE and residual is not None else None
    return activate(u, activation).to(x.dtype), mask


def _affine(x, weight, bias, mean, invstd):
    acc = acc_dtype(x)
    y = (x.to(acc) - _channel(mean, x)) * _channel(invstd, x)
    if weight is not None:
        y = y * _channel(weight.to(acc), x)
    if bias is not None:
        y = y + _channel(bias.to(acc), x)
    return y


def _act_grad(dy, x, weight, bias, mean, invstd, mask, activation):
    """dy·act'(u): a gated activation's gate from the bitmask when there is one, else u recomputed from x
    (no residual) as the forward computed it, act' as the kernels' ``_act_backward``. Differentiable in u
    for SiLU and Hardswish (double backward; Hardswish: dy/3 on (−3, 3), as torch's)."""
    if mask is not None:
        return torch.where(unpack_mask(mask, x), dy, torch.zeros_like(dy))
    u = _affine(x, weight, bias, mean, invstd).to(x.dtype)
    if activation in _GATE:
        return torch.where(_GATE[activation](u), dy, torch.zeros_like(dy))
    u = u.to(acc_dtype(x))   # in the accumulation dtype, as the kernels
    if activation == 4:      # Hardswish: 0 up to −3, u/3 + ½ below 3, 1 from 3 on and for NaN
        return dy.to(u.dtype) * torch.where(u <= -3, 0.0, torch.where(u < 3, u / 3 + 0.5, 1.0))
    sig = torch.sigmoid(u)
    return dy.to(u.dtype) * (sig * (1 + u * (1 - sig)))


def backward(dy, x, weight, bias, mean, invstd, mask, training, eps, activation, need_dx, need_dweight,
             dbias_dtype, need_dz):
    """``(dx, dweight, dbias, dz)`` from the formulas (None where not asked for). Differentiable in dy, x,
    weight and bias: with ``training`` the statistics are recomputed from x so that second derivatives
    see their dependence on x (``mean``/``invstd`` are then only used for a ReLU or ReLU6 gate)."""
    acc = acc_dtype(x)
    xa = x.to(acc)
    dims = _dims(x)
    if training:
        m = max(x.numel() // max(x.shape[1], 1), 1)
        mu = xa.mean(dims)
        istd = torch.rsqrt(((xa - _channel(mu, x)) ** 2).mean(dims) + eps)
    else:
        mu, istd = mean, invstd
    g = dy
    if activation:
        # A gate from the forward's statistics (bit-exact masks); SiLU's act'(u) from the recomputed ones,
        # so that second derivatives see u's dependence on x.
        g = _act_grad(dy, x, weight, bias, *((mean, invstd) if activation in _GATE else (mu, istd)), mask,
                      activation)
    dz = g if need_dz else None
    ga = g.to(acc)
    xhat = (xa - _channel(mu, x)) * _channel(istd, x)
    sum_g = ga.sum(dims)
    sum_g_xhat = (ga * xhat).sum(dims)
    dx = None
    if need_dx:
        scale = istd if weight is None else istd * weight.to(acc)
        h = ga
        if training:
            h = ga - _channel(sum_g, x) / m - xhat * _channel(sum_g_xhat / m, x)
        dx = (h * _channel(scale, x)).to(x.dtype)
    dw = sum_g_xhat.to(weight.dtype) if need_dweight and weight is not None else None
    db = sum_g.to(dbias_dtype) if dbias_dtype is not None else None
    return dx, dw, db, dz

