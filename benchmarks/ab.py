"""Launcher tunings side by side on the GPU: ``python -m benchmarks.ab --out DIR``.

Runs ``benchmarks.bench`` once per variant (a ``tritonbn.ops.Tuning`` override, ``""`` = the defaults),
tritonbn only, with CUDA-graph timing, each in its own process (Triton's caches and the plan cache start
clean), into a temporary folder, then writes one table: kernel time under a CUDA graph per row and
variant, and each variant's geomean ratio to the first. Two files in DIR (``ab.json``, ``ab.md``) and
the table on the console: the GPU machine returns at most 8 files and no folders.

The default variants are the open questions left by the H200 run of 2026-11-28 (results/h200-2026-11-28-run3
and -run4), whose slowest kernel rows against eager are all fp32 channels_last reductions: the training
forward of 2048×7×7 at b32 (-run4's complete fp32 rows: 0.80×, 26.4 µs against cuDNN's 21.1; -run3 timed
the same row at 26.4 against 20.7, 0.78×; of those 26.4 µs the normalize pass is ~13 µs as the eval row
shows, 12.9, so the statistics pass takes ~13 µs to read 12.8 MB), 64×112×112 and the 3-D 64×16×56×56
(0.96×, -run4). The statistics kernel's main loop costs the same per element on every shape
(``benchmarks/sass_stats.py --kernel stats``: 13.1 sm_90 instructions per fp32 element at 2048×7×7, 13.0
at 256×56×56, which runs at 1.13× eager), but at 2048×7×7 each of its 544 programs reads only 3 row
blocks, one dependent DRAM round trip after the other, then the last program of each channel tile merges
17 partials: latency, not instructions. Each variant changes that:

* ``waves=2``: half the programs, twice the row blocks each (288 programs of 6), fewer partials to merge;
* ``waves=8``: more programs in flight per SM (800 of 2 row blocks);
* ``reduce_tile=4096``: tiles of 64 rows, not 32: twice the bytes in flight per load (416 programs of 2);
* ``reduce_stages=2``: the next row block's loads issued before this one is reduced (cp.async);
* ``elementwise_tile=8192``: the other pass, for the large bandwidth-bound rows (64×112×112, 3-D: 76% of
  copy bandwidth against cuDNN's 80%): twice the elements per normalize / dx program.

Two of them cross an occupancy cliff on 2048×7×7, so there they measure waves as much as tiling (compiled
registers, Triton 3.6, sm_90, 8 warps per program): the defaults' statistics and backward-reduce kernels
take 48 registers, 5 programs per SM, 660 resident against 544 programs; ``waves=8`` asks for 800;
``reduce_tile=4096`` takes 79-95 registers, 2-3 per SM, 264-396 resident against 416. The same arithmetic
explains the 25% the H200 lost there with ``merge_tile=2048`` (48 -> 91-108 registers, 2 per SM: three
waves).

Reductions run only in training, so the rows are fp32 channels_last training forward and forward+backward;
256×56×56 is the control that is fine today. A variant that wins there must then be checked on bf16 and
NCHW (``--dtypes bf16 --layouts channels_last,contiguous``) before it becomes a default.

``--preset persistent`` measures the one-launch training forward (``Tuning.persistent``, opt-in until it
does) against the default two launches.

``--preset waves`` asks whether reduction grids should stay within one wave (``whole_waves``: splits
rounded down; ``benchmarks/occupancy.py`` finds NCHW grids of 768 programs on 660 slots at the defaults).

``--preset quick`` is ``benchmarks/gpu_check.sh``'s last step, in the time the run leaves: the one-launch
forward, the fused channels-last backward's half tiles and the ReLU bitmask read bit by bit (as before
``Tuning.mask_words``) against the defaults on ResNet-50 b32's small channels-last layers (12 rows per
variant).

``--preset fused_cl`` asks the other open question of that run: bf16 channels_last forward+backward with
the fused ReLU / add+ReLU is 28-78% slower than NCHW (see ``PRESETS``), whose variants cut the registers per
thread of the channels_last backward kernels by using smaller tiles.

First every variant's kernels are compiled in parallel (``benchmarks.warm_cache --tunings``: 241
specializations for the default variants, shapes and dtype, both layouts), so that no variant spends its
share compiling. Each variant gets an equal share of ``--time-budget``, all of it timing: bench counts its
budget from the end of its start-up (imports, CUDA context, copy bandwidth: ~5-10 s a process on top of
the share); it stops starting shapes past its share and keeps what it measured. A share under
``min_share`` (``ITEM_S`` per item: a shape's plain modes, each fused epilogue) is warned about: some
modes would get no row.

Only CUDA-graph times (``graph_ms``) are compared: a row whose capture failed for a variant reads "—" with
a note giving the capture error, and is left out of that variant's geomean (its do_bench time is another
method). The exit status is 1 when the first variant (the reference) timed no row: nothing was compared.
``--smoke`` runs the same on a CPU (Triton interpreter) and compares one wall-clock call each: timings
mean nothing there.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("", "waves=2", "waves=8", "reduce_tile=4096", "reduce_stages=2", "elementwise_tile=8192")
# the fp32 channels-last rows under 1.0x eager in the 2026-11-28 H200 run, and one that is fine (256x56x56)
SHAPES = "rn50_b32_64x112x112,rn50_b32_256x56x56,rn50_b32_2048x7x7,bn3d_b8_64x16x56x56"
PRESETS = {
    # the default: latency of the channels-last statistics pass (module docstring)
    "reductions": dict(variants=";".join(VARIANTS), shapes=SHAPES, dtypes="fp32", layouts="channels_last",
                       modes="train_fwd,fwd_bwd"),
    # bf16 channels_last forward+backward, plain and fused: the fused ReLU costs channels_last 28 us at
    # 256x56x56 and NCHW nothing (H200 run of 2026-11-28). Not instructions (sass_stats: fewer per element
    # than NCHW) but registers? sm_90 with the GPU machines' triton 3.6, bf16 channels_last backward reduce /
    # dx registers per thread: 48 / 64 plain, 71 / 75 with the ReLU, 100 / 74 with add+ReLU (NCHW: 40 / 33,
    # 40 / 32, 59 / 40), so 2-3 programs of 8 warps per SM; with reduce_tile=1024 and elementwise_tile=2048
    # (fewer rows per thread, 8-byte loads) 48 / 48 in every case, 5 programs per SM. fused_cl_tiles halves
    # the tiles of those fused channels-last backward kernels only; the other two variants, of every kernel.
    # Since that run the add+ReLU backward reads its bitmask as whole words (Tuning.mask_words: reduce 64
    # registers, not 100-120); mask_words=false is the bit-by-bit read that run measured.
    "fused_cl": dict(variants=";fused_cl_tiles=true;mask_words=false;reduce_tile=1024;"
                              "reduce_tile=1024,elementwise_tile=2048",
                     shapes="rn50_b32_64x112x112,rn50_b32_256x56x56,rn50_b32_2048x7x7", dtypes="bf16",
                     layouts="channels_last", modes="fwd_bwd,relu_fwd_bwd,add_relu_fwd_bwd"),
    # gpu_check's last step, in whatever time the run leaves: the two built-but-unmeasured options, on
    # ResNet-50 b32's small channels-last layers, training forward and BN + add + ReLU forward+backward:
    # the one-launch forward (fits 512x7x7 and 256x14x14, not fp32 2048x7x7), the fused channels-last
    # backward's half tiles (40 registers, not 64-71) and, against the bitmask read as whole words (the
    # default since that run), the bit-by-bit read it measured (mask_words=false: 113-120 registers, 2-3
    # waves). Not the statistics tiles: 64-row ones cross the occupancy cliff on 2048x7x7 (module
    # docstring), so they need the full "reductions" preset.
    "quick": dict(variants=";persistent=auto;fused_cl_tiles=true;mask_words=false",
                  shapes="rn50_b32_2048x7x7,rn50_b32_512x7x7,rn50_b32_256x14x14", dtypes="fp32,bf16",
                  layouts="channels_last", modes="train_fwd,add_relu_fwd_bwd"),
    # Whole waves (Tuning.whole_waves): reduction splits rounded down so a grid never exceeds waves x SMs
    # programs. benchmarks/occupancy.py (Triton 3.6, sm_90): rounded up, 256 NCHW channels take 768
    # programs, two waves of the 660 an H200 holds at 48 registers; rounded down, 512, one wave (and with
    # waves=5, 660). Larger layers, both layouts: channels-last grids barely change (C = 64-1024 fill
    # 523-528 either way), so those rows are the control.
    "waves": dict(variants=";whole_waves=true;waves=5,whole_waves=true",
                  shapes="rn50_b32_64x112x112,rn50_b32_256x56x56,rn50_b32_512x28x28,rn50_b32_1024x14x14",
                  dtypes="fp32,bf16", layouts="contiguous,channels_last", modes="train_fwd,fwd_bwd"),
    # The one-launch training forward (Tuning.persistent, _bn_persistent_forward_kernel): x read once and
    # held in registers across a grid barrier, one launch instead of two. Where the grid fits on the GPU
    # at once (ResNet-50 b32's 7x7 and 14x14 layers; 128x28x28 and 256x56x56 do not, the controls),
    # against the two-launch default: its defaults, twice the rows per program (fewer partials, more
    # registers), and a 4x wider merge step after the barrier (each program merges every partial of its
    # channels: fewer serial L2 round trips, more registers).
    "persistent": dict(variants=";persistent=auto;persistent=auto,persistent_tile=8192;"
                                "persistent=auto,persistent_merge_tile=4096",
                       shapes="rn50_b32_2048x7x7,rn50_b32_512x7x7,rn50_b32_256x14x14,rn50_b32_128x28x28,"
                              "rn50_b32_256x56x56",
                       dtypes="fp32,bf16", layouts="channels_last,contiguous", modes="train_fwd,fwd_bwd"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for ab.json and ab.md")
    p.add_argument("--preset", choices=sorted(PRESETS), default="reductions",
                   help="the question asked: defaults for the five options below (module docstring)")
    p.add_argument("--variants",
                   help="';'-separated Tuning overrides (bench --tuning syntax); empty = defaults")
    p.add_argument("--shapes", help="bench --shapes")
    p.add_argument("--dtypes")
    p.add_argument("--layouts")
    p.add_argument("--modes")
    p.add_argument("--time-budget", type=float, default=200.0,
                   help="seconds of timing, shared equally by the variants (each bench process's start-up, "
                        "~5-10 s, comes on top)")
    p.add_argument("--warm-timeout", type=float, default=150.0,
                   help="seconds for compiling every variant's kernels first (benchmarks.warm_cache)")
    p.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def _row_key(row) -> tuple:
    return (row["case"], row["dtype"], row["layout"], row["mode"])


GRAPH = "graph_ms"   # the one timing compared on a GPU: CUDA-graph replay (kernels, no host cost)
SMOKE_TIMING = "ms"  # --smoke: one wall-clock call each, for every variant alike (meaningless numbers)


def _cell(row, timing: str = GRAPH) -> tuple[float | None, str | None]:
    """One variant's time for one row, ``(µs, None)``, or ``(None, why there is none)``. Only ``timing``
    counts: a row whose CUDA-graph capture failed has a do_bench time, but that is another method (host
    launch cost hidden only up to the L2 flush), never put next to graph times."""
    t = row.get("providers", {}).get("tritonbn", {})
    if t.get("error"):
        return None, f"error: {t['error']}"
    ms = t.get(timing)
    if ms:
        return ms * 1e3, None
    if timing == GRAPH:
        err = f" (graph capture: {t['graph_error']})" if t.get("graph_error") else ""
        return None, f"no CUDA-graph time{err}; its do_bench time is another timing method, not shown"
    return None, f"no {timing} time"


def combine(variants: list[str], results: list[dict | None], timing: str = GRAPH) -> dict:
    """One row per (case, dtype, layout, mode) the first variant reached: µs per variant under ``timing``
    (None where a variant did not reach the row, failed it, or has no time of that method, with the reason
    in ``missing``), and per variant the geomean of its time over the first's on the rows both timed."""
    base = results[0] or {"rows": []}
    per_variant = [None if res is None else {_row_key(r): _cell(r, timing) for r in res.get("rows", [])}
                   for res in results]
    rows = []
    for r in base["rows"]:
        key = _row_key(r)
        cells = []
        for pv in per_variant:
            if pv is None:
                cells.append((None, "no results: its bench process wrote no bench.json (failed or not run)"))
            else:
                cells.append(pv.get(key, (None, "not reached within its time share")))
        rows.append({"case": key[0], "dtype": key[1], "layout": key[2], "mode": key[3],
                     "us": [u for u, _ in cells], "missing": [w for _, w in cells]})
    ratios = []
    for i in range(len(variants)):
        logs = [math.log(row["us"][i] / row["us"][0]) for row in rows
                if row["us"][0] and row["us"][i]]
        ratios.append({"geomean_vs_first": math.exp(sum(logs) / len(logs)) if logs else None,
                       "rows": len(logs)})
    return {"variants": [v or "(defaults)" for v in variants], "timing": timing, "rows": rows,
            "ratios": ratios, "first_rows_timed": sum(1 for row in rows if row["us"][0])}


