"""Assemble DIR/summary.json from the pieces a GPU run wrote into DIR, and print it as tables.

    python -m benchmarks.summary DIR            # reads DIR/{host_us,bench,model}.json (+ pytest_cuda.log)
    python -m benchmarks.summary --results-dir  # prints benchmarks/results/<card>-<YYYY-MM-DD>[-runN]

Pieces: host_us.json (`benchmarks.host_us`), bench.json (`benchmarks.bench --cuda-graphs`, fused rows
with `--fused`), model.json (`benchmarks.model_bench`). Any of them may be missing or partial: every
field stays in place, a value that was not measured is null and its dict says why in "reason", and
"missing" lists every null leaf with its reason. Nothing is estimated or carried over from another run.
The kernel geomeans are given only where bench timed every row it planned (a partial run's rows are whole
strata and a few rows of the next: their geomean would weigh the strata by how far it got); every
(dtype, layout) stratum's geomean, row counts and completeness are in kernel_detail / kernel_fused strata.
summary.json's fields are documented in benchmarks/results/README.md. Imports no torch; takes a second.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
from pathlib import Path

from . import harness as H

HOST_MODES = ("eval", "train_fwd", "fwd_bwd")
KERNEL_MODES = {"train_fwd": "train_fwd", "fwd_bwd": "fwd_bwd", "eval": "eval_fwd"}  # summary -> bench
RESNET50_KEYS = ("eager_b32", "eager_b128", "graph_b32", "graph_b128", "compile_b128")
FUSED_KEYS = ("eager_b32", "eager_b128", "graph_b32", "graph_b128")
RESNET50 = "resnet50"
YES_NO = {True: "yes", False: "no"}


def load(path: Path):
    """(doc, None) or (None, why not)."""
    if not path.exists():
        return None, f"{path.name} not written (its step did not run, or failed before writing)"
    try:
        return json.loads(path.read_text()), None
    except Exception as e:
        return None, f"{path.name} unreadable: {type(e).__name__}: {e}"[:300]


def _leaf(values: dict, reason: str | None) -> dict:
    """A summary dict: the values, plus "reason" when any of them is null."""
    if any(v is None for v in values.values()):
        values["reason"] = reason or "not measured"
    return values


def _piece_reason(doc, why, what) -> str:
    if doc is None:
        return why
    meta = doc.get("meta", {})
    if not meta.get("complete") and meta.get("stopped_reason"):
        return f"{what} not measured: run stopped early ({meta['stopped_reason']})"
    return f"{what} not measured"


def host_section(doc, why) -> dict:
    out = {}
    summ = (doc or {}).get("summary", {})
    for mode in HOST_MODES:
        s = summ.get(mode, {})
        out[mode] = _leaf(
            {
                "tritonbn": s.get("tritonbn"),
                "torch": s.get("torch"),
                "ratio": s.get("ratio"),
                "cells": s.get("cells", 0),
                "launches_max": s.get("launches_max"),
            },
            _piece_reason(doc, why, f"host µs ({mode})"),
        )
        if "tritonbn_native" in s:   # host_us --native: the native call path (tritonbn.native)
            out[mode].update({k: s.get(k) for k in ("tritonbn_native", "native_ratio", "native_cells")})
    return out


def _argv_without_tuning(argv: list[str]) -> list[str]:
    """bench's argv less --tuning (parsing its values imports tritonbn, hence torch; the plan ignores it)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--tuning":
            skip = True
        elif not a.startswith("--tuning="):
            out.append(a)
    return out


