"""Measurement helpers shared by `bench` and `train_check`: byte model, timing, environment, summaries.

Byte model (E = numel(x) * itemsize(x); per-channel vectors are ignored as negligible):

    train_fwd  3E   reads x for the statistics, reads x again to normalize, writes y
    eval_fwd   2E   reads x, writes y (running statistics are per-channel vectors)
    bwd        5E   reads x and dy for the reductions (sum dy, sum dy*xhat), reads x and dy again for dx,
                    writes dx
    fwd_bwd    8E   train_fwd + bwd

This is the traffic of the classic two-pass kernels (PyTorch native, cuDNN, Inductor, most Triton
ports). A kernel that keeps x on chip between passes moves less and can exceed 100% of this model's
"% of copy bandwidth"; the figure is then still a fair speed measure, just not a bound.

GB/s = model bytes / median time; "% of copy" divides by the bandwidth of a large device-to-device
`dst.copy_(src)` (bytes read + written) measured in the same process.

Timing uses `triton.testing.do_bench`, which zeroes a 256 MB buffer before every timed repetition
(triton >= 3.0, `clear_cache`), so no shape is served from L2 (50 MB on H100, 60 MB on H200); the
input sets therefore are not rotated. do_bench records its start event behind that flush (~60-80 us of
GPU work on H100/H200), so host-side launch cost is hidden only up to that much: a call that needs more
host time than flush + kernels is timed at host speed. Each cell therefore also reports `host_us`, the
CPU time to issue one call with the GPU not waited for (what a training loop pays per call); where
host_us approaches the time column, the row measures host overhead, not kernels.

Fused modes (y = relu(BN(x) [+ z]), issue 9), charged at the traffic of a fused two-pass kernel; an
unfused chain (BN, then a separate add and ReLU, each a pass over the activation) moves the second
figure:

    relu_train_fwd      3E  (unfused 5E: + ReLU reads y, writes y)
    relu_eval_fwd       2E  (unfused 4E)
    relu_fwd_bwd        8E  (unfused 13E: forward 5E + backward 8E, ReLU backward reads dy and y, writes dy)
    add_relu_train_fwd  4E  (unfused 8E: BN 3E + add 3E + ReLU 2E)
    add_relu_eval_fwd   3E  (unfused 7E: BN 2E + add 3E + ReLU 2E)
    add_relu_fwd_bwd   10E  (unfused 16E: forward 8E + backward 8E; fused backward 6E: x and dy read
                             twice, dx and dz written)

The ReLU mask (a bit per element when stored, nothing when recomputed from x) is not counted.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("train_fwd", "bwd", "fwd_bwd", "eval_fwd")
# y = relu(BN(x)) and y = relu(BN(x) + z): training forward, forward+backward, eval (issue 9)
FUSED_MODES = (
    "relu_train_fwd",
    "relu_fwd_bwd",
    "relu_eval_fwd",
    "add_relu_train_fwd",
    "add_relu_fwd_bwd",
    "add_relu_eval_fwd",
)
BYTES_PER_ELEMENT_PASS = {
    "train_fwd": 3,
    "eval_fwd": 2,
    "bwd": 5,
    "fwd_bwd": 8,
    "relu_train_fwd": 3,
    "relu_eval_fwd": 2,
    "relu_fwd_bwd": 8,
    "add_relu_train_fwd": 4,
    "add_relu_eval_fwd": 3,
    "add_relu_fwd_bwd": 10,
}
# what an unfused chain (BN module, then a separate add and ReLU) moves in the fused modes
UNFUSED_BYTES_PER_ELEMENT_PASS = {
    "relu_train_fwd": 5,
    "relu_eval_fwd": 4,
    "relu_fwd_bwd": 13,
    "add_relu_train_fwd": 8,
    "add_relu_eval_fwd": 7,
    "add_relu_fwd_bwd": 16,
}
BYTE_MODEL_TEXT = {
    "train_fwd": "3E: read x (statistics) + read x (normalize) + write y",
    "eval_fwd": "2E: read x + write y",
    "bwd": "5E: read x, dy (reductions) + read x, dy (dx) + write dx",
    "fwd_bwd": "8E: train_fwd + bwd",
    "relu_train_fwd": "3E fused (unfused 5E): BN train_fwd, ReLU in the normalize pass",
    "relu_eval_fwd": "2E fused (unfused 4E): read x + write y",
    "relu_fwd_bwd": "8E fused (unfused 13E): 3E forward + 5E backward, mask from x",
    "add_relu_train_fwd": "4E fused (unfused 8E): read x twice, read z, write y",
    "add_relu_eval_fwd": "3E fused (unfused 7E): read x, z + write y",
    "add_relu_fwd_bwd": "10E fused (unfused 16E): 4E forward + 6E backward (x, dy twice; dx, dz written)",
}
# The other fused activations (opt-in through bench --modes, not --fused): y = act(BN(x) [+ z]) with ReLU6
# (MobileNetV2), SiLU (EfficientNet, YOLO) or Hardswish (MobileNetV3); the same passes, so the ReLU modes'
# byte models.
EXTRA_EPILOGUES = ("relu6", "add_relu6", "silu", "hardswish")
EXTRA_FUSED_MODES = tuple(f"{e}_{m}" for e in EXTRA_EPILOGUES for m in ("train_fwd", "fwd_bwd", "eval_fwd"))
ALL_FUSED_MODES = FUSED_MODES + EXTRA_FUSED_MODES
for _m in EXTRA_FUSED_MODES:
    _act = "ReLU6" if "relu6" in _m else "SiLU" if "silu" in _m else "Hardswish"
    _as = _m.replace("relu6", "relu").replace("silu", "relu").replace("hardswish", "relu")
    BYTES_PER_ELEMENT_PASS[_m] = BYTES_PER_ELEMENT_PASS[_as]
    UNFUSED_BYTES_PER_ELEMENT_PASS[_m] = UNFUSED_BYTES_PER_ELEMENT_PASS[_as]
    BYTE_MODEL_TEXT[_m] = BYTE_MODEL_TEXT[_as].replace("ReLU", _act).replace("mask from x",
                                                                            "act'(u) from x")
REPO = Path(__file__).resolve().parent.parent


def model_bytes(mode: str, numel: int, itemsize: int) -> int:
    """Bytes the byte model charges one call of `mode` on a tensor of `numel` elements."""
    return BYTES_PER_ELEMENT_PASS[mode] * numel * itemsize


def geomean(values) -> float | None:
    """Geometric mean of the positive finite values; None when there are none."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v)) and float(v) > 0]
    if not vals:
        return None
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


