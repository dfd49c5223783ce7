"""Launchers for the Triton batch-norm kernels, and the autograd function built on them.

Launchers take and return torch tensors, choose tiles and splits (``_plan``), and never synchronize with
the host: no ``.item()``, no branch on tensor values, so they can be captured in CUDA graphs.

Tile heuristic (documented here because it is the whole tuning story; no autotuning, which would re-run
kernels that update running statistics):

* channel-contiguous view (channels_last, ``(N, C)``): ``BLOCK_C = min(next_pow2(C), 64)`` channels
  (≥128 contiguous bytes per row for 2-byte dtypes) × ``BLOCK_S = TILE / BLOCK_C`` rows;
* spatial-contiguous view (NCHW): ``BLOCK_S = min(next_pow2(S), TILE)`` positions, and when a channel's
  plane is small (7×7, 14×14) ``BLOCK_C = TILE / BLOCK_S`` neighbouring channels per tile, so a tile still
  covers one contiguous span of memory;
* ``TILE`` is 2048 elements (8 warps) for the reductions and 4096 for the elementwise kernels;
* reductions split the rows so that the grid has about ``4 × SMs`` programs: small C with a large N·S
  fills the GPU too, unlike one-block-per-channel kernels.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

# Set by ``tritonbn.compile_gate`` to record kernel launches instead of running them.
_launch_hook = None


@dataclasses.dataclass(frozen=True)
class Tuning:
    reduce_tile: int = 2048
    elementwise_tile: int = 4096
    max_block_c: int = 64
    reduce_warps: int = 8
    elementwise_warps: int = 8
    waves: int = 4                 # reduction programs per SM
    interpreter_programs: int = 8  # "SM count" under the interpreter: keeps several splits in the tests


TUNING = Tuning()


_KERNELS = None


def _kernels():
    # Imported on first use: TRITON_INTERPRET is read when @triton.jit runs, and imports stay free of work.
    global _KERNELS
    if _KERNELS is None:
        from tritonbn import kernels

        _KERNELS = kernels
    return _KERNELS


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return TUNING.waves * _sm_count(device.index if device.index is not None else 0)
    return TUNING.interpreter_programs


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.cache
def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


@dataclasses.dataclass(frozen=True)
class View:
    """The ``[N, C, S]`` view of a tensor (see ``tritonbn/kernels.py``)."""

    n: int
    c: int
    s: int
    stride_n: int
    stride_c: int
    stride_s: int

    @property
    def strides(self) -> tuple[int, int, int]:
        return self.stride_n, self.stride_c, self.stride_s


def _view3d(x: torch.Tensor) -> View | None:
    """``[N, C, S]`` view of ``x`` with spatial dims merged, and batch merged too when rows are evenly
    spaced (channels_last, ``(N, C)``); None when the spatial dims cannot be merged."""
    return _view3d_cached(tuple(x.shape), x.stride())


@functools.lru_cache(maxsize=4096)
def _view3d_cached(shape: tuple[int, ...], strides: tuple[int, ...]) -> View | None:
    n, c = shape[0], shape[1]
    sn, sc = strides[0], strides[1]
    spatial = [(d, st) for d, st in zip(shape[2:], strides[2:]) if d != 1]
    s = 1
    for d in shape[2:]:
        s *= d
    for (_, outer), (d_in, inner) in zip(spatial, spatial[1:]):
        if outer != inner * d_in:
            return None
    ss = spatial[-1][1] if spatial else sn
    if n == 1 or s == 1 or sn == ss * s:
        return View(1, c, n * s, 0, sc, ss)
    return View(n, c, s, sn, sc, ss)


def _prepare(x: torch.Tensor) -> tuple[torch.Tensor, View]:
    """``x`` (copied only if it is not dense, or its spatial dims cannot be merged) and its view."""
    if not _is_dense(x):
        x = x.contiguous()
    view = _view3d(x)
    if view is None:
        x = x.contiguous()
        view = _view3d(x)
    return x, view


def _is_dense(x: torch.Tensor) -> bool:
    # empty_like keeps the strides of exactly these tensors, so y/dx share x's view.
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) or (
        x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return True
    return torch.empty_like(x).stride() == x.stride()


def _like(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` with exactly ``x``'s strides (a copy only when they differ, e.g. an expanded gradient)."""
    if t.stride() == x.stride():
        return t
    return torch.empty_like(x, dtype=t.dtype).copy_(t)


