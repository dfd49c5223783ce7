"""``tritonbn.batch_norm``: ``torch.nn.functional.batch_norm`` on Triton kernels, with an optional fused
residual add and activation.

Which calls the kernels take (``tritonbn.dispatch`` says where a tensor runs): every call that
``supported`` accepts. Everything else goes to ``F.batch_norm`` itself, which computes or raises exactly
as torch does: degenerate and unusual inputs (empty tensors, 1-D input, non-contiguous running stats,
parameter dtype mixes torch may or may not take on that device) keep torch's exact semantics, and a call
that torch rejects raises torch's own exception before any state changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tritonbn import custom_ops, native, ops
from tritonbn.dispatch import graph_capture, uses_triton
from tritonbn.torch_math import epilogue

# Parameter / running-stat dtypes the kernels take per input dtype: all present ones share one dtype, the
# input's or fp32 under mixed precision (torch's own rule).
_PARAM_DTYPES = {torch.float16: (torch.float16, torch.float32),
                 torch.bfloat16: (torch.bfloat16, torch.float32),
                 torch.float32: (torch.float32,), torch.float64: (torch.float64,)}
ACTIVATIONS = tuple(ops.ACTIVATIONS)


def activation_code(activation) -> int:
    """The kernels' constexpr for ``activation`` (None, "relu", "relu6", "silu" or "hardswish"), or a
    ValueError."""
    code = ops.ACTIVATIONS.get(activation) if isinstance(activation, (str, type(None))) else None
    if code is None:
        raise ValueError(f"batch_norm: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return code


def check_fusion(input, residual, activation) -> int:
    """Validate the fused epilogue's arguments and return the activation code: ``residual`` has exactly
    ``input``'s shape, dtype and device (it is added without broadcasting or type promotion)."""
    code = activation_code(activation)
    if residual is None:
        return code
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"batch_norm: residual must be a Tensor or None, got {type(residual).__name__}")
    if not fusable_residual(input, residual):
        desc = (f"{tuple(input.shape)} {input.dtype} on {input.device}" if isinstance(input, torch.Tensor)
                else type(input).__name__)
        raise RuntimeError(
            f"batch_norm: residual must match input exactly (no broadcasting or type promotion): input is "
            f"{desc}, residual is {tuple(residual.shape)} {residual.dtype} on {residual.device}")
    return code


def fusable_residual(input, residual) -> bool:
    """Whether ``residual`` can be added inside the kernels: exactly ``input``'s shape, dtype and device."""
    return isinstance(residual, torch.Tensor) and isinstance(input, torch.Tensor) and \
        residual.shape == input.shape and residual.dtype == input.dtype and residual.device == input.device


def supported(input, running_mean, running_var, weight, bias, training, eps) -> bool:
    """Whether the kernels take this call. True only for calls ``F.batch_norm`` accepts too (so never a
    different verdict from torch's), and only where the kernels give torch's results: a non-empty float
    input with channels, more than one value per channel in training, 1-D running stats (both or none;
    required in eval) and parameters with one value per channel, on the input's device, in one allowed
    dtype, ε > 0 in training (≥ 0 in eval)."""
    if not isinstance(input, torch.Tensor) or input.dim() < 2 or type(training) is not bool:
        return False
    allowed = _PARAM_DTYPES.get(input.dtype)
    if allowed is None or type(eps) not in (float, int) or not (eps > 0 if training else eps >= 0):
        return False
    c = input.shape[1]
    numel = input.numel()
    if numel == 0 or (training and numel == c):
        return False
    if (running_mean is None) != (running_var is None) or (not training and running_mean is None):
        return False
    device = input.device
    pdtype = None
    for t in (running_mean, running_var, weight, bias):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.numel() != c or t.device != device:
            return False
        if pdtype is None:
            if t.dtype not in allowed:
                return False
            pdtype = t.dtype
        elif t.dtype != pdtype:
            return False
    if running_mean is not None:
        for t in (running_mean, running_var):
            if t.dim() != 1 or t.requires_grad or not t.is_contiguous():
                return False
    return True


def check_inputs(input, running_mean, running_var, weight, bias, training: bool) -> None:
    """Raise torch's exception types, with clear messages, for the common mistakes (used where tritonbn
    cannot hand the call to ``F.batch_norm``: SyncBatchNorm's cross-process path)."""
    if input.dim() < 2:
        raise ValueError(f"batch_norm: expected input of shape (N, C, *), got a {input.dim()}-D tensor "
                         f"of shape {tuple(input.shape)}")
    if input.dtype not in _PARAM_DTYPES:
        raise NotImplementedError(f"batch_norm: input dtype {input.dtype} is not supported "
                                  "(float16, bfloat16, float32 or float64)")
    c = input.shape[1]
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError("batch_norm: running_mean and running_var must be defined in evaluation mode")
    if (running_mean is None) != (running_var is None):
        raise ValueError("batch_norm: running_mean and running_var must both be given or both be None")
    allowed = _PARAM_DTYPES[input.dtype]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is None:
            continue
        if t.numel() != c:
            raise RuntimeError(f"batch_norm: {name} should contain {c} elements (one per channel of input "
                               f"shape {tuple(input.shape)}), not {t.numel()}")
        if t.device != input.device:
            raise RuntimeError(f"batch_norm: {name} is on {t.device} but input is on {input.device}")
        if t.dtype not in allowed:
            raise RuntimeError(f"batch_norm: {name} has dtype {t.dtype}, input has {input.dtype}; "
                               f"expected one of {[str(d) for d in allowed]}")
    dtypes = {t.dtype for t in (running_mean, running_var, weight, bias) if t is not None}
    if len(dtypes) > 1:   # the kernels' plans key on one parameter dtype (ops.forward_plan)
        raise RuntimeError("batch_norm: weight, bias and running stats must share one dtype, got "
                           f"{sorted(str(d) for d in dtypes)}")
    if training and input.numel() // max(c, 1) == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{input.size()}")


