"""tritonbn's kernels as PyTorch custom ops, for ``torch.compile``, ``torch.export`` and ONNX.

Ops (namespace ``tritonbn``; all functional, so autograd can be registered on them):

* ``bn_forward_train(x, weight?, bias?, residual?, running_mean?, running_var?, num_batches_tracked?,
  momentum?, eps, activation) -> (y, stats, new_running_mean, new_running_var, mask)``: ``stats`` =
  ``[mean | invstd]`` (2·C, fp32 / fp64); the running statistics are *returned* updated (empty when not
  tracked) instead of mutated, and ``dispatch`` copies them back into the buffers, which functionalization
  turns into the usual buffer mutation of the compiled graph; ``mask`` is the ReLU bitmask (residual +
  ReLU; else empty);
* ``bn_forward_eval(x, weight?, bias?, residual?, running_mean, running_var, eps, activation) -> (y, mask)``;
* ``bn_backward(dy, x, weight?, bias?, mean_src, var_src, mask?, eps, training, activation, need_dx,
  need_dweight, need_dbias, need_dz, dbias_dtype) -> (dx, dweight, dbias, dz)`` (empty tensors for the
  gradients not asked for; ``mean_src``/``var_src``: ``stats`` twice in training, the running mean and
  variance in eval).

Why ``torch.library.custom_op`` + ``register_fake`` and not ``triton_op`` + ``wrap_triton``: under the
CPU interpreter ``triton_op`` hands fake tensors to the kernel launch inside ``torch.compile``, while an
opaque custom op compiles with every backend on CPU and GPU alike, is a single node in the graph (no graph
break), and its launches never sync with the host, so it is capturable in CUDA graphs.

Why the ops return new running stats instead of declaring ``mutates_args``: torch refuses to register
autograd on a non-functional op. The extra cost (two ``C``-element copies) is paid only under compile.

Eager calls never come here (the custom-op dispatch costs tens of µs per call): ``tritonbn.functional``
calls the launchers directly. When a tensor does not run tritonbn's kernels, the implementations use
``tritonbn.torch_math``, with the same outputs (shapes, dtypes, strides) as the fake kernels.
"""

from __future__ import annotations

import torch

from tritonbn import dispatch as _dispatch
from tritonbn import ops, torch_math

_NS = "tritonbn"


def _uses_triton(x: torch.Tensor) -> bool:
    return _dispatch.uses_triton(x)


