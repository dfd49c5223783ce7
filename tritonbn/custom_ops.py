"""tritonbn's kernels as PyTorch custom ops, for ``torch.compile``, ``torch.export`` and ONNX.

Ops (namespace ``tritonbn``; all functional, so autograd can be registered on them):

* ``bn_forward_train(x, weight?, bias?, running_mean?, running_var?, num_batches_tracked?, momentum?, eps)
  -> (y, mean, invstd, new_running_mean, new_running_var)``: the running statistics are *returned*
  updated (empty when not tracked) instead of mutated; ``batch_norm_compiled`` copies them back into the
  buffers, which functionalization turns into the usual buffer mutation of the compiled graph;
* ``bn_forward_eval(x, weight?, bias?, running_mean, running_var, eps) -> y``;
* ``bn_backward(dy, x, weight?, mean, invstd, training, need_dx, need_dweight, need_dbias, dbias_dtype)
  -> (dx, dweight, dbias)`` (empty tensors for the gradients not asked for).

Why ``torch.library.custom_op`` + ``register_fake`` and not ``triton_op`` + ``wrap_triton``: under the
CPU interpreter ``triton_op`` hands fake tensors to the kernel launch inside ``torch.compile``, while an
opaque custom op compiles with every backend on CPU and GPU alike, is a single node in the graph (no graph
break), and its launches never sync with the host, so it is capturable in CUDA graphs.

Why the ops return new running stats instead of declaring ``mutates_args``: torch refuses to register
autograd on a non-functional op. The extra cost (two ``C``-element copies) is paid only under compile.

When a tensor does not run tritonbn's kernels (CPU without ``TRITON_INTERPRET=1``), the implementations
fall back to torch's own batch norm, with the same outputs (shapes, dtypes, strides) as the fake kernels.
"""

from __future__ import annotations

import torch

from tritonbn import ops

_NS = "tritonbn"


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _uses_triton(x: torch.Tensor) -> bool:
    from tritonbn.functional import uses_triton

    return uses_triton(x)


def _none0(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return t if t is not None else like.new_empty(0)


# --- forward, training -----------------------------------------------------------------------------

@torch.library.custom_op(f"{_NS}::bn_forward_train", mutates_args=())
def bn_forward_train(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
    running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None, momentum: float | None, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rm = running_mean.clone() if running_mean is not None else None
    rv = running_var.clone() if running_var is not None else None
    if _uses_triton(x):
        y, mean, invstd = ops.bn_forward_train(x, weight, bias, rm, rv, num_batches_tracked, momentum, eps)
        y = ops._like(x, y)
    else:
        y, mean, invstd = _torch_forward_train(x, weight, bias, rm, rv, num_batches_tracked, momentum, eps)
    return y, mean, invstd, _none0(rm, x), _none0(rv, x)


@bn_forward_train.register_fake
def _(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps):
    c = x.shape[1]
    acc = _acc(x)
    rm = torch.empty_like(running_mean) if running_mean is not None else x.new_empty(0)
    rv = torch.empty_like(running_var) if running_var is not None else x.new_empty(0)
    return (torch.empty_like(x), x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc), rm, rv)


def _torch_forward_train(x, weight, bias, rm, rv, num_batches_tracked, momentum, eps):
    """torch's math for devices tritonbn does not run on (mutates ``rm``/``rv``, which are copies)."""
    if momentum is None:
        momentum = 1.0 / float(num_batches_tracked.item()) if num_batches_tracked is not None else 0.0
    acc = _acc(x)
    dims = [0] + list(range(2, x.dim()))
    xa = x.to(acc)
    var, mean = torch.var_mean(xa, dims, correction=0)
    invstd = torch.rsqrt(var + eps)
    if rm is not None and x.numel() > 0:
        m = x.numel() // x.shape[1]
        with torch.no_grad():
            rm.mul_(1 - momentum).add_(mean.to(rm.dtype), alpha=momentum)
            rv.mul_(1 - momentum).add_((var * m / max(m - 1, 1)).to(rv.dtype), alpha=momentum)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (xa - mean.view(shape)) * invstd.view(shape)
    if weight is not None:
        y = y * weight.to(acc).view(shape)
    if bias is not None:
        y = y + bias.to(acc).view(shape)
    return torch.empty_like(x).copy_(y), mean, invstd


def _setup_train(ctx, inputs, output):
    x, weight, bias = inputs[:3]
    _, mean, invstd, _, _ = output
    ctx.save_for_backward(x, weight, mean, invstd)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward_train(ctx, dy, _dmean, _dinvstd, _drm, _drv):
    x, weight, mean, invstd = ctx.saved_tensors
    return _grads(ctx, dy, x, weight, mean, invstd, True) + (None,) * 5


def _grads(ctx, dy, x, weight, mean, invstd, training):
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    need_dw = need_dw and weight is not None
    need_db = need_db and ctx.bias_dtype is not None
    if not (need_dx or need_dw or need_db):
        return None, None, None
    dx, dw, db = torch.ops.tritonbn.bn_backward(
        dy, x, weight, mean, invstd, training, need_dx, need_dw, need_db,
        ctx.bias_dtype if need_db else x.dtype)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None)


torch.library.register_autograd(f"{_NS}::bn_forward_train", _backward_train, setup_context=_setup_train)


