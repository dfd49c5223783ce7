"""tritonbn's kernels as PyTorch custom ops, for ``torch.compile``, ``torch.export`` and ONNX.

Ops (namespace ``tritonbn``), none of them differentiable themselves:

* ``bn_batch_stats(x, running_mean?, running_var?, num_batches_tracked?, momentum?, eps) -> stats``: the
  training statistics ``[mean | invstd]`` (2·C, fp32 / fp64), the running statistics updated **in place**
  (declared in the schema: Inductor reinplaces the op on the module's buffers, with no copy); given
  ``x.detach()``: ``bn_normalize``'s backward is the whole batch-norm gradient;
* ``bn_batch_stats_untracked(x, eps) -> stats``: the same for a layer without running stats (mutates
  nothing);
* ``bn_normalize(x, weight?, bias?, residual?, mean_src, var_src, eps, training, activation) -> (y, mask)``:
  ``activation(BN(x) [+ residual])`` from ``stats`` twice (training) or the running mean and variance
  (eval); ``mask`` is the ReLU bitmask (residual + ReLU; else empty);
* ``bn_backward(dy, x, weight?, bias?, mean_src, var_src, mask?, eps, training, activation, need_dx,
  need_dweight, need_dbias, need_dz, dbias_dtype) -> (dx, dweight, dbias, dz)`` (empty tensors for the
  gradients not asked for).

A training call is ``bn_batch_stats`` then ``bn_normalize``: the same two launches as eager. Splitting
there is what lets the running statistics be mutated in place under functionalization, while the
differentiable part stays functional. The gradient is an ``autograd.Function`` (``Normalize``) around
``bn_normalize`` whose backward calls ``bn_backward``: Dynamo traces it, so the compiled forward and
backward graphs call the two ops directly.

Why ``torch.library.Library`` (a schema, one Python kernel per device, ``register_fake``) and not
``torch.library.custom_op`` + ``register_autograd``: a compiled graph calls its ops through the
dispatcher on every step, and custom_op puts several Python layers in that call (its autograd kernel,
which runs even under no_grad, a redispatch, the version bump of mutated arguments, a Dynamo-disabled
wrapper, aliasing checks): 37-61 µs per call on a CPU core against 13-32 µs here, where the kernels'
own launchers take 4-10 µs. (AOTAutograd bumps the versions of the inputs a compiled graph mutates
itself.) And not ``triton_op`` + ``wrap_triton``: under the CPU interpreter ``triton_op`` hands fake
tensors to the kernel launch inside ``torch.compile``, while an opaque op compiles with every backend on
CPU and GPU alike, is a single node in the graph (no graph break), and its launches never sync with the
host, so it is capturable in CUDA graphs.

Eager calls never come here (``tritonbn.functional`` calls the launchers directly). When a tensor does
not run tritonbn's kernels, the implementations use ``tritonbn.torch_math``, with the same outputs
(shapes, dtypes, strides) as the fake kernels.
"""

from __future__ import annotations

import torch

from tritonbn import dispatch as _dispatch
from tritonbn import ops, torch_math

_NS = "tritonbn"
_lib = torch.library.Library(_NS, "DEF")
# pt2_compliant: the ops follow torch.compile's rules (opcheck in the tests). flexible_layout: the kernels
# read any dense layout (NCHW, channels_last, ...) in place, so Inductor need not copy the inputs into the
# strides seen while tracing.
_TAGS = tuple(getattr(torch.Tag, t) for t in ("pt2_compliant_tag", "flexible_layout")
              if hasattr(torch.Tag, t))


def _define(schema: str, impl, fake) -> None:
    name = schema[:schema.index("(")]
    _lib.define(schema, tags=_TAGS)
    # One Python kernel for every device (the implementations choose kernels or torch_math per tensor).
    _lib.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{_NS}::{name}", fake, lib=_lib)


def _uses_triton(x: torch.Tensor) -> bool:
    return _dispatch.uses_triton(x)