# --------------------------------------------------------------------------------------------------
# timing


def do_bench_flushes_l2() -> bool:
    """Whether this triton's do_bench clears L2 between repetitions (read from its source)."""
    try:
        from triton.testing import do_bench

        src = inspect.getsource(do_bench)
    except Exception:
        return False
    return "clear_cache" in src or "cache.zero_" in src


def gpu_time_ms(fn, warmup_ms: int, rep_ms: int, grad_to_none=None) -> dict:
    """Median (and 20th/80th percentile) of fn's GPU time via triton's do_bench, on triton 3.x.

    `quantiles` exists on every 3.x do_bench and wins over `return_mode` where both exist.
    """
    from triton.testing import do_bench

    params = inspect.signature(do_bench).parameters
    kw = {"warmup": warmup_ms, "rep": rep_ms}
    if grad_to_none is not None and "grad_to_none" in params:
        kw["grad_to_none"] = grad_to_none
    if "quantiles" in params:
        r = do_bench(fn, quantiles=[0.5, 0.2, 0.8], **kw)
        r = [float(v) for v in (r if isinstance(r, (list, tuple)) else [r, r, r])]
        return {"ms": r[0], "p20_ms": r[1], "p80_ms": r[2]}
    if "return_mode" in params:
        kw["return_mode"] = "median"
    ms = float(do_bench(fn, **kw))
    return {"ms": ms, "p20_ms": None, "p80_ms": None}


_CUDA_SYNC = object()


