"""The benchmark harness must not rot between GPU runs: run its CPU smoke modes (Triton interpreter, tiny
shapes) end to end and check what they write; unit-test the byte model, geomean and summaries."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench, harness, shapes

REPO = Path(__file__).resolve().parent.parent


def test_byte_model():
    E = 1000 * 2  # numel * itemsize
    assert harness.model_bytes("train_fwd", 1000, 2) == 3 * E
    assert harness.model_bytes("eval_fwd", 1000, 2) == 2 * E
    assert harness.model_bytes("bwd", 1000, 2) == 5 * E
    assert harness.model_bytes("fwd_bwd", 1000, 2) == 8 * E
    modes = set(harness.MODES) | set(harness.FUSED_MODES)
    assert set(harness.BYTE_MODEL_TEXT) == modes == set(harness.BYTES_PER_ELEMENT_PASS)
    # issue 9's byte model: fused BN+ReLU 3E fwd / 5E bwd, BN+Add+ReLU 4E / 6E; unfused 5E/8E and 8E/8E
    per_e = {m: harness.model_bytes(m, 1000, 2) // E for m in harness.FUSED_MODES}
    assert per_e == {"relu_train_fwd": 3, "relu_fwd_bwd": 3 + 5, "relu_eval_fwd": 2,
                     "add_relu_train_fwd": 4, "add_relu_fwd_bwd": 4 + 6, "add_relu_eval_fwd": 3}
    unf = harness.UNFUSED_BYTES_PER_ELEMENT_PASS
    assert unf["relu_train_fwd"] == 5 and unf["relu_fwd_bwd"] == 5 + 8
    assert unf["add_relu_train_fwd"] == 8 and unf["add_relu_fwd_bwd"] == 8 + 8
    assert all(unf[m] > harness.BYTES_PER_ELEMENT_PASS[m] for m in harness.FUSED_MODES)


def test_geomean():
    assert harness.geomean([1.0, 4.0]) == pytest.approx(2.0)
    assert harness.geomean([2.0, None, 0.0, -1.0, math.inf, math.nan, 8.0]) == pytest.approx(4.0)
    assert harness.geomean([]) is None
    assert harness.geomean([None]) is None


def test_shapes_and_plan():
    rn = [c for c in shapes.FULL if c.group == "rn50_b32"]
    assert sum(c.count for c in rn) == 53  # every BN layer of ResNet-50
    assert {c.shape[1:] for c in rn} >= {(64, 112, 112), (2048, 7, 7)}
    assert len(shapes.QUICK) == 8
    assert {c.ndim_bn for c in shapes.QUICK} == {1, 2, 3}
    assert any(len(c.shape) == 2 for c in shapes.QUICK) and any(len(c.shape) == 3 for c in shapes.QUICK)
    assert all(c.numel <= 5000 for c in shapes.SMOKE)
    assert [c.name for c in shapes.select(shapes.FULL, "rn50_b128_2048*,bn3d")] == [
        "rn50_b128_2048x7x7",
        "bn3d_b8_64x16x56x56",
        "bn3d_b8_256x8x28x28",
    ]
    args = bench.parse_args(["--quick"])
    assert args.dtypes == ["bf16", "fp32"] and args.modes == list(harness.MODES)
    todo = bench.plan(args)
    # (N, C) has no channels-last variant; bf16 rows come first so a time-budget cut keeps whole dtypes
    assert len(todo) == 2 * (2 * len(shapes.QUICK) - 1)
    assert [t[1] for t in todo[: len(todo) // 2]] == ["bf16"] * (len(todo) // 2)
    assert bench.parse_args(["--smoke"]).dtypes == ["fp32"]
    # fused rows come after every plain row; relu and add_relu of one shape side by side
    fargs = bench.parse_args(["--quick", "--fused", "--fused-shapes", "rn50", "--time-budget", "100"])
    assert fargs.modes == [*harness.MODES, *harness.FUSED_MODES] and fargs.fused_budget == 40
    ftodo = bench.plan(fargs)
    assert ftodo[: len(todo)] == todo
    fused = ftodo[len(todo) :]
    n_rn50 = len(shapes.select(shapes.QUICK, "rn50"))
    assert len(fused) == 2 * 2 * 2 * n_rn50  # dtypes x layouts x (relu, add_relu)
    assert [t[3] for t in fused[:2]] == [list(harness.FUSED_MODES[:3]), list(harness.FUSED_MODES[3:])]
    assert all(t[0].group.startswith("rn50") for t in fused)
    assert [bench.epilogue(m) for m in ("fwd_bwd", "relu_fwd_bwd", "add_relu_eval_fwd")] == [
        None, "relu", "add_relu"]
    assert bench.base_mode("add_relu_train_fwd") == "train_fwd" and bench.base_mode("bwd") == "bwd"
    assert bench.mode_providers(["tritonbn", "eager", "compile"], "relu_fwd_bwd") == [
        "tritonbn", bench.UNFUSED, "eager", "compile"]
    assert bench.mode_providers(["tritonbn", "eager"], "fwd_bwd") == ["tritonbn", "eager"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--modes", "nope"])


def _row(case, mode, t_tb, t_eager, t_comp, count=1, group="g"):
    prov = {
        p: {"ms": t, "frac_copy_bw": 0.5, "error": None}
        for p, t in (("tritonbn", t_tb), ("eager", t_eager), ("compile", t_comp))
    }
    return {
        "case": case,
        "group": group,
        "count": count,
        "shape": [2, 3],
        "dtype": "bf16",
        "layout": "contiguous",
        "mode": mode,
        "providers": prov,
        "speedup_vs_eager": t_eager / t_tb,
        "speedup_vs_compile": t_comp / t_tb,
        "err_tritonbn": 1e-3,
        "err_eager": 1e-3,
        "flagged": False,
    }


def test_summary_and_markdown():
    rows = [_row("a", "bwd", 1.0, 2.0, 1.0), _row("b", "bwd", 1.0, 8.0, 4.0)]
    s = bench.summarize(rows, list(bench.PROVIDERS))
    # a shape whose set-up failed is recorded, rendered, and left out of the means
    failed = bench.failed_row(shapes.SMOKE[0], "bf16", "contiguous", "bwd", bench.PROVIDERS, "OOM: boom")
    g_failed = bench.summarize([*rows, failed], list(bench.PROVIDERS))["groups"][0]
    assert g_failed["rows"] == 3 and g_failed["geomean_speedup_vs_eager"] == pytest.approx(4.0)
    g = next(x for x in s["groups"] if x["dtype"] == "bf16")
    assert g["geomean_speedup_vs_eager"] == pytest.approx(4.0)
    assert g["geomean_speedup_vs_compile"] == pytest.approx(2.0)
    assert s["resnet50_totals"] == []  # incomplete network: no total
    meta = {
        "providers": list(bench.PROVIDERS),
        "modes": list(harness.MODES),
        "complete": False,
        "stopped_reason": "time budget",
        "rows_planned": 4,
        "elapsed_s": 1.0,
        "timing_meaningful": True,
        "copy_bandwidth": {"gbs": 3000.0, "bytes": 2 * 2**30},
        "warmup_ms": 10,
        "rep_ms": 40,
        "l2_flush": True,
        "param_dtype": "fp32",
        "compile_backend": "inductor",
    }
    md = bench.markdown({"env": {"torch": "x"}, "meta": meta, "rows": [*rows, failed], "summary": s})
    assert "PARTIAL (time budget)" in md and "4.00×" in md and "## bwd" in md and "OOM: boom" in md


# every benchmark's CPU smoke mode, with its extra options; run concurrently by the fixture below
SMOKE_RUNS = {"bench": ["--fused"], "train_check": []}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """bench --smoke and train_check --smoke, concurrently (each is mostly single-threaded interpreter)."""
    out = tmp_path_factory.mktemp("bench_smoke")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", f"benchmarks.{name}", "--smoke", *extra, "--out", str(out)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, extra in SMOKE_RUNS.items()
    }
    res = {}
    for name, p in procs.items():
        try:
            log, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            p.kill()
            log, _ = p.communicate()
        res[name] = (p.returncode, log)
    return out, res


@pytest.mark.slow
def test_bench_smoke(smoke_run):
    out, res = smoke_run
    rc, log = res["bench"]
    assert rc == 0, log[-4000:]
    doc = json.loads((out / "bench.json").read_text())
    assert set(doc) >= {"env", "meta", "rows", "summary"}
    assert set(doc["env"]) >= {"torch", "triton", "tritonbn", "git_commit", "gpu", "python"}
    meta = doc["meta"]
    assert meta["complete"] and not meta["timing_meaningful"] and meta["errors"] == 0 and meta["flagged"] == 0
    todo = bench.plan(bench.parse_args(["--smoke", "--fused"]))
    assert len(doc["rows"]) == meta["rows_planned"] == sum(len(t[3]) for t in todo)
    for r in doc["rows"]:
        assert list(r["providers"]) == bench.mode_providers(list(bench.PROVIDERS), r["mode"])
        for p, cell in r["providers"].items():
            assert cell["error"] is None, (r["case"], r["mode"], p, cell["error"])
            assert cell["ms"] > 0 and cell["gbs"] > 0 and cell["err"] < 1e-4, (r["case"], r["mode"], p, cell)
        assert r["speedup_vs_eager"] > 0 and r["speedup_vs_compile"] > 0
        assert (r["speedup_vs_unfused"] is not None) == (r["epilogue"] is not None)
        assert r["tritonbn_uses_triton"] is True  # the interpreter ran tritonbn's kernels, not a fallback
    assert {(r["mode"]) for r in doc["rows"]} == set(harness.MODES) | set(harness.FUSED_MODES)
    # the fused rows check dz against the fp64 reference, and only the add_relu rows have one
    for r in doc["rows"]:
        assert ("dz" in r["err_parts"]["tritonbn"]) == (r["epilogue"] == "add_relu")
    groups = {g["mode"] for g in doc["summary"]["groups"]}
    assert groups == set(harness.MODES) | set(harness.FUSED_MODES)
    assert {r["layout"] for r in doc["rows"]} == {"contiguous", "channels_last"}
    assert {len(r["shape"]) for r in doc["rows"]} == {2, 3, 4, 5}
    md = (out / "bench.md").read_text()
    assert "## Summary" in md and "NOT meaningful" in md and "Byte model" in md
    assert "## add_relu_fwd_bwd (10E fused (unfused 16E)" in md and "tritonbn_unfused µs" in md
    png = out / "bench.png"
    assert png.exists() and 0 < png.stat().st_size < 400_000


@pytest.mark.slow
def test_train_check_smoke(smoke_run):
    out, res = smoke_run
    rc, log = res["train_check"]
    assert rc == 0, log[-4000:]
    doc = json.loads((out / "train.json").read_text())
    assert doc["ok"] and doc["configs"]
    for c in doc["configs"]:
        assert c["error"] is None and c["tracks"]
        assert c["converted_layers"] == c["bn_layers"] > 0
        assert c["tritonbn_uses_triton"] is True
        assert len(c["losses"]["torch"]) == len(c["losses"]["tritonbn"]) == doc["meta"]["steps"]
        assert c["max_abs_loss_diff"] < 1e-3
    assert "Loss curve" in (out / "train.md").read_text()


def test_gpu_check_script_parses():
    script = REPO / "benchmarks" / "gpu_check.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_gpu_time_ms_across_do_bench_signatures(monkeypatch):
    """The median must come out right whichever do_bench signature the installed triton has."""
    triton_testing = pytest.importorskip("triton.testing")
    seen = {}

    def v3(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
        seen.update(warmup=warmup, rep=rep, grad_to_none=grad_to_none)
        return [2.0, 1.0, 3.0] if quantiles else 9.0

    def old_tuple(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, fast_flush=True):
        return (2.0, 1.0, 3.0) if quantiles else 9.0

    def median_only(fn, warmup=25, rep=100, return_mode="mean"):
        return 2.0 if return_mode == "median" else 9.0

    for fake in (v3, old_tuple, median_only):
        monkeypatch.setattr(triton_testing, "do_bench", fake)
        assert harness.gpu_time_ms(lambda: None, 7, 11, grad_to_none=["g"])["ms"] == 2.0, fake.__name__
    assert seen == {"warmup": 7, "rep": 11, "grad_to_none": ["g"]}


def test_host_us_per_call_resets_grads(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)  # the CPU stands in for the GPU here
    t = torch.zeros(1, requires_grad=True)
    calls = []

    def fn():
        assert t.grad is None
        (t * 2).sum().backward()
        calls.append(1)

    assert harness.host_us_per_call(fn, n=5, grad_to_none=[t]) > 0
    assert len(calls) == 5


def test_host_overhead_runs_on_cpu(capsys):
    from benchmarks import host_overhead
    from tritonbn import ops

    assert host_overhead.main([]) == 0
    out = capsys.readouterr().out
    assert "python: module train forward" in out and "python: backward" in out
    assert ops._launch_hook is None     # the recording hook is always removed