# --- forward, inference ----------------------------------------------------------------------------

@torch.library.custom_op(f"{_NS}::bn_forward_eval", mutates_args=())
def bn_forward_eval(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    running_mean: torch.Tensor, running_var: torch.Tensor, eps: float) -> torch.Tensor:
    if _uses_triton(x):
        return ops._like(x, ops.bn_forward_eval(x, weight, bias, running_mean, running_var, eps))
    y = torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    return ops._like(x, y)


@bn_forward_eval.register_fake
def _(x, weight, bias, running_mean, running_var, eps):
    return torch.empty_like(x)


def _setup_eval(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, eps = inputs
    ctx.save_for_backward(x, weight, running_mean, running_var)
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.eps = eps


def _backward_eval(ctx, dy):
    x, weight, rm, rv = ctx.saved_tensors
    acc = _acc(x)
    mean, invstd = rm.to(acc), torch.rsqrt(rv.to(acc) + ctx.eps)
    return _grads(ctx, dy, x, weight, mean, invstd, False) + (None,) * 3


torch.library.register_autograd(f"{_NS}::bn_forward_eval", _backward_eval, setup_context=_setup_eval)


# --- backward --------------------------------------------------------------------------------------

@torch.library.custom_op(f"{_NS}::bn_backward", mutates_args=())
def bn_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                invstd: torch.Tensor, training: bool, need_dx: bool, need_dweight: bool, need_dbias: bool,
                dbias_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    need_dweight = need_dweight and weight is not None
    if _uses_triton(x):
        dx, dw, db = ops.bn_backward(dy, x, weight, mean, invstd, training, need_dx, need_dweight,
                                     dbias_dtype if need_dbias else None)
    else:
        dx, dw, db = _torch_backward(dy, x, weight, mean, invstd, training, need_dx, need_dweight,
                                     dbias_dtype if need_dbias else None)
    dx = ops._like(x, dx) if dx is not None else x.new_empty(0)
    return dx, _none0(dw, x), _none0(db, x)


@bn_backward.register_fake
def _(dy, x, weight, mean, invstd, training, need_dx, need_dweight, need_dbias, dbias_dtype):
    c = x.shape[1]
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    dw = x.new_empty(c, dtype=weight.dtype) if need_dweight and weight is not None else x.new_empty(0)
    db = x.new_empty(c, dtype=dbias_dtype) if need_dbias else x.new_empty(0)
    return dx, dw, db


def _torch_backward(dy, x, weight, mean, invstd, training, need_dx, need_dweight, dbias_dtype):
    acc = _acc(x)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    dims = [0] + list(range(2, x.dim()))
    xa, dya = x.to(acc), dy.to(acc)
    xhat = (xa - mean.view(shape)) * invstd.view(shape)
    sum_dy = dya.sum(dims)
    sum_dy_xhat = (dya * xhat).sum(dims)
    dx = dw = db = None
    if need_dx:
        scale = invstd if weight is None else invstd * weight.to(acc)
        g = dya
        if training:
            m = max(x.numel() // x.shape[1], 1)
            g = dya - sum_dy.view(shape) / m - xhat * (sum_dy_xhat / m).view(shape)
        dx = torch.empty_like(x).copy_(g * scale.view(shape))
    if need_dweight:
        dw = sum_dy_xhat.to(weight.dtype)
    if dbias_dtype is not None:
        db = sum_dy.to(dbias_dtype)
    return dx, dw, db


# --- entry point used by tritonbn.functional under torch.compile -----------------------------------

def batch_norm_compiled(input, running_mean, running_var, weight, bias, training, momentum, eps,
                        num_batches_tracked=None):
    """``batch_norm_impl`` through the custom ops (arguments already checked)."""
    if not training:
        return torch.ops.tritonbn.bn_forward_eval(input, weight, bias, running_mean, running_var, eps)
    y, _, _, rm, rv = torch.ops.tritonbn.bn_forward_train(
        input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps)
    if running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(rm)
            running_var.copy_(rv)
    return y


def dispatch(input, running_mean, running_var, weight, bias, training, momentum, eps,
             num_batches_tracked=None):
    """Graph-capture path of ``batch_norm_impl``: exporters get ``F.batch_norm`` (standard ATen, so
    ``torch.export``/ONNX emit ``batch_norm``/``BatchNormalization``: nothing runs a kernel while exporting),
    ``torch.compile`` gets the custom ops (tritonbn's kernels run in the compiled graph)."""
    if tracing_for_export() and (not training or momentum is not None):
        return torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, training,
                                              momentum, eps)
    return batch_norm_compiled(input, running_mean, running_var, weight, bias, training, momentum, eps,
                               num_batches_tracked)


def graph_capture() -> bool:
    """Whether the caller is being traced (compile, export, TorchScript trace) rather than run eagerly."""
    return torch.jit.is_tracing() or compiling()


def tracing_for_export() -> bool:
    """True under ``torch.export`` (and the ONNX exporters built on it) and TorchScript tracing."""
    if torch.jit.is_tracing():
        return True
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


def compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    if is_compiling is not None:
        return is_compiling()
    return torch._dynamo.is_compiling()  # pragma: no cover (torch < 2.3)