def host_us_per_call(fn, n: int = 20, grad_to_none=None, loops: int = 1, warmup: int = 0, sync=_CUDA_SYNC):
    """CPU microseconds to issue one call of fn: `loops` loops of n calls queued back to back (far below
    the launch queue depth, so the CPU never waits for the GPU), synchronized only between loops; the
    median loop's mean. `sync` defaults to torch.cuda.synchronize; None for CPU-only callables."""
    return host_us_interleaved({None: (fn, grad_to_none)}, n, loops, warmup, sync)[None]


def host_us_interleaved(fns: dict, n: int = 20, loops: int = 1, warmup: int = 0, sync=_CUDA_SYNC) -> dict:
    """``host_us_per_call`` of several callables measured together: ``fns`` maps a name to ``(fn,
    grad_to_none)``; each loop times n calls of every one, in an order that alternates from loop to loop,
    so that a drifting or noisy host (a VM's neighbours, clock changes) weighs on all of them alike rather
    than on whichever ran second. Returns name -> the median loop's mean µs per call."""
    import statistics

    if sync is _CUDA_SYNC:
        import torch

        sync = torch.cuda.synchronize

    def calls(fn, gtn, k):
        for _ in range(k):
            for t in gtn or ():
                t.grad = None
            fn()

    for fn, gtn in fns.values():
        calls(fn, gtn, warmup)
    names = list(fns)
    per_loop: dict = {name: [] for name in names}
    for i in range(loops):
        for name in names if i % 2 == 0 else names[::-1]:
            fn, gtn = fns[name]
            if sync:
                sync()
            t0 = time.perf_counter()
            calls(fn, gtn, n)
            per_loop[name].append((time.perf_counter() - t0) / n * 1e6)
    if sync:
        sync()
    return {name: statistics.median(v) for name, v in per_loop.items()}


def rel_l2(torch, a, b) -> float:
    """||a - b|| / ||b|| over lists of tensors (inf when a has a non-finite value)."""
    num = sum(float(torch.sum((x - y).double() ** 2)) for x, y in zip(a, b))
    den = sum(float(torch.sum(y.double() ** 2)) for y in b)
    return math.sqrt(num / den) if den > 0 and math.isfinite(num) else (0.0 if num == 0 else math.inf)


def count_launches(fn) -> list[str]:
    """Names of the Triton kernels one call of fn launches, recorded through
    ``tritonbn.ops._launch_hook`` (each launch still runs); the hook is removed afterwards."""
    from tritonbn import ops

    names: list[str] = []

    def record_and_run(kernel, grid, args, constexprs, num_warps):
        names.append(getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel)))
        kernel[grid](*args, num_warps=num_warps, **constexprs)

    prev, ops._launch_hook = ops._launch_hook, record_and_run
    try:
        fn()
    finally:
        ops._launch_hook = prev
    return names


