"""Launchers for the Triton batch-norm kernels, and the autograd function built on them.

A call costs what its host path costs, so the launchers are built around a per-call *plan*, cached by
everything the kernels specialize on (shape, strides, dtypes, device, flags, the big tensors' 16-byte
alignment). A plan holds the grids, the tile sizes, the prepared scalar arguments, the workspace size and
one ``_Launch`` per kernel, which keeps the ``CompiledKernel`` of its first launch and afterwards launches
it directly: the launcher's C entry point with triton 3.6 and 3.9, ``CompiledKernel.run`` with 3.7–3.8
(CUDA; the normal ``kernel[grid](...)`` launch everywhere else, under the interpreter, and while a Triton
launch hook is installed). Per call the
launchers allocate the output and one workspace (statistics and partials together), take the stream's
reduction counters, and launch:

* training forward: 2 launches (statistics with last-program finalize, then normalize);
* eval forward: 1 launch; backward: 2 launches (sums with last-program finalize, then dx), 1 in eval when
  only dx is needed.

They never synchronize with the host (no ``.item()``, no branch on tensor values) and allocate nothing whose
size depends on data, so they can be captured in CUDA graphs.

Tile heuristic (the whole tuning story: no autotuning, which would re-run kernels that update running
statistics):

* channel-contiguous view (channels_last, ``(N, C)``): ``BLOCK_C = min(next_pow2(C), 64)`` channels
  (≥128 contiguous bytes per row for 2-byte dtypes) × ``BLOCK_S = TILE / BLOCK_C`` rows;
* spatial-contiguous view (NCHW): ``BLOCK_S = min(next_pow2(S), TILE)`` positions, and when a channel's
  plane is small (7×7, 14×14) ``BLOCK_C = TILE / BLOCK_S`` neighbouring channels per tile;
* ``TILE`` is 2048 elements (8 warps) for the reductions and 4096 for the elementwise kernels (8192 for
  eval on large tensors: ``Tuning.eval_tile``);
* elementwise kernels take NCHW planes whose rows are not a multiple of 8 bytes (7×7) as flat runs of
  memory (FLAT_RUNS), and the ReLU bitmask as flat blocks where no tile holds whole 32-element words
  (``_elementwise_plan``);
* reductions split the rows so that the grid has about ``4 × SMs`` programs: small C with a large N·S
  fills the GPU too, unlike one-block-per-channel kernels.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading

import torch

# Set by ``tritonbn.compile_gate`` and tests: called as ``hook(kernel, grid, args, constexprs, num_warps)``
# instead of launching (to record launches; the hook may launch them itself).
_launch_hook = None


@dataclasses.dataclass(frozen=True)
class Tuning:
    reduce_tile: int = 2048        # elements per reduction tile (half for fp64: twice the registers)
    elementwise_tile: int = 4096
    eval_tile: int = 8192          # TILED elements of the kernels that compute 1/√(var+ε) per channel
                                   # (eval forward and backward; half for fp64) where that still makes
                                   # 4 programs per SM: twice the rows per thread for each channel's sqrt
                                   # and division (sm_90, bf16 channels_last: 38 → 22 instructions per
                                   # element, 48 → 62 registers)
    flat_block: int = 2048         # elements per FLAT block (half for fp64)
    run_block: int = 4096          # elements per FLAT_RUNS block (half for fp64): more than FLAT's, as
                                   # the block's setup (two int32 divisions) is shared by more elements
    flat_run: int = 8              # planar FLAT blocks as runs of this many elements (a power of two),
                                   # channels found per run (FLAT_RUNS); 1: per element (FLAT_PLANAR)
    max_block_c: int = 64
    merge_tile: int = 1024         # partials (splits x channels) a merging program merges per step; its
                                   # accumulators size the whole kernel's registers (2048: 105 on sm_90 for
                                   # bf16 channels-last C = 64 with triton 3.6, so 2 programs per SM, not 4)
    reduce_warps: int = 8
    elementwise_warps: int = 8
    two_level_merge: bool = True   # ReducePlan.grouped where it shortens the merge (False: always flat)
    reduce_stages: int = 1         # software-pipelining stages of the reductions' main loop (tl.range's
                                   # num_stages; 1: plain loads, as measured so far; 3: cp.async, to measure)
    waves: int = 4                 # reduction programs per SM
    whole_waves: bool = False      # reduction splits rounded down, so a grid never exceeds waves x SMs
                                   # programs (rounded up, 256 NCHW channels take 3 splits at 4 waves: 768
                                   # programs, two waves of the 660 an H200 holds at 48 registers;
                                   # benchmarks/occupancy.py). With waves=5 it fills one wave of those
                                   # kernels: to measure (benchmarks/ab.py --preset waves)
    interpreter_programs: int = 8  # "SM count" under the interpreter: keeps several splits in the tests
    flat: str = "auto"             # elementwise addressing (_elementwise_plan): "auto" (TILED, but FLAT_RUNS
                                   # for planes TILED cannot vectorize and FLAT for a ReLU bitmask no tile
                                   # can hold), "tiled" (TILED but for that bitmask) or "always" (FLAT for
                                   # every dense input)
    fast_launch: bool = True       # CompiledKernel.run on triton 3.6–3.9 (GPU); False: kernel[grid](...)
    fused_cl_tiles: bool = False   # channels-last backward kernels with a ReLU take half-size tiles (to
                                   # measure: benchmarks/ab.py --preset fused_cl): fewer rows per thread,
                                   # fewer registers (sm_90, triton 3.6, bf16 ReLU / add+ReLU: reduce 71 /
                                   # 64 -> 40, dx 75 / 80 -> 59 / 64 per thread), more programs per SM
    mask_words: bool = True        # the backward kernels read the ReLU bitmask as whole words of their
                                   # tiles where they lie along the tile (_mask_tile_read; sm_90, triton
                                   # 3.6, bf16 channels-last add+ReLU: reduce 120 -> 64 registers and 20.5
                                   # -> 12.8 instructions per element, dx 40 -> 32); False: bit by bit, as
                                   # measured on 2026-11-28 (benchmarks/ab.py --preset quick)
    persistent: str = "off"        # the one-launch training forward (_bn_persistent_forward_kernel: x read
                                   # once, held in registers across a grid barrier; no ReLU bitmask):
                                   # "off"; "auto": on a GPU, where the grid fits the compiled kernel's
                                   # occupancy (cooperative launch); "always": wherever it can run (the
                                   # interpreter in two launches; the compile gate). To measure before it
                                   # becomes a default: benchmarks/ab.py --preset persistent
    persistent_tile: int = 4096    # elements per program of the one-launch forward
    persistent_merge_tile: int = 1024  # partials (splits x channels) its programs merge per step, after the
                                   # barrier: fewer serial steps (dependent L2 round trips) against more
                                   # registers, hence fewer programs per SM (sm_90, triton 3.9, fp32
                                   # channels-last 4096-element tiles: 76 registers, 3 per SM; with 256:
                                   # 63, 4, but 4x the steps: 25 for ResNet-50 b32's 256x14x14)
    pointer_ints: bool = True      # cached launches pass data_ptr() ints: the launcher then skips its own
                                   # data_ptr() call and cuPointerGetAttribute per pointer (H200 host,
                                   # benchmarks/host_overhead.py: 9.6 -> 7.7 µs for a launch with 6 of
                                   # them; ours pass 8-11; bit-identical in the CUDA tests)

    def __post_init__(self):
        if self.flat not in ("auto", "tiled", "always"):
            raise ValueError(f"Tuning.flat must be 'auto', 'tiled' or 'always', got {self.flat!r}")
        if self.flat_run < 1 or self.flat_run & (self.flat_run - 1):
            raise ValueError(f"Tuning.flat_run must be a power of two, got {self.flat_run}")
        if self.persistent not in ("off", "auto", "always"):
            raise ValueError(f"Tuning.persistent must be 'off', 'auto' or 'always', got {self.persistent!r}")


TUNING = Tuning()

# Compile options of every launch (and of the compile gate and the cache warmer, so their cache keys agree).
# FMA contraction pinned on: triton 3.9 warns that its default will change, and the kernels' numerics must
# not change with a Triton upgrade (the ReLU mask's recomputation uses explicit FMAs either way).
LAUNCH_OPTIONS = {"enable_fp_fusion": True}

# The fused activations: name -> the kernels' ACTIVATION constexpr (kernels.py, ACT_*). GATED ones (act' is
# 0 or 1) take a residual too: their gate is stored as a bitmask; SiLU's and Hardswish's act' would need
# the residual again.
ACTIVATIONS = {None: 0, "relu": 1, "relu6": 2, "silu": 3, "hardswish": 4}
GATED = frozenset({1, 2})
TILED, FLAT_CL, FLAT_PLANAR, FLAT_RUNS = 0, 1, 2, 3
MASK_NONE, MASK_FLAT, MASK_S, MASK_C = 0, 1, 2, 3   # kernels.py: how the forward packs the ReLU bitmask

_KERNELS = None


def _kernels():
    # Imported on first use: TRITON_INTERPRET is read when @triton.jit runs, and imports stay free of work.
    global _KERNELS
    if _KERNELS is None:
        from tritonbn import kernels

        _patch_interpreter_index(kernels)
        _KERNELS = kernels
    return _KERNELS


def _patch_interpreter_index(kernels) -> None:
    """Triton 3.6's interpreter (and older) converts a scalar tensor, a shape-(1,) array, with
    ``int(array)``, which NumPy ≥ 2.4 rejects: every ``range()`` over runtime values in a kernel fails
    (triton-lang/triton#9171). Under the interpreter, install the upstream fix (``int(data.squeeze())``,
    what triton 3.9 does itself) on top of Triton's own tensor patching."""
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if (not isinstance(kernels._bn_stats_kernel, interpreter.InterpretedFunction) or patch_tensor is None
            or getattr(patch_tensor, "_tritonbn_index", False)):
        return

    def index(self):
        return int(self.handle.data.squeeze())

    def patched(tensor, *scope):   # (tensor, scope) in triton 3.6 and 3.9; (tensor) in older releases
        patch_tensor(tensor, *scope)
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    patched._tritonbn_index = True
    interpreter._patch_lang_tensor = patched


