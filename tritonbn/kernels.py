"""Triton kernels for batch normalization.

Every kernel sees the input through one strided view ``[N, C, S]``: ``N`` outer rows, ``C`` channels and
``S`` inner positions, with element ``(n, c, s)`` at ``n*stride_xn + c*stride_xc + s*stride_xs``. The
launchers (``tritonbn/ops.py``) map each layout onto it so that no copy is needed:

* NCHW-contiguous ``(N, C, *spatial)``: ``[N, C, prod(spatial)]``, ``stride_xs == 1``;
* channels_last / channels_last_3d and ``(N, C)``: batch and spatial merged into ``[1, C, N*prod(spatial)]``,
  ``stride_xc == 1``.

Tiles are ``[BLOCK_S, BLOCK_C]``; Triton specializes unit strides, so loads vectorize along whichever axis
is contiguous. Tile-local offsets are int32 and every tile base is int64, so tensors past 2**31 elements
are addressed correctly.

Reductions (statistics, backward sums) run on a 2-D grid ``(channel tiles, splits)``: split ``k`` owns a
contiguous range of the ``N * cdiv(S, BLOCK_S)`` row blocks and writes one partial per channel; a finalize
kernel merges the partials in a fixed order, so results are bit-identical from run to run.
"""

import triton
import triton.language as tl


@triton.jit
def _welford_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan et al.'s parallel merge of two (mean, M2, count) summaries; empty summaries are harmless."""
    n = n_a + n_b
    w_b = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    return mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b, n


@triton.jit
def _invstd(var, eps):
    """1/√(var+ε), correctly rounded (the default fp32 sqrt and division are approximate)."""
    var = var + tl.full(var.shape, eps, var.dtype)
    if var.dtype == tl.float64:
        return 1.0 / tl.sqrt(var)
    else:
        return tl.div_rn(tl.full(var.shape, 1.0, tl.float32), tl.sqrt_rn(var))


@triton.jit
def _reduce_tile(C, blocks_per_split, total_blocks, stride_xc, stride_xs,
                 BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's channel tile and row-block range in a reduction kernel (grid ``(channel tiles,
    splits)``): first channel, lane offsets, channel mask, int32 tile offsets, int64 channel base, and the
    row blocks ``[b_start, b_end)`` of its split."""
    c0 = tl.program_id(0) * BLOCK_C
    offs_s = tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = (c0 + offs_c) < C
    tile = offs_s[:, None] * stride_xs + offs_c[None, :] * stride_xc
    b_start = tl.program_id(1) * blocks_per_split
    b_end = tl.minimum(b_start + blocks_per_split, total_blocks)
    return c0, offs_s, offs_c, mask_c, tile, c0.to(tl.int64) * stride_xc, b_start, b_end


@triton.jit
def _row_block(b, S, num_sblocks, stride_xn, stride_xs, offs_s, mask_c, BLOCK_S: tl.constexpr):
    """Row block ``b`` of a reduction's ``N * num_sblocks`` blocks: its int64 offset and tile mask."""
    n = b // num_sblocks
    s0 = (b - n * num_sblocks) * BLOCK_S
    mask = ((s0 + offs_s) < S)[:, None] & mask_c[None, :]
    return n.to(tl.int64) * stride_xn + s0.to(tl.int64) * stride_xs, mask


