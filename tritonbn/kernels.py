"""Triton kernels for batch normalization, with an optional fused residual add and activation.

Every kernel sees the input through one strided view ``[N, C, S]``: ``N`` outer rows, ``C`` channels and
``S`` inner positions, with element ``(n, c, s)`` at ``n*stride_xn + c*stride_xc + s*stride_xs``. The
launchers (``tritonbn/ops.py``) map each layout onto it so that no copy is needed:

* NCHW-contiguous ``(N, C, *spatial)``: ``[N, C, prod(spatial)]``, ``stride_xs == 1`` ("planar");
* channels_last / channels_last_3d and ``(N, C)``: batch and spatial merged into ``[1, C, N*prod(spatial)]``,
  ``stride_xc == 1`` ("channels-last").

Elementwise kernels (forward, dx) address their elements in one of three ways (constexpr ``LAYOUT``):

* ``TILED`` (0): ``[BLOCK_S, BLOCK_C]`` tiles of the view, channel tiles fastest; per-channel parameters
  are loaded once per tile column. The default: cheap 2-D addressing, at the price of idle lanes where S
  (planar) or C (channels-last) is not a power of two;
* ``FLAT_CL`` (1) / ``FLAT_PLANAR`` (2): the tensor as one flat range of memory in blocks of
  ``BLOCK_S * BLOCK_C`` elements, channel ``off % C`` (channels-last) or ``(off // S) % C`` (planar) per
  element, per-channel parameters gathered: no idle lanes, but several times TILED's instructions per
  element. Used for the ReLU bitmask where no tile holds whole 32-element words of memory (planar S or
  channels-last C not a multiple of 32), and on request (``Tuning.flat``);
* ``FLAT_RUNS`` (3): planar FLAT blocks as ``BLOCK_S`` runs of ``BLOCK_C`` consecutive elements, each in at
  most two planes: a run's two channels are found and their parameters loaded once, and each element
  picks one (``_bn_affine_at``). Planar FLAT's replacement wherever it fits (``ops._runs_fit``), and the
  default for planes whose rows TILED cannot load in vectors of 8 bytes or more (7×7: rows misaligned).

Offsets are int32 inside a tile or block and int64 at its base, so tensors past 2**31 elements are
addressed correctly (FLAT_RUNS, which the launchers take only below 2**31 elements, is int32 throughout:
its per-block divisions are then 32-bit, not a 64-bit division routine).

Reductions (statistics, backward sums) run on a 2-D grid ``(channel tiles, splits)``: split ``k`` owns a
contiguous range of the ``N * cdiv(S, BLOCK_S)`` row blocks and writes one partial per channel. The last
program of each channel tile to finish (a ticket from an ``acq_rel`` atomic counter, reset by that program,
so the counters are zero again for the next launch on the stream) merges the partials in a fixed order:
one launch per reduction, and results bit-identical from run to run whichever program finishes last.

The fused epilogue is ``y = act(u)``, ``u = γ·(x − μ)·invstd + β [+ z]``, with ``act`` None, ReLU,
ReLU6, SiLU or Hardswish (``_activation``). The backward needs act'(u): without a residual u is recomputed
from x with the forward's arithmetic (``_bn_affine`` + ``_bn_output``, shared by every kernel, so ReLU
masks agree bit for bit). The gated activations (ReLU: 0 < u, ReLU6: 0 < u < 6; act' is 1 there and 0
elsewhere) also take a residual: the forward then writes the gate as a bitmask (bit ``i`` of word
``i // 32`` is element ``i`` in memory order). SiLU and Hardswish take none (their act' would need z in the
backward: the launchers run that case unfused).
"""

import triton
import triton.language as tl

TILED: tl.constexpr = tl.constexpr(0)
FLAT_CL: tl.constexpr = tl.constexpr(1)
FLAT_PLANAR: tl.constexpr = tl.constexpr(2)
FLAT_RUNS: tl.constexpr = tl.constexpr(3)
# WRITE_MASK: how the forward packs the ReLU bitmask (always bit i = element i in memory order).
MASK_NONE: tl.constexpr = tl.constexpr(0)
MASK_FLAT: tl.constexpr = tl.constexpr(1)   # FLAT block: 32 consecutive lanes per word
MASK_S: tl.constexpr = tl.constexpr(2)      # TILED planar tile (stride_xs == 1, S % 32 == 0): words along S
MASK_C: tl.constexpr = tl.constexpr(3)      # TILED channels-last tile (stride_xc == 1, C % 32 == 0): along C
ACT_NONE: tl.constexpr = tl.constexpr(0)
ACT_RELU: tl.constexpr = tl.constexpr(1)
ACT_RELU6: tl.constexpr = tl.constexpr(2)
ACT_SILU: tl.constexpr = tl.constexpr(3)
ACT_HARDSWISH: tl.constexpr = tl.constexpr(4)


def _jit(**kwargs):
    # Small per-channel vectors need no 16-byte alignment specialization: one compiled kernel serves any
    # parameter slice, and the launch-plan cache needs to key only on the big tensors' alignment. Older
    # triton has no such option (and then takes the normal launch path, which specializes per call).
    import inspect

    if "do_not_specialize_on_alignment" not in inspect.signature(triton.jit).parameters:
        kwargs.pop("do_not_specialize_on_alignment", None)
    return triton.jit(**kwargs)


_SMALL = ["mean_ptr", "var_ptr", "weight_ptr", "bias_ptr", "running_mean_ptr", "running_var_ptr",
          "num_batches_ptr", "ws_ptr", "cnt_ptr", "dweight_ptr", "dbias_ptr", "sums_ptr", "mask_ptr"]