def _none0(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return t if t is not None else like.new_empty(0)


def _mask_numel(x, residual, activation) -> int:
    return -(-x.numel() // 32) if residual is not None and activation else 0


def _like_fake(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` with the strides ``torch.empty_like(x)`` has (what the fake kernels promise)."""
    if y.stride() == x.stride() and ops.readable(x):
        return y
    return torch.empty_like(x).copy_(y)


# --- forward, training -----------------------------------------------------------------------------

@torch.library.custom_op(f"{_NS}::bn_forward_train", mutates_args=())
def bn_forward_train(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, residual: torch.Tensor | None,
    running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None, momentum: float | None, eps: float, activation: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rm = running_mean.clone() if running_mean is not None else None
    rv = running_var.clone() if running_var is not None else None
    write_mask = _mask_numel(x, residual, activation) > 0
    c = x.shape[1]
    if _uses_triton(x):
        y, stats, mask, _ = ops.forward(x, weight, bias, rm, rv, num_batches_tracked, True, momentum, eps,
                                        residual, activation, write_mask)
        stats = stats[:2 * c].clone()
    else:
        y, mean, invstd, mask = torch_math.forward(x, weight, bias, residual, rm, rv, True, momentum, eps,
                                                   activation, num_batches_tracked)
        stats = torch.cat((mean, invstd))
    no_mask = x.new_empty(0, dtype=torch.int32)
    return _like_fake(x, y), stats, _none0(rm, x), _none0(rv, x), _none0(mask, no_mask)


@bn_forward_train.register_fake
def _(x, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum, eps, activation):
    rm = torch.empty_like(running_mean) if running_mean is not None else x.new_empty(0)
    rv = torch.empty_like(running_var) if running_var is not None else x.new_empty(0)
    stats = x.new_empty(2 * x.shape[1], dtype=torch_math.acc_dtype(x))
    mask = x.new_empty(_mask_numel(x, residual, activation), dtype=torch.int32)
    return torch.empty_like(x), stats, rm, rv, mask


def _setup_train(ctx, inputs, output):
    x, weight, bias, residual = inputs[:4]
    _, stats, _, _, mask = output
    ctx.save_for_backward(x, weight, bias, stats, stats, mask if mask.numel() else None)
    ctx.cfg = (True, inputs[8], inputs[9], bias.dtype if bias is not None else None)


def _backward_train(ctx, dy, _dstats, _drm, _drv, _dmask):
    return _grads(ctx, dy) + (None,) * 6


def _grads(ctx, dy):
    """(dx, dweight, dbias, dresidual) through the ``bn_backward`` op."""
    x, weight, bias, mean_src, var_src, mask = ctx.saved_tensors
    training, eps, activation, bias_dtype = ctx.cfg
    need_dx, need_dw, need_db, need_dz = ctx.needs_input_grad[:4]
    need_dw = need_dw and weight is not None
    need_db = need_db and bias_dtype is not None
    dz = None
    if need_dz and not activation:
        dz, need_dz = dy, False     # y = bn(x) + z: the residual's gradient is dy itself
    if not (need_dx or need_dw or need_db or need_dz):
        return None, None, None, dz
    dx, dw, db, dz_op = torch.ops.tritonbn.bn_backward(
        dy, x, weight, bias, mean_src, var_src, mask, eps, training, activation, need_dx, need_dw, need_db,
        need_dz, bias_dtype if need_db else x.dtype)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None,
            dz_op if need_dz else dz)


torch.library.register_autograd(f"{_NS}::bn_forward_train", _backward_train, setup_context=_setup_train)


# --- forward, inference ----------------------------------------------------------------------------

@torch.library.custom_op(f"{_NS}::bn_forward_eval", mutates_args=())
def bn_forward_eval(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    residual: torch.Tensor | None, running_mean: torch.Tensor, running_var: torch.Tensor,
                    eps: float, activation: int) -> tuple[torch.Tensor, torch.Tensor]:
    write_mask = _mask_numel(x, residual, activation) > 0
    if _uses_triton(x):
        y, _, mask, _ = ops.forward(x, weight, bias, running_mean, running_var, None, False, 0.0, eps,
                                    residual, activation, write_mask)
    else:
        y, _, _, mask = torch_math.forward(x, weight, bias, residual, running_mean, running_var, False, 0.0,
                                           eps, activation)
    return _like_fake(x, y), _none0(mask, x.new_empty(0, dtype=torch.int32))


@bn_forward_eval.register_fake
def _(x, weight, bias, residual, running_mean, running_var, eps, activation):
    return torch.empty_like(x), x.new_empty(_mask_numel(x, residual, activation), dtype=torch.int32)


def _setup_eval(ctx, inputs, output):
    x, weight, bias, residual, running_mean, running_var, eps, activation = inputs
    mask = output[1]
    ctx.save_for_backward(x, weight, bias, running_mean, running_var, mask if mask.numel() else None)
    ctx.cfg = (False, eps, activation, bias.dtype if bias is not None else None)


def _backward_eval(ctx, dy, _dmask):
    return _grads(ctx, dy) + (None,) * 4


torch.library.register_autograd(f"{_NS}::bn_forward_eval", _backward_eval, setup_context=_setup_eval)


# --- backward --------------------------------------------------------------------------------------

@torch.library.custom_op(f"{_NS}::bn_backward", mutates_args=())
def bn_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                mean_src: torch.Tensor, var_src: torch.Tensor, mask: torch.Tensor | None, eps: float,
                training: bool, activation: int, need_dx: bool, need_dweight: bool, need_dbias: bool,
                need_dz: bool, dbias_dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    need_dweight = need_dweight and weight is not None
    dbias_dtype = dbias_dtype if need_dbias else None
    if _uses_triton(x):
        dx, dw, db, dz, _ = ops.backward(dy, x, weight, bias, mean_src, var_src, mask, training, eps,
                                         activation, need_dx, need_dweight, dbias_dtype, need_dz)
    else:
        if training:
            mean, invstd = ops.stats_views(mean_src, x.shape[1])
        else:
            acc = torch_math.acc_dtype(x)
            mean, invstd = mean_src.to(acc), torch.rsqrt(var_src.to(acc) + eps)
        dx, dw, db, dz = torch_math.backward(dy, x, weight, bias, mean, invstd, mask, training, eps,
                                             activation, need_dx, need_dweight, dbias_dtype, need_dz)
    dx = _like_fake(x, dx) if dx is not None else x.new_empty(0)
    dz = _like_fake(x, dz) if dz is not None else x.new_empty(0)
    return dx, _none0(dw, x), _none0(db, x), dz


@bn_backward.register_fake
def _(dy, x, weight, bias, mean_src, var_src, mask, eps, training, activation, need_dx, need_dweight,
      need_dbias, need_dz, dbias_dtype):
    c = x.shape[1]
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    dw = x.new_empty(c, dtype=weight.dtype) if need_dweight and weight is not None else x.new_empty(0)
    db = x.new_empty(c, dtype=dbias_dtype) if need_dbias else x.new_empty(0)
    dz = torch.empty_like(x) if need_dz else x.new_empty(0)
    return dx, dw, db, dz


# --- entry point used by tritonbn.functional while tracing ------------------------------------------

def dispatch(input, running_mean, running_var, weight, bias, training, momentum, eps,
             num_batches_tracked=None, residual=None, activation=0):
    """Graph-capture path of ``batch_norm_impl`` (arguments already checked): exporters get
    ``F.batch_norm`` + add + ReLU (standard ATen, so ``torch.export``/ONNX emit ``batch_norm`` /
    ``BatchNormalization``: nothing runs a kernel while exporting), ``torch.compile`` gets the custom ops
    (tritonbn's kernels run in the compiled graph)."""
    if _dispatch.tracing_for_export() and (not training or momentum is not None):
        y = torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                                           eps)
        return torch_math.epilogue(y, residual, activation)
    if not training:
        return torch.ops.tritonbn.bn_forward_eval(input, weight, bias, residual, running_mean, running_var,
                                                  eps, activation)[0]
    y, _, rm, rv, _ = torch.ops.tritonbn.bn_forward_train(
        input, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum, eps,
        activation)
    if running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(rm)
            running_var.copy_(rv)
    return y