@triton.jit
def _bn_stats_kernel(
    x_ptr, part_ptr,
    C, S, num_sblocks, blocks_per_split, total_blocks,
    stride_xn, stride_xc, stride_xs,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Partial batch statistics of one channel tile over one split of the rows.

    Each lane of the ``[BLOCK_S, BLOCK_C]`` tile runs Welford's update over the row blocks of the split
    (mean += δ/n, M2 += δ·(x − mean_new)); the lanes are then merged along the row axis with Chan's formula.
    Values are shifted by K_c = x[0, c, 0] first: with |μ| ≫ σ (say μ = 1e4, σ = 1e-2 in fp32) an unshifted
    running mean cannot absorb increments δ/n below its ulp and the variance is lost; shifted, every
    quantity is O(σ). Writes shifted ``mean − K, M2, count`` into ``part[3, splits, C]`` (ACC_DTYPE).

    Grid: ``(cdiv(C, BLOCK_C), splits)``.
    """
    c0, offs_s, offs_c, mask_c, tile, c_base, b_start, b_end = _reduce_tile(
        C, blocks_per_split, total_blocks, stride_xc, stride_xs, BLOCK_S, BLOCK_C)
    x_base = x_ptr + c_base
    shift = tl.load(x_base + offs_c * stride_xc, mask=mask_c, other=0.0).to(ACC_DTYPE)

    mean = tl.zeros([BLOCK_S, BLOCK_C], dtype=ACC_DTYPE)
    m2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=ACC_DTYPE)
    count = tl.zeros([BLOCK_S, BLOCK_C], dtype=ACC_DTYPE)
    for b in range(b_start, b_end):
        row, mask = _row_block(b, S, num_sblocks, stride_xn, stride_xs, offs_s, mask_c, BLOCK_S)
        x = tl.load(x_base + row + tile, mask=mask, other=0.0).to(ACC_DTYPE) - shift[None, :]
        w = mask.to(ACC_DTYPE)
        count += w
        delta = x - mean
        mean += delta * w / tl.maximum(count, 1.0)
        m2 += delta * (x - mean) * w

    mean_c, m2_c, count_c = tl.reduce((mean, m2, count), 0, _welford_combine)
    out = part_ptr + tl.program_id(1) * C + c0 + offs_c
    plane = tl.num_programs(1) * C
    tl.store(out, mean_c, mask=mask_c)
    tl.store(out + plane, m2_c, mask=mask_c)
    tl.store(out + 2 * plane, count_c, mask=mask_c)


@triton.jit
def _bn_stats_finalize_kernel(
    x_ptr, part_ptr,
    mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr, num_batches_ptr,
    C, num_splits, momentum: tl.float64, eps: tl.float64, stride_xc,
    HAS_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Merge the ``part[3, splits, C]`` shifted partials into mean (K_c = x[0, c, 0] added back) and
    invstd = 1/√(σ²+ε) (biased σ²), and update running stats.

    running ← (1 − f)·running + f·batch, with the unbiased variance σ²·m/(m − 1) for running_var and
    f = momentum, or f = 1/num_batches_tracked (read on the device) when CUMULATIVE, so no host sync.

    Grid: ``(cdiv(C, BLOCK_C),)``.
    """
    pid = tl.program_id(0)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    offs_k = tl.arange(0, BLOCK_K)
    plane = num_splits * C
    mean = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    m2 = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    count = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    for k0 in range(0, num_splits, BLOCK_K):
        mask = ((k0 + offs_k) < num_splits)[:, None] & mask_c[None, :]
        idx = (k0 + offs_k)[:, None] * C + offs_c[None, :]
        p_mean = tl.load(part_ptr + idx, mask=mask, other=0.0)
        p_m2 = tl.load(part_ptr + plane + idx, mask=mask, other=0.0)
        p_count = tl.load(part_ptr + 2 * plane + idx, mask=mask, other=0.0)
        b_mean, b_m2, b_count = tl.reduce((p_mean, p_m2, p_count), 0, _welford_combine)
        mean, m2, count = _welford_combine(mean, m2, count, b_mean, b_m2, b_count)

    mean += tl.load(x_ptr + offs_c.to(tl.int64) * stride_xc, mask=mask_c, other=0.0).to(ACC_DTYPE)
    var = m2 / tl.maximum(count, 1.0)
    invstd = _invstd(var, eps)
    tl.store(mean_ptr + offs_c, mean, mask=mask_c)
    tl.store(invstd_ptr + offs_c, invstd, mask=mask_c)
    if HAS_RUNNING:
        # Scalars arrive as fp64 (annotated) so fp64 running stats get the exact momentum.
        if CUMULATIVE:
            factor = 1.0 / tl.load(num_batches_ptr).to(ACC_DTYPE)
        else:
            factor = tl.full([BLOCK_C], momentum, ACC_DTYPE)
        unbiased = m2 / tl.maximum(count - 1.0, 1.0)
        rm = tl.load(running_mean_ptr + offs_c, mask=mask_c, other=0.0).to(ACC_DTYPE)
        rv = tl.load(running_var_ptr + offs_c, mask=mask_c, other=0.0).to(ACC_DTYPE)
        keep = 1.0 - factor
        rm = factor * mean + keep * rm
        rv = factor * unbiased + keep * rv
        tl.store(running_mean_ptr + offs_c, rm.to(running_mean_ptr.dtype.element_ty), mask=mask_c)
        tl.store(running_var_ptr + offs_c, rv.to(running_var_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def _elementwise_tile(C, S, num_sblocks, num_cblocks, stride_xn, stride_xc, stride_xs,
                      BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile of an elementwise kernel: int64 base offset, int32 tile offsets, channel
    indices and masks. Programs are ordered (channel tile, row block, n), channel tiles fastest."""
    pid = tl.program_id(0)
    pid_c = pid % num_cblocks
    rest = pid // num_cblocks
    pid_s = rest % num_sblocks
    n = rest // num_sblocks
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, BLOCK_C)
    c0 = pid_c * BLOCK_C
    chan = c0 + offs_c
    mask_c = chan < C
    mask = (offs_s < S)[:, None] & mask_c[None, :]
    base = n.to(tl.int64) * stride_xn + c0.to(tl.int64) * stride_xc
    tile = offs_s[:, None] * stride_xs + offs_c[None, :] * stride_xc
    return base, tile, chan, mask_c, mask


@triton.jit
def _bn_forward_kernel(
    x_ptr, y_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr,
    C, S, num_sblocks, num_cblocks, eps: tl.float64,
    stride_xn, stride_xc, stride_xs,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, FROM_VAR: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Normalize + affine: y = (x − μ)·(γ·invstd) + β, written in y's dtype with x's strides.

    Training passes the batch mean/invstd; inference (FROM_VAR) passes running_mean/running_var and computes
    invstd = 1/√(var+ε) per channel here. Subtracting μ before scaling keeps precision when |μ| ≫ σ.

    Grid: ``(N * cdiv(S, BLOCK_S) * cdiv(C, BLOCK_C),)``, channel tiles fastest.
    """
    base, tile, chan, mask_c, mask = _elementwise_tile(C, S, num_sblocks, num_cblocks, stride_xn, stride_xc,
                                                       stride_xs, BLOCK_S, BLOCK_C)

    mean = tl.load(mean_ptr + chan, mask=mask_c, other=0.0).to(ACC_DTYPE)
    if FROM_VAR:
        var = tl.load(invstd_ptr + chan, mask=mask_c, other=1.0).to(ACC_DTYPE)
        scale = _invstd(var, eps)
    else:
        scale = tl.load(invstd_ptr + chan, mask=mask_c, other=0.0).to(ACC_DTYPE)
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + chan, mask=mask_c, other=0.0).to(ACC_DTYPE)
    if HAS_BIAS:
        shift = tl.load(bias_ptr + chan, mask=mask_c, other=0.0).to(ACC_DTYPE)
    else:
        shift = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)

    x = tl.load(x_ptr + base + tile, mask=mask, other=0.0).to(ACC_DTYPE)
    y = (x - mean[None, :]) * scale[None, :] + shift[None, :]
    tl.store(y_ptr + base + tile, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_backward_reduce_kernel(
    x_ptr, dy_ptr, mean_ptr, invstd_ptr, part_ptr,
    C, S, num_sblocks, blocks_per_split, total_blocks,
    stride_xn, stride_xc, stride_xs,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Partial sums Σdy and Σ(dy·x̂), x̂ = (x − μ)·invstd, from the saved μ and invstd.

    Same view, tiling and split as ``_bn_stats_kernel``; writes ``part[2, splits, C]`` (ACC_DTYPE).
    Grid: ``(cdiv(C, BLOCK_C), splits)``.
    """
    c0, offs_s, offs_c, mask_c, tile, c_base, b_start, b_end = _reduce_tile(
        C, blocks_per_split, total_blocks, stride_xc, stride_xs, BLOCK_S, BLOCK_C)
    mean = tl.load(mean_ptr + c0 + offs_c, mask=mask_c, other=0.0).to(ACC_DTYPE)

    sum_dy = tl.zeros([BLOCK_S, BLOCK_C], dtype=ACC_DTYPE)
    sum_dy_xc = tl.zeros([BLOCK_S, BLOCK_C], dtype=ACC_DTYPE)
    for b in range(b_start, b_end):
        row, mask = _row_block(b, S, num_sblocks, stride_xn, stride_xs, offs_s, mask_c, BLOCK_S)
        base = c_base + row
        x = tl.load(x_ptr + base + tile, mask=mask, other=0.0).to(ACC_DTYPE)
        dy = tl.load(dy_ptr + base + tile, mask=mask, other=0.0).to(ACC_DTYPE)
        sum_dy += dy
        sum_dy_xc += dy * tl.where(mask, x - mean[None, :], 0.0)

    invstd = tl.load(invstd_ptr + c0 + offs_c, mask=mask_c, other=0.0).to(ACC_DTYPE)
    out = part_ptr + tl.program_id(1) * C + c0 + offs_c
    tl.store(out, tl.sum(sum_dy, axis=0), mask=mask_c)
    tl.store(out + tl.num_programs(1) * C, tl.sum(sum_dy_xc, axis=0) * invstd, mask=mask_c)


@triton.jit
def _bn_backward_finalize_kernel(
    part_ptr, sums_ptr, dweight_ptr, dbias_ptr,
    C, num_splits,
    HAS_DWEIGHT: tl.constexpr, HAS_DBIAS: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Sum the ``part[2, splits, C]`` partials in a fixed order into ``sums[2, C]`` = (Σdy, Σ(dy·x̂))
    (ACC_DTYPE), and dβ = Σdy, dγ = Σ(dy·x̂) in the parameters' dtypes.

    Grid: ``(cdiv(C, BLOCK_C),)``.
    """
    pid = tl.program_id(0)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    offs_k = tl.arange(0, BLOCK_K)
    acc_dy = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    acc_dy_xhat = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    for k0 in range(0, num_splits, BLOCK_K):
        mask = ((k0 + offs_k) < num_splits)[:, None] & mask_c[None, :]
        idx = (k0 + offs_k)[:, None] * C + offs_c[None, :]
        acc_dy += tl.sum(tl.load(part_ptr + idx, mask=mask, other=0.0), axis=0)
        acc_dy_xhat += tl.sum(tl.load(part_ptr + num_splits * C + idx, mask=mask, other=0.0), axis=0)
    tl.store(sums_ptr + offs_c, acc_dy, mask=mask_c)
    tl.store(sums_ptr + C + offs_c, acc_dy_xhat, mask=mask_c)
    if HAS_DWEIGHT:
        tl.store(dweight_ptr + offs_c, acc_dy_xhat.to(dweight_ptr.dtype.element_ty), mask=mask_c)
    if HAS_DBIAS:
        tl.store(dbias_ptr + offs_c, acc_dy.to(dbias_ptr.dtype.element_ty), mask=mask_c)


@triton.jit(do_not_specialize=["count"])
def _bn_backward_dx_kernel(
    x_ptr, dy_ptr, dx_ptr, mean_ptr, invstd_ptr, weight_ptr, sums_ptr,
    C, S, num_sblocks, num_cblocks, count,
    stride_xn, stride_xc, stride_xs,
    HAS_WEIGHT: tl.constexpr, TRAINING: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """dx = γ·invstd · (dy − Σdy/m − x̂·Σ(dy·x̂)/m), m = ``count`` = N·S, x̂ = (x − μ)·invstd (training:
    batch statistics); dx = γ·invstd · dy when the statistics were constants (eval with running stats),
    and x is not read then.

    Grid: ``(N * cdiv(S, BLOCK_S) * cdiv(C, BLOCK_C),)``, channel tiles fastest.
    """
    base, tile, chan, mask_c, mask = _elementwise_tile(C, S, num_sblocks, num_cblocks, stride_xn, stride_xc,
                                                       stride_xs, BLOCK_S, BLOCK_C)

    invstd = tl.load(invstd_ptr + chan, mask=mask_c, other=0.0).to(ACC_DTYPE)
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + chan, mask=mask_c, other=0.0).to(ACC_DTYPE)
    dy = tl.load(dy_ptr + base + tile, mask=mask, other=0.0).to(ACC_DTYPE)
    if TRAINING:
        inv_count = 1.0 / count.to(ACC_DTYPE)
        mean = tl.load(mean_ptr + chan, mask=mask_c, other=0.0).to(ACC_DTYPE)
        mean_dy = tl.load(sums_ptr + chan, mask=mask_c, other=0.0) * inv_count
        mean_dy_xhat = tl.load(sums_ptr + C + chan, mask=mask_c, other=0.0) * inv_count
        x = tl.load(x_ptr + base + tile, mask=mask, other=0.0).to(ACC_DTYPE)
        xhat = (x - mean[None, :]) * invstd[None, :]
        dx = (dy - mean_dy[None, :] - xhat * mean_dy_xhat[None, :]) * scale[None, :]
    else:
        dx = dy * scale[None, :]
    tl.store(dx_ptr + base + tile, dx.to(dx_ptr.dtype.element_ty), mask=mask)
