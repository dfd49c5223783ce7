"""Assemble DIR/summary.json from the pieces a GPU run wrote into DIR, and print it as tables.

    python -m benchmarks.summary DIR            # reads DIR/{host_us,bench,model}.json (+ pytest_cuda.log)
    python -m benchmarks.summary --results-dir  # prints benchmarks/results/<card>-<YYYY-MM-DD>[-runN]

Pieces: host_us.json (`benchmarks.host_us`), bench.json (`benchmarks.bench --cuda-graphs`, fused rows
with `--fused`), model.json (`benchmarks.model_bench`). Any of them may be missing or partial: every
field stays in place, a value that was not measured is null and its dict says why in "reason", and
"missing" lists every null leaf with its reason. Nothing is estimated or carried over from another run.
summary.json's fields are documented in benchmarks/results/README.md. Imports no torch; takes a second.
"""

from __future__ import annotations

import argparse
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


def kernel_section(doc, why):
    """Kernel-only (CUDA-graph replay) geomean speed-ups over all dtypes and layouts of the run."""
    meta = (doc or {}).get("meta", {})
    groups = {g["mode"]: g for g in (doc or {}).get("summary", {}).get("groups", []) if g["dtype"] == "all"}
    if doc is not None and not meta.get("cuda_graphs"):
        why = "bench.json was measured without --cuda-graphs: no kernel-only times"
    geo, detail = {}, {}
    for key, mode in KERNEL_MODES.items():
        g = groups.get(mode, {})
        geo[key] = g.get("geomean_graph_speedup_vs_eager")
        detail[key] = {
            "rows": g.get("rows", 0),
            "min_row": g.get("min_graph_speedup_vs_eager"),
            "geomean_vs_compile": g.get("geomean_graph_speedup_vs_compile"),
            "geomean_do_bench_vs_eager": g.get("geomean_speedup_vs_eager"),
        }
    if any(v is None for v in geo.values()):
        geo["reason"] = _piece_reason(doc, why, "kernel geomean")
    rows = (doc or {}).get("rows", [])
    detail["dtypes"] = sorted({r["dtype"] for r in rows if not r.get("epilogue")})
    detail["layouts"] = sorted({r["layout"] for r in rows if not r.get("epilogue")})
    detail["complete"] = meta.get("complete")
    fused = {}
    for g in groups.values():
        if g["mode"] in H.FUSED_MODES:
            fused[g["mode"]] = {
                "rows": g["rows"],
                "vs_eager": g.get("geomean_graph_speedup_vs_eager"),
                "vs_unfused": g.get("geomean_graph_speedup_vs_unfused"),
                "vs_compile": g.get("geomean_graph_speedup_vs_compile"),
            }
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
            mins = [S["kernel_detail"][k]["min_row"] for k in KERNEL_MODES]
            lo = min(mins) if all(m is not None for m in mins) else None
            add(
                "issue 8: kernel geomean fwd_bwd vs eager (CUDA graphs)",
                S["kernel_geomean_vs_eager"]["fwd_bwd"],
                1.6,
            )
            add("issue 8: slowest kernel row vs eager (CUDA graphs)", lo, 1.0)
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
    k = S["kernel_geomean_vs_eager"]
    L += [
        "",
        f"kernel geomean vs eager (CUDA graphs; dtypes {S['kernel_detail']['dtypes']}): train_fwd "
        f"{f(k['train_fwd'])}, fwd_bwd {f(k['fwd_bwd'])}, eval {f(k['eval'])}",
    ]
    for m, c in S["kernel_fused"].items():
        L.append(
            f"  {m} (CUDA graphs): vs eager {f(c['vs_eager'])}, vs unfused {f(c['vs_unfused'])}, "
            f"vs compile {f(c['vs_compile'])}"
        )
    L += ["", "| criterion | value | target | ok |", "|---|---|---|---|"]
    for c in S["criteria"]:
        ok = {True: "yes", False: "**NO**", None: "—"}[c["ok"]]
        L.append(f"| {c['name']} | {f(c['value'])} | {'<=' if c['at_most'] else '>='} {c['target']} | {ok} |")
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