def planned_strata(doc) -> tuple[dict | None, str]:
    """``({mode: {(dtype, layout): rows planned}}, where that came from)``, or ``(None, why unknown)``.
    bench.json's ``meta.rows_planned_by_stratum``; for a bench.json older than that field, the plan rebuilt
    from its ``meta.argv`` with this tree's shapes, accepted only where it plans exactly
    ``meta.rows_planned`` rows and holds every row the run reached."""
    meta, rows = doc.get("meta", {}), doc.get("rows", [])
    if meta.get("rows_planned_by_stratum"):
        out: dict = {}
        for st in meta["rows_planned_by_stratum"]:
            out.setdefault(st["mode"], {})[(st["dtype"], st["layout"])] = st["rows"]
        return out, "bench.json meta.rows_planned_by_stratum"
    if meta.get("argv") is None:
        return None, "bench.json records neither its planned rows nor its argv"
    from . import bench  # no torch: bench imports it in main()

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            todo = bench.plan(bench.parse_args(_argv_without_tuning(meta["argv"])))
    except (Exception, SystemExit) as e:
        return None, f"bench.json's argv does not parse here ({type(e).__name__}: {e})"[:200]
    out, keys = {}, set()
    for case, dt, lay, modes in todo:
        for m in modes:
            out.setdefault(m, {})
            out[m][(dt, lay)] = out[m].get((dt, lay), 0) + 1
            keys.add((case.name, dt, lay, m))
    n = sum(sum(v.values()) for v in out.values())
    stray = [r for r in rows if (r.get("case"), r.get("dtype"), r.get("layout"), r.get("mode")) not in keys]
    if n != meta.get("rows_planned") or stray:
        return None, (f"the plan rebuilt from bench.json's argv ({n} rows) is not the run's "
                      f"({meta.get('rows_planned')} rows planned, {len(stray)} reached outside it)")
    return out, "rebuilt from bench.json meta.argv (the run predates meta.rows_planned_by_stratum)"


def _stratum(rs, dt, lay, planned, fused) -> dict:
    timed = [r for r in rs if r.get("graph_speedup_vs_eager")]
    st = {
        "dtype": dt,
        "layout": lay,
        "rows": len(rs),
        "rows_planned": planned,
        "rows_timed": len(timed),   # rows with a CUDA-graph speed-up over eager: what the geomean covers
        "complete": None if planned is None else len(timed) == planned,
        "geomean_vs_eager": H.geomean(r.get("graph_speedup_vs_eager") for r in rs),
        "min_vs_eager": min((r["graph_speedup_vs_eager"] for r in timed), default=None),
        "geomean_vs_compile": H.geomean(r.get("graph_speedup_vs_compile") for r in rs),
    }
    if fused:
        st["geomean_vs_unfused"] = H.geomean(r.get("graph_speedup_vs_unfused") for r in rs)
    return st


def coverage(doc, mode, planned: dict | None) -> dict:
    """How far the run got in one mode: rows reached, planned and timed (CUDA-graph speed-up over eager),
    whether every planned row was timed, and per (dtype, layout) stratum the same with its geomeans.
    Strata in run order (the plan's), then any the plan does not list."""
    rs = [r for r in (doc or {}).get("rows", []) if r.get("mode") == mode]
    pm = (planned or {}).get(mode, {}) if planned is not None else None
    keys = list(pm or {})
    keys += sorted({(r.get("dtype"), r.get("layout")) for r in rs} - set(keys), key=str)
    fused = mode in H.ALL_FUSED_MODES
    strata = [
        _stratum([r for r in rs if (r.get("dtype"), r.get("layout")) == k], *k,
                 None if pm is None else pm.get(k, 0), fused)
        for k in keys
    ]
    timed = sum(st["rows_timed"] for st in strata)
    if pm is not None:
        complete = bool(pm) and all(st["complete"] for st in strata)
    else:  # plan unknown: the run's own word, and a time for every row it reached
        complete = bool((doc or {}).get("meta", {}).get("complete")) and timed == len(rs)
    return {
        "rows": len(rs),
        "rows_planned": None if pm is None else sum(pm.values()),
        "rows_timed": timed,
        "complete": complete,
        "strata": strata,
    }


def _strata_text(cov) -> str:
    """'19 of 30 planned rows timed (complete: bf16/channels_last 7/7; incomplete: fp32/contiguous 0/8)'."""
    if cov["rows_planned"] is None:
        return f"{cov['rows_timed']} rows timed of {cov['rows']} reached"
    if not cov["rows_planned"]:
        return "no row planned (bench ran without this mode)"
    parts = []
    for label, want in (("complete", True), ("incomplete", False)):
        sts = [f"{st['dtype']}/{st['layout']} {st['rows_timed']}/{st['rows_planned']}"
               for st in cov["strata"] if st["complete"] is want]
        if sts:
            parts.append(f"{label}: " + ", ".join(sts))
    return f"{cov['rows_timed']} of {cov['rows_planned']} planned rows timed ({'; '.join(parts)})"