def _param(t):
    # Kernels index parameters linearly.
    return t if t is None or t.is_contiguous() else t.contiguous()


def _requires_grad(t) -> bool:
    return t is not None and t.requires_grad


def _torch_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                      num_batches_tracked, bump, residual, activation):
    """``batch_norm_impl``'s call computed by ``F.batch_norm`` (with its verdict: its error, raised before
    any state changes); ``num_batches_tracked`` bumped only once it has succeeded."""
    factor = momentum
    if momentum is None:
        factor = 0.0 if num_batches_tracked is None else 1.0 / float(num_batches_tracked + int(bump))
    y = F.batch_norm(input, running_mean, running_var, weight, bias, training, factor, eps)
    if bump:
        num_batches_tracked.add_(1)
    return epilogue(y, residual, activation)


def batch_norm_impl(input, running_mean, running_var, weight, bias, training, momentum, eps,
                    num_batches_tracked=None, bump=False, residual=None, activation=0):
    """The kernels' entry point for calls that passed ``supported`` (and ``check_fusion``).

    ``momentum=None`` with ``num_batches_tracked`` uses the cumulative average 1/num_batches_tracked, read
    on the device; ``bump`` increments ``num_batches_tracked`` first (the module's counter: done by the
    kernels in eager mode, by an ``add_`` while tracing)."""
    if residual is not None and activation and activation not in ops.GATED:
        # SiLU's and Hardswish's gradients would need the residual again in the backward: the add and
        # activation run unfused.
        y = batch_norm_impl(input, running_mean, running_var, weight, bias, training, momentum, eps,
                            num_batches_tracked, bump)
        return epilogue(y, residual, activation)
    if graph_capture():  # torch.compile / export / tracing: custom ops or aten (custom_ops.py)
        if bump:
            num_batches_tracked.add_(1)
        return custom_ops.dispatch(input, running_mean, running_var, _param(weight), _param(bias), training,
                                   momentum, eps, num_batches_tracked, residual, activation)
    weight, bias = _param(weight), _param(bias)
    grad_mode = torch.is_grad_enabled()
    bn_graph = grad_mode and (input.requires_grad or _requires_grad(weight) or _requires_grad(bias))
    if bn_graph and input.is_inference():
        # torch refuses to save an inference tensor for backward, before any state changes; the kernels
        # would update the running stats first. (The input only: an inference weight or running stat in a
        # graph is far-fetched, and each check costs ~0.4 µs; those fail when the Function saves them.)
        return _torch_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                 num_batches_tracked, bump, residual, activation)
    needs_graph = bn_graph or (grad_mode and _requires_grad(residual))
    # The plan may copy the input (not readable in place): done here, outside the autograd function, so
    # that double backward sees the copy too.
    input, plan = ops.forward_plan(input, weight, bias, running_mean, running_var, num_batches_tracked,
                                   training, momentum, residual, activation,
                                   needs_graph and residual is not None and activation in ops.GATED, bump)
    first = False
    if native.ENABLED:   # tritonbn.native: after a plan's first (Python) call, its C++ path
        y = native.call(plan, input, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                        momentum, eps, needs_graph)
        if y is not None:
            return y
        first = plan.native_handle is None
    if needs_graph:
        y = ops.apply(input, weight, bias, residual, (
            plan, running_mean, running_var, num_batches_tracked, momentum, eps))
    else:
        # No graph to record (inference, no_grad): skip the autograd.Function machinery on the hot path.
        y = ops.run_forward(plan, input, weight, bias, running_mean, running_var, num_batches_tracked,
                            momentum, eps, residual)[0]
    if first:
        native.try_build(plan, input)
    return y


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
               eps=1e-5, *, residual=None, activation=None):
    """Same signature, results, in-place running-stat updates and errors as
    ``torch.nn.functional.batch_norm``; differentiable w.r.t. input, weight and bias.

    Fused epilogue (keyword-only): ``activation(batch_norm(...) + residual)``, with ``residual`` a tensor
    of the input's shape, dtype and device (differentiable too) and ``activation`` None, ``"relu"``,
    ``"relu6"``, ``"silu"`` or ``"hardswish"``; the same results and running-stat updates as, e.g.,
    ``F.relu(F.batch_norm(...) + residual)``. The add and a ReLU or ReLU6 run inside the kernels; with a
    SiLU or Hardswish, a residual is added after them (their gradient would need it in the backward)."""
    act = check_fusion(input, residual, activation)
    if isinstance(input, torch.Tensor) and uses_triton(input) and type(momentum) in (float, int) and \
            supported(input, running_mean, running_var, weight, bias, training, eps):
        return batch_norm_impl(input, running_mean, running_var, weight, bias, training, momentum, eps,
                               residual=residual, activation=act)
    return epilogue(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps),
                    residual, act)