@functools.cache
def interpreted() -> bool:
    """Whether Triton runs tritonbn's kernels through its interpreter. Asked of Triton, not of the
    environment: Triton reads TRITON_INTERPRET when it decorates a kernel, its own library's at
    ``import triton``, so a variable set or changed later does not take effect (and a mix of interpreted and
    compiled functions cannot run: Triton raises InterpreterError)."""
    import triton.language.standard as std
    from triton.runtime.interpreter import InterpretedFunction

    ours = isinstance(_kernels()._bn_stats_kernel, InterpretedFunction)
    triton_lib = not any(type(v).__name__ == "JITFunction" for v in vars(std).values())
    return ours and triton_lib


def _known_launcher() -> bool:
    """Whether this Triton's launcher convention is one tritonbn's launch paths were written against
    (triton 3.6 through 3.9, read from their sources): the cached launch here, the native path's packing."""
    import triton

    try:
        major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    return (3, 6) <= (major, minor) <= (3, 9)


@functools.cache
def _fast_launch_supported() -> bool:
    """``CompiledKernel.run(gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter_hook,
    exit_hook, *all_params)`` is the launcher convention of triton 3.6 through 3.9; anything else takes the
    normal launch."""
    return _known_launcher() and not interpreted()


@functools.cache
def _launcher_layout() -> str | None:
    """How ``CudaLauncher.__call__`` hands a launch to its C entry point ``launch``, read from Triton's
    sources: ``"flat"`` (3.6: every parameter as its own argument) or ``"tuple"`` (3.9: the parameters as one
    tuple, after the argument annotations and kernel signature); None for other releases."""
    import triton

    return {"3.6": "flat", "3.9": "tuple"}.get(".".join(triton.__version__.split(".")[:2]))


def _fast_entry(compiled) -> tuple:
    """``(launch, params_as_tuple, prefix)`` for the cached path: ``launch(gx, gy, gz, stream, *prefix,
    *params)`` (or ``..., *prefix, params)``). The launcher's C ``launch`` itself where
    ``CudaLauncher.__call__`` would only forward to it (no global or profile scratch to allocate, no GSan):
    that Python frame costs ~0.6 µs per launch on a CPU core (triton 3.6). Else ``CompiledKernel.run``."""
    run, function, packed = compiled.run, compiled.function, compiled.packed_metadata
    layout = _launcher_layout()
    if layout is None or type(run).__name__ != "CudaLauncher" or getattr(run, "global_scratch_size", 1) or \
            getattr(run, "profile_scratch_size", 1) or getattr(run, "gsan_enabled", False):
        return run, False, (function, packed, None, None, None)
    coop, pdl = run.launch_cooperative_grid, run.launch_pdl
    if layout == "flat":
        return run.launch, False, (function, coop, pdl, None, None, packed, None, None, None)
    return run.launch, True, (function, coop, pdl, packed, None, None, None, None, None, run.arg_annotations,
                              run.kernel_signature)


@functools.cache
def _runtime_knobs():
    from triton import knobs

    return knobs.runtime


def _launch_hooks_active() -> bool:
    """Whether Triton launch hooks (profilers such as proton) are installed: they see only normal launches."""
    rt = _runtime_knobs()
    # HookChain objects (triton 3.5+) hold their callbacks in .calls; a hook set by assignment is itself.
    # Asked on every cached launch: no generator (any(...) over a tuple costs 0.2 µs more).
    enter, exit_ = rt.launch_enter_hook, rt.launch_exit_hook
    return bool(getattr(enter, "calls", enter)) or bool(getattr(exit_, "calls", exit_))


_DATA_PTR = torch.Tensor.data_ptr   # map(_DATA_PTR, ...) beats a comprehension of .data_ptr() calls
# Normal launches one at a time: Triton's interpreter is not thread-safe (calls from several threads gave
# NaN, wrong values or a crashed process), and CPU calls all share one stream's reduction counters, which
# a launch leaves zeroed only once all its programs have run. Cached launches never take it.
_SLOW_LAUNCH_LOCK = threading.RLock()


class _Launch:
    """One kernel specialization: grid, warps, constexprs, and after its first launch the cached
    ``CompiledKernel`` handles, so later launches skip Triton's argument binding, specialization and
    cache lookup. Callers pass the runtime arguments in signature order; every kernel declares its
    constexprs last, so ``(*args, *consts)`` is Triton's full parameter list."""

    __slots__ = ("kernel", "grid", "g0", "g1", "g2", "num_warps", "constexprs", "consts", "fast",
                 "fast_launches", "compiled", "n_ptr")

    def __init__(self, kernel, grid, num_warps, constexprs):
        self.kernel = kernel
        self.grid = grid
        self.g0, self.g1, self.g2 = (*grid, 1, 1)[:3]
        self.num_warps = num_warps
        self.constexprs = constexprs
        self.consts = ()
        self.fast = None           # _fast_entry's (launch, params_as_tuple, prefix)
        self.fast_launches = 0     # for tests: how many launches took the cached path
        self.compiled = None
        self.n_ptr = 0             # pointer_ints: leading pointer parameters passed as ints

    def __call__(self, stream, *args):
        fast = self.fast
        if fast is not None and _launch_hook is None and not _launch_hooks_active():
            if self.n_ptr:
                n = self.n_ptr
                args = (*map(_DATA_PTR, args[:n]), *args[n:])
            if fast[1]:
                fast[0](self.g0, self.g1, self.g2, stream, *fast[2], (*args, *self.consts))
            else:
                fast[0](self.g0, self.g1, self.g2, stream, *fast[2], *args, *self.consts)
            self.fast_launches += 1
            return
        if _launch_hook is not None:
            _launch_hook(self.kernel, self.grid, args, self.constexprs, self.num_warps)
            return
        with _SLOW_LAUNCH_LOCK:
            compiled = self.kernel[self.grid](*args, num_warps=self.num_warps, **LAUNCH_OPTIONS,
                                              **self.constexprs)
        if stream is not None and compiled is not None and TUNING.fast_launch and _fast_launch_supported():
            if hasattr(compiled, "result"):   # triton's async compile mode hands back a future
                compiled = compiled.result()
            self.consts = tuple(self.constexprs[p.name] for p in self.kernel.params if p.is_constexpr)
            self.compiled = compiled   # owns the loaded module: the cached handles live as long as it
            self.fast = _fast_entry(compiled)
            self.n_ptr = _pointer_prefix(compiled) if TUNING.pointer_ints else 0


def _compiled_signature(compiled) -> dict | None:
    """A compiled kernel's parameter types by name (``"*bf16"``, ``"i32"``, ``"constexpr"``...), or None
    where this Triton does not keep them."""
    signature = getattr(getattr(compiled, "src", None), "signature", None)
    return signature if isinstance(signature, dict) else None


def _pointer_prefix(compiled) -> int:
    """How many leading parameters of ``compiled`` are pointers (tritonbn's kernels declare theirs first),
    or 0 where pointers are not all leading."""
    types = list((_compiled_signature(compiled) or {}).values())
    n = next((i for i, t in enumerate(types) if not str(t).startswith("*")), len(types))
    return n if not any(str(t).startswith("*") for t in types[n:]) else 0


# --- reduction counters -----------------------------------------------------------------------------
# One int32 counter per channel tile, zero between launches (the last program resets its own). Launches on
# one stream run one after another and can share them; concurrent streams must not, so each stream gets
# its own slot. Slots come from one zeroed arena per device, allocated on the first eager call, so a CUDA
# graph capture (a new stream) takes a slot without allocating or zeroing anything. Only when no slot fits
# during a capture does a launch get its own counters, zeroed inside the graph.

_COUNTER_SLOTS = 32
_COUNTER_SLOT_SIZE = 4096
_counter_arenas: dict = {}     # device index -> [arena tensor, next free slot, event after its zero fill]
_counters_by_stream: dict = {}  # (device index, stream) -> int32 tensor
_graph_owned: list = []         # counters a captured graph uses: kept alive as long as the process


