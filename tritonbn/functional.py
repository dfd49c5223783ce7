"""``tritonbn.batch_norm``: ``torch.nn.functional.batch_norm`` on Triton kernels.

Dispatch: CUDA tensors run the Triton kernels. CPU tensors run the same kernels through Triton's
interpreter when ``TRITON_INTERPRET=1`` was set before triton was imported (how the test suite runs them),
and torch's own batch norm otherwise.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from tritonbn import custom_ops, ops
from tritonbn.ops import BatchNormFunction

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ALLOWED_PARAM_DTYPES = {torch.float16: (torch.float16, torch.float32),
                         torch.bfloat16: (torch.bfloat16, torch.float32),
                         torch.float32: (torch.float32,), torch.float64: (torch.float64,)}


def uses_triton(x: torch.Tensor) -> bool:
    """Whether ``x`` is normalized by tritonbn's Triton kernels (True) or by torch's batch norm (False)."""
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_inputs(input, running_mean, running_var, weight, bias, training: bool) -> None:
    """Raise before anything is launched or mutated, with torch's exception types and clearer messages."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm: input must be a Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"batch_norm: expected input of shape (N, C, *), got a {input.dim()}-D tensor "
                         f"of shape {tuple(input.shape)}")
    if input.dtype not in _FLOAT_DTYPES:
        raise RuntimeError(f"batch_norm: input dtype {input.dtype} is not supported "
                           "(float16, bfloat16, float32 or float64)")
    c = input.shape[1]
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError("batch_norm: running_mean and running_var must be defined in evaluation mode")
    if (running_mean is None) != (running_var is None):
        raise RuntimeError("batch_norm: running_mean and running_var must both be given or both be None")
    # fp16/bf16 input may carry fp32 parameters and statistics (mixed precision), as in torch.
    allowed = _ALLOWED_PARAM_DTYPES[input.dtype]
    device = input.device
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"batch_norm: {name} must be a Tensor or None, got {type(t).__name__}")
        if t.numel() != c:
            raise RuntimeError(f"batch_norm: {name} should contain {c} elements (one per channel of input "
                               f"shape {tuple(input.shape)}), not {t.numel()}")
        if t.device != device:
            raise RuntimeError(f"batch_norm: {name} is on {t.device} but input is on {input.device}")
        if t.dtype not in allowed:
            raise RuntimeError(f"batch_norm: {name} has dtype {t.dtype}, input has {input.dtype}; "
                               f"expected one of {[str(d) for d in allowed]}")
        if name.startswith("running") and not t.is_contiguous():
            raise RuntimeError(f"batch_norm: {name} must be contiguous (it is updated in place)")
    if training:
        size_per_channel = input.numel() // c if c else 0
        if size_per_channel == 1:
            raise ValueError("Expected more than 1 value per channel when training, got input size "
                             f"{input.size()}")


def _param(t):
    # Kernels index parameters linearly.
    return t if t is None or t.is_contiguous() else t.contiguous()


def batch_norm_impl(input, running_mean, running_var, weight, bias, training, momentum, eps,
                    num_batches_tracked=None):
    """Entry point shared by ``batch_norm`` and the modules, for inputs that already passed
    ``check_inputs``. ``momentum=None`` with ``num_batches_tracked`` uses the cumulative average
    1/num_batches_tracked, read on the device."""
    if custom_ops.graph_capture():  # torch.compile / export / tracing: custom ops or aten (custom_ops.py)
        return custom_ops.dispatch(input, running_mean, running_var, _param(weight), _param(bias), training,
                                   momentum, eps, num_batches_tracked)
    weight, bias = _param(weight), _param(bias)
    needs_graph = input.requires_grad or _requires_grad(weight) or _requires_grad(bias)
    if not (needs_graph and torch.is_grad_enabled()):
        # No graph to record (inference, no_grad): skip the autograd.Function machinery on the hot path.
        if training:
            return ops.bn_forward_train(input, weight, bias, running_mean, running_var, num_batches_tracked,
                                        momentum, eps)[0]
        return ops.bn_forward_eval(input, weight, bias, running_mean, running_var, eps)
    return BatchNormFunction.apply(input, weight, bias, running_mean, running_var, num_batches_tracked,
                                   training, momentum, eps)


def _requires_grad(t) -> bool:
    return t is not None and t.requires_grad


ACTIVATIONS = (None, "relu")


def check_fusion(input, residual, activation) -> None:
    """The fused epilogue's arguments: ``residual`` of exactly ``input``'s shape, dtype, device and
    strides (it is added without broadcasting or type promotion), ``activation`` one of ACTIVATIONS."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"batch_norm: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if residual is None:
        return
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"batch_norm: residual must be a Tensor or None, got {type(residual).__name__}")
    if residual.shape != input.shape or residual.dtype != input.dtype or residual.device != input.device:
        raise RuntimeError(
            f"batch_norm: residual must match input exactly (no broadcasting or type promotion): input is "
            f"{tuple(input.shape)} {input.dtype} on {input.device}, residual is {tuple(residual.shape)} "
            f"{residual.dtype} on {residual.device}")


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
               eps=1e-5, *, residual=None, activation=None):
    """Same signature, results, in-place running-stat updates and errors as
    ``torch.nn.functional.batch_norm``; differentiable w.r.t. input, weight and bias.

    Fused epilogue (keyword-only): ``activation(batch_norm(...) + residual)``, with ``residual`` a tensor
    of the input's shape, dtype and device (differentiable too) and ``activation`` None or ``"relu"``;
    the same results and running-stat updates as ``F.relu(F.batch_norm(...) + residual)``."""
    if isinstance(input, torch.Tensor):
        check_fusion(input, residual, activation)
    if isinstance(input, torch.Tensor) and not uses_triton(input):
        y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return _epilogue(y, residual, activation)
    check_inputs(input, running_mean, running_var, weight, bias, training)
    y = batch_norm_impl(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return _epilogue(y, residual, activation)


def _epilogue(y, residual, activation):
    if residual is not None:
        y = y + residual
    if activation == "relu":
        y = torch.relu(y)
    return y