def _covers(cov, detail=False) -> str:
    """Which rows a geomean of one mode covers, in words."""
    if cov["complete"]:
        dts = sorted({st["dtype"] for st in cov["strata"]})
        lays = sorted({st["layout"] for st in cov["strata"]})
        n = cov["rows_planned"] if cov["rows_planned"] is not None else cov["rows_timed"]
        what = "every planned row" if cov["rows_planned"] is not None else "every row of a complete run"
        return f"{what}: {n} ({', '.join(dts)} × {', '.join(lays)})"
    n = "?" if cov["rows_planned"] is None else cov["rows_planned"]
    return f"null: {cov['rows_timed']} of {n} planned rows timed" + (
        " (per-stratum geomeans in strata)" if detail else "")


def _by_text(items: list[tuple[str, str]]) -> str:
    """[(mode, text), ...] -> 'train_fwd, fwd_bwd: text; eval: other text' (modes that say the same, once)."""
    groups: dict[str, list[str]] = {}
    for mode, text in items:
        groups.setdefault(text, []).append(mode)
    return "; ".join(f"{', '.join(modes)}: {text}" for text, modes in groups.items())


def kernel_section(doc, why):
    """Kernel-only (CUDA-graph replay) geomean speed-ups over every row of the planned suite, per mode.

    Given only where the run timed every planned row of the mode: a run stopped early reaches whole strata
    of the plan (bf16 before fp32, channels_last before contiguous) and only a few rows of the last one, so
    a geomean over the rows reached would weight the strata by how far it got. Then the headline value is
    null with a reason (listed in "missing"; no criterion is judged on it), and ``strata`` gives each
    (dtype, layout) stratum's geomean with its row counts and whether it is complete."""
    meta = (doc or {}).get("meta", {})
    groups = {g["mode"]: g for g in (doc or {}).get("summary", {}).get("groups", []) if g["dtype"] == "all"}
    rows = (doc or {}).get("rows", [])
    no_graphs = doc is None or not meta.get("cuda_graphs")
    if doc is not None and not meta.get("cuda_graphs"):
        why = "bench.json was measured without --cuda-graphs: no kernel-only times"
    elif rows and not any(r.get("graph_speedup_vs_eager") for r in rows):
        no_graphs = True
        why = "no row of bench.json has a CUDA-graph time" + (
            " (a CPU smoke run: the interpreter captures no CUDA graphs)" if not meta.get("timing_meaningful")
            else " (every capture failed: see the rows' graph_error)")
    planned, planned_from = planned_strata(doc) if doc is not None else (None, why)

    def _kreason(what):  # a null for another cause than rows not reached
        return why if no_graphs else _piece_reason(doc, why, what)

    geo, detail, incomplete, covers = {}, {}, [], []
    for key, mode in KERNEL_MODES.items():
        g = groups.get(mode, {})
        cov = coverage(doc, mode, planned)
        ok = cov["complete"] and not no_graphs
        geo[key] = g.get("geomean_graph_speedup_vs_eager") if ok else None
        if not ok and not no_graphs:
            incomplete.append((key, _strata_text(cov)))
        covers.append((key, _covers(cov)))
        detail[key] = {
            **{k: cov[k] for k in ("rows", "rows_planned", "rows_timed", "complete")},
            "covers": _covers(cov, detail=True),
            "min_row": g.get("min_graph_speedup_vs_eager") if ok else None,
            # the slowest of the rows timed, complete or not: the full run's slowest row is no faster
            "min_row_reached": min((st["min_vs_eager"] for st in cov["strata"] if st["min_vs_eager"]),
                                   default=None),
            "geomean_vs_compile": g.get("geomean_graph_speedup_vs_compile") if ok else None,
            "geomean_do_bench_vs_eager": g.get("geomean_speedup_vs_eager") if ok else None,
            "strata": cov["strata"],
        }
    stop = f" (run stopped early: {meta['stopped_reason']})" if meta.get("stopped_reason") else ""
    unknown = "" if planned is not None else f"; planned rows unknown: {planned_from}"
    if any(v is None for v in geo.values()):
        geo["reason"] = (
            f"not every planned row was timed{stop}: {_by_text(incomplete)}{unknown}. A geomean over the "
            "rows reached would weight the (dtype, layout) strata by how far the run got, so none is given: "
            "per-stratum geomeans in kernel_detail.<mode>.strata"
            if incomplete else _kreason("kernel geomean")
        )
    geo["covers"] = _by_text(covers)
    for key in KERNEL_MODES:
        d = detail[key]
        if any(d[k] is None for k in ("min_row", "geomean_vs_compile", "geomean_do_bench_vs_eager")):
            d["reason"] = (
                f"not every planned {key} row was timed: {dict(incomplete)[key]}{unknown}; per-stratum "
                f"geomeans in kernel_detail.{key}.strata"
                if key in dict(incomplete) else _kreason(f"{key} kernel detail")
            )
    detail["dtypes"] = sorted({r["dtype"] for r in rows if not r.get("epilogue")})
    detail["layouts"] = sorted({r["layout"] for r in rows if not r.get("epilogue")})
    detail["complete"] = meta.get("complete")
    detail["planned_from"] = planned_from
    fused = {}
    fused_modes = [m for m in H.FUSED_MODES if m in groups or m in (planned or {})]
    for mode in fused_modes:
        g = groups.get(mode, {})
        cov = coverage(doc, mode, planned)
        ok = cov["complete"] and not no_graphs
        fused[mode] = {
            **{k: cov[k] for k in ("rows", "rows_planned", "rows_timed", "complete")},
            "covers": _covers(cov, detail=True),
            "vs_eager": g.get("geomean_graph_speedup_vs_eager") if ok else None,
            "vs_unfused": g.get("geomean_graph_speedup_vs_unfused") if ok else None,
            "vs_compile": g.get("geomean_graph_speedup_vs_compile") if ok else None,
            "strata": cov["strata"],
        }
        if any(fused[mode][k] is None for k in ("vs_eager", "vs_unfused", "vs_compile")):
            fused[mode]["reason"] = (
                f"not every planned {mode} row was timed: {_strata_text(cov)}{unknown}; per-stratum "
                f"geomeans in kernel_fused.{mode}.strata" if not ok and not no_graphs
                else _kreason(f"{mode} kernel geomean")
            )
    return geo, detail, fused