def _counters(x: torch.Tensor, dev: int, stream, n: int) -> torch.Tensor:
    key = (dev, stream)
    buf = _counters_by_stream.get(key)
    if buf is not None and buf.numel() >= n:
        return buf
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    arena = _counter_arenas.get(dev)
    if arena is None and not capturing:
        zeros = torch.zeros(_COUNTER_SLOTS * _COUNTER_SLOT_SIZE, dtype=torch.int32, device=x.device)
        event = None
        if x.is_cuda:
            event = torch.cuda.Event()
            event.record()
        arena = _counter_arenas[dev] = [zeros, 0, event]
    if n <= _COUNTER_SLOT_SIZE and arena is not None and arena[1] < _COUNTER_SLOTS:
        i = arena[1]
        arena[1] += 1
        buf = arena[0][i * _COUNTER_SLOT_SIZE:(i + 1) * _COUNTER_SLOT_SIZE]
        if arena[2] is not None and not capturing:
            # The arena was zeroed on the stream that created it: order this stream after that fill (a
            # capture needs no wait: torch.cuda.graph synchronizes the device before it begins).
            torch.cuda.current_stream(x.device).wait_event(arena[2])
    elif capturing:
        buf = torch.zeros(max(n, 1), dtype=torch.int32, device=x.device)
        _graph_owned.append(buf)
        return buf
    else:
        # Zeroed on this stream, which alone uses it.
        buf = torch.zeros(max(n, _COUNTER_SLOT_SIZE), dtype=torch.int32, device=x.device)
    _counters_by_stream[key] = buf
    return buf


# --- views and plans -------------------------------------------------------------------------------

@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


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

    @property
    def flat_layout(self) -> int:
        """FLAT_CL / FLAT_PLANAR when the view covers its memory densely in that order, else TILED."""
        if self.stride_c == 1 and (self.n == 1 or self.stride_n == self.s * self.c) and (
                self.stride_s == self.c or self.s == 1):
            return FLAT_CL
        if self.stride_s == 1 and self.stride_c == self.s and (
                self.n == 1 or self.stride_n == self.c * self.s):
            return FLAT_PLANAR
        return TILED


@functools.lru_cache(maxsize=4096)
def _view3d(shape: tuple[int, ...], strides: tuple[int, ...]) -> View | None:
    """``[N, C, S]`` view with spatial dims merged, and batch merged too when rows are evenly spaced
    (channels_last, ``(N, C)``); None when the spatial dims cannot be merged."""
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


@functools.lru_cache(maxsize=4096)
def _dense_view(shape: tuple[int, ...], strides: tuple[int, ...]) -> View | None:
    """The view of a tensor the kernels can read in place (dense, so ``empty_like`` shares its strides;
    spatial dims mergeable), or None: copy it with ``.contiguous()`` first."""
    numel = 1
    for d in shape:
        numel *= d
    if numel == 0:
        return _view3d(shape, strides)
    # Dense and non-overlapping: sorted by stride, each stride is the product of the sizes below it.
    expected = 1
    for st, d in sorted((st, d) for d, st in zip(shape, strides) if d != 1):
        if st != expected:
            return None
        expected *= d
    return _view3d(shape, strides)


def _prepare(x: torch.Tensor) -> tuple[torch.Tensor, View]:
    """``x`` (copied only if it is not dense, or its spatial dims cannot be merged) and its view."""
    view = _dense_view(tuple(x.shape), x.stride())
    if view is None:
        x = x.contiguous()
        view = _view3d(tuple(x.shape), x.stride())
    return x, view