def table(doc: dict) -> str:
    """The µs table; a cell without a time reads "— [n]", note n below the table saying why. The geomeans
    leave such rows out."""
    names = doc["variants"]
    unit = "graph µs" if doc.get("timing", GRAPH) == GRAPH else "µs (smoke: wall clock)"
    lines = ["| shape | dtype | layout | mode | " + " | ".join(f"`{n}` {unit}" for n in names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    notes: dict[str, int] = {}
    for r in doc["rows"]:
        cells = []
        for name, u, why in zip(names, r["us"], r.get("missing") or [None] * len(names)):
            if u:
                cells.append(f"{u:.1f}")
            else:
                n = notes.setdefault(f"`{name}`: {why or 'no time'}", len(notes) + 1)
                cells.append(f"— [{n}]")
        lines.append(f"| {r['case']} | {r['dtype']} | {r['layout']} | {r['mode']} | "
                     + " | ".join(cells) + " |")
    lines.append("| geomean / first | | | | " + " | ".join(
        f"{x['geomean_vs_first']:.3f} (n={x['rows']})" if x["geomean_vs_first"] else f"— (n={x['rows']})"
        for x in doc["ratios"]) + " |")
    if notes:
        lines += ["", "Cells without a time (left out of the geomeans):"]
        lines += [f"[{n}] {text}" for text, n in notes.items()]
    return "\n".join(lines)


# Seconds bench takes for the first shape of one of its items (a plain item holds every plain mode of a
# shape; each fused epilogue is an item of its own) under ab: a correctness pass, then per mode do_bench
# (warm-up 25 ms, 100 ms of repetitions), host µs and a CUDA-graph replay as long, the kernels loaded from
# the cache warm_cache filled. ~1-2 s on the H200 (run4's A/B: 8 items of 3 modes in ~18 s per variant,
# start-up included); 3 leaves a margin.
ITEM_S = 3.0


def min_share(args) -> float:
    """Seconds of timing a variant needs to reach one shape of each of its modes (plain, and each fused
    epilogue), by ITEM_S."""
    from .bench import epilogue

    modes = [m for m in args.modes.split(",") if m]
    items = any(epilogue(m) is None for m in modes) + len({epilogue(m) for m in modes} - {None})
    return ITEM_S * items


class _Stopped(Exception):
    """SIGTERM (gpu_check's hard cap): stop, and tabulate the variants measured so far."""


def _stop(signum, frame):
    raise _Stopped


def main(argv=None) -> int:
    args = parse_args(argv)
    variants = args.variants.split(";")
    args.out.mkdir(parents=True, exist_ok=True)
    results, log = [], []
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        _run(args, variants, results, log)
    except _Stopped:
        log.append({"variant": "stopped", "rc": None, "seconds": None,
                    "tail": f"SIGTERM after {len(results)} of {len(variants)} variants"})
        print(f"ab: stopped (SIGTERM) after {len(results)} of {len(variants)} variants", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    results += [None] * (len(variants) - len(results))
    doc = combine(variants, results, SMOKE_TIMING if args.smoke else GRAPH)
    doc["runs"] = log
    doc["timing_meaningful"] = not args.smoke
    (args.out / "ab.json").write_text(json.dumps(doc, indent=1))
    md = table(doc)
    title = ("# tritonbn launcher tunings, kernel time under a CUDA graph (µs)" if not args.smoke else
             "# tritonbn launcher tunings, smoke run: one wall-clock call each, timings meaningless")
    (args.out / "ab.md").write_text(f"{title}\n\n{md}\n")
    print(md)
    if not doc["first_rows_timed"]:
        # nothing to compare against: not a result, whatever the other variants measured
        tail = next((r["tail"][-300:] for r in log if r["variant"] == (variants[0] or "(defaults)")), "")
        print(f"ab: FAILED: the first variant (`{doc['variants'][0]}`) timed no rows, so nothing was "
              f"compared; its bench's last output: {tail.strip()!r}", flush=True)
        return 1
    return 0


def _run(args, variants: list[str], results: list, log: list) -> None:
    """Warm the kernel cache, then one bench process per variant, appending to ``results`` and ``log`` as
    each ends (so that a stop keeps what was measured)."""
    # Each bench counts its --time-budget from the end of its start-up (imports, CUDA context, copy
    # bandwidth: bench's meta.setup_s), so the share is all timing; the start-ups come on top of it.
    share = args.time_budget / max(1, len(variants))
    need = min_share(args)
    if share < need:
        print(f"ab: warning: {share:.1f} s per variant is under the ~{need:.0f} s that one shape of each of "
              f"its modes takes ({args.modes}): rows will be missing", flush=True)
    if not args.smoke:
        # Every variant's kernels compiled first, in parallel on all cores (benchmarks.warm_cache): at their
        # first launch they would compile one by one inside the variant's time share.
        # A failed or cut-off warm-up only costs time: the kernels then compile at their first launch.
        t0 = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.warm_cache", "--shapes", args.shapes,
                                   "--dtypes", args.dtypes, "--tunings", ";".join(variants)],
                                  capture_output=True, text=True, timeout=args.warm_timeout)
            rc, tail = proc.returncode, proc.stdout[-600:] + proc.stderr[-600:]
        except subprocess.TimeoutExpired:
            rc, tail = None, f"killed after {args.warm_timeout:.0f} s"
        log.append({"variant": "warm_cache", "rc": rc, "seconds": round(time.monotonic() - t0, 1),
                    "tail": tail})
        print(f"ab: warm_cache: exit {rc} after {log[-1]['seconds']} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for i, variant in enumerate(variants):
            out = Path(tmp) / f"v{i}"
            cmd = [sys.executable, "-m", "benchmarks.bench", "--providers", "tritonbn", "--cuda-graphs",
                   "--no-png", "--shapes", args.shapes, "--dtypes", args.dtypes, "--layouts", args.layouts,
                   "--modes", args.modes, "--time-budget", f"{share:.1f}", "--out", str(out)]
            if args.smoke:
                cmd.append("--smoke")
            if variant:
                cmd += ["--tuning", variant]
            t0 = time.monotonic()
            # Past the share, bench stops starting shapes and writes what it has: the hard cap is a backstop
            # (start-up, the last shape, writing).
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=share + 60)
            name = variant or "(defaults)"
            log.append({"variant": name, "rc": proc.returncode, "seconds": round(time.monotonic() - t0, 1),
                        "tail": proc.stdout[-600:] + proc.stderr[-600:]})
            print(f"ab: {name}: exit {proc.returncode} after {log[-1]['seconds']} s", flush=True)
            path = out / "bench.json"
            results.append(json.loads(path.read_text()) if path.exists() else None)


if __name__ == "__main__":
    sys.exit(main())