def _jobs(doc, model):
    return {j["key"]: j for j in (doc or {}).get("jobs", []) if j["model"] == model}


def _job_reason(doc, why, model, key, job, variant=None) -> str:
    if doc is None:
        return why
    if job is None:
        meta = doc.get("meta", {})
        if model not in meta.get("models", []):
            return f"{model} not among the benchmarked models {meta.get('models')}"
        return f"{model} {key} not planned or not reached" + (
            f" (run stopped early: {meta['stopped_reason']})" if meta.get("stopped_reason") else ""
        )
    if job.get("skipped") or job.get("error"):
        return f"{model} {key}: {job.get('skipped') or job.get('error')}"
    cell = job["variants"].get(variant, {}) if variant else {}
    if cell.get("skipped") or cell.get("error"):
        return f"{model} {key} {variant}: {cell.get('skipped') or cell.get('error')}"
    return f"{model} {key} {variant or ''}: no timing".strip()


def _ms(job, variant):
    return ((job or {}).get("variants", {}).get(variant) or {}).get("ms")


def model_section(doc, why, model=RESNET50):
    jobs = _jobs(doc, model)
    out, fused = {}, {}
    for key in RESNET50_KEYS:
        job = jobs.get(key)
        tb, tr = _ms(job, "tritonbn"), _ms(job, "torch")
        cell = ((job or {}).get("variants", {}).get("tritonbn")) or {}
        out[key] = _leaf(
            {
                "tritonbn_ms": tb,
                "torch_ms": tr,
                "speedup": tr / tb if tb and tr else None,
                "tritonbn_tracks": cell.get("tracks"),
                "tritonbn_loss_gap": cell.get("loss_gap"),
            },
            _job_reason(doc, why, model, key, job, "tritonbn" if tr else "torch"),
        )
        control = ((job or {}).get("variants", {}).get("control")) or {}
        if control.get("loss_gap") is not None:
            # the rounding-noise floor the loss gap was judged against (eager and graph jobs only)
            out[key]["control_loss_gap"] = control["loss_gap"]
    compile_torch = _ms(jobs.get("compile_b128"), "torch")
    for key in FUSED_KEYS:
        job = jobs.get(key)
        fu, tr = _ms(job, "fused"), _ms(job, "torch")
        cell = ((job or {}).get("variants", {}).get("fused")) or {}
        vals = {"tritonbn_ms": fu, "torch_ms": tr, "speedup": tr / fu if fu and tr else None}
        if key == "eager_b128":
            vals["torch_compile_ms"] = compile_torch
            vals["speedup_vs_torch_compile"] = compile_torch / fu if fu and compile_torch else None
        vals.update(tritonbn_tracks=cell.get("tracks"), tritonbn_loss_gap=cell.get("loss_gap"))
        reason = _job_reason(doc, why, model, key, job, "fused" if tr else "torch")
        if key == "eager_b128" and compile_torch is None:
            reason += "; torch_compile_ms: " + _job_reason(
                doc, why, model, "compile_b128", jobs.get("compile_b128"), "torch"
            )
        fused[key] = _leaf(vals, reason)
    return out, fused