@triton.jit
def _welford_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan et al.'s parallel merge of two (mean, M2, count) summaries. Empty summaries are harmless, and
    an overflowing δ² gives M2 = inf, never NaN (δ·n_a and δ·w_b are 0 when a side is empty)."""
    n = n_a + n_b
    w_b = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    return mean_a + delta * w_b, m2_a + m2_b + (delta * n_a) * (delta * w_b), n


@triton.jit
def _invstd(var, eps):
    """1/√(var+ε), correctly rounded (the default fp32 sqrt and division are approximate)."""
    var = var + tl.full(var.shape, eps, var.dtype)
    if var.dtype == tl.float64:
        return 1.0 / tl.sqrt(var)
    else:
        return tl.div_rn(tl.full(var.shape, 1.0, tl.float32), tl.sqrt_rn(var))


@triton.jit
def _bn_affine(mean_ptr, var_ptr, weight_ptr, bias_ptr, chan, cmask, var_off, eps,
               HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, FROM_VAR: tl.constexpr,
               ACC_DTYPE: tl.constexpr):
    """Per-channel (μ, invstd, scale = γ·invstd, shift = β) at channels ``chan``: from the saved batch
    statistics (``mean_ptr[c]``, ``var_ptr[var_off + c]`` = invstd), or with FROM_VAR from running
    statistics (invstd = 1/√(var+ε) computed here)."""
    mean = tl.load(mean_ptr + chan, mask=cmask, other=0.0).to(ACC_DTYPE)
    v = tl.load(var_ptr + var_off + chan, mask=cmask, other=1.0).to(ACC_DTYPE)
    if FROM_VAR:
        invstd = _invstd(v, eps)
    else:
        invstd = v
    scale, shift = _bn_scale_shift(invstd, weight_ptr, bias_ptr, chan, cmask, HAS_WEIGHT, HAS_BIAS, ACC_DTYPE)
    return mean, invstd, scale, shift


@triton.jit
def _bn_scale_shift(invstd, weight_ptr, bias_ptr, chan, cmask, HAS_WEIGHT: tl.constexpr,
                    HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """(scale = γ·invstd, shift = β) at channels ``chan``: invstd and 0 without γ / β."""
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + chan, mask=cmask, other=0.0).to(ACC_DTYPE)
    if HAS_BIAS:
        shift = tl.load(bias_ptr + chan, mask=cmask, other=0.0).to(ACC_DTYPE)
    else:
        shift = tl.zeros_like(invstd)
    return scale, shift


@triton.jit
def _bn_output(x, mean, scale, shift, OUT_DTYPE: tl.constexpr):
    """γ·(x − μ)·invstd + β rounded to the output dtype (and held in x's accumulation dtype, exactly), with
    one explicit FMA so that every kernel recomputing it (the ReLU mask) gets the same bits. Subtracting μ
    first keeps precision when |μ| ≫ σ. Comparisons then run in fp32/fp64, never on 16-bit values."""
    return tl.fma(x - mean, scale, shift).to(OUT_DTYPE).to(x.dtype)


@triton.jit
def _bn_output_residual(x, z, mean, scale, shift, OUT_DTYPE: tl.constexpr):
    """``_bn_output`` + z, rounded once to the output dtype (the forward's y before its activation; the
    backward reads the gate from the bitmask, so nothing recomputes it)."""
    return (tl.fma(x - mean, scale, shift) + z).to(OUT_DTYPE).to(x.dtype)


@triton.jit
def _activation(u, ACTIVATION: tl.constexpr):
    """act(u) in u's (accumulation) dtype, as torch computes it: ReLU and ReLU6 (hardtanh) keep NaN, SiLU
    is u / (1 + e^−u), Hardswish u·min(max(u + 3, 0), 6) / 6 (NaN kept)."""
    if ACTIVATION == ACT_RELU:
        u = tl.where(u < 0, 0.0, u)
    elif ACTIVATION == ACT_RELU6:
        u = tl.where(u < 0, 0.0, tl.where(u > 6.0, 6.0, u))
    elif ACTIVATION == ACT_SILU:
        u = u / (1.0 + tl.exp(-u))
    elif ACTIVATION == ACT_HARDSWISH:
        t = u + 3.0
        u = u * tl.where(t < 0, 0.0, tl.where(t > 6.0, 6.0, t)) / 6.0
    return u


@triton.jit
def _act_gate(u, ACTIVATION: tl.constexpr):
    """Where a gated activation passes the gradient, as torch's threshold / hardtanh backward: 0 < u
    (ReLU), 0 < u < 6 (ReLU6); NaN passes nothing. The forward's bitmask stores it."""
    gate = u > 0
    if ACTIVATION == ACT_RELU6:
        gate = gate & (u < 6.0)
    return gate


@triton.jit
def _act_backward(g, u, ACTIVATION: tl.constexpr):
    """g·act'(u), u recomputed as the forward computed it: gated (ReLU, ReLU6) g where the gate is open,
    else 0; SiLU g·σ(u)·(1 + u·(1 − σ(u))), as torch's silu_backward; Hardswish 0 up to −3, g·(u/3 + ½)
    below 3, g from 3 on (and for NaN), as torch's hardswish_backward (2.11, 2.13)."""
    if ACTIVATION == ACT_SILU:
        sig = 1.0 / (1.0 + tl.exp(-u))
        g = g * (sig * (1.0 + u * (1.0 - sig)))
    elif ACTIVATION == ACT_HARDSWISH:
        g = tl.where(u <= -3.0, 0.0, tl.where(u < 3.0, g * (u / 3.0 + 0.5), g))
    else:
        g = tl.where(_act_gate(u, ACTIVATION), g, 0.0)
    return g


@triton.jit
def _mask_bit(mask_ptr, off, mask):
    """Bit ``off`` of the ReLU bitmask (element ``off`` of the input in memory order)."""
    word = tl.load(mask_ptr + (off >> 5), mask=mask, other=0)
    return ((word >> (off & 31).to(tl.int32)) & 1) != 0


@triton.jit
def _mask_bit_aligned(mask_ptr, base, offs, mask):
    """``_mask_bit(mask_ptr, base + offs, mask)`` for an int64 ``base`` that is a multiple of 32 and int32
    ``offs``: the word index splits into a scalar and an int32 part, and the bit comes from ``offs`` alone
    (no int64 shift and mask per element: 2-8 fewer sm_90 instructions per element in the backward
    reduction's loop, ``benchmarks/sass_stats.py --kernel reduce --fused``)."""
    word = tl.load(mask_ptr + (base >> 5) + (offs >> 5), mask=mask, other=0)
    return ((word >> (offs & 31)) & 1) != 0


@triton.jit
def _hint_divisible(v, DIV: tl.constexpr):
    """``v``, declared a multiple of DIV (the launcher checked it): ``(v // DIV) * DIV`` lets Triton's
    alignment analysis see it, so loads along the contiguous axis vectorize although ``v`` is not a
    multiple of 16 (a 14×14 plane is 196 elements: 16-byte aligned rows in fp32)."""
    if DIV > 1:
        v = (v // DIV) * DIV
    return v


@triton.jit
def _view_hints(C, S, stride_xn, stride_xc, stride_xs, DIV_S: tl.constexpr, DIV_C: tl.constexpr):
    """Divisibility the launcher proved for the view: DIV_S for the planar axis (S, stride_xc, stride_xn),
    DIV_C for the channel axis (C, stride_xs, stride_xn); at most one of them is above 1."""
    return (_hint_divisible(C, DIV_C), _hint_divisible(S, DIV_S), _hint_divisible(stride_xn, DIV_S * DIV_C),
            _hint_divisible(stride_xc, DIV_S), _hint_divisible(stride_xs, DIV_C))


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
def _row_blocks(b_start, num_sblocks, stride_xn, stride_xs, BLOCK_S: tl.constexpr):
    """Start of a loop over a reduction's ``N * num_sblocks`` row blocks from block ``b_start``: (row block
    within its plane, int64 offset, step to the next block in the plane, step to the next plane's first).
    ``_next_row_block`` carries them forward: no division or 64-bit multiply per block."""
    n = b_start // num_sblocks
    sb = b_start - n * num_sblocks
    step_s = tl.full([], BLOCK_S, tl.int64) * stride_xs
    return sb, n.to(tl.int64) * stride_xn + sb * step_s, step_s, stride_xn - (num_sblocks - 1) * step_s


@triton.jit
def _next_row_block(sb, row, num_sblocks, step_s, step_n):
    sb += 1
    wrap = sb == num_sblocks
    return tl.where(wrap, 0, sb), row + tl.where(wrap, step_n, step_s)


@triton.jit
def _row_mask(sb, S, offs_s, mask_c, BLOCK_S: tl.constexpr):
    """The tile mask of row block ``sb`` of a plane."""
    return (offs_s < S - sb * BLOCK_S)[:, None] & mask_c[None, :]


@triton.jit
def _last_ticket(cnt_ptr, expected):
    """Whether this program draws the last of ``expected`` tickets of the counter at ``cnt_ptr``.

    Every thread's partial stores are issued before the barrier; the ``acq_rel`` ticket then releases them
    to, and acquires everyone else's for, the program that draws the last ticket. That program resets the
    counter (``_reset_counter``) so the next launch on this stream finds it zero."""
    tl.debug_barrier()
    ticket = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    return ticket == expected - 1


@triton.jit
def _reset_counter(cnt_ptr):
    tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")


@triton.jit
def _merge_group(cnt_ptr, num_splits, BLOCK_K: tl.constexpr):
    """Two-level merge of a reduction's partials (GROUPED: more splits than two merge steps take): the
    splits form groups of BLOCK_K, and the last program of each group merges the group's partials in one
    step while other programs are still reducing. Returns (merges the group, counter, number of groups,
    group): the group counters follow the channel tiles' own, ``num_groups`` per channel tile. The last
    group merger of a channel tile then merges the group partials (``_last_ticket`` on the tile's counter,
    ``num_groups`` tickets): a serial tail of 1 + cdiv(groups, BLOCK_K) steps after the last program,
    instead of cdiv(splits, BLOCK_K)."""
    num_groups = tl.cdiv(num_splits, BLOCK_K)
    g = tl.program_id(1) // BLOCK_K
    cnt = cnt_ptr + tl.num_programs(0) + tl.program_id(0) * num_groups + g
    return _last_ticket(cnt, tl.minimum(BLOCK_K, num_splits - g * BLOCK_K)), cnt, num_groups, g


@triton.jit
def _merge_welford(src, plane, C, k_begin, k_end, chan, mask_c, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                   ACC_DTYPE: tl.constexpr):
    """Chan-merge of the Welford partials ``(mean, M2, count)`` at ``src + k·C + chan`` (planes ``plane``
    apart), k in ``[k_begin, k_end)``, in a fixed order: lane k merges partials k, k + BLOCK_K, ...
    elementwise, then the lanes are merged once. A reduction across threads per step instead made this
    tail the bulk of channels-last statistics with few channel tiles (on the H200, C = 64 merged ~520
    splits in 17 steps; that pass ran at 28% of copy bandwidth, against 66% for the same tensor in NCHW)."""
    offs_k = tl.arange(0, BLOCK_K)
    mean_k = tl.zeros([BLOCK_K, BLOCK_C], dtype=ACC_DTYPE)
    m2_k = tl.zeros([BLOCK_K, BLOCK_C], dtype=ACC_DTYPE)
    count_k = tl.zeros([BLOCK_K, BLOCK_C], dtype=ACC_DTYPE)
    for k0 in range(k_begin, k_end, BLOCK_K):
        kmask = ((k0 + offs_k) < k_end)[:, None] & mask_c[None, :]
        idx = (k0 + offs_k)[:, None] * C + chan[None, :]
        p_mean = tl.load(src + idx, mask=kmask, other=0.0, cache_modifier=".cg")
        p_m2 = tl.load(src + plane + idx, mask=kmask, other=0.0, cache_modifier=".cg")
        p_count = tl.load(src + 2 * plane + idx, mask=kmask, other=0.0, cache_modifier=".cg")
        mean_k, m2_k, count_k = _welford_combine(mean_k, m2_k, count_k, p_mean, p_m2, p_count)
    return tl.reduce((mean_k, m2_k, count_k), 0, _welford_combine)


@triton.jit
def _merge_sums(src, plane, C, k_begin, k_end, chan, mask_c, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                ACC_DTYPE: tl.constexpr):
    """Sums of the two partial planes at ``src + k·C + chan`` (``plane`` apart), k in ``[k_begin, k_end)``,
    in a fixed order: per-lane sums over the steps, one reduction across threads at the end."""
    offs_k = tl.arange(0, BLOCK_K)
    acc_a = tl.zeros([BLOCK_K, BLOCK_C], dtype=ACC_DTYPE)
    acc_b = tl.zeros([BLOCK_K, BLOCK_C], dtype=ACC_DTYPE)
    for k0 in range(k_begin, k_end, BLOCK_K):
        kmask = ((k0 + offs_k) < k_end)[:, None] & mask_c[None, :]
        idx = (k0 + offs_k)[:, None] * C + chan[None, :]
        acc_a += tl.load(src + idx, mask=kmask, other=0.0, cache_modifier=".cg")
        acc_b += tl.load(src + plane + idx, mask=kmask, other=0.0, cache_modifier=".cg")
    return tl.sum(acc_a, axis=0), tl.sum(acc_b, axis=0)


@triton.jit
def _finish_stats(ws_ptr, running_mean_ptr, running_var_ptr, num_batches_ptr, C, chan, mask_c, shift,
                  mean_t, m2_t, count_t, momentum, eps, HAS_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr,
                  BUMP_BATCHES: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """μ (K added back) and invstd = 1/√(σ²+ε) (biased σ²) into ``ws``; the running statistics updated."""
    mean_t += shift
    invstd = _invstd(m2_t / tl.maximum(count_t, 1.0), eps)
    tl.store(ws_ptr + chan, mean_t, mask=mask_c)
    tl.store(ws_ptr + C + chan, invstd, mask=mask_c)
    if HAS_RUNNING:
        # Scalars arrive as fp64 (annotated) so fp64 running stats get the exact momentum.
        if CUMULATIVE:
            factor = 1.0 / (tl.load(num_batches_ptr) + BUMP_BATCHES).to(ACC_DTYPE)
        else:
            factor = tl.full([BLOCK_C], momentum, ACC_DTYPE)
        unbiased = m2_t / tl.maximum(count_t - 1.0, 1.0)
        rm = tl.load(running_mean_ptr + chan, mask=mask_c, other=0.0).to(ACC_DTYPE)
        rv = tl.load(running_var_ptr + chan, mask=mask_c, other=0.0).to(ACC_DTYPE)
        keep = 1.0 - factor
        rm = factor * mean_t + keep * rm
        rv = factor * unbiased + keep * rv
        tl.store(running_mean_ptr + chan, rm.to(running_mean_ptr.dtype.element_ty), mask=mask_c)
        tl.store(running_var_ptr + chan, rv.to(running_var_ptr.dtype.element_ty), mask=mask_c)


@_jit(do_not_specialize_on_alignment=_SMALL)
def _bn_stats_kernel(
    x_ptr, ws_ptr, cnt_ptr, running_mean_ptr, running_var_ptr, num_batches_ptr,
    C, S, num_sblocks, blocks_per_split, total_blocks, momentum: tl.float64, eps: tl.float64,
    stride_xn, stride_xc, stride_xs,
    HAS_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, BUMP_BATCHES: tl.constexpr,
    FINALIZE: tl.constexpr, GROUPED: tl.constexpr, STAGES: tl.constexpr, DIV_S: tl.constexpr,
    DIV_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """Batch statistics: per-split partials, merged by the last program of each channel tile.

    Each lane of the ``[BLOCK_S, BLOCK_C]`` tile runs Welford's update over the row blocks of the split
    (mean += δ·(1/n), M2 += δ·(x − mean_new)); the lanes are then merged along the row axis with Chan's
    formula.
    Values are shifted by K_c = x[0, c, 0] first: with |μ| ≫ σ (say μ = 1e4, σ = 1e-2 in fp32) an unshifted
    running mean cannot absorb increments δ/n below its ulp and the variance is lost; shifted, every
    quantity is O(σ).

    Workspace ``ws`` (ACC_DTYPE): ``[mean (C) | invstd (C) | partials (3, splits, C) | group partials
    (3, groups, C) when GROUPED]``, partials being the shifted ``(mean − K, M2, count)``. With FINALIZE the
    last program of each channel tile merges the partials in a fixed order (``_merge_welford``; GROUPED: in
    two levels, ``_merge_group``) into μ (K added back) and invstd = 1/√(σ²+ε) (biased σ²), and updates the
    running stats: running ← (1 − f)·running + f·batch with the unbiased σ²·m/(m − 1) for running_var,
    f = momentum, or with CUMULATIVE f = 1/num_batches_tracked read on the device (plus one when
    BUMP_BATCHES: the forward kernel that follows increments it). Without FINALIZE only the partials are
    written (SyncBatchNorm merges them across processes).

    Counters (int32, zero between launches): one per channel tile, then GROUPED ``groups`` per channel tile.
    STAGES: software-pipelining stages of the main loop (``tl.range``'s num_stages; 1 = plain loads).
    Grid: ``(cdiv(C, BLOCK_C), splits)``.
    """
    C, S, stride_xn, stride_xc, stride_xs = _view_hints(C, S, stride_xn, stride_xc, stride_xs, DIV_S, DIV_C)
    c0, offs_s, offs_c, mask_c, tile, c_base, b_start, b_end = _reduce_tile(
        C, blocks_per_split, total_blocks, stride_xc, stride_xs, BLOCK_S, BLOCK_C)
    x_base = x_ptr + c_base
    shift = tl.load(x_base + offs_c * stride_xc, mask=mask_c, other=0.0).to(ACC_DTYPE)

    mean = tl.zeros([BLOCK_S, BLOCK_C], dtype=ACC_DTYPE)
    m2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=ACC_DTYPE)
    # A lane's Welford count is one of two scalars: rows below the last row block's length are in every
    # block, the others only in full blocks. So the update multiplies by one of two reciprocals instead of
    # dividing every element by its own count: with the carried row offsets, 13-18 sm_90 instructions per
    # useful bf16 element instead of 25-33 (python -m benchmarks.sass_stats --kernel stats).
    in_every = offs_s < S - (num_sblocks - 1) * BLOCK_S
    n_full = b_start * 0
    sb, row, step_s, step_n = _row_blocks(b_start, num_sblocks, stride_xn, stride_xs, BLOCK_S)
    for b in tl.range(b_start, b_end, num_stages=STAGES):
        mask = _row_mask(sb, S, offs_s, mask_c, BLOCK_S)
        x = tl.load(x_base + row + tile, mask=mask, other=0.0).to(ACC_DTYPE) - shift[None, :]
        n_full += (sb < num_sblocks - 1).to(tl.int32)
        sb, row = _next_row_block(sb, row, num_sblocks, step_s, step_n)
        rcp = tl.where(in_every, 1.0 / (b - b_start + 1).to(ACC_DTYPE),
                       1.0 / tl.maximum(n_full, 1).to(ACC_DTYPE))
        # A masked lane reads its own mean: δ = 0 and x − mean_new = 0 exactly, so it changes neither sum
        # (a multiply by the mask instead could turn an overflowing δ² into inf·0 = NaN).
        x = tl.where(mask, x, mean)
        delta = x - mean
        mean += delta * rcp[:, None]
        m2 += delta * (x - mean)
    n_every = tl.maximum(b_end - b_start, 0)
    count = tl.broadcast_to(tl.where(in_every, n_every, n_full).to(ACC_DTYPE)[:, None], [BLOCK_S, BLOCK_C])

    mean_c, m2_c, count_c = tl.reduce((mean, m2, count), 0, _welford_combine)
    num_splits = tl.num_programs(1)
    part = ws_ptr + 2 * C
    plane = num_splits * C
    out = part + tl.program_id(1) * C + c0 + offs_c
    tl.store(out, mean_c, mask=mask_c)
    tl.store(out + plane, m2_c, mask=mask_c)
    tl.store(out + 2 * plane, count_c, mask=mask_c)

    if FINALIZE:
        chan = c0 + offs_c
        top = cnt_ptr + tl.program_id(0)
        if GROUPED:
            merges, cnt, num_groups, g = _merge_group(cnt_ptr, num_splits, BLOCK_K)
            src, src_plane, n_src = part + 3 * plane, num_groups * C, num_groups
            last = tl.full([], 0, tl.int1)
            if merges:
                k0 = g * BLOCK_K
                k1 = tl.minimum(k0 + BLOCK_K, num_splits)
                mean_g, m2_g, count_g = _merge_welford(part, plane, C, k0, k1, chan, mask_c, BLOCK_K, BLOCK_C,
                                                       ACC_DTYPE)
                out = src + g * C + chan
                tl.store(out, mean_g, mask=mask_c)
                tl.store(out + src_plane, m2_g, mask=mask_c)
                tl.store(out + 2 * src_plane, count_g, mask=mask_c)
                _reset_counter(cnt)
                last = _last_ticket(top, num_groups)
        else:
            src, src_plane, n_src = part, plane, num_splits
            last = _last_ticket(top, num_splits)
        if last:
            mean_t, m2_t, count_t = _merge_welford(src, src_plane, C, 0, n_src, chan, mask_c, BLOCK_K,
                                                   BLOCK_C, ACC_DTYPE)
            # K read again rather than kept in registers through the main loop in the merge's layout (that
            # copy spilled a register on sm_90 for bf16 input with fp32 running stats).
            k_c = tl.load(x_base + offs_c * stride_xc, mask=mask_c, other=0.0).to(ACC_DTYPE)
            _finish_stats(ws_ptr, running_mean_ptr, running_var_ptr, num_batches_ptr, C, chan, mask_c, k_c,
                          mean_t, m2_t, count_t, momentum, eps, HAS_RUNNING, CUMULATIVE, BUMP_BATCHES,
                          BLOCK_C, ACC_DTYPE)
            _reset_counter(top)


@triton.jit
def _tile_coords(num_sblocks, num_cblocks):
    """(n, row block, channel tile) of this program in a TILED grid: channel tiles fastest."""
    pid = tl.program_id(0)
    pid_c = pid % num_cblocks
    rest = pid // num_cblocks
    return rest // num_sblocks, rest % num_sblocks, pid_c


@triton.jit
def _store_mask_words(mask_ptr, positive, mask, base, C, S, numel, num_sblocks, num_cblocks, stride_xs,
                      stride_xc, WRITE_MASK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Store the ReLU bitmask of this program's elements: word ``w`` holds elements ``32·w … 32·w + 31`` of
    the input in memory order. FLAT blocks are 32-lane aligned runs of memory; TILED tiles (MASK_S / MASK_C)
    hold whole words along their contiguous axis, as the launcher guarantees (that axis' extent and the
    tile's block along it are multiples of 32), so every word is complete in one program."""
    bits = (positive & mask).to(tl.int32)
    shifts = tl.arange(0, 32)
    if WRITE_MASK == MASK_FLAT:
        words = tl.sum(tl.reshape(bits, (BLOCK_S * BLOCK_C // 32, 32)) << shifts[None, :], axis=1)
        w = tl.arange(0, BLOCK_S * BLOCK_C // 32)
        tl.store(mask_ptr + base // 32 + w, words, mask=w * 32 < numel - base)
    else:
        _, pid_s, pid_c = _tile_coords(num_sblocks, num_cblocks)
        if WRITE_MASK == MASK_C:
            # [BLOCK_S, BLOCK_C] → words [BLOCK_S, BLOCK_C // 32]; element (s, c) at s·stride_xs + c.
            words = tl.sum(tl.reshape(bits, (BLOCK_S, BLOCK_C // 32, 32)) << shifts[None, None, :], axis=2)
            offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
            w = tl.arange(0, BLOCK_C // 32)
            woff = offs_s[:, None] * (stride_xs // 32) + w[None, :]
            wmask = (offs_s < S)[:, None] & (pid_c * BLOCK_C + w * 32 < C)[None, :]
        else:
            # [BLOCK_S, BLOCK_C] → words [BLOCK_C, BLOCK_S // 32]; element (s, c) at s + c·stride_xc.
            words = tl.sum(tl.reshape(tl.trans(bits), (BLOCK_C, BLOCK_S // 32, 32)) << shifts[None, None, :],
                           axis=2)
            offs_c = tl.arange(0, BLOCK_C)
            offs_w = pid_s * (BLOCK_S // 32) + tl.arange(0, BLOCK_S // 32)
            woff = offs_c[:, None] * (stride_xc // 32) + offs_w[None, :]
            wmask = (pid_c * BLOCK_C + offs_c < C)[:, None] & (offs_w * 32 < S)[None, :]
        # base (the tile's n and first channel) is a multiple of 32 here.
        tl.store(mask_ptr + base // 32 + woff, words, mask=wmask)


@triton.jit
def _element_block(C, S, numel, num_sblocks, num_cblocks, stride_xn, stride_xc, stride_xs,
                   LAYOUT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's elements in an elementwise kernel: base offset (int64; int32 for FLAT_RUNS), int32
    offsets from it, the element mask, each element's channel (broadcastable to the elements) and its mask,
    and for FLAT_RUNS the next channel and which elements take it (``_bn_affine_at``).

    TILED: tile (channel tile, row block, n) of the view, channel tiles fastest. FLAT_*: memory block
    ``pid`` of ``BLOCK_S * BLOCK_C`` elements of a dense tensor; FLAT_RUNS: ``BLOCK_S`` runs of ``BLOCK_C``
    elements, each in at most two planes (S >= BLOCK_C), so channels are found and loaded once per run."""
    pid = tl.program_id(0)
    if LAYOUT == TILED:
        n, pid_s, pid_c = _tile_coords(num_sblocks, num_cblocks)
        offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        offs_c = tl.arange(0, BLOCK_C)
        c0 = pid_c * BLOCK_C
        chan = (c0 + offs_c)[None, :]
        cmask = chan < C
        mask = (offs_s < S)[:, None] & cmask
        base = n.to(tl.int64) * stride_xn + c0.to(tl.int64) * stride_xc
        offs = offs_s[:, None] * stride_xs + offs_c[None, :] * stride_xc
        chan_b, second = chan, cmask
    elif LAYOUT == FLAT_RUNS:
        # int32 throughout (the launcher takes this layout only below 2**31 elements): q0 is the plane
        # (n·C + c) of the block's first element, t each run's start counted from that plane's start.
        base = pid * (BLOCK_S * BLOCK_C)
        runs = tl.arange(0, BLOCK_S)[:, None] * BLOCK_C
        cols = tl.arange(0, BLOCK_C)[None, :]
        offs = runs + cols
        left = tl.minimum(numel - base, BLOCK_S * BLOCK_C)
        mask = offs < left
        q0 = base // S
        t = base - q0 * S + runs
        j = t // S
        chan = (q0 % C + j) % C
        chan_b = tl.where(chan == C - 1, 0, chan + 1)
        second = cols >= S - (t - j * S)              # past the end of the run's first plane
        cmask = runs < left
    else:
        base = pid.to(tl.int64) * (BLOCK_S * BLOCK_C)
        offs = tl.arange(0, BLOCK_S * BLOCK_C)
        mask = offs < tl.minimum(numel - base, BLOCK_S * BLOCK_C).to(tl.int32)
        if LAYOUT == FLAT_CL:
            chan = ((base % C).to(tl.int32) + offs) % C
        else:
            q0 = base // S
            s = (base - q0 * S).to(tl.int32) + offs
            chan = ((q0 % C).to(tl.int32) + s // S) % C
        cmask = mask
        chan_b, second = chan, cmask
    return base, offs, mask, chan, cmask, chan_b, second


@triton.jit
def _bn_affine_at(mean_ptr, var_ptr, weight_ptr, bias_ptr, chan, chan_b, second, cmask, var_off, eps,
                  HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, FROM_VAR: tl.constexpr,
                  ACC_DTYPE: tl.constexpr, LAYOUT: tl.constexpr):
    """``_bn_affine`` at the channels ``_element_block`` found: FLAT_RUNS computes it for both channels of
    each run and picks per element (the ``second`` ones take ``chan_b``'s)."""
    mean, invstd, scale, shift = _bn_affine(mean_ptr, var_ptr, weight_ptr, bias_ptr, chan, cmask, var_off,
                                            eps, HAS_WEIGHT, HAS_BIAS, FROM_VAR, ACC_DTYPE)
    if LAYOUT == FLAT_RUNS:
        mean_b, invstd_b, scale_b, shift_b = _bn_affine(mean_ptr, var_ptr, weight_ptr, bias_ptr, chan_b,
                                                        cmask, var_off, eps, HAS_WEIGHT, HAS_BIAS, FROM_VAR,
                                                        ACC_DTYPE)
        mean, invstd = tl.where(second, mean_b, mean), tl.where(second, invstd_b, invstd)
        scale, shift = tl.where(second, scale_b, scale), tl.where(second, shift_b, shift)
    return mean, invstd, scale, shift


@triton.jit
def _load_at(ptr, chan, chan_b, second, cmask, LAYOUT: tl.constexpr):
    """``ptr[chan]`` per element, as ``_bn_affine_at`` picks."""
    v = tl.load(ptr + chan, mask=cmask, other=0.0)
    if LAYOUT == FLAT_RUNS:
        v = tl.where(second, tl.load(ptr + chan_b, mask=cmask, other=0.0), v)
    return v


@_jit(do_not_specialize_on_alignment=_SMALL)
def _bn_forward_kernel(
    x_ptr, y_ptr, z_ptr, mask_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, num_batches_ptr,
    C, S, numel, num_sblocks, num_cblocks, var_off, eps: tl.float64,
    stride_xn, stride_xc, stride_xs,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, FROM_VAR: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, WRITE_MASK: tl.constexpr, BUMP_BATCHES: tl.constexpr, LAYOUT: tl.constexpr,
    DIV_S: tl.constexpr, DIV_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """y = act(γ·(x − μ)·invstd + β [+ z]), written in y's dtype with x's strides (z has them too).

    Training passes the batch statistics (``mean_ptr[c]``, ``var_ptr[var_off + c]`` = invstd: the stats
    kernel's workspace); inference (FROM_VAR) passes running_mean/running_var and invstd is computed per
    channel here. With WRITE_MASK the gate of a gated activation (``_act_gate``: ReLU, ReLU6) is written
    as a bitmask, one bit per element in memory order (``_store_mask_words``). With BUMP_BATCHES program 0
    increments num_batches_tracked (the stats kernel of the same call, which ran before, used its value
    plus one).

    Grid: ``(N * cdiv(S, BLOCK_S) * cdiv(C, BLOCK_C),)`` when TILED, ``(cdiv(numel, BLOCK_S * BLOCK_C),)``
    when FLAT.
    """
    tl.static_assert(WRITE_MASK == MASK_NONE or (LAYOUT == TILED) == (WRITE_MASK != MASK_FLAT),
                     "MASK_FLAT goes with a FLAT layout, MASK_S / MASK_C with TILED")
    C, S, stride_xn, stride_xc, stride_xs = _view_hints(C, S, stride_xn, stride_xc, stride_xs, DIV_S, DIV_C)
    base, offs, mask, chan, cmask, chan_b, second = _element_block(
        C, S, numel, num_sblocks, num_cblocks, stride_xn, stride_xc, stride_xs, LAYOUT, BLOCK_S, BLOCK_C)
    mean, _, scale, shift = _bn_affine_at(mean_ptr, var_ptr, weight_ptr, bias_ptr, chan, chan_b, second,
                                          cmask, var_off, eps, HAS_WEIGHT, HAS_BIAS, FROM_VAR, ACC_DTYPE,
                                          LAYOUT)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    if HAS_RESIDUAL:
        z = tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        y = _bn_output_residual(x, z, mean, scale, shift, y_ptr.dtype.element_ty)
    else:
        y = _bn_output(x, mean, scale, shift, y_ptr.dtype.element_ty)
    if WRITE_MASK != MASK_NONE:
        positive = _act_gate(y, ACTIVATION)
    y = _activation(y, ACTIVATION)
    tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    if WRITE_MASK != MASK_NONE:
        _store_mask_words(mask_ptr, positive, mask, base, C, S, numel, num_sblocks, num_cblocks, stride_xs,
                          stride_xc, WRITE_MASK, BLOCK_S, BLOCK_C)
    if BUMP_BATCHES:
        if tl.program_id(0) == 0:
            tl.store(num_batches_ptr, tl.load(num_batches_ptr) + 1)


@_jit(do_not_specialize_on_alignment=_SMALL)
def _bn_backward_reduce_kernel(
    x_ptr, dy_ptr, mask_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, ws_ptr, cnt_ptr, dweight_ptr,
    dbias_ptr,
    C, S, num_sblocks, blocks_per_split, total_blocks, var_off, eps: tl.float64,
    stride_xn, stride_xc, stride_xs,
    FROM_VAR: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_READ: tl.constexpr, HAS_DWEIGHT: tl.constexpr,
    HAS_DBIAS: tl.constexpr, GROUPED: tl.constexpr, STAGES: tl.constexpr, DIV_S: tl.constexpr,
    DIV_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """Σg and Σ(g·x̂), x̂ = (x − μ)·invstd, g = dy (no activation) or dy·act'(u) (the gate from the
    bitmask when HAS_MASK, else u recomputed from x exactly as the forward did: ``_act_backward``), from the
    saved statistics (never recomputed) or, FROM_VAR, the running ones. MASK_READ, how the bitmask is read:
    whole words of the tile (MASK_S / MASK_C, ``_mask_tile_bits``), bit by bit from row blocks that start at
    multiples of 32 elements (MASK_FLAT: word index in two parts), else bit by bit (MASK_NONE).

    Same view, tiling, split and counters as ``_bn_stats_kernel``. Workspace ``ws`` (ACC_DTYPE):
    ``[sums (2, C) | partials (2, splits, C) | group partials (2, groups, C) when GROUPED]``. The last program
    of each channel tile sums the partials in a fixed order (GROUPED: in two levels) into ``sums`` =
    (Σg, Σg·x̂) and writes dβ = Σg, dγ = Σg·x̂ in the parameters' dtypes.

    Grid: ``(cdiv(C, BLOCK_C), splits)``.
    """
    C, S, stride_xn, stride_xc, stride_xs = _view_hints(C, S, stride_xn, stride_xc, stride_xs, DIV_S, DIV_C)
    c0, offs_s, offs_c, mask_c, tile, c_base, b_start, b_end = _reduce_tile(
        C, blocks_per_split, total_blocks, stride_xc, stride_xs, BLOCK_S, BLOCK_C)
    chan = c0 + offs_c
    mean, invstd, scale, shift = _bn_affine(mean_ptr, var_ptr, weight_ptr, bias_ptr, chan, mask_c, var_off,
                                            eps, HAS_WEIGHT, HAS_BIAS, FROM_VAR, ACC_DTYPE)

    sum_g = tl.zeros([BLOCK_S, BLOCK_C], dtype=ACC_DTYPE)
    sum_g_xc = tl.zeros([BLOCK_S, BLOCK_C], dtype=ACC_DTYPE)
    sb, row, step_s, step_n = _row_blocks(b_start, num_sblocks, stride_xn, stride_xs, BLOCK_S)
    row += c_base
    for _ in tl.range(b_start, b_end, num_stages=STAGES):
        mask = _row_mask(sb, S, offs_s, mask_c, BLOCK_S)
        off = row + tile
        if ACTIVATION != ACT_NONE and HAS_MASK:
            if MASK_READ == MASK_S or MASK_READ == MASK_C:   # first: see the dx kernel
                positive = _mask_tile_bits(mask_ptr, row, offs_s, offs_c, S - sb * BLOCK_S, C - c0,
                                           stride_xs, stride_xc, MASK_READ, BLOCK_S, BLOCK_C)
            else:
                positive = _mask_bit_aligned(mask_ptr, row, tile, mask) if MASK_READ == MASK_FLAT else \
                    _mask_bit(mask_ptr, off, mask)
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC_DTYPE)
        g = tl.load(dy_ptr + off, mask=mask, other=0.0).to(ACC_DTYPE)
        if ACTIVATION != ACT_NONE:
            if HAS_MASK:
                g = tl.where(positive, g, 0.0)
            else:
                u = _bn_output(x, mean[None, :], scale[None, :], shift[None, :], x_ptr.dtype.element_ty)
                g = _act_backward(g, u, ACTIVATION)
                if ACTIVATION == ACT_SILU:
                    g = tl.where(mask, g, 0.0)   # masked lanes: act'(u) of x = 0 may be inf or NaN
        sum_g += g
        sum_g_xc += g * (x - mean[None, :])   # masked lanes: g = 0 and x − μ finite
        sb, row = _next_row_block(sb, row, num_sblocks, step_s, step_n)

    num_splits = tl.num_programs(1)
    part = ws_ptr + 2 * C
    plane = num_splits * C
    out = part + tl.program_id(1) * C + chan
    tl.store(out, tl.sum(sum_g, axis=0), mask=mask_c)
    tl.store(out + plane, tl.sum(sum_g_xc, axis=0) * invstd, mask=mask_c)

    top = cnt_ptr + tl.program_id(0)
    if GROUPED:
        merges, cnt, num_groups, g = _merge_group(cnt_ptr, num_splits, BLOCK_K)
        src, src_plane, n_src = part + 2 * plane, num_groups * C, num_groups
        last = tl.full([], 0, tl.int1)
        if merges:
            k0 = g * BLOCK_K
            g_sum, g_sum_xhat = _merge_sums(part, plane, C, k0, tl.minimum(k0 + BLOCK_K, num_splits), chan,
                                            mask_c, BLOCK_K, BLOCK_C, ACC_DTYPE)
            tl.store(src + g * C + chan, g_sum, mask=mask_c)
            tl.store(src + src_plane + g * C + chan, g_sum_xhat, mask=mask_c)
            _reset_counter(cnt)
            last = _last_ticket(top, num_groups)
    else:
        src, src_plane, n_src = part, plane, num_splits
        last = _last_ticket(top, num_splits)
    if last:
        acc_g, acc_g_xhat = _merge_sums(src, src_plane, C, 0, n_src, chan, mask_c, BLOCK_K, BLOCK_C,
                                        ACC_DTYPE)
        tl.store(ws_ptr + chan, acc_g, mask=mask_c)
        tl.store(ws_ptr + C + chan, acc_g_xhat, mask=mask_c)
        if HAS_DWEIGHT:
            tl.store(dweight_ptr + chan, acc_g_xhat.to(dweight_ptr.dtype.element_ty), mask=mask_c)
        if HAS_DBIAS:
            tl.store(dbias_ptr + chan, acc_g.to(dbias_ptr.dtype.element_ty), mask=mask_c)
        _reset_counter(top)


@_jit(do_not_specialize=["count"], do_not_specialize_on_alignment=_SMALL)
def _bn_backward_dx_kernel(
    x_ptr, dy_ptr, dx_ptr, dz_ptr, mask_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, sums_ptr,
    C, S, numel, num_sblocks, num_cblocks, var_off, count, eps: tl.float64,
    stride_xn, stride_xc, stride_xs,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, FROM_VAR: tl.constexpr, TRAINING: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_MASK: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DZ: tl.constexpr,
    LAYOUT: tl.constexpr, DIV_S: tl.constexpr, DIV_C: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr, MASK_READ: tl.constexpr,
):
    """dx = γ·invstd · (g − Σg/m − x̂·Σ(g·x̂)/m), m = ``count`` = N·S (TRAINING: batch statistics), or
    dx = γ·invstd · g when the statistics were constants (eval); g = dy, or dy·act'(u) after an activation
    (as in ``_bn_backward_reduce_kernel``, MASK_READ too); with WRITE_DZ also dz = g, the residual's gradient.

    Grid: as ``_bn_forward_kernel``.
    """
    C, S, stride_xn, stride_xc, stride_xs = _view_hints(C, S, stride_xn, stride_xc, stride_xs, DIV_S, DIV_C)
    base, offs, mask, chan, cmask, chan_b, second = _element_block(
        C, S, numel, num_sblocks, num_cblocks, stride_xn, stride_xc, stride_xs, LAYOUT, BLOCK_S, BLOCK_C)
    if ACTIVATION != ACT_NONE and HAS_MASK:
        # First: a bit-by-bit gather gets its own layout, its predicate converted to the tile's.
        positive = _mask_bit(mask_ptr, base + offs, mask) if MASK_READ == MASK_NONE else _mask_block_bits(
            mask_ptr, base, C, S, num_sblocks, num_cblocks, stride_xs, stride_xc, MASK_READ, BLOCK_S, BLOCK_C)
    mean, invstd, scale, shift = _bn_affine_at(mean_ptr, var_ptr, weight_ptr, bias_ptr, chan, chan_b, second,
                                               cmask, var_off, eps, HAS_WEIGHT, HAS_BIAS, FROM_VAR, ACC_DTYPE,
                                               LAYOUT)
    g = tl.load(dy_ptr + base + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    if TRAINING or (ACTIVATION != ACT_NONE and not HAS_MASK):
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    if ACTIVATION != ACT_NONE:
        if HAS_MASK:
            g = tl.where(positive, g, 0.0)
        else:
            g = _act_backward(g, _bn_output(x, mean, scale, shift, x_ptr.dtype.element_ty), ACTIVATION)
    if WRITE_DZ:
        tl.store(dz_ptr + base + offs, g.to(dz_ptr.dtype.element_ty), mask=mask)
    if WRITE_DX:
        if TRAINING:
            inv_count = 1.0 / count.to(ACC_DTYPE)
            mean_g = _load_at(sums_ptr, chan, chan_b, second, cmask, LAYOUT) * inv_count
            mean_g_xhat = _load_at(sums_ptr + C, chan, chan_b, second, cmask, LAYOUT) * inv_count
            xhat = (x - mean) * invstd
            dx = (g - mean_g - xhat * mean_g_xhat) * scale
        else:
            dx = g * scale
        tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --- one-launch training forward (Tuning.persistent) -------------------------------------------------
# Appended after the other kernels: Triton's cache key of a kernel includes its line number, so code added
# above them would recompile every cached specialization.

@triton.jit
def _grid_arrive(cnt_ptr):
    """Count this program in at the grid barrier (its partial stores released to the others)."""
    tl.debug_barrier()
    tl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _grid_wait(cnt_ptr, total):
    """Wait until all ``total`` programs have arrived (their stores acquired). Only for grids whose
    programs are all resident at once (a cooperative launch); never under the interpreter, which runs
    programs one after another (there the launcher splits the kernel at the barrier: PHASE 1, then 2)."""
    arrived = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
    while arrived < total:
        arrived = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _grid_depart(cnt_ptr, total):
    """Count this program out; whether it is the last of the grid to leave (every program has then passed
    the barrier and read what it needed: the last one resets the counter to zero for the next launch)."""
    tl.debug_barrier()
    ticket = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    return ticket == 2 * total - 1


@_jit(do_not_specialize_on_alignment=_SMALL)
def _bn_persistent_forward_kernel(
    x_ptr, y_ptr, z_ptr, ws_ptr, cnt_ptr, running_mean_ptr, running_var_ptr, num_batches_ptr, weight_ptr,
    bias_ptr,
    C, S, num_sblocks, momentum: tl.float64, eps: tl.float64,
    stride_xn, stride_xc, stride_xs,
    HAS_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, BUMP_BATCHES: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, PHASE: tl.constexpr,
    DIV_S: tl.constexpr, DIV_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """The whole training forward in one launch: y = act(γ·(x − μ)·invstd + β [+ z]) with the batch
    statistics, x read once (1 read + 1 write, against 2 + 1 for ``_bn_stats_kernel`` then
    ``_bn_forward_kernel``).

    Program ``(j, b)`` loads row block ``b`` of channel tile ``j`` (a ``[BLOCK_S, BLOCK_C]`` tile of the
    ``[N, C, S]`` view) into registers and keeps it there. It writes the tile's partial ``(mean − K, M2,
    count)`` (exact two-pass over the registers, shifted by K_c = x[0, c, 0] as in ``_bn_stats_kernel``)
    to the workspace, waits at a grid barrier (counter ``cnt_ptr[0]``) for every program's partial, merges
    its channels' partials in a fixed order (``_merge_welford``: every program of a channel tile computes
    the same μ and invstd, bit for bit, and so does the backward, which reads them from the workspace), and
    normalizes its tile from registers. Programs ``(j, 0)`` store μ and invstd and update the running
    statistics (``_finish_stats``); the last program to leave resets the counter and, with BUMP_BATCHES,
    increments num_batches_tracked (after every program has read it for the cumulative factor).

    Workspace: ``_bn_stats_kernel``'s layout, ``[mean (C) | invstd (C) | partials (3, N·num_sblocks, C)]``.
    The barrier needs every program resident at once: the launcher launches cooperatively (the driver
    refuses a grid that does not fit, rather than let it deadlock) and only grids that fit the compiled
    kernel's occupancy (``ops._persistent_fits``). PHASE: 0 the whole kernel (GPU); 1 up to and including
    the arrival, 2 the rest (the interpreter: two launches in a row, as it runs programs one at a time).
    No ReLU bitmask (residual + gated activation: two launches).

    Grid: ``(cdiv(C, BLOCK_C), N * cdiv(S, BLOCK_S))``.
    """
    C, S, stride_xn, stride_xc, stride_xs = _view_hints(C, S, stride_xn, stride_xc, stride_xs, DIV_S, DIV_C)
    c0 = tl.program_id(0) * BLOCK_C
    b = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, BLOCK_C)
    chan = c0 + offs_c
    mask_c = chan < C
    n = b // num_sblocks
    sb = b - n * num_sblocks
    c_base = c0.to(tl.int64) * stride_xc
    base = c_base + n.to(tl.int64) * stride_xn + (sb * BLOCK_S).to(tl.int64) * stride_xs
    tile = offs_s[:, None] * stride_xs + offs_c[None, :] * stride_xc
    mask = _row_mask(sb, S, offs_s, mask_c, BLOCK_S)
    x = tl.load(x_ptr + base + tile, mask=mask, other=0.0)   # x's dtype: half the registers for 16-bit
    num_splits = tl.num_programs(1)
    total = tl.num_programs(0) * num_splits
    part = ws_ptr + 2 * C
    plane = num_splits * C
    if PHASE != 2:
        k_c = tl.load(x_ptr + c_base + offs_c * stride_xc, mask=mask_c, other=0.0).to(ACC_DTYPE)
        rows = tl.minimum(S - sb * BLOCK_S, BLOCK_S)
        xs = tl.where(mask, x.to(ACC_DTYPE) - k_c[None, :], 0.0)
        mean_p = tl.sum(xs, axis=0) / rows.to(ACC_DTYPE)
        d = tl.where(mask, xs - mean_p[None, :], 0.0)
        out = part + b * C + chan
        tl.store(out, mean_p, mask=mask_c)
        tl.store(out + plane, tl.sum(d * d, axis=0), mask=mask_c)
        tl.store(out + 2 * plane, tl.zeros_like(mean_p) + rows.to(ACC_DTYPE), mask=mask_c)
        _grid_arrive(cnt_ptr)
    if PHASE != 1:
        _grid_wait(cnt_ptr, total)
        mean_t, m2_t, count_t = _merge_welford(part, plane, C, 0, num_splits, chan, mask_c, BLOCK_K, BLOCK_C,
                                               ACC_DTYPE)
        k_c = tl.load(x_ptr + c_base + offs_c * stride_xc, mask=mask_c, other=0.0).to(ACC_DTYPE)
        if b == 0:
            _finish_stats(ws_ptr, running_mean_ptr, running_var_ptr, num_batches_ptr, C, chan, mask_c, k_c,
                          mean_t, m2_t, count_t, momentum, eps, HAS_RUNNING, CUMULATIVE, BUMP_BATCHES,
                          BLOCK_C, ACC_DTYPE)
        # μ and invstd exactly as _finish_stats stores them, scale and shift by _bn_affine's own helper: the
        # backward recomputes this u (a gated activation's gate) from the workspace, bit for bit.
        mean = mean_t + k_c
        invstd = _invstd(m2_t / tl.maximum(count_t, 1.0), eps)
        scale, shift = _bn_scale_shift(invstd, weight_ptr, bias_ptr, chan, mask_c, HAS_WEIGHT, HAS_BIAS,
                                       ACC_DTYPE)
        xa = x.to(ACC_DTYPE)
        if HAS_RESIDUAL:
            z = tl.load(z_ptr + base + tile, mask=mask, other=0.0).to(ACC_DTYPE)
            u = _bn_output_residual(xa, z, mean[None, :], scale[None, :], shift[None, :],
                                    y_ptr.dtype.element_ty)
        else:
            u = _bn_output(xa, mean[None, :], scale[None, :], shift[None, :], y_ptr.dtype.element_ty)
        y = _activation(u, ACTIVATION)
        tl.store(y_ptr + base + tile, y.to(y_ptr.dtype.element_ty), mask=mask)
        if _grid_depart(cnt_ptr, total):
            _reset_counter(cnt_ptr)
            if BUMP_BATCHES:
                tl.store(num_batches_ptr, tl.load(num_batches_ptr) + 1)


# Appended, as the one-launch forward: Triton's cache key of a kernel includes its line number.

@triton.jit
def _mask_tile_bits(mask_ptr, row, offs_s, offs_c, s_left, c_left, stride_xs, stride_xc,
                    MASK_READ: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """The ReLU bitmask's bits of a reduction tile ``[BLOCK_S, BLOCK_C]`` at element ``row`` (a multiple of
    32; element (s, c) at ``row + s·stride_xs + c·stride_xc``; ``s_left`` rows and ``c_left`` channels left
    from it), where whole words lie along the tile's contiguous axis, as the launcher checked (MASK_C:
    stride_xc == 1, stride_xs and BLOCK_C multiples of 32; MASK_S: the same along S). Each word is loaded
    once, as a ``[BLOCK_S, BLOCK_C // 32]`` (MASK_C) or ``[BLOCK_C, BLOCK_S // 32]`` (MASK_S) tile, and
    broadcast to its 32 elements; the reshape lands in the tile's own layout (MASK_S: transposed after it;
    a ``[BLOCK_S // 32, BLOCK_C]`` tile broadcast along its first axis made ptxas give some eval dx kernels
    a stack frame). A bit-by-bit gather instead
    loads the same word once per element and converts the predicate's layout through shared memory (sm_90,
    Triton 3.6, bf16 channels-last 2048×7×7 BN + add + ReLU: 120 → 64 registers, 167 → 102 instructions
    in the reduction's main loop)."""
    words_ptr = mask_ptr + (row >> 5)
    if MASK_READ == MASK_C:
        offs_w = tl.arange(0, BLOCK_C // 32)
        wmask = (offs_s < s_left)[:, None] & (offs_w * 32 < c_left)[None, :]
        words = tl.load(words_ptr + (offs_s * (stride_xs // 32))[:, None] + offs_w[None, :], mask=wmask,
                        other=0)
        words = tl.reshape(tl.broadcast_to(words[:, :, None], (BLOCK_S, BLOCK_C // 32, 32)),
                           (BLOCK_S, BLOCK_C))
        bit = (offs_c % 32)[None, :]
    else:
        offs_w = tl.arange(0, BLOCK_S // 32)
        wmask = (offs_c < c_left)[:, None] & (offs_w * 32 < s_left)[None, :]
        words = tl.load(words_ptr + (offs_c * (stride_xc // 32))[:, None] + offs_w[None, :], mask=wmask,
                        other=0)
        words = tl.trans(tl.reshape(tl.broadcast_to(words[:, :, None], (BLOCK_C, BLOCK_S // 32, 32)),
                                    (BLOCK_C, BLOCK_S)))
        bit = (offs_s % 32)[:, None]
    return ((words >> bit) & 1) != 0


@triton.jit
def _mask_block_bits(mask_ptr, base, C, S, num_sblocks, num_cblocks, stride_xs, stride_xc,
                     MASK_READ: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """``_mask_tile_bits`` of an elementwise kernel's TILED tile (``_element_block``: ``base`` is its first
    channel in row 0 of its plane)."""
    _, pid_s, pid_c = _tile_coords(num_sblocks, num_cblocks)
    s0 = pid_s * BLOCK_S
    return _mask_tile_bits(mask_ptr, base + s0.to(tl.int64) * stride_xs, tl.arange(0, BLOCK_S),
                           tl.arange(0, BLOCK_C), S - s0, C - pid_c * BLOCK_C, stride_xs, stride_xc,
                           MASK_READ, BLOCK_S, BLOCK_C)