def _none0(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return t if t is not None else like.new_empty(0)


def _mask_numel(x, residual, activation) -> int:
    return -(-x.numel() // 32) if residual is not None and activation in ops.GATED else 0


def _like_fake(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` with the strides ``torch.empty_like(x)`` has (what the fake kernels promise)."""
    if y.stride() == x.stride() and ops.readable(x):
        return y
    return torch.empty_like(x).copy_(y)


def _mean_invstd(x, mean_src, var_src, training, eps):
    if training:
        return ops.stats_views(mean_src, x.shape[1])
    acc = torch_math.acc_dtype(x)
    return mean_src.to(acc), torch.rsqrt(var_src.to(acc) + eps)


# --- forward --------------------------------------------------------------------------------------

def bn_batch_stats(x, running_mean, running_var, num_batches_tracked, momentum, eps):
    if _uses_triton(x):
        return ops.batch_stats(x, running_mean, running_var, num_batches_tracked, momentum, eps)
    return torch.cat(torch_math.batch_stats(x, running_mean, running_var, num_batches_tracked, momentum,
                                            eps))


def _batch_stats_fake(x, running_mean, running_var, num_batches_tracked, momentum, eps):
    return x.new_empty(2 * x.shape[1], dtype=torch_math.acc_dtype(x))


_define("bn_batch_stats(Tensor x, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
        "Tensor? num_batches_tracked, float? momentum, float eps) -> Tensor", bn_batch_stats,
        _batch_stats_fake)


def bn_batch_stats_untracked(x, eps):
    return bn_batch_stats(x, None, None, None, 0.0, eps)


def _batch_stats_untracked_fake(x, eps):
    return _batch_stats_fake(x, None, None, None, 0.0, eps)


# The statistics of a layer without running stats (track_running_stats=False): an op that mutates
# nothing, as Inductor cannot lower the mutable one's functionalized form with both buffers None.
_define("bn_batch_stats_untracked(Tensor x, float eps) -> Tensor", bn_batch_stats_untracked,
        _batch_stats_untracked_fake)


def bn_normalize(x, weight, bias, residual, mean_src, var_src, eps, training, activation):
    write_mask = _mask_numel(x, residual, activation) > 0
    if _uses_triton(x):
        y, mask = ops.normalize(x, weight, bias, mean_src, var_src, training, eps, residual, activation,
                                write_mask)
    else:
        y, mask = torch_math.normalize(x, weight, bias, *_mean_invstd(x, mean_src, var_src, training, eps),
                                       residual, activation)
    return _like_fake(x, y), mask if mask is not None else x.new_empty(0, dtype=torch.int32)


def _normalize_fake(x, weight, bias, residual, mean_src, var_src, eps, training, activation):
    return torch.empty_like(x), x.new_empty(_mask_numel(x, residual, activation), dtype=torch.int32)


_define("bn_normalize(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, Tensor mean_src, "
        "Tensor var_src, float eps, bool training, int activation) -> (Tensor, Tensor)", bn_normalize,
        _normalize_fake)


# --- backward --------------------------------------------------------------------------------------

def bn_backward(dy, x, weight, bias, mean_src, var_src, mask, eps, training, activation, need_dx,
                need_dweight, need_dbias, need_dz, dbias_dtype):
    need_dweight = need_dweight and weight is not None
    dbias_dtype = dbias_dtype if need_dbias else None
    if _uses_triton(x):
        dx, dw, db, dz, _ = ops.backward(dy, x, weight, bias, mean_src, var_src, mask, training, eps,
                                         activation, need_dx, need_dweight, dbias_dtype, need_dz)
    else:
        mean, invstd = _mean_invstd(x, mean_src, var_src, training, eps)
        dx, dw, db, dz = torch_math.backward(dy, x, weight, bias, mean, invstd, mask, training, eps,
                                             activation, need_dx, need_dweight, dbias_dtype, need_dz)
    dx = _like_fake(x, dx) if dx is not None else x.new_empty(0)
    dz = _like_fake(x, dz) if dz is not None else x.new_empty(0)
    return dx, _none0(dw, x), _none0(db, x), dz


def _backward_fake(dy, x, weight, bias, mean_src, var_src, mask, eps, training, activation, need_dx,
                   need_dweight, need_dbias, need_dz, dbias_dtype):
    c = x.shape[1]
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    dw = x.new_empty(c, dtype=weight.dtype) if need_dweight and weight is not None else x.new_empty(0)
    db = x.new_empty(c, dtype=dbias_dtype) if need_dbias else x.new_empty(0)
    dz = torch.empty_like(x) if need_dz else x.new_empty(0)
    return dx, dw, db, dz


_define("bn_backward(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean_src, Tensor var_src, "
        "Tensor? mask, float eps, bool training, int activation, bool need_dx, bool need_dweight, "
        "bool need_dbias, bool need_dz, ScalarType dbias_dtype) -> (Tensor, Tensor, Tensor, Tensor)",
        bn_backward, _backward_fake)


class Normalize(torch.autograd.Function):
    """``bn_normalize`` with its gradient: ``(x, weight, bias, residual)`` get theirs from ``bn_backward``
    (in training dx is the whole batch-norm gradient, through the statistics too, so ``mean_src`` and
    ``var_src`` get none). ``var_src`` is None in training, where both are ``stats`` (Dynamo takes no
    tensor twice; nor a residual that is x itself, ``bn(x) + x``: ``residual_is_x`` then, and x gets both
    gradients). Returns ``(y, mask)``, the mask not differentiable."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, mean_src, var_src, eps, training, activation, residual_is_x):
        if var_src is None:
            var_src = mean_src
        if residual_is_x:
            residual = x
        y, mask = torch.ops.tritonbn.bn_normalize(x, weight, bias, residual, mean_src, var_src, eps, training,
                                                  activation)
        ctx.mark_non_differentiable(mask)
        # The mask exists (is not empty) exactly when there is a residual and a gated activation.
        has_mask = residual is not None and activation in ops.GATED
        saved = (x, weight, bias, mean_src, None if training else var_src, mask if has_mask else None)
        ctx.save_for_backward(*saved)
        ctx.cfg = (training, eps, activation, bias.dtype if bias is not None else None,
                   # (not while Dynamo traces this: the compiled graph's backward gets its own saved tensors)
                   None if torch.compiler.is_compiling() or not ops.saved_tensor_hooks_active()
                   else ops.saved_meta(saved), residual_is_x)
        return y, mask

    @staticmethod
    def backward(ctx, dy, _dmask):
        training, eps, activation, bias_dtype, meta, residual_is_x = ctx.cfg
        saved = ctx.saved_tensors
        x, weight, bias, mean_src, var_src, mask = saved if meta is None else ops.restore_saved(saved, meta)
        if training:
            var_src = mean_src
        need_dx, need_dw, need_db, need_dz = ctx.needs_input_grad[:4]
        if residual_is_x:
            need_dz = need_dx
        need_dw = need_dw and weight is not None
        need_db = need_db and bias_dtype is not None
        dz = None
        if need_dz and not activation:
            dz, need_dz = dy, False     # y = bn(x) + z: the residual's gradient is dy itself
        grads = (None, None, None, dz)
        if need_dx or need_dw or need_db or need_dz:
            dx, dw, db, dz_op = torch.ops.tritonbn.bn_backward(
                dy, x, weight, bias, mean_src, var_src, mask, eps, training, activation, need_dx, need_dw,
                need_db, need_dz, bias_dtype if need_db else x.dtype)
            grads = (dx if need_dx else None, dw if need_dw else None, db if need_db else None,
                     dz_op if need_dz else dz)
        if residual_is_x:
            grads = (None if grads[0] is None else grads[0] + grads[3], grads[1], grads[2], None)
        return grads + (None,) * 6


# --- entry point used by tritonbn.functional while tracing ------------------------------------------

def _cumulative_batch_norm(input, running_mean, running_var, weight, bias, num_batches_tracked, eps):
    """A training call with the cumulative average (momentum=None) in standard, differentiable ATen ops,
    for exporters: ``F.batch_norm`` with momentum 1 leaves the batch mean and unbiased variance in
    temporaries, then the running stats take ``(1 − f)·running + f·batch`` with f = 1/num_batches_tracked
    read on the device (``F.batch_norm`` takes only a Python float, which would bake one step's factor
    into the exported graph)."""
    batch_mean, batch_var = torch.zeros_like(running_mean), torch.ones_like(running_var)
    y = torch.nn.functional.batch_norm(input, batch_mean, batch_var, weight, bias, True, 1.0, eps)
    f = 1.0 / num_batches_tracked.to(running_mean.dtype)
    running_mean.mul_(1.0 - f).add_(batch_mean * f)
    running_var.mul_(1.0 - f).add_(batch_var * f)
    return y


def dispatch(input, running_mean, running_var, weight, bias, training, momentum, eps,
             num_batches_tracked=None, residual=None, activation=0):
    """Graph-capture path of ``batch_norm_impl`` (arguments already checked): exporters get
    ``F.batch_norm`` + add + activation (standard, differentiable ATen, so ``torch.export``/ONNX emit
    ``batch_norm`` / ``BatchNormalization`` and an exported training graph trains; the cumulative average
    through ``_cumulative_batch_norm``; nothing runs a kernel while exporting), ``torch.compile`` gets the
    custom ops (tritonbn's kernels run in the compiled graph)."""
    if _dispatch.tracing_for_export():
        if training and momentum is None and running_mean is not None and num_batches_tracked is not None:
            y = _cumulative_batch_norm(input, running_mean, running_var, weight, bias, num_batches_tracked,
                                       eps)
        else:
            y = torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, training,
                                               0.0 if momentum is None else momentum, eps)
        return torch_math.epilogue(y, residual, activation)
    if not training:
        mean_src, var_src = running_mean, running_var
    else:
        # x.detach(): the statistics carry no gradient of their own (bn_normalize's backward is whole).
        if running_mean is None:
            mean_src = torch.ops.tritonbn.bn_batch_stats_untracked(input.detach(), eps)
        else:
            mean_src = torch.ops.tritonbn.bn_batch_stats(input.detach(), running_mean, running_var,
                                                         num_batches_tracked, momentum, eps)
        var_src = None
    same = residual is input
    return Normalize.apply(input, weight, bias, None if same else residual, mean_src, var_src, eps, training,
                           activation, same)[0]