def count_aten_ops(fn) -> dict[str, int]:
    """ATen operators one call of fn dispatches (below autograd: what runs, views included), by name.
    tritonbn's Triton launches are skipped meanwhile (``tritonbn.ops._launch_hook``): the interpreter's
    own tensor ops would count otherwise, and no launcher branches on tensor values."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tritonbn import ops

    counts: dict[str, int] = {}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(getattr(func, "overloadpacket", func))
            counts[name] = counts.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    prev, ops._launch_hook = ops._launch_hook, lambda *a, **k: None
    try:
        with Count():
            fn()
    finally:
        ops._launch_hook = prev
    return counts


def graph_time_ms(fn, warmup_ms: int, rep_ms: int, grad_to_none=None) -> float:
    """Median GPU time of fn captured once in a CUDA graph and replayed: kernels only, no host cost.
    Grads are set to None before capture, so the captured backward writes fresh buffers each replay."""
    import torch

    for t in grad_to_none or ():
        t.grad = None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph asks
        for _ in range(2):
            for t in grad_to_none or ():
                t.grad = None
            fn()
    torch.cuda.current_stream().wait_stream(side)
    for t in grad_to_none or ():
        t.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    ms = gpu_time_ms(g.replay, warmup_ms, rep_ms)["ms"]
    del g
    return ms


def wall_time_ms(fn, reps: int = 1, grad_to_none=None) -> dict:
    """CPU smoke timing: exercises the code path only (no warm-up); the numbers mean nothing."""
    ts = []
    for _ in range(reps):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return {"ms": ts[len(ts) // 2], "p20_ms": ts[0], "p80_ms": ts[-1]}


def copy_bandwidth_gbs(device: str, nbytes: int, warmup_ms: int = 25, rep_ms: int = 100) -> dict:
    """Device-to-device copy bandwidth, counting bytes read + written, measured like the kernels are."""
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)
    t = gpu_time_ms(fn, warmup_ms, rep_ms) if device == "cuda" else wall_time_ms(fn, reps=3)
    moved = 2 * src.numel() * src.element_size()
    return {"bytes": moved, "ms": t["ms"], "gbs": moved / (t["ms"] * 1e-3) / 1e9}


# --------------------------------------------------------------------------------------------------
# environment


def _run(cmd: list[str], timeout: float = 10.0) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except Exception:
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_commit() -> str:
    """HEAD of the repo, else $GIT_COMMIT (copies of the tree without .git), else 'unknown'."""
    sha = _run(["git", "rev-parse", "HEAD"])
    if sha:
        dirty = _run(["git", "status", "--porcelain", "--", "tritonbn", "benchmarks"])
        return sha + ("-dirty" if dirty else "")
    return os.environ.get("GIT_COMMIT") or "unknown"


def env_info(device: str) -> dict:
    import torch

    info = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "git_commit": git_commit(),
        "device": device,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:  # the bench still reports eager numbers without triton
        info["triton"] = f"unavailable: {e}"
    try:
        import tritonbn

        info["tritonbn"] = getattr(tritonbn, "__version__", "unknown")
    except Exception as e:
        info["tritonbn"] = f"import failed: {type(e).__name__}: {e}"
    if device == "cuda":
        try:
            _cuda_info(torch, info)
        except Exception as e:
            info["gpu"] = f"unknown ({type(e).__name__}: {e})"
    else:
        info["gpu"] = None
        info["cpu"] = platform.processor() or platform.machine()
    return info


def _cuda_info(torch, info: dict) -> None:
    p = torch.cuda.get_device_properties(0)
    info.update(
        gpu=p.name,
        gpu_capability=f"{p.major}.{p.minor}",
        gpu_sms=p.multi_processor_count,
        gpu_memory_gib=round(p.total_memory / 2**30, 1),
        gpu_l2_mb=round(getattr(p, "L2_cache_size", 0) / 1e6, 1) or None,
        cudnn=torch.backends.cudnn.version(),
    )
    smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    info["driver"] = smi.splitlines()[0].strip() if smi else "unknown"


def card_slug(info: dict) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; CPU runs -> 'cpu'."""
    name = (info.get("gpu") or "cpu").lower()
    m = re.search(r"\b([a-z]{1,2}\d{2,4}[a-z]?)\b", name.replace("nvidia", ""))
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def default_out_dir(info: dict, root: Path | None = None) -> Path:
    """benchmarks/results/<card>-<YYYY-MM-DD>, or -runN (the first N free) when that exists already."""
    root = root or REPO / "benchmarks" / "results"
    base = f"{card_slug(info)}-{time.strftime('%Y-%m-%d')}"
    path, n = root / base, 1
    while path.exists():
        path, n = root / f"{base}-run{n}", n + 1
    return path


def start_run(name: str, smoke: bool, out: Path | None):
    """The start every benchmark's main shares. --smoke: the CPU, with Triton's interpreter (set before
    triton is first imported); otherwise a CUDA device, required. Returns (torch, device, env, out dir),
    or None when there is no CUDA device (the caller exits with status 2)."""
    if smoke and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            print(
                f"{name}: warning: triton already imported; TRITON_INTERPRET=1 comes too late",
                file=sys.stderr,
            )
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    device = "cpu" if smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print(f"{name}: no CUDA device; use --smoke for the CPU check", file=sys.stderr)
        return None
    env = env_info(device)
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="tritonbn-smoke-")) if smoke else default_out_dir(env)
    out.mkdir(parents=True, exist_ok=True)
    return torch, device, env, out


def write_json_atomic(path: Path, obj) -> None:
    """Write then rename, so a run killed mid-write leaves the previous complete file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fmt(v, spec: str = ".3g", none: str = "—") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none if v is None else str(v)
    return format(v, spec)