def native_section(doc, model=RESNET50) -> dict | None:
    """``model_bench --native``: eager steps of tritonbn's and fuse_model's models on the native call path
    (tritonbn.native), against torch's; None where the run had no native variants."""
    jobs = _jobs(doc, model)
    if not any(v in j.get("variants", {}) for j in jobs.values() for v in ("native", "fused_native")):
        return None
    out = {}
    for key in ("eager_b32", "eager_b128"):
        job = jobs.get(key) or {}
        tr, nat, fnat = _ms(job, "torch"), _ms(job, "native"), _ms(job, "fused_native")
        V = job.get("variants", {})
        out[key] = {
            "tritonbn_ms": nat, "fused_ms": fnat, "torch_ms": tr,
            "speedup": tr / nat if tr and nat else None,
            "fused_speedup": tr / fnat if tr and fnat else None,
            "tritonbn_tracks": V.get("native", {}).get("tracks"),
            "fused_tracks": V.get("fused_native", {}).get("tracks"),
            "skipped": V.get("native", {}).get("skipped") or V.get("native", {}).get("error"),
            "failures": job.get("native_failures"),   # plans left on the Python path, and why
        }
    return out


def other_models(doc) -> dict:
    out = {}
    for m in (doc or {}).get("meta", {}).get("models", [])[1:]:
        out[m] = {
            k: {v: _ms(j, v) for v in ("torch", "tritonbn", "fused")}
            | {"skipped": j.get("skipped") or j.get("error")}
            for k, j in _jobs(doc, m).items()
        }
    return out


def loss_tracking(doc) -> dict:
    """Every variant whose loss did not follow torch's (or could not be compared)."""
    bad = []
    for j in (doc or {}).get("jobs", []):
        for v, c in j.get("variants", {}).items():
            if v != "torch" and "tracks" in c and c["tracks"] is not True:
                bad.append(f"{j['model']} {j['key']} {v}: gap {H.fmt(c.get('loss_gap'), '.2e')}")
    return {"all_track": not bad if doc else None, "not_tracking": bad}


def pytest_result(d: Path) -> str | None:
    p = d / "pytest_cuda.log"
    if not p.exists():
        return None
    pat = r"\d+ (passed|failed|errors?|skipped|deselected)\b|no tests ran"
    lines = [ln for ln in p.read_text(errors="replace").splitlines() if re.search(pat, ln)]
    return lines[-1].strip("= ") if lines else "no pytest summary line (killed?)"


_PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|warnings?|deselected)\b")
_PYTEST_SECONDS = re.compile(r" in ([0-9.]+)s\b")


def merge_pytest_logs(logs: list[tuple[str, int]]) -> str:
    """One pytest summary line for several pytest processes (gpu_check's test shards): ``logs`` =
    ``[(console text, exit status), ...]``. Counts are summed from each process's own summary line. A
    process that printed none (killed, crashed) is named first, so the line never reads as a clean pass;
    the time is the slowest process's."""
    totals: dict = {}
    seconds = []
    lost = []
    for i, (text, rc) in enumerate(logs):
        lines = [ln for ln in text.splitlines() if _PYTEST_COUNT.search(ln) and " in " in ln]
        if not lines:
            lost.append(f"shard {i + 1} of {len(logs)}: no summary line (exit {rc}: killed or crashed?)")
            continue
        for n, kind in _PYTEST_COUNT.findall(lines[-1]):
            kind = {"error": "errors", "warning": "warnings"}.get(kind, kind)
            totals[kind] = totals.get(kind, 0) + int(n)
        m = _PYTEST_SECONDS.search(lines[-1])
        if m:
            seconds.append(float(m.group(1)))
    order = ("failed", "errors", "passed", "skipped", "xfailed", "xpassed", "deselected", "warnings")
    counts = ", ".join(f"{totals[k]} {k}" for k in order if totals.get(k))
    tail = f"{counts or 'no tests ran'} in {len(logs)} shards"
    if seconds:
        tail += f", {max(seconds):.1f}s (slowest shard)"
    return "; ".join(lost + [tail])