def _like(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` laid out in memory as ``x`` is (a copy only when it is not, e.g. an expanded gradient).
    ``x`` is dense; strides of size-1 dims do not matter."""
    if t.stride() == x.stride():
        return t
    shape = tuple(x.shape)
    if _dense_view(shape, t.stride()) == _dense_view(shape, x.stride()):
        return t
    return torch.empty_like(x, dtype=t.dtype).copy_(t)


def _tiles(view: View, tile: int, tuning: Tuning) -> tuple[int, int]:
    max_c = min(_next_pow2(view.c), tuning.max_block_c)
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


def _divisors(view: View, itemsize: int) -> tuple[int, int]:
    """``(DIV_S, DIV_C)``: the power of two (up to one 16-byte vector) dividing the view's sizes and strides
    along its contiguous axis, for the kernels' vectorization hints (see ``kernels._view_hints``). 1 where
    Triton's own specialization (multiples of 16) already says it, or where it does not hold."""
    def common(*vals):
        g = 0
        for v in vals:
            g = math.gcd(g, v)
        if g % 16 == 0:
            return 1
        d, cap = 1, max(1, 16 // itemsize)
        while d < cap and g % (2 * d) == 0:
            d *= 2
        return d

    if view.stride_s == 1 and view.stride_c != 1:
        return common(view.s, view.stride_c, view.stride_n), 1
    if view.stride_c == 1 and view.stride_s != 1:
        return 1, common(view.c, view.stride_s, view.stride_n)
    return 1, 1


@dataclasses.dataclass(frozen=True)
class ReducePlan:
    """Tiles and row splits of a reduction kernel (grid ``(num_cblocks, splits)``)."""

    block_s: int
    block_c: int
    block_k: int        # partials merged per step by the finalizing program
    num_sblocks: int
    num_cblocks: int
    total_blocks: int   # N * num_sblocks row blocks per channel tile
    splits: int
    blocks_per_split: int
    two_level: bool = True

    @property
    def grid(self):
        return (self.num_cblocks, self.splits)

    @property
    def grouped(self) -> bool:
        """More splits than two merge steps take: the kernels merge in two levels (``_merge_group``), a
        serial tail of 1 + cdiv(groups, block_k) steps after the last program (ResNet-50's C = 64
        channels-last layers on an H200: 4, against 33 flat). Up to two steps the flat merge is as short,
        with one atomic round trip less."""
        return self.two_level and self.splits > 2 * self.block_k

    @property
    def num_groups(self) -> int:
        return _cdiv(self.splits, self.block_k) if self.grouped else 0

    def workspace(self, c: int, planes: int) -> int:
        """Elements of a finalizing reduction's workspace: 2·C results, ``planes`` partial planes per split,
        and as many per group when grouped."""
        return 2 * c + planes * (self.splits + self.num_groups) * c

    @property
    def num_counters(self) -> int:
        """One counter per channel tile, and one per group of each when grouped."""
        return self.num_cblocks * (1 + self.num_groups)


def _reduce_plan(view: View, target_programs: int, tuning: Tuning, wide: bool) -> ReducePlan:
    block_s, block_c = _tiles(view, tuning.reduce_tile // (2 if wide else 1), tuning)
    num_sblocks = _cdiv(view.s, block_s)
    num_cblocks = _cdiv(view.c, block_c)
    total = view.n * num_sblocks
    want = target_programs // num_cblocks if tuning.whole_waves else _cdiv(target_programs, num_cblocks)
    splits = max(1, min(total, want))
    per_split = _cdiv(total, splits)
    splits = _cdiv(total, per_split)
    block_k = min(_next_pow2(splits), max(1, tuning.merge_tile // block_c))
    return ReducePlan(block_s, block_c, block_k, num_sblocks, num_cblocks, total, splits, per_split,
                      tuning.two_level_merge)


@dataclasses.dataclass(frozen=True)
class ElementwisePlan:
    layout: int
    block_s: int
    block_c: int
    num_sblocks: int
    num_cblocks: int
    grid: tuple
    mask: int = MASK_NONE   # how the forward packs the ReLU bitmask (when it writes one)


def _rows_aligned(view: View, r: ReducePlan, k: int) -> bool:
    """Whether every row block of reduction plan ``r`` starts at a multiple of ``k`` elements: each step a
    program takes (next row block, next plane, next channel tile) is a multiple of k or never taken."""
    return ((view.stride_n % k == 0 or view.n == 1)
            and ((r.block_s * view.stride_s) % k == 0 or r.num_sblocks == 1)
            and ((r.block_c * view.stride_c) % k == 0 or r.num_cblocks == 1))


def _mask_tile_read(view: View, block_s: int, block_c: int) -> int:
    """MASK_S / MASK_C where the backward kernels can read the ReLU bitmask as whole words of their
    ``[block_s, block_c]`` tiles (``kernels._mask_tile_bits``): words along the tile's contiguous axis
    (planar S or channels-last C, its block and the stride across it multiples of 32: the forward's
    MASK_S / MASK_C condition) and every tile starting at a multiple of 32 elements; else MASK_NONE."""
    if view.n > 1 and view.stride_n % 32:
        return MASK_NONE
    if view.stride_s == 1 and view.s % 32 == 0 and block_s % 32 == 0 and view.stride_c % 32 == 0:
        return MASK_S
    if view.stride_c == 1 and view.c % 32 == 0 and block_c % 32 == 0 and view.stride_s % 32 == 0:
        return MASK_C
    return MASK_NONE


def _mask_read(view: View, r: ReducePlan, words: bool) -> int:
    """How the backward reduction of plan ``r`` reads the ReLU bitmask (``_bn_backward_reduce_kernel``'s
    MASK_READ): with ``words`` (``Tuning.mask_words``) whole words of its tiles (``_mask_tile_read``), else
    bit by bit, with split word indices where every row block starts at a multiple of 32 elements
    (MASK_FLAT), or whole int64 ones."""
    tile = _mask_tile_read(view, r.block_s, r.block_c) if words else MASK_NONE
    if tile != MASK_NONE:
        return tile
    return MASK_FLAT if _rows_aligned(view, r, 32) else MASK_NONE


def _runs_fit(view: View, block: int, run: int) -> bool:
    """Whether FLAT_RUNS can take a dense planar view in blocks of ``block`` elements: each run in at most
    two planes (S >= run), int32 offsets."""
    return 1 < run <= min(view.s, block) and view.n * view.c * view.s + block < 2**31


def _elementwise_plan(view: View, tuning: Tuning, need_mask: bool, itemsize: int, from_var: bool,
                      dev: int, act: int = 0) -> ElementwisePlan:
    """TILED, except for planes TILED cannot load in wide vectors, the ReLU bitmask where no tile holds
    whole words, and on request (``Tuning.flat``).

    TILED loads per-channel parameters once per tile column and addresses in 2-D, while FLAT finds and
    gathers each element's channel. sm_90 SASS per useful bf16 element (``benchmarks/sass_stats.py``,
    idle lanes counted; training normalize / eval normalize / dx, all at 4096-element tiles):

    * 56×56 and 14×14 planes: TILED 13 / 23 / 20 and 19 / 38 / 27, FLAT_RUNS 18 / 33 / 24 and
      22 / 37 / 31, per-element planar FLAT 51–78 / 97–124 / 60–88;
    * 7×7 planes: TILED 34 / 84 / 48 against FLAT_RUNS 22 / 37 / 31. Rows of 49 elements start at odd
      offsets, so TILED loads one element per instruction, and with 64 planes per tile each thread loads
      (and, in eval, computes 1/√(var+ε) for) 16 channels for 16 elements; FLAT_RUNS loads 16-byte
      vectors and 2 channels per run of 8.

    So ``flat="auto"`` takes FLAT_RUNS where TILED's rows allow only vectors under 8 bytes (planar
    S·itemsize not a multiple of 8: odd planes in 16- and 32-bit dtypes), ``"tiled"`` keeps TILED there
    (for A/B runs), ``"always"`` takes FLAT wherever the view is dense.

    Kernels that compute 1/√(var+ε) per channel from the running variance (``from_var``: eval forward and
    backward) take ``Tuning.eval_tile`` elements per TILED tile: with more rows per channel in each thread,
    the correctly rounded square root and division cost less per element (sm_90, bf16: channels_last
    38 → 22, 14×14 planes 38 → 30 instructions per element). Only where that still makes
    ``_target_programs(dev)`` programs (4 per SM, as the reductions): a smaller tensor keeps the GPU busier
    with smaller tiles.

    The bitmask (bit i = element i in memory order) takes a TILED tile when whole 32-element words lie
    along its contiguous axis (planar S, or channels-last C, a multiple of 32, and a block of at least 32
    along that axis): every channels-last ResNet layer. Else FLAT blocks, which are runs of memory.

    ``act`` (an ``ACTIVATIONS`` code) halves the eval-mode FLAT_RUNS blocks where full ones spill."""
    flat = view.flat_layout
    wide = itemsize == 8
    numel = view.n * view.c * view.s
    if from_var and (act == ACTIVATIONS["hardswish"] or (need_mask and act == ACTIVATIONS["relu6"])):
        # ReLU6's gate (one comparison more than ReLU's) or Hardswish in an eval-mode FLAT_RUNS block that
        # computes 1/√(var+ε) per run: full blocks spill registers on sm_80 / sm_90 (compile gate).
        tuning = dataclasses.replace(tuning, run_block=tuning.run_block // 2)
    tile = tuning.elementwise_tile
    if from_var:
        eval_tile = tuning.eval_tile // (2 if wide else 1)
        if numel >= _target_programs(dev) * eval_tile:
            tile = eval_tile
    block_s, block_c = _tiles(view, tile, tuning)
    mask = MASK_NONE
    if need_mask:
        if flat == FLAT_PLANAR and view.s % 32 == 0 and block_s % 32 == 0 and view.stride_c % 32 == 0:
            mask = MASK_S
        elif flat == FLAT_CL and view.c % 32 == 0 and block_c % 32 == 0 and view.stride_s % 32 == 0:
            mask = MASK_C
    # Blocks of whole 32-bit mask words.
    run_block = max(32, tuning.run_block // (2 if wide else 1))
    runs = flat == FLAT_PLANAR and _runs_fit(view, run_block, tuning.flat_run)
    use_flat = flat != TILED and (tuning.flat == "always" or (need_mask and mask == MASK_NONE) or (
        tuning.flat == "auto" and runs and view.s * itemsize % 8 != 0))
    if use_flat:
        mask = MASK_FLAT if need_mask else MASK_NONE
        if runs:
            return ElementwisePlan(FLAT_RUNS, run_block // tuning.flat_run, tuning.flat_run, 0, 0,
                                   (_cdiv(numel, run_block),), mask)
        block = max(32, tuning.flat_block // (2 if wide else 1))
        return ElementwisePlan(flat, block, 1, 0, 0, (_cdiv(numel, block),), mask)
    num_sblocks, num_cblocks = _cdiv(view.s, block_s), _cdiv(view.c, block_c)
    return ElementwisePlan(TILED, block_s, block_c, num_sblocks, num_cblocks,
                           (view.n * num_sblocks * num_cblocks,), mask)


def _target_programs(dev: int) -> int:
    return TUNING.waves * _sm_count(dev) if dev >= 0 else TUNING.interpreter_programs


_plans: dict = {}
_plans_tuning = TUNING


def _plan_cache() -> dict:
    """Plans depend on TUNING too (tests swap it): start afresh when it changes."""
    global _plans, _plans_tuning
    if TUNING is not _plans_tuning:
        _plans, _plans_tuning = {}, TUNING
    return _plans


def _device(x: torch.Tensor):
    """(device index, current raw stream) of a CUDA tensor; (-1, None) on the CPU (interpreter)."""
    if x.is_cuda:
        dev = x.get_device()
        return dev, torch._C._cuda_getCurrentRawStream(dev)
    return -1, None


def _on_other_device(x: torch.Tensor) -> bool:
    """Whether ``x`` lives on a CUDA device that is not the current one (a model on cuda:1 while cuda:0 is
    current): Triton compiles and launches for the current device, so the launchers switch first."""
    return x.is_cuda and x.get_device() != torch._C._cuda_getDevice()


def _on_x_device(fn):
    """Run ``fn(x, ...)`` with x's CUDA device current (see ``_on_other_device``)."""
    @functools.wraps(fn)
    def wrapper(x, *args):
        if _on_other_device(x):
            with torch.cuda.device(x.device):
                return fn(x, *args)
        return fn(x, *args)
    return wrapper


class ForwardPlan:
    """Everything about a forward call that does not change from call to call."""

    def __init__(self, view: View, dtype: torch.dtype, dev: int, training: bool, flags: tuple):
        (has_weight, has_bias, has_running, cumulative, bump, has_residual, act, write_mask) = flags
        k = _kernels()
        tuning = TUNING
        acc = _acc_dtype(dtype)
        self.acc = acc
        self.training = training
        self.flags = flags
        c = view.c
        self.c = c
        self.numel = view.n * view.c * view.s
        tl_acc = _tl_dtype(acc)
        self.stats = None
        self.backward_plans = {}   # flags -> BackwardPlan of this input (BatchNormFunction's backward)
        self.native_handle = None  # tritonbn.native: None before its first call, -1 Python-only, else handle
        self.native_counters = 0
        if self.numel == 0:
            return
        div_s, div_c = _divisors(view, dtype.itemsize)
        if training:
            r = _reduce_plan(view, _target_programs(dev), tuning, acc == torch.float64)
            self.num_counters = r.num_counters
            self.ws_numel = r.workspace(c, 3)
            self.stats_ints = (c, view.s, r.num_sblocks, r.blocks_per_split, r.total_blocks)
            self.stats = _Launch(k._bn_stats_kernel, r.grid, tuning.reduce_warps, dict(
                HAS_RUNNING=has_running, CUMULATIVE=cumulative, BUMP_BATCHES=bump, FINALIZE=True,
                GROUPED=r.grouped, STAGES=tuning.reduce_stages, DIV_S=div_s, DIV_C=div_c,
                BLOCK_S=r.block_s, BLOCK_C=r.block_c, BLOCK_K=r.block_k, ACC_DTYPE=tl_acc))
        e = _elementwise_plan(view, tuning, write_mask, dtype.itemsize, not training, dev, act)
        flat = e.layout != TILED
        self.mask_words = _cdiv(self.numel, 32) if write_mask else 0
        self.fwd_ints = (c, view.s, self.numel, e.num_sblocks, e.num_cblocks, c if training else 0)
        self.strides = view.strides
        self.fwd = _Launch(k._bn_forward_kernel, e.grid, tuning.elementwise_warps, dict(
            HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, FROM_VAR=not training, HAS_RESIDUAL=has_residual,
            ACTIVATION=act, WRITE_MASK=e.mask, BUMP_BATCHES=bump, LAYOUT=e.layout,
            DIV_S=1 if flat else div_s, DIV_C=1 if flat else div_c, BLOCK_S=e.block_s, BLOCK_C=e.block_c,
            ACC_DTYPE=tl_acc))
        self.persistent = None     # the one-launch forward's launches (Tuning.persistent), where it applies
        self.persistent_ok = None  # whether they run; None ("auto"): decided at the first call (_fits)
        # Not for fp64 (a test dtype, not a speed target): on sm_90 some of its specializations spill.
        if training and not write_mask and acc != torch.float64 and (tuning.persistent == "always" or (
                tuning.persistent == "auto" and dev >= 0 and not interpreted() and _cooperative_supported())):
            self._plan_persistent(view, tuning, div_s, div_c, tl_acc)

    def _plan_persistent(self, view: View, tuning: Tuning, div_s: int, div_c: int, tl_acc) -> None:
        """The one-launch forward's launches (``_bn_persistent_forward_kernel``), grid ``(channel tiles,
        row blocks)``: one tile per program, all resident at once where it runs."""
        has_weight, has_bias, has_running, cumulative, bump, has_residual, act, _ = self.flags
        block_s, block_c = _tiles(view, tuning.persistent_tile, tuning)
        num_sblocks = _cdiv(view.s, block_s)
        splits = view.n * num_sblocks
        self.persistent_ws = 2 * self.c + 3 * splits * self.c
        self.persistent_ints = (self.c, view.s, num_sblocks)
        consts = dict(HAS_RUNNING=has_running, CUMULATIVE=cumulative, BUMP_BATCHES=bump,
                      HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, HAS_RESIDUAL=has_residual, ACTIVATION=act,
                      DIV_S=div_s, DIV_C=div_c, BLOCK_S=block_s, BLOCK_C=block_c,
                      BLOCK_K=min(_next_pow2(splits), max(1, tuning.persistent_merge_tile // block_c)),
                      ACC_DTYPE=tl_acc)
        kernel, grid, warps = _kernels()._bn_persistent_forward_kernel, (_cdiv(view.c, block_c), splits), \
            tuning.elementwise_warps
        if interpreted():   # programs run one at a time: the kernel in two launches, split at its barrier
            self.persistent = tuple(_Launch(kernel, grid, warps, dict(consts, PHASE=p)) for p in (1, 2))
        else:
            if _cooperative_supported():
                consts["launch_cooperative_grid"] = True
            self.persistent = (_Launch(kernel, grid, warps, dict(consts, PHASE=0)),)
        self.persistent_ok = True if tuning.persistent == "always" else None


def forward_plan(x, weight, bias, running_mean, running_var, num_batches_tracked, training: bool, momentum,
                 residual=None, activation: int = 0, write_mask: bool = False, bump: bool = False):
    """``(x, plan)`` of a forward call (arguments as ``forward``): x is a dense copy when the input is not
    readable in place (or, for the bitmask, not in memory order). Cached by everything the kernels
    specialize on, the big tensors' 16-byte alignment and the parameters' dtype included (callers pass
    parameters and running stats of one dtype, as ``functional.supported`` requires: a compiled kernel
    types each pointer, and cached launches skip Triton's specialization)."""
    has_running = running_mean is not None
    flags = (weight is not None, bias is not None, has_running and training,
             training and has_running and momentum is None and num_batches_tracked is not None,
             bump and training, residual is not None, activation, write_mask)
    p = weight if weight is not None else bias if bias is not None else running_mean
    key = (x.shape, x.stride(), x.data_ptr() % 16 == 0, x.dtype, None if p is None else p.dtype,
           x.get_device(), training, flags)
    cache = _plans if TUNING is _plans_tuning else _plan_cache()
    plan = cache.get(key)
    if plan is None:
        if residual is not None and activation and activation not in GATED:
            raise ValueError(f"tritonbn.ops: activation {activation} takes no fused residual (its gradient "
                             "would need it again); add it after the kernels")
        view = _dense_view(tuple(x.shape), x.stride())
        if view is None or (write_mask and view.flat_layout == TILED):
            # Not readable in place, or the bitmask needs memory order: contiguous (planar) copy.
            x = x.contiguous()
            return forward_plan(x, weight, bias, running_mean, running_var, num_batches_tracked, training,
                                momentum, residual, activation, write_mask, bump)
        plan = cache[key] = ForwardPlan(view, x.dtype, x.get_device(), training, flags)
    return x, plan


def run_forward(plan: ForwardPlan, x, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
                eps: float, residual=None):
    """Run a forward ``plan`` on ``x`` (as returned by ``forward_plan``): ``(y, stats, mask)``."""
    if _on_other_device(x):
        with torch.cuda.device(x.device):
            return run_forward(plan, x, weight, bias, running_mean, running_var, num_batches_tracked,
                               momentum, eps, residual)
    if plan.numel == 0:
        return torch.empty_like(x), _empty_stats(x, plan.c) if plan.training else None, None
    dev, stream = _device(x)
    if plan.persistent is not None and plan.persistent_ok is not False:
        out = _run_persistent(plan, x, dev, stream, weight, bias, running_mean, running_var,
                              num_batches_tracked, momentum, eps, residual)
        if out is not None:
            return out
    if plan.training:
        ws = _run_stats(plan, x, dev, stream, running_mean, running_var, num_batches_tracked, momentum, eps)
        mean_src = var_src = ws
    else:
        ws = None
        mean_src, var_src = running_mean, running_var
    y, mask = _run_normalize(plan, x, stream, weight, bias, mean_src, var_src, num_batches_tracked, eps,
                             residual)
    return y, ws, mask


def _run_stats(plan: ForwardPlan, x, dev, stream, running_mean, running_var, num_batches_tracked, momentum,
               eps) -> torch.Tensor:
    """The statistics launch: the workspace ``[mean | invstd | partials]``, running stats updated."""
    ws = torch.empty(plan.ws_numel, dtype=plan.acc, device=x.device)
    cnt = _counters(x, dev, stream, plan.num_counters)
    plan.stats(stream, *stats_args(plan, x, ws, cnt, running_mean, running_var, num_batches_tracked,
                                   0.0 if momentum is None else float(momentum), float(eps)))
    return ws


def _run_persistent(plan: ForwardPlan, x, dev, stream, weight, bias, running_mean, running_var,
                    num_batches_tracked, momentum, eps, residual):
    """The one-launch training forward: ``(y, ws, None)``, or None where its grid turns out not to fit
    (then the plan keeps to two launches)."""
    ws = torch.empty(plan.persistent_ws, dtype=plan.acc, device=x.device)
    y = torch.empty_like(x)
    z = _residual_operand(x, residual)
    args = persistent_args(plan, x, y, z, ws, _counters(x, dev, stream, 1), running_mean, running_var,
                           num_batches_tracked, weight, bias, 0.0 if momentum is None else float(momentum),
                           float(eps))
    if plan.persistent_ok is None:
        plan.persistent_ok = _fits(plan.persistent[0], args, dev)
        if not plan.persistent_ok:
            return None
    for launch in plan.persistent:
        launch(stream, *args)
    return y, ws, None


@functools.cache
def _cooperative_supported() -> bool:
    """Whether this Triton launches cooperatively on request (``launch_cooperative_grid``)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_cooperative_grid" in getattr(CUDAOptions, "__dataclass_fields__", {})


def _fits(launch: _Launch, args: tuple, dev: int) -> bool:
    """Whether every program of ``launch``'s grid can be resident at once on device ``dev``, by the
    compiled kernel's registers and shared memory (compiled here, not launched)."""
    compiled = launch.kernel.warmup(*args, grid=launch.grid, num_warps=launch.num_warps, **LAUNCH_OPTIONS,
                                    **launch.constexprs)
    if hasattr(compiled, "result"):   # triton's async compile mode hands back a future
        compiled = compiled.result()
    init = getattr(compiled, "_init_handles", None)
    if init is not None:
        init()
    blocks = blocks_per_sm(getattr(compiled, "n_regs", 0) or 0, compiled.metadata.shared, launch.num_warps,
                           torch.cuda.get_device_properties(dev))
    return math.prod(launch.grid) <= blocks * _sm_count(dev)


def blocks_per_sm(n_regs: int, shared: int, num_warps: int, props) -> int:
    """Programs of a kernel (``n_regs`` registers per thread, ``shared`` bytes of shared memory,
    ``num_warps`` warps) one SM holds at once: registers go to warps in 256s from each of the SM's 4
    partitions; each program also takes 1 KiB of shared memory for the system. 0 when unknown."""
    if n_regs <= 0 or num_warps <= 0:
        return 0
    per_warp = -(-n_regs * 32 // 256) * 256
    by_regs = 4 * ((getattr(props, "regs_per_multiprocessor", 65536) // 4) // per_warp) // num_warps
    by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * num_warps)
    smem = getattr(props, "shared_memory_per_multiprocessor", 0) or 0
    by_smem = smem // (shared + 1024) if smem else 0
    return max(0, min(by_regs, by_threads, by_smem, 32))


def persistent_args(plan: ForwardPlan, x, y, z, ws, cnt, running_mean, running_var, num_batches_tracked,
                    weight, bias, momentum, eps) -> tuple:
    return (x, y, z, ws, cnt, running_mean if running_mean is not None else ws,
            running_var if running_var is not None else ws,
            num_batches_tracked if num_batches_tracked is not None else ws,
            weight if weight is not None else ws, bias if bias is not None else ws,
            *plan.persistent_ints, momentum, eps, *plan.strides)


# The launches' argument lists, in the kernels' parameter order. Pure functions of the plan and their
# arguments (tensors, or the native path's symbolic slots): an absent optional tensor passes another tensor
# of the call, which the kernel does not read (its constexpr flag is off).

def stats_args(plan: ForwardPlan, x, ws, cnt, running_mean, running_var, num_batches_tracked, momentum,
               eps) -> tuple:
    return (x, ws, cnt, running_mean if running_mean is not None else ws,
            running_var if running_var is not None else ws,
            num_batches_tracked if num_batches_tracked is not None else ws,
            *plan.stats_ints, momentum, eps, *plan.strides)


def normalize_args(plan: ForwardPlan, x, y, z, mask, mean_src, var_src, weight, bias, num_batches_tracked,
                   eps) -> tuple:
    any_ = mean_src
    return (x, y, z, mask if mask is not None else any_, mean_src, var_src,
            weight if weight is not None else any_, bias if bias is not None else any_,
            num_batches_tracked if plan.flags[4] else any_, *plan.fwd_ints, eps, *plan.strides)


def reduce_args(plan: BackwardPlan, x, dy, mask, mean_src, var_src, weight, bias, sums, cnt, dweight, dbias,
                var_off: int, eps) -> tuple:
    any_ = mean_src
    return (x, dy, mask if mask is not None else any_, mean_src, var_src,
            weight if weight is not None else any_, bias if bias is not None else any_, sums, cnt,
            dweight if dweight is not None else any_, dbias if dbias is not None else any_,
            *plan.reduce_ints, var_off, eps, *plan.strides)


def dx_args(plan: BackwardPlan, x, dy, dx, dz, mask, mean_src, var_src, weight, bias, sums, var_off: int,
            eps) -> tuple:
    any_ = mean_src
    return (x, dy, dx if dx is not None else dy, dz if dz is not None else dy,
            mask if mask is not None else any_, mean_src, var_src,
            weight if weight is not None else any_, bias if bias is not None else any_, sums,
            *plan.dx_ints, var_off, plan.count, eps, *plan.strides)


def _residual_operand(x, residual):
    """The residual as the kernels read it: x's strides, 16-byte aligned (as they are specialized); x
    itself when there is none (not read)."""
    if residual is None:
        return x
    z = _like(x, residual)
    return z if z.data_ptr() % 16 == 0 else torch.empty_like(x).copy_(z)


def _run_normalize(plan: ForwardPlan, x, stream, weight, bias, mean_src, var_src, num_batches_tracked,
                   eps, residual):
    """The normalize launch: ``(y, mask)`` from ``mean_src``/``var_src`` (see ``normalize``)."""
    y = torch.empty_like(x)
    z = _residual_operand(x, residual)
    mask = torch.empty(plan.mask_words, dtype=torch.int32, device=x.device) if plan.mask_words else None
    plan.fwd(stream, *normalize_args(plan, x, y, z, mask, mean_src, var_src, weight, bias,
                                     num_batches_tracked, float(eps)))
    return y, mask


def forward(x, weight, bias, running_mean, running_var, num_batches_tracked, training: bool,
            momentum, eps: float, residual=None, activation: int = 0, write_mask: bool = False,
            bump: bool = False):
    """The forward pass.

    Training: batch statistics (``stats`` = ``[mean (C) | invstd (C) | partials]``, accumulation dtype),
    running stats updated in place when given, with ``momentum`` or, when it is None and
    ``num_batches_tracked`` is given, the cumulative factor 1/num_batches_tracked read on the device;
    ``bump`` increments ``num_batches_tracked`` on the device first (the module's counter). Eval: from the
    running statistics, ``stats`` is None. ``residual`` (x's shape and dtype) is added before
    ``activation`` (an ``ACTIVATIONS`` code; with a residual, 0 or a GATED one); ``write_mask`` also returns
    the gate of a GATED activation as a bitmask (int32 words, bit i = element i of ``x`` in memory order),
    else ``mask`` is None. Returns ``(y, stats, mask,
    x)``, x being the tensor the kernels read (a dense copy when the input was not readable in place)."""
    x, plan = forward_plan(x, weight, bias, running_mean, running_var, num_batches_tracked, training,
                           momentum, residual, activation, write_mask, bump)
    return (*run_forward(plan, x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                         residual), x)


@_on_x_device
def batch_stats(x, running_mean, running_var, num_batches_tracked, momentum, eps: float) -> torch.Tensor:
    """The training forward's first launch alone: ``[mean | invstd]`` (2·C, accumulation dtype) of ``x``,
    the running stats (when given) updated in place as ``forward`` does (``num_batches_tracked`` is only
    read, for the cumulative average). With ``normalize`` it is ``forward`` in two calls: the custom ops
    use the pair so that the running stats are mutated in place under ``torch.compile``."""
    x, plan = forward_plan(x, None, None, running_mean, running_var, num_batches_tracked, True, momentum)
    if plan.numel == 0:
        return _empty_stats(x, plan.c)
    dev, stream = _device(x)
    return _run_stats(plan, x, dev, stream, running_mean, running_var, num_batches_tracked, momentum,
                      eps)[:2 * plan.c]


@_on_x_device
def normalize(x, weight, bias, mean_src, var_src, training: bool, eps: float, residual=None,
              activation: int = 0, write_mask: bool = False):
    """The normalize launch alone: ``(y, mask)`` = ``activation(BN(x) [+ residual])`` from given statistics:
    in training ``mean_src`` = ``var_src`` = ``[mean | invstd]`` (``batch_stats``, or SyncBatchNorm's
    global ones), in eval the running mean and variance. ``mask`` as in ``forward``."""
    # In eval the running stats are the statistics: passed for the plan's key (their dtype).
    x, plan = forward_plan(x, weight, bias, None if training else mean_src, None if training else var_src,
                           None, training, 0.0, residual, activation, write_mask)
    if plan.numel == 0:
        return torch.empty_like(x), None
    return _run_normalize(plan, x, _device(x)[1], weight, bias, mean_src, var_src, None, eps, residual)


def readable(x: torch.Tensor) -> bool:
    """Whether the kernels read ``x`` in place (dense, mergeable spatial dims); otherwise the launchers
    copy it."""
    return _dense_view(tuple(x.shape), x.stride()) is not None


def _empty_stats(x, c):
    stats = torch.empty(2 * c, dtype=_acc_dtype(x.dtype), device=x.device)
    stats.fill_(float("nan"))
    return stats


def stats_views(stats: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, invstd) views of a training forward's ``stats`` workspace."""
    return stats[:c], stats[c:2 * c]


def backward_tuning(view: View, dtype: torch.dtype, act: int, tuning: Tuning) -> Tuning:
    """The tuning a backward plan takes: smaller tiles for some activations (``BackwardPlan``)."""
    if act != 0 and tuning.fused_cl_tiles and view.stride_c == 1 and view.stride_s != 1:
        return dataclasses.replace(tuning, reduce_tile=tuning.reduce_tile // 2,
                                   elementwise_tile=tuning.elementwise_tile // 2,
                                   eval_tile=tuning.eval_tile // 2)
    if act != 0 and act not in GATED:
        # SiLU's act'(u) (an exponential and a division per element) in the reduction's loop: full tiles
        # spill registers on sm_80 (fp32) and sm_90 (fp64), half fp64 tiles still need a stack frame on
        # sm_80 (libdevice's exp) (compile gate). Hardswish (no exponential) takes the same.
        div = 4 if dtype == torch.float64 else 2
        return dataclasses.replace(tuning, reduce_tile=tuning.reduce_tile // div)
    return tuning


class BackwardPlan:
    def __init__(self, view: View, dtype: torch.dtype, dev: int, training: bool, flags: tuple):
        (has_weight, has_bias, act, has_mask, need_dx, need_dw, need_db, need_dz, need_sums) = flags
        k = _kernels()
        tuning = backward_tuning(view, dtype, act, TUNING)
        acc = _acc_dtype(dtype)
        self.acc = acc
        c = view.c
        self.c = c
        self.numel = view.n * view.c * view.s
        self.count = view.n * view.s
        self.strides = view.strides
        tl_acc = _tl_dtype(acc)
        self.reduce = self.dx = None
        if self.numel == 0:
            return
        div_s, div_c = _divisors(view, dtype.itemsize)
        common = dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, FROM_VAR=not training, ACTIVATION=act,
                      HAS_MASK=has_mask, ACC_DTYPE=tl_acc)
        if need_dw or need_db or need_sums or (training and need_dx):
            r = _reduce_plan(view, _target_programs(dev), tuning, acc == torch.float64)
            self.num_counters = r.num_counters
            self.ws_numel = r.workspace(c, 2)
            self.reduce_ints = (c, view.s, r.num_sblocks, r.blocks_per_split, r.total_blocks)
            self.reduce = _Launch(k._bn_backward_reduce_kernel, r.grid, tuning.reduce_warps, dict(
                common, MASK_READ=_mask_read(view, r, tuning.mask_words) if has_mask else MASK_NONE,
                HAS_DWEIGHT=need_dw,
                HAS_DBIAS=need_db, GROUPED=r.grouped, STAGES=tuning.reduce_stages, DIV_S=div_s,
                DIV_C=div_c, BLOCK_S=r.block_s, BLOCK_C=r.block_c, BLOCK_K=r.block_k))
        write_dz = need_dz and act != 0
        if need_dx or write_dz:
            e = _elementwise_plan(view, tuning, False, dtype.itemsize, not training, dev, act)
            self.dx_ints = (c, view.s, self.numel, e.num_sblocks, e.num_cblocks)
            self.dx = _Launch(k._bn_backward_dx_kernel, e.grid, tuning.elementwise_warps, dict(
                common, TRAINING=training, WRITE_DX=need_dx, WRITE_DZ=write_dz, LAYOUT=e.layout,
                DIV_S=1 if e.layout != TILED else div_s, DIV_C=1 if e.layout != TILED else div_c,
                BLOCK_S=e.block_s, BLOCK_C=e.block_c, MASK_READ=_mask_tile_read(view, e.block_s, e.block_c)
                if has_mask and e.layout == TILED and tuning.mask_words else MASK_NONE))


def backward(dy, x, weight, bias, mean_src, var_src, mask, training: bool, eps: float, activation: int,
             need_dx: bool, need_dweight: bool, dbias_dtype: torch.dtype | None, need_dz: bool,
             need_sums: bool = False, forward_plan: ForwardPlan | None = None, grads_as_views: bool = False):
    """Gradients ``(dx, dweight, dbias, dz, sums)``, each None unless asked for (dbias when ``dbias_dtype``
    is given, dz = the residual's gradient, ``sums`` = ``[Σg, Σg·x̂]`` (2, C) with ``need_sums``).
    Training: ``mean_src`` and ``var_src`` are the forward's ``stats``. Eval: the running mean and variance
    (constants). ``mask``: the forward's ReLU bitmask (residual + ReLU), else None (the mask is recomputed
    from x). ``forward_plan``: the plan of the forward that read this very ``x`` (BatchNormFunction), which
    keeps this input's backward plans: found there without building the full cache key.

    ``grads_as_views``: dweight and dbias in the accumulation dtype are returned as views of the
    reduction's workspace, which holds them already (dweight = Σg·x̂, dbias = Σg): two allocations fewer
    per call (~4.4 µs each on the H200's host). Only for callers whose outputs may share storage
    (BatchNormFunction; not a custom op, whose outputs must not alias)."""
    if _on_other_device(x):
        with torch.cuda.device(x.device):
            return backward(dy, x, weight, bias, mean_src, var_src, mask, training, eps, activation, need_dx,
                            need_dweight, dbias_dtype, need_dz, need_sums, forward_plan, grads_as_views)
    flags, dw_view, db_view, dz_is_dy = backward_flags(_acc_dtype(x.dtype), weight, bias, activation,
                                                       mask is not None, need_dx, need_dweight, dbias_dtype,
                                                       need_dz, need_sums, grads_as_views)
    want_sums = need_sums
    need_dw, need_db, need_dz, need_sums = flags[5:]
    plan = forward_plan.backward_plans.get(flags) if forward_plan is not None else None
    if plan is None:
        p = weight if weight is not None else bias if bias is not None else None if training else mean_src
        key = ("bwd", x.shape, x.stride(), x.data_ptr() % 16 == 0, x.dtype, None if p is None else p.dtype,
               x.get_device(), training, flags)
        cache = _plans if TUNING is _plans_tuning else _plan_cache()
        plan = cache.get(key)
        if plan is None:
            view = _dense_view(tuple(x.shape), x.stride())
            if view is None:   # saved inputs are dense (the forward read them in place or copied them)
                x = x.contiguous()
                return backward(dy, x, weight, bias, mean_src, var_src, mask, training, eps, activation,
                                need_dx, need_dweight, dbias_dtype, need_dz or dz_is_dy, want_sums,
                                None, grads_as_views)
            plan = cache[key] = BackwardPlan(view, x.dtype, x.get_device(), training, flags)
        if forward_plan is not None:
            forward_plan.backward_plans[flags] = plan
    # dy laid out as x (a copy only for an unusual gradient, e.g. the expanded one of y.sum()) and 16-byte
    # aligned, as the kernels are specialized for it.
    dy = _like(x, dy)
    if dy.data_ptr() % 16:
        dy = torch.empty_like(x).copy_(dy)
    dz = dy if dz_is_dy else None
    dev, stream = _device(x)
    c = plan.c
    dweight = torch.empty(c, dtype=weight.dtype, device=x.device) if need_dw else None
    dbias = torch.empty(c, dtype=dbias_dtype, device=x.device) if need_db else None
    dx = torch.empty_like(x) if need_dx else None
    if need_dz:
        dz = torch.empty_like(x)
    if plan.numel == 0:
        sums = torch.zeros(2 * c, dtype=plan.acc, device=x.device) if need_sums else None
        for t in (dweight, dbias):
            if t is not None:
                t.zero_()
        return _backward_outputs(dx, dweight, dbias, dz, sums, c, dw_view, db_view, want_sums)
    var_off = c if training else 0
    sums = mean_src
    if plan.reduce is not None:
        sums = torch.empty(plan.ws_numel, dtype=plan.acc, device=x.device)
        cnt = _counters(x, dev, stream, plan.num_counters)
        plan.reduce(stream, *reduce_args(plan, x, dy, mask, mean_src, var_src, weight, bias, sums, cnt,
                                         dweight, dbias, var_off, float(eps)))
    if plan.dx is not None:
        plan.dx(stream, *dx_args(plan, x, dy, dx, dz if need_dz else None, mask, mean_src, var_src, weight,
                                 bias, sums, var_off, float(eps)))
    return _backward_outputs(dx, dweight, dbias, dz, sums, c, dw_view, db_view, want_sums)


def backward_flags(acc: torch.dtype, weight, bias, activation: int, has_mask: bool, need_dx: bool,
                   need_dweight: bool, dbias_dtype, need_dz: bool, need_sums: bool,
                   grads_as_views: bool) -> tuple:
    """``(flags, dw_view, db_view, dz_is_dy)`` of a ``backward`` call (arguments as there; ``acc``: the
    accumulation dtype of x's): its
    ``BackwardPlan`` flags ``(has_weight, has_bias, activation, has_mask, need_dx, need_dw, need_db,
    need_dz, need_sums)`` as the kernels see them, and which results come from elsewhere: dγ / dβ read from
    the workspace (``grads_as_views``, accumulation dtype), dz = dy (y = bn(x) + z: no ReLU between)."""
    need_db = dbias_dtype is not None
    need_dw = need_dweight and weight is not None
    dw_view = db_view = False
    if grads_as_views:
        dw_view, db_view = need_dw and weight.dtype == acc, need_db and dbias_dtype == acc
        need_dw, need_db = need_dw and not dw_view, need_db and not db_view
    dz_is_dy = need_dz and activation == 0   # y = bn(x) + z: the residual's gradient is dy itself
    need_dz = need_dz and not dz_is_dy         # a kernel writes dz only after a ReLU
    flags = (weight is not None, bias is not None, activation, has_mask, need_dx, need_dw, need_db, need_dz,
             need_sums or dw_view or db_view)
    return flags, dw_view, db_view, dz_is_dy


def _backward_outputs(dx, dweight, dbias, dz, sums, c, dw_view, db_view, want_sums):
    """``backward``'s results: dweight / dbias as views of the finalized ``[Σg | Σg·x̂]`` where asked."""
    if dw_view:
        dweight = sums[c:2 * c]
    if db_view:
        dbias = sums[:c]
    return dx, dweight, dbias, dz, sums[:2 * c].view(2, c) if want_sums else None


# --- entry points of the layers above (functional, custom ops, SyncBatchNorm) ----------------------

def bn_forward_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps):
    """Training forward: returns (y, saved_mean, saved_invstd). Running stats are updated in place."""
    y, stats, _, _ = forward(x, weight, bias, running_mean, running_var, num_batches_tracked, True,
                             momentum, eps)
    return (y, *stats_views(stats, x.shape[1]))


# SyncBatchNorm: partial statistics without the finalize, then normalize / backward with its own stats.

@_on_x_device
def bn_stat_partials(x: torch.Tensor, view: View) -> tuple[torch.Tensor, int]:
    """Per-split batch statistics ``[3, splits, C]`` = (mean − K_c, M2, count), shifted by
    K_c = x[0, c, 0] (see ``_bn_stats_kernel``), and the number of splits. One launch."""
    dev, stream = _device(x)
    acc = _acc_dtype(x.dtype)
    r = _reduce_plan(view, _target_programs(dev), TUNING, acc == torch.float64)
    ws = torch.empty(2 * view.c + 3 * r.splits * view.c, dtype=acc, device=x.device)
    div_s, div_c = _divisors(view, x.dtype.itemsize)
    launch = _Launch(_kernels()._bn_stats_kernel, r.grid, TUNING.reduce_warps, dict(
        HAS_RUNNING=False, CUMULATIVE=False, BUMP_BATCHES=False, FINALIZE=False, GROUPED=False,
        STAGES=TUNING.reduce_stages, DIV_S=div_s, DIV_C=div_c, BLOCK_S=r.block_s, BLOCK_C=r.block_c,
        BLOCK_K=r.block_k, ACC_DTYPE=_tl_dtype(acc)))
    launch(stream, x, ws, ws, ws, ws, ws, view.c, view.s, r.num_sblocks, r.blocks_per_split, r.total_blocks,
           0.0, 0.0, *view.strides)
    return ws[2 * view.c:].view(3, r.splits, view.c), r.splits


def bn_backward_sums(x: torch.Tensor, dy: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """``[Σdy, Σ(dy·x̂)]`` (2, C) per channel (accumulation dtype), summed in a fixed order, from the
    statistics ``stats`` = ``[mean | invstd]``. One launch."""
    return backward(dy, x, None, None, stats, stats, None, True, 0.0, 0, False, False, None, False,
                    need_sums=True)[4]


@_on_x_device
def bn_backward_dx(x: torch.Tensor, dy: torch.Tensor, weight, stats, sums, count: int) -> torch.Tensor:
    """Training dx from given statistics ``stats`` = ``[mean | invstd]`` and ``sums`` = ``[Σdy, Σ(dy·x̂)]``
    over ``count`` values per channel (SyncBatchNorm: the global ones). One launch."""
    x, view = _prepare(x)
    dy = _like(x, dy)
    if dy.data_ptr() % 16:   # the kernel is specialized for 16-byte aligned operands (a slice's may not be)
        dy = torch.empty_like(x).copy_(dy)
    flags = (weight is not None, False, 0, False, True, False, False, False, False)
    dev, stream = _device(x)
    key = ("dx", tuple(x.shape), x.stride(), x.data_ptr() % 16 == 0, x.dtype,
           None if weight is None else weight.dtype, dev, flags)
    cache = _plan_cache()
    plan = cache.get(key)
    if plan is None:
        plan = cache[key] = BackwardPlan(view, x.dtype, dev, True, flags)
    dx = torch.empty_like(x)
    if plan.numel:
        plan.dx(stream, x, dy, dx, dy, stats, stats, stats, weight if weight is not None else stats, stats,
                sums.contiguous(), *plan.dx_ints, view.c, count, 0.0, *plan.strides)
    return dx


class BatchNormFunction(torch.autograd.Function):
    """Autograd layer over the launchers, fused epilogue included. Saves the input the kernels read, the
    parameters, the statistics workspace (training, fp32 / fp64) or the running statistics (eval), and the
    ReLU bitmask when there is a residual: no full-size tensor besides x. Double backward (create_graph)
    runs the same formulas as differentiable torch ops (``tritonbn.torch_math``).

    ``call`` = ``(plan, running_mean, running_var, num_batches_tracked, momentum, eps)`` from
    ``forward_plan``: one argument rather than six keeps ``apply`` cheap."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, call):
        plan, running_mean, running_var, num_batches_tracked, momentum, eps = call
        y, stats, mask = run_forward(plan, x, weight, bias, running_mean, running_var, num_batches_tracked,
                                     momentum, eps, residual)
        saved = (x, weight, bias, stats, stats, mask) if plan.training else \
            (x, weight, bias, running_mean, running_var, mask)
        ctx.save_for_backward(*saved)
        ctx.cfg = (plan.training, eps, plan.flags[6], bias.dtype if bias is not None else None, plan,
                   saved_meta(saved) if saved_tensor_hooks_active() else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        training, eps, activation, bias_dtype, plan, meta = ctx.cfg
        saved = ctx.saved_tensors
        x, weight, bias, mean_src, var_src, mask = saved if meta is None else restore_saved(saved, meta)
        need_dx, need_dw, need_db, need_dz = ctx.needs_input_grad[:4]
        dbias_dtype = bias_dtype if need_db else None
        if torch.is_grad_enabled():
            grads = _differentiable_backward(dy, x, weight, bias, mean_src, var_src, mask, training, eps,
                                             activation, need_dx, need_dw, dbias_dtype, need_dz)
        else:
            grads = kernel_backward(dy, x, weight, bias, mean_src, var_src, mask, training, eps, activation,
                                    need_dx, need_dw, dbias_dtype, need_dz, plan)
        return (*grads, None)


def has_memory(t: torch.Tensor) -> bool:
    """Whether ``t`` has elements in memory the kernels can read (not a vmapped or efficient-zero tensor)."""
    return torch._C._has_storage(t) and not t._is_zerotensor()


def kernel_backward(dy, x, weight, bias, mean_src, var_src, mask, training, eps, activation, need_dx, need_dw,
                    dbias_dtype, need_dz, plan):
    """``(dx, dweight, dbias, dz)`` of an autograd node (``BatchNormFunction``, the native node's Python
    backward) from the kernels, or from torch ops where the incoming gradient has no memory for them to
    read: a vmapped one (``is_grads_batched``, vectorized ``jacobian`` / ``hessian``) or an efficient zero
    tensor. Found by the error reading it raises, before any launch: no check on the hot path."""
    try:
        return backward(dy, x, weight, bias, mean_src, var_src, mask, training, eps, activation, need_dx,
                        need_dw, dbias_dtype, need_dz, False, plan, True)[:4]
    except RuntimeError:
        if has_memory(dy):
            raise
    return _differentiable_backward(dy, x, weight, bias, mean_src, var_src, mask, training, eps, activation,
                                    need_dx, need_dw, dbias_dtype, need_dz)


def _c_apply():
    """The C++ ``apply`` of autograd Functions (what ``Function.apply`` ends in), bound to
    ``BatchNormFunction``, or None where torch does not have it where expected."""
    descr = getattr(torch._C._FunctionBase, "__dict__", {}).get("apply")
    unwrap = getattr(getattr(torch._C, "_functorch", None), "unwrap_if_dead", None)
    if descr is None or not hasattr(descr, "__get__") or unwrap is None:
        return None, None
    return descr.__get__(None, BatchNormFunction), unwrap


_APPLY, _UNWRAP_IF_DEAD = _c_apply()


def apply(x, weight, bias, residual, call):
    """``BatchNormFunction.apply(x, weight, bias, residual, call)`` without torch's Python wrapper (about
    2 µs of a 16 µs call on the CPU): for a Function without ``setup_context``, outside functorch
    transforms, the wrapper only unwraps dead functorch wrappers, then calls the C++ apply; so does this.
    Calls under functorch transforms never get here (``dispatch.uses_triton`` sends them to torch's batch
    norm); on a torch without those internals it is the wrapper itself."""
    if _APPLY is None:
        return BatchNormFunction.apply(x, weight, bias, residual, call)
    u = _UNWRAP_IF_DEAD
    return _APPLY(u(x), weight if weight is None else u(weight), bias if bias is None else u(bias),
                  residual if residual is None else u(residual), call)


def _differentiable_backward(dy, x, weight, bias, mean_src, var_src, mask, training, eps, activation,
                             need_dx, need_dw, dbias_dtype, need_dz):
    from tritonbn import torch_math

    acc = _acc_dtype(x.dtype)
    if training:
        mean, invstd = stats_views(mean_src, x.shape[1])
    else:
        mean, invstd = mean_src.to(acc), torch.rsqrt(var_src.to(acc) + eps)
    return torch_math.backward(dy, x, weight, bias, mean, invstd, mask, training, eps, activation, need_dx,
                               need_dw, dbias_dtype, need_dz)


# --- saved-tensor hooks (torch.autograd.graph.saved_tensors_hooks: offloading, compression, checkpoints) ---

_top_saved_hooks = getattr(getattr(torch._C, "_autograd", None), "_top_saved_tensors_default_hooks", None)
SAVED_NAMES = ("input", "weight", "bias", "mean", "variance", "ReLU bitmask")


def saved_tensor_hooks_active() -> bool:
    """Whether tensors saved now go through saved-tensor hooks (always True where torch does not say)."""
    return _top_saved_hooks is None or _top_saved_hooks(False) is not None


def saved_meta(saved: tuple) -> tuple:
    """What the backward's kernels assume of each saved tensor: dtype, device, shape, strides, alignment."""
    return tuple(None if t is None else (t.dtype, t.device, t.shape, t.stride(), t.data_ptr() % 16 == 0)
                 for t in saved)


def restore_saved(saved: tuple, meta: tuple, names: tuple = SAVED_NAMES) -> tuple:
    """The saved tensors as the forward saved them (``saved_meta``), from what unpack hooks returned.

    The backward's plan and kernels were specialized on the forward's tensors, and the ReLU bitmask is in
    the input's memory order: a tensor unpacked with other strides, or unaligned where the forward's was
    aligned, is copied back into the forward's layout. A different dtype, device or shape is an error (as
    in torch's own batch norm backward): computing from it would silently give other gradients."""
    out = []
    for name, t, m in zip(names, saved, meta):
        if m is None:
            out.append(t)
            continue
        dtype, device, shape, stride, aligned = m
        if t is None or t.dtype != dtype or t.device != device or t.shape != shape:
            got = "None" if t is None else f"{t.dtype} {tuple(t.shape)} on {t.device}"
            raise RuntimeError(f"tritonbn: a saved-tensor hook unpacked BatchNorm's saved {name} as {got}; "
                               f"it was saved as {dtype} {tuple(shape)} on {device}. Unpack hooks must "
                               "return a tensor of the saved one's dtype, shape and device")
        if t.stride() != stride or (aligned and t.data_ptr() % 16):
            t = torch.empty_strided(shape, stride, dtype=dtype, device=device).copy_(t)
        out.append(t)
    return tuple(out)