@functools.lru_cache(maxsize=4096)
def _tiles(view: View, tile: int) -> tuple[int, int]:
    max_c = min(_next_pow2(view.c), TUNING.max_block_c)
    if view.stride_c == 1 and view.stride_s != 1:
        block_c = max_c
        block_s = min(_next_pow2(view.s), max(1, tile // block_c))
    else:
        block_s = min(_next_pow2(view.s), tile)
        block_c = min(max_c, max(1, tile // block_s))
    # Tile-local offsets are int32.
    if (block_s - 1) * abs(view.stride_s) + (block_c - 1) * abs(view.stride_c) >= 2**31:
        raise RuntimeError("tritonbn: tensor strides too large for a tile; make the input contiguous")
    return block_s, block_c


def _launch(kernel, grid, *args, num_warps, **constexprs):
    if _launch_hook is not None:
        _launch_hook(kernel, grid, args, constexprs, num_warps)
        return
    device = args[0].device
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        # Triton launches on the current device and stream: follow the tensors (e.g. a model on cuda:1).
        with torch.cuda.device(device):
            kernel[grid](*args, num_warps=num_warps, **constexprs)
        return
    kernel[grid](*args, num_warps=num_warps, **constexprs)


@dataclasses.dataclass(frozen=True)
class ReducePlan:
    """Tiles and row splits of a reduction kernel (grid ``(num_cblocks, splits)``)."""

    block_s: int
    block_c: int
    num_sblocks: int
    num_cblocks: int
    total_blocks: int   # N * num_sblocks row blocks per channel tile
    splits: int
    blocks_per_split: int


def _reduce_plan(view: View, device: torch.device) -> ReducePlan:
    return _reduce_plan_cached(view, _target_programs(device), TUNING)


@functools.lru_cache(maxsize=4096)
def _reduce_plan_cached(view: View, target_programs: int, tuning: Tuning) -> ReducePlan:
    block_s, block_c = _tiles(view, tuning.reduce_tile)
    num_sblocks = _cdiv(view.s, block_s)
    num_cblocks = _cdiv(view.c, block_c)
    total = view.n * num_sblocks
    splits = max(1, min(total, _cdiv(target_programs, num_cblocks)))
    per_split = _cdiv(total, splits)
    return ReducePlan(block_s, block_c, num_sblocks, num_cblocks, total, _cdiv(total, per_split), per_split)


@functools.lru_cache(maxsize=4096)
def _elementwise_plan(view: View, tuning: Tuning):
    """(BLOCK_S, BLOCK_C, num_sblocks, num_cblocks, grid) of the elementwise kernels."""
    block_s, block_c = _tiles(view, tuning.elementwise_tile)
    num_sblocks, num_cblocks = _cdiv(view.s, block_s), _cdiv(view.c, block_c)
    return block_s, block_c, num_sblocks, num_cblocks, (view.n * num_sblocks * num_cblocks,)


@functools.lru_cache(maxsize=4096)
def _finalize_blocks(c: int, splits: int) -> tuple[int, int]:
    block_c = min(_next_pow2(c), 128)
    block_k = min(_next_pow2(splits), max(1, 2048 // block_c))
    return block_k, block_c


def bn_stat_partials(x: torch.Tensor, view: View) -> tuple[torch.Tensor, int]:
    """Per-split batch statistics ``[3, splits, C]`` = (mean − K_c, M2, count), shifted by
    K_c = x[0, c, 0] (see ``_bn_stats_kernel``), and the number of splits."""
    acc = _acc_dtype(x.dtype)
    p = _reduce_plan(view, x.device)
    parts = torch.empty((3, p.splits, view.c), dtype=acc, device=x.device)
    _launch(
        _kernels()._bn_stats_kernel, (p.num_cblocks, p.splits),
        x, parts,
        view.c, view.s, p.num_sblocks, p.blocks_per_split, p.total_blocks, *view.strides,
        BLOCK_S=p.block_s, BLOCK_C=p.block_c, ACC_DTYPE=_tl_dtype(acc), num_warps=TUNING.reduce_warps,
    )
    return parts, p.splits


def bn_stats(x: torch.Tensor, view: View, running_mean, running_var, num_batches_tracked,
             momentum: float | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch mean and invstd (fp32, fp64 for fp64 input); updates the running stats in place if given."""
    acc = _acc_dtype(x.dtype)
    parts, splits = bn_stat_partials(x, view)
    mean = torch.empty(view.c, dtype=acc, device=x.device)
    invstd = torch.empty(view.c, dtype=acc, device=x.device)
    has_running = running_mean is not None
    cumulative = momentum is None and num_batches_tracked is not None
    if momentum is None and not cumulative:
        momentum = 0.0  # torch's factor when momentum=None and num_batches_tracked is missing
    block_k, fblock_c = _finalize_blocks(view.c, splits)
    _launch(
        _kernels()._bn_stats_finalize_kernel, (_cdiv(view.c, fblock_c),),
        x, parts, mean, invstd,
        running_mean if has_running else mean, running_var if has_running else invstd,
        num_batches_tracked if cumulative else mean,
        view.c, splits, float(momentum or 0.0), float(eps), view.stride_c,
        HAS_RUNNING=has_running, CUMULATIVE=cumulative,
        BLOCK_K=block_k, BLOCK_C=fblock_c, ACC_DTYPE=_tl_dtype(acc), num_warps=4,
    )
    return mean, invstd


def bn_normalize(x: torch.Tensor, view: View, mean, invstd_or_var, weight, bias, eps: float,
                 from_var: bool) -> torch.Tensor:
    """y = (x − mean)·invstd·γ + β; with ``from_var`` the second vector is a variance (inference)."""
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    block_s, block_c, num_sblocks, num_cblocks, grid = _elementwise_plan(view, TUNING)
    _launch(
        _kernels()._bn_forward_kernel, grid,
        x, y, mean, invstd_or_var,
        weight if weight is not None else mean, bias if bias is not None else mean,
        view.c, view.s, num_sblocks, num_cblocks, float(eps), *view.strides,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, FROM_VAR=from_var,
        BLOCK_S=block_s, BLOCK_C=block_c, ACC_DTYPE=_tl_dtype(_acc_dtype(x.dtype)),
        num_warps=TUNING.elementwise_warps,
    )
    return y


def bn_forward_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps):
    """Training forward: returns (y, saved_mean, saved_invstd). Running stats are updated in place."""
    x, view = _prepare(x)
    if x.numel() == 0:
        acc = _acc_dtype(x.dtype)
        c = x.shape[1]
        nan = torch.full((c,), float("nan"), dtype=acc, device=x.device)
        return torch.empty_like(x), nan, nan.clone()
    mean, invstd = bn_stats(x, view, running_mean, running_var, num_batches_tracked, momentum, eps)
    return bn_normalize(x, view, mean, invstd, weight, bias, eps, from_var=False), mean, invstd


def bn_forward_eval(x, weight, bias, running_mean, running_var, eps):
    """Inference forward from running statistics: one elementwise kernel."""
    x, view = _prepare(x)
    return bn_normalize(x, view, running_mean, running_var, weight, bias, eps, from_var=True)


def bn_backward_sums(x: torch.Tensor, dy: torch.Tensor, view: View, mean, invstd, dweight=None,
                     dbias=None) -> torch.Tensor:
    """``[Σdy, Σ(dy·x̂)]`` per channel (accumulation dtype), summed in a fixed order; also written to
    ``dbias`` / ``dweight`` (dβ = Σdy, dγ = Σ(dy·x̂)) when given. ``dy`` has ``x``'s strides."""
    acc = _acc_dtype(x.dtype)
    c = view.c
    if x.numel() == 0:
        for t in (dweight, dbias):
            if t is not None:
                t.zero_()
        return torch.zeros((2, c), dtype=acc, device=x.device)
    k = _kernels()
    p = _reduce_plan(view, x.device)
    parts = torch.empty((2, p.splits, c), dtype=acc, device=x.device)
    _launch(
        k._bn_backward_reduce_kernel, (p.num_cblocks, p.splits),
        x, dy, mean, invstd, parts,
        c, view.s, p.num_sblocks, p.blocks_per_split, p.total_blocks, *view.strides,
        BLOCK_S=p.block_s, BLOCK_C=p.block_c, ACC_DTYPE=_tl_dtype(acc), num_warps=TUNING.reduce_warps,
    )
    sums = torch.empty((2, c), dtype=acc, device=x.device)
    block_k, fblock_c = _finalize_blocks(c, p.splits)
    _launch(
        k._bn_backward_finalize_kernel, (_cdiv(c, fblock_c),),
        parts, sums, dweight if dweight is not None else sums, dbias if dbias is not None else sums,
        c, p.splits,
        HAS_DWEIGHT=dweight is not None, HAS_DBIAS=dbias is not None,
        BLOCK_K=block_k, BLOCK_C=fblock_c, ACC_DTYPE=_tl_dtype(acc), num_warps=4,
    )
    return sums


def bn_backward_dx(x: torch.Tensor, dy: torch.Tensor, view: View, weight, mean, invstd, sums, count: int,
                   training: bool) -> torch.Tensor:
    """dx from ``sums = [Σdy, Σ(dy·x̂)]`` over ``count`` values per channel (training), or dx = γ·invstd·dy
    (constant statistics: ``sums`` unused). ``dy`` has ``x``'s strides."""
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx
    block_s, block_c, num_sblocks, num_cblocks, grid = _elementwise_plan(view, TUNING)
    _launch(
        _kernels()._bn_backward_dx_kernel, grid,
        x, dy, dx, mean, invstd, weight if weight is not None else invstd,
        sums if sums is not None else invstd,
        view.c, view.s, num_sblocks, num_cblocks, count, *view.strides,
        HAS_WEIGHT=weight is not None, TRAINING=training,
        BLOCK_S=block_s, BLOCK_C=block_c, ACC_DTYPE=_tl_dtype(_acc_dtype(x.dtype)),
        num_warps=TUNING.elementwise_warps,
    )
    return dx


def bn_backward(dy, x, weight, mean, invstd, training: bool, need_dx: bool, need_dweight: bool,
                dbias_dtype: torch.dtype | None):
    """Gradients (dx, dγ, dβ), each None unless asked for (dβ when ``dbias_dtype`` is given).
    ``mean``/``invstd`` are the saved batch statistics (training) or the running ones (eval), in the
    accumulation dtype."""
    x, view = _prepare(x)
    dy = _like(x, dy)
    c = view.c
    dweight = torch.empty(c, dtype=weight.dtype, device=x.device) if need_dweight else None
    dbias = torch.empty(c, dtype=dbias_dtype, device=x.device) if dbias_dtype is not None else None
    sums = None
    if dweight is not None or dbias is not None or (training and need_dx):
        sums = bn_backward_sums(x, dy, view, mean, invstd, dweight, dbias)
    dx = None
    if need_dx:
        dx = bn_backward_dx(x, dy, view, weight, mean, invstd, sums, view.n * view.s, training)
    return dx, dweight, dbias


class BatchNormFunction(torch.autograd.Function):
    """Autograd layer over the launchers. Saves fp32 (fp64 for fp64 input) mean and invstd for backward;
    the eval-mode backward uses the running statistics, which are constants."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum,
                eps):
        if training:
            y, mean, invstd = bn_forward_train(x, weight, bias, running_mean, running_var,
                                               num_batches_tracked, momentum, eps)
            ctx.save_for_backward(x, weight, mean, invstd)
        else:
            y = bn_forward_eval(x, weight, bias, running_mean, running_var, eps)
            ctx.save_for_backward(x, weight, running_mean, running_var)
        ctx.training = training
        ctx.eps = eps
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        if not ctx.training:
            acc = _acc_dtype(x.dtype)
            mean = mean.to(acc)
            invstd = torch.rsqrt(invstd.to(acc) + ctx.eps)
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx, dweight, dbias = bn_backward(dy, x, weight, mean, invstd, ctx.training, need_dx,
                                         need_dw and weight is not None,
                                         ctx.bias_dtype if need_db else None)
        return dx, dweight, dbias, None, None, None, None, None, None