# (issue, summary section, key, field, target, the criterion's words)
MODEL_CRITERIA = (
    (8, "resnet50", "eager_b32", "speedup", 1.0, "resnet50 eager_b32 speed-up"),
    (8, "resnet50", "eager_b128", "speedup", 1.10, "resnet50 eager_b128 speed-up"),
    (8, "resnet50", "graph_b32", "speedup", 1.05, "resnet50 graph_b32 speed-up"),
    (8, "resnet50", "graph_b128", "speedup", 1.15, "resnet50 graph_b128 speed-up"),
    (8, "resnet50", "compile_b128", "speedup", 1.0, "resnet50 compile_b128 speed-up"),
    (9, "resnet50_fused", "eager_b128", "speedup", 1.25, "fuse_model resnet50 eager_b128 vs torch eager"),
    (
        9,
        "resnet50_fused",
        "eager_b128",
        "speedup_vs_torch_compile",
        1.05,
        "fuse_model resnet50 eager_b128 vs torch.compile",
    ),
    (9, "resnet50_fused", "eager_b32", "speedup", 1.0, "fuse_model resnet50 eager_b32 vs torch eager"),
    (9, "resnet50_fused", "graph_b128", "speedup", 1.3, "fuse_model resnet50 graph_b128 vs torch graph"),
)


def criteria(S) -> list[dict]:
    """Issue 8's and issue 9's "done when" numbers, checked against this run (ok None: not measured).
    Speed-ups pass at or above their target, launch counts at or below; a model whose loss left torch's
    never passes."""
    out = []

    def add(name, value, target, tracks=None, at_most=False):
        ok = (
            None
            if value is None
            else ((value <= target if at_most else value >= target) and tracks is not False)
        )
        out.append({"name": name, "value": value, "target": target, "ok": ok, "at_most": at_most})

    for mode in HOST_MODES:
        r = S["host_us"][mode]["ratio"]  # tritonbn / torch: torch / tritonbn >= 1.0 is the target
        add(f"issue 8: host µs {mode} torch/tritonbn (geomean)", 1 / r if r else None, 1.0)
    for mode, most in (("eval", 1), ("train_fwd", 2), ("fwd_bwd", 4)):  # <= 2 per training pass, 1 in eval
        add(
            f"issue 8: Triton launches per {mode} call (max)",
            S["host_us"][mode]["launches_max"],
            most,
            at_most=True,
        )
    for issue in (8, 9):
        for i, section, key, field, target, words in MODEL_CRITERIA:
            if i == issue:
                c = S[section][key]
                add(f"issue {issue}: {words}", c[field], target, c["tritonbn_tracks"])
        if issue == 8:
            # null where the run did not time every planned row (kernel_section): not judged
            add(
                "issue 8: kernel geomean fwd_bwd vs eager (CUDA graphs)",
                S["kernel_geomean_vs_eager"]["fwd_bwd"],
                1.6,
            )
            name = "issue 8: slowest kernel row vs eager (CUDA graphs)"
            mins = [S["kernel_detail"][k]["min_row"] for k in KERNEL_MODES]
            reached = [S["kernel_detail"][k].get("min_row_reached") for k in KERNEL_MODES]
            reached = min((m for m in reached if m is not None), default=None)
            if all(m is not None for m in mins):
                add(name, min(mins), 1.0)
            elif reached is not None and reached < 1.0:
                # an incomplete run: a row already below the target fails it whatever the other rows do
                add(name, reached, 1.0)
                out[-1]["note"] = "incomplete run: the slowest of the rows it timed"
            else:
                add(name, None, 1.0)
    return out


def _missing(obj, path="") -> dict:
    """Every null leaf (path -> reason of its dict)."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "reason":
                continue
            p = f"{path}.{k}" if path else k
            if v is None and "reason" in obj:
                out[p] = obj["reason"]
            elif isinstance(v, dict):
                out.update(_missing(v, p))
    return out


def build(d: Path) -> dict:
    host, host_why = load(d / "host_us.json")
    bench, bench_why = load(d / "bench.json")
    model, model_why = load(d / "model.json")
    env = next((p["env"] for p in (bench, model, host) if p and p.get("env")), {})
    commits = sorted(
        {p["env"].get("git_commit") for p in (bench, model, host) if p and p.get("env")} - {None}
    )
    S = {
        "card": env.get("gpu"),
        "card_slug": H.card_slug(env) if env else None,
        "torch": env.get("torch"),
        "triton": env.get("triton"),
        "commit": commits[0] if len(commits) == 1 else (", ".join(commits) if commits else None),
        "date_utc": env.get("time_utc"),
        "timing_meaningful": (
            all(p["meta"].get("timing_meaningful") for p in (bench, model, host) if p) if env else None
        ),
        "pieces": {
            name: {
                "written": doc is not None,
                "complete": (doc or {}).get("meta", {}).get("complete"),
                "stopped_reason": (doc or {}).get("meta", {}).get("stopped_reason") if doc else why,
            }
            for name, doc, why in (
                ("host_us", host, host_why),
                ("bench", bench, bench_why),
                ("model", model, model_why),
            )
        },
        "cuda_tests": pytest_result(d),
    }
    if not env:
        S["reason"] = "no piece was written: card, torch, triton, commit unknown"
    S["host_us"] = host_section(host, host_why)
    S["resnet50"], S["resnet50_fused"] = model_section(model, model_why)
    native = native_section(model)
    if native is not None:
        S["resnet50_native"] = native
    S["kernel_geomean_vs_eager"], S["kernel_detail"], S["kernel_fused"] = kernel_section(bench, bench_why)
    S["fuse_model"] = {
        m: {k: info.get(k) for k in ("fused_skipped", "fuse_report") if k in info}
        for m, info in (model or {}).get("models", {}).items()
    }
    S["other_models"] = other_models(model)
    S["loss_tracking"] = loss_tracking(model)
    S["criteria"] = criteria(S)
    # resnet50_native (model_bench --native) is an A/B beside the issues' fields: its Nones are not gaps
    S["missing"] = _missing({k: v for k, v in S.items() if k not in ("criteria", "resnet50_native")})
    return S


def markdown(S) -> str:
    f = lambda v, spec=".2f": H.fmt(v, spec)
    L = [
        f"# summary: {S['card']} | torch {S['torch']} | triton {S['triton']} | commit {S['commit']}",
        f"cuda tests: {S['cuda_tests']}",
        "",
        "| host µs/call (geomean) | tritonbn | torch | tritonbn/torch | max launches |",
        "|---|---|---|---|---|",
    ]
    for m, c in S["host_us"].items():
        L.append(
            f"| {m} | {f(c['tritonbn'], '.1f')} | {f(c['torch'], '.1f')} | {f(c['ratio'])} | "
            f"{c['launches_max']} |"
        )
    native_host = {m: c for m, c in S["host_us"].items() if "tritonbn_native" in c}
    if native_host:
        L += ["", "| host µs/call, native call path (geomean) | native | native/torch | cells |",
              "|---|---|---|---|"]
        L += [f"| {m} | {f(c['tritonbn_native'], '.1f')} | {f(c['native_ratio'])} | {c['native_cells']} |"
              for m, c in native_host.items()]
    L += [
        "",
        "| resnet50 ms/step | tritonbn | torch | speed-up | loss gap | control gap | fused "
        "| fused speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, c in S["resnet50"].items():
        fu = S["resnet50_fused"].get(k, {})
        L.append(
            f"| {k} | {f(c['tritonbn_ms'])} | {f(c['torch_ms'])} | {f(c['speedup'])} | "
            f"{f(c['tritonbn_loss_gap'], '.1e')} | {f(c.get('control_loss_gap'), '.1e')} | "
            f"{f(fu.get('tritonbn_ms'))} | {f(fu.get('speedup'))} |"
        )
    L.append(
        f"fused eager_b128 vs torch.compile ({f(S['resnet50_fused']['eager_b128']['torch_compile_ms'])} ms): "
        f"{f(S['resnet50_fused']['eager_b128']['speedup_vs_torch_compile'])}"
    )
    for k, c in (S.get("resnet50_native") or {}).items():
        L.append(f"native call path, resnet50 {k}: tritonbn {f(c['tritonbn_ms'])} ms ({f(c['speedup'])}x), "
                 f"fuse_model {f(c['fused_ms'])} ms ({f(c['fused_speedup'])}x), torch {f(c['torch_ms'])} ms, "
                 f"tracks {c['tritonbn_tracks']}/{c['fused_tracks']}"
                 + (f", {c['skipped']}" if c["skipped"] else ""))
    k, kd = S["kernel_geomean_vs_eager"], S["kernel_detail"]
    L += [
        "",
        f"kernel geomean vs eager (CUDA graphs; {k['covers']}): train_fwd "
        f"{f(k['train_fwd'])}, fwd_bwd {f(k['fwd_bwd'])}, eval {f(k['eval'])}",
    ]
    if k.get("reason"):
        L.append(f"  null: {k['reason']}")
    if any(kd[m]["strata"] for m in KERNEL_MODES):
        L += ["", "| kernel vs eager (CUDA graphs), per stratum | dtype | layout | rows timed / planned "
              "| geomean | slowest row | complete |", "|---|---|---|---|---|---|---|"]
        for m in KERNEL_MODES:
            for st in kd[m]["strata"]:
                L.append(f"| {m} | {st['dtype']} | {st['layout']} | {st['rows_timed']} / "
                         f"{H.fmt(st['rows_planned'])} | {f(st['geomean_vs_eager'])} | "
                         f"{f(st['min_vs_eager'])} | {YES_NO.get(st['complete'], '—')} |")
    for m, c in S["kernel_fused"].items():
        L.append(
            f"  {m} (CUDA graphs, {c['rows_timed']} of {H.fmt(c['rows_planned'])} planned rows): vs eager "
            f"{f(c['vs_eager'])}, vs unfused {f(c['vs_unfused'])}, vs compile {f(c['vs_compile'])}"
        )
        if not c["complete"]:
            L.append("    per stratum, vs eager / vs unfused: " + "; ".join(
                f"{st['dtype']}/{st['layout']} {st['rows_timed']}/{H.fmt(st['rows_planned'])} rows "
                f"{f(st['geomean_vs_eager'])} / {f(st['geomean_vs_unfused'])}" for st in c["strata"]))
    L += ["", "| criterion | value | target | ok |", "|---|---|---|---|"]
    for c in S["criteria"]:
        ok = {True: "yes", False: "**NO**", None: "—"}[c["ok"]]
        note = f" ({c['note']})" if c.get("note") else ""
        L.append(f"| {c['name']}{note} | {f(c['value'])} | {'<=' if c['at_most'] else '>='} {c['target']} "
                 f"| {ok} |")
    if S["loss_tracking"]["not_tracking"]:
        L += ["", "LOSS DOES NOT TRACK TORCH: " + "; ".join(S["loss_tracking"]["not_tracking"])]
    if S["missing"]:
        L += ["", f"{len(S['missing'])} null fields, e.g.:"]
        L += [f"  {p}: {r}" for p, r in list(S["missing"].items())[:12]]
    return "\n".join(L)


def results_dir() -> Path:
    """benchmarks/results/<card>-<YYYY-MM-DD>[-runN] for the first GPU nvidia-smi lists."""
    out = H._run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    return H.default_out_dir({"gpu": out.splitlines()[0].strip() if out else None})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.summary", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path, nargs="?", help="the run's output folder")
    p.add_argument("--results-dir", action="store_true", help="print the folder this run's results belong in")
    p.add_argument("--merge-pytest", nargs="+", metavar="LOG:RC",
                   help="print one summary line for these pytest console logs, each with its exit status")
    a = p.parse_args(argv)
    if a.results_dir:
        print(results_dir())
        return 0
    if a.merge_pytest:
        logs = []
        for item in a.merge_pytest:
            path, _, rc = item.rpartition(":")
            logs.append((Path(path).read_text(errors="replace") if Path(path).exists() else "", int(rc)))
        print(merge_pytest_logs(logs))
        return 0
    if a.dir is None:
        p.error("DIR is required")
    S = build(a.dir)
    H.write_json_atomic(a.dir / "summary.json", S)
    print(markdown(S))
    print(f"summary: wrote {a.dir / 'summary.json'} ({len(S['missing'])} null fields)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
