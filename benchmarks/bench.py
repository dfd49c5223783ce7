"""tritonbn vs torch eager vs torch.compile, batch norm forward/backward, side by side in one process.

    python -m benchmarks.bench --quick --out DIR          # GPU: the subset gpu_check.sh runs
    python -m benchmarks.bench                            # GPU: every shape, dtype, layout and mode
    python -m benchmarks.bench --smoke                    # CPU, Triton interpreter, tiny shapes, no timings

Writes DIR/bench.json (raw rows + environment), DIR/bench.md (tables) and DIR/bench.png (speed-up and %
of copy bandwidth per shape). The JSON and Markdown are rewritten after every shape, so a run that is
stopped (time budget, SIGTERM from `timeout`) still leaves what it measured. The time budget counts from
the end of start-up (imports, CUDA context, copy bandwidth; meta.setup_s), so even a budget of a few
seconds measures rows; meta.rows_planned_by_stratum lists the rows planned per (mode, dtype, layout).

Modes: train_fwd (module in train mode, x and the affine parameters require grad, as inside a network),
bwd (autograd.grad of a precomputed graph w.r.t. x, weight, bias), fwd_bwd (forward + .backward(dy),
grads reset to None between repetitions), eval_fwd (running statistics, no grad).
Providers: tritonbn.BatchNormNd, torch.nn.BatchNormNd (cuDNN or ATen), torch.compile of the latter.

Fused modes (`--fused`, issue 9): relu_{train_fwd,fwd_bwd,eval_fwd} time y = relu(BN(x)) and
add_relu_{train_fwd,fwd_bwd,eval_fwd} time y = relu(BN(x) + z), z a second input of x's shape and layout
(its gradient is computed too); relu6_*, add_relu6_*, silu_* and hardswish_* (through --modes only) the
same with ReLU6, SiLU or Hardswish. Providers there: tritonbn = the fused op (tritonbn.BatchNormActNd with
activation="relu", i.e. batch_norm(..., residual=z, activation="relu")), tritonbn_unfused = tritonbn's
BatchNormNd then a separate in-place add and ReLU, eager = torch's BatchNormNd then the same add and ReLU
(torchvision's BasicBlock tail), compile = torch.compile of that torch composition. The fused rows run
after every plain row (the plain rows first get the time budget minus --fused-budget).
Input dtypes bf16/fp16 run with fp32 parameters and running stats by default, as under autocast (AMP);
`--param-dtype same` makes them the input dtype.
See benchmarks/harness.py for the byte model behind GB/s and "% of copy bandwidth".
"""

from __future__ import annotations

import argparse
import math
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

from . import harness as H
from .shapes import FULL, QUICK, SMOKE, Case, select

PROVIDERS = ("tritonbn", "eager", "compile")  # the default set; speed-ups are tritonbn vs the other two
# opt-in: torch.compile of the tritonbn module (its custom ops inside an Inductor graph)
ALL_PROVIDERS = (*PROVIDERS, "tritonbn_compile")
DTYPES = ("bf16", "fp16", "fp32")
LAYOUTS = ("contiguous", "channels_last")
# Max error normalised by max |reference| (fp64) above which a row is flagged -- and only when
# tritonbn is also more than 2x worse than eager in the same dtype.
TOL = {"bf16": 3e-2, "fp16": 5e-3, "fp32": 1e-3}
# fused modes: tritonbn is the fused op, tritonbn_unfused tritonbn's BN then a separate add / ReLU
UNFUSED = "tritonbn_unfused"
PSHORT = {
    "tritonbn": "tbn",
    "eager": "eag",
    "compile": "cmp",
    "tritonbn_compile": "tbn+cmp",
    UNFUSED: "tbn-unf",
}
SHORT = {"contiguous": "contig", "channels_last": "cl", "train_fwd": "fwd", "eval_fwd": "eval"}


class Stop(BaseException):
    """Raised by the SIGTERM handler; a BaseException so per-provider `except Exception` lets it pass."""


def _sigterm(signum, frame):
    raise Stop(f"signal {signum}")


def _tuning_overrides(text, parser) -> dict:
    """``KEY=VALUE,...`` → Tuning field overrides, each value converted to the field's type."""
    if not text:
        return {}
    import dataclasses

    from tritonbn.ops import Tuning

    types = {f.name: type(f.default) for f in dataclasses.fields(Tuning)}
    out = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        if key not in types or not value:
            parser.error(f"--tuning: expected KEY=VALUE with KEY one of {sorted(types)}, got {item!r}")
        kind = types[key]
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                parser.error(f"--tuning: {key} takes true or false, got {value!r}")
            out[key] = value.lower() in ("true", "1")
        else:
            try:
                out[key] = kind(value)
            except ValueError:
                parser.error(f"--tuning: {key} takes a {kind.__name__}, got {value!r}")
    try:
        Tuning(**out)   # the values themselves (Tuning.__post_init__)
    except ValueError as e:
        parser.error(f"--tuning: {e}")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=H.__doc__,
    )
    p.add_argument("--quick", action="store_true", help="8 representative shapes, bf16+fp32, both layouts")
    p.add_argument(
        "--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes; timings meaningless"
    )
    p.add_argument(
        "--out", type=Path, help="output dir (default benchmarks/results/<card>-<date>; smoke: a tmp dir)"
    )
    p.add_argument(
        "--modes", default=",".join(H.MODES), help="comma list of " + ",".join(H.MODES + H.ALL_FUSED_MODES)
    )
    p.add_argument("--fused", action="store_true", help="add the fused modes " + ",".join(H.FUSED_MODES))
    p.add_argument(
        "--fused-shapes", default=None, help="shapes for the fused modes (like --shapes; default: --shapes)"
    )
    p.add_argument(
        "--fused-budget",
        type=float,
        default=None,
        help="seconds of --time-budget kept for the fused rows (default 40%% of it when fused modes run)",
    )
    p.add_argument("--dtypes", default=None, help="comma list of bf16,fp16,fp32 (quick: bf16,fp32)")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma list of contiguous,channels_last")
    p.add_argument("--shapes", default=None, help="comma list of shape names, groups, globs or substrings")
    p.add_argument(
        "--providers", default=",".join(PROVIDERS), help="comma list of " + ",".join(ALL_PROVIDERS)
    )
    p.add_argument(
        "--param-dtype",
        choices=("fp32", "same"),
        default="fp32",
        help="dtype of weight/bias/running stats for bf16/fp16 inputs (fp32 = AMP-style)",
    )
    p.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend (default inductor; smoke: aot_eager, which skips codegen)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds, counted from the end of start-up (imports, CUDA context, copy bandwidth: "
        "meta.setup_s); stop starting new shapes past it and write what was measured",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="do_bench warm-up ms (default 25, quick 5; the correctness pass already warmed up)",
    )
    p.add_argument("--rep", type=int, default=None, help="do_bench repetition ms (default 100, quick 30)")
    p.add_argument("--copy-mib", type=int, default=None, help="copy-bandwidth buffer MiB (default 1024)")
    p.add_argument("--no-png", action="store_true", help="skip the plot")
    p.add_argument(
        "--tuning",
        default=None,
        help="tritonbn launcher settings, KEY=VALUE,... (tritonbn.ops.Tuning fields), e.g. flat=always",
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="also time calls replayed from a CUDA graph (graph_ms: kernels without host cost; not bwd)",
    )
    a = p.parse_args(argv)
    a.tuning = _tuning_overrides(a.tuning, p)
    for name, allowed in (
        ("modes", H.MODES + H.ALL_FUSED_MODES),
        ("layouts", LAYOUTS),
        ("providers", ALL_PROVIDERS),
    ):
        setattr(a, name, _csv(getattr(a, name), allowed, p, name))
    if a.fused:
        a.modes += [m for m in H.FUSED_MODES if m not in a.modes]
    if a.fused_budget is None:
        fused = set(a.modes) & set(H.ALL_FUSED_MODES)
        a.fused_budget = 0.4 * a.time_budget if a.time_budget and fused else 0.0
    default_dtypes = "fp32" if a.smoke else "bf16,fp32" if a.quick else ",".join(DTYPES)
    a.dtypes = _csv(a.dtypes or default_dtypes, DTYPES, p, "dtypes")
    a.warmup = a.warmup or (5 if a.quick else 25)
    a.rep = a.rep or (30 if a.quick else 100)
    a.copy_mib = a.copy_mib or (4 if a.smoke else 1024)
    a.compile_backend = a.compile_backend or ("aot_eager" if a.smoke else "inductor")
    return a


def _csv(s, allowed, parser, name):
    vals = [v.strip() for v in s.split(",") if v.strip()]
    bad = [v for v in vals if v not in allowed]
    if bad or not vals:
        parser.error(f"--{name}: {bad or s!r} not in {', '.join(allowed)}")
    return vals


EPILOGUES = ("relu", "add_relu", *H.EXTRA_EPILOGUES)


def epilogue(mode: str) -> str | None:
    """None for plain BN modes, the epilogue ("relu", "add_relu", "relu6", "add_relu6", "silu",
    "hardswish") for the fused ones."""
    return next((e for e in EPILOGUES if mode.startswith(e + "_")), None)


def activation(epi: str | None) -> str | None:
    """The activation of an epilogue: "add_relu6" -> "relu6"."""
    return None if epi is None else epi.removeprefix("add_")


def _act_fn(torch, act: str, in_place: bool = False):
    F = torch.nn.functional
    if act == "relu":
        return torch.relu_ if in_place else torch.relu
    if act == "relu6":
        return lambda y: F.relu6(y, inplace=in_place)
    if act == "hardswish":
        return lambda y: F.hardswish(y, inplace=in_place)
    return lambda y: F.silu(y, inplace=in_place)


def base_mode(mode: str) -> str:
    """The plain mode a fused one times the same way: relu_fwd_bwd -> fwd_bwd."""
    e = epilogue(mode)
    return mode[len(e) + 1 :] if e else mode


def plan(args) -> list[tuple[Case, str, str, list[str]]]:
    """(case, dtype, layout, modes) in run order: every plain row first, then the fused ones (relu and
    add_relu of a shape next to each other); within each, dtype, then layout outermost, channels_last
    first (the layout convnets train in with bf16 autocast), so that a run cut short by the time budget
    has covered every shape for the first dtype (bf16) and layout rather than every dtype of a few. The
    modes of one item share one epilogue (one set of providers and one correctness pass)."""
    pool = SMOKE if args.smoke else (QUICK if args.quick else FULL)
    plain = [m for m in args.modes if epilogue(m) is None]
    fused = {e: [m for m in args.modes if epilogue(m) == e] for e in EPILOGUES}
    cl_first = sorted(args.layouts, key=lambda lay: lay != "channels_last")
    phases = [(select(pool, args.shapes), [plain], cl_first)]
    phases.append(
        (select(pool, args.fused_shapes or args.shapes), [fused[e] for e in EPILOGUES], cl_first)
    )
    out = []
    for cases, groups, layouts in phases:
        for dt in args.dtypes:
            for lay in layouts:
                for c in cases:
                    if lay == "channels_last" and not c.has_layouts:
                        continue
                    # smoke: one channels-last case keeps the interpreter run short; strides are generic
                    if args.smoke and lay == "channels_last" and c.ndim_bn != 2:
                        continue
                    out += [(c, dt, lay, modes) for modes in groups if modes]
    return out


def mode_providers(providers, mode: str) -> list[str]:
    """The providers of a mode's rows: fused modes add tritonbn_unfused right after tritonbn."""
    if epilogue(mode) is None or "tritonbn" not in providers:
        return list(providers)
    i = providers.index("tritonbn") + 1
    return [*providers[:i], UNFUSED, *providers[i:]]


# --------------------------------------------------------------------------------------------------
# tensors and modules


def _torch_dtype(torch, name):
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def make_input(torch, shape, dtype, layout, device, seed):
    """randn*1.5+0.7 in `layout`; channels_last = channel dim innermost in memory, for any rank >= 3
    (equals torch.channels_last / channels_last_3d for 4-D / 5-D)."""
    g = torch.Generator(device=device).manual_seed(seed)
    if layout == "channels_last" and len(shape) >= 3:
        t = torch.randn((shape[0], *shape[2:], shape[1]), generator=g, device=device)
        t = t.permute(0, len(shape) - 1, *range(1, len(shape) - 1))
    else:
        t = torch.randn(shape, generator=g, device=device)
    return (t * 1.5 + 0.7).to(dtype)  # .to keeps the strides of a dense permuted tensor


def bn_state(torch, nd, C, pdtype, device, seed):
    """Non-trivial affine params and running stats, shared by every provider of a shape."""
    m = getattr(torch.nn, f"BatchNorm{nd}d")(C, device=device, dtype=pdtype)
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for t, lo, hi in (
            (m.weight, 0.5, 1.5),
            (m.bias, -0.5, 0.5),
            (m.running_mean, -0.5, 0.5),
            (m.running_var, 0.5, 2.0),
        ):
            t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
    return {k: v.clone() for k, v in m.state_dict().items()}


def make_modules(torch, providers, tb, nd, C, pdtype, device, state, backend, epi=None):
    """provider -> (call, bn, params), or tritonbn's import error. `call(x)` / `call(x, z)` runs the
    provider; `bn` is its BatchNorm module (train/eval flag, running statistics); params its weight and bias.
    With an epilogue ("relu", "add_relu") tritonbn is the fused module and every other provider the BN
    module followed by a separate add and ReLU (see `_chain`)."""
    mods = {}
    for p in providers:
        if p.startswith("tritonbn") and isinstance(tb, Exception):
            mods[p] = tb
            continue
        fused = epi is not None and p in ("tritonbn", "tritonbn_compile")
        if fused:
            bn = getattr(tb, f"BatchNormAct{nd}d")(C, device=device, dtype=pdtype,
                                                   activation=activation(epi))
        else:
            lib = tb if p.startswith("tritonbn") else torch.nn
            bn = getattr(lib, f"BatchNorm{nd}d")(C, device=device, dtype=pdtype)
        bn.load_state_dict(state)
        call = bn if epi is None or fused else _chain(torch, bn, activation(epi))
        if p.endswith("compile"):
            call = torch.compile(call, dynamic=False, backend=backend)
        mods[p] = (call, bn, [bn.weight, bn.bias])
    return mods


def _chain(torch, bn, act="relu"):
    """BN, then the residual added in place and an in-place activation: torchvision's BasicBlock tail
    (`out = bn2(out); out += identity; out = relu(out)`, ReLU(inplace=True)), each op a separate pass."""
    act_ = _act_fn(torch, act, in_place=True)

    def chain(x, z=None):
        y = bn(x)
        if z is not None:
            y += z
        return act_(y)

    return chain


def _call(f, x, z):
    return f(x) if z is None else f(x, z)


# --------------------------------------------------------------------------------------------------
# correctness: each provider vs an fp64 torch reference, once per (shape, dtype, layout, epilogue)


def _err(torch, a, ref, keep=None) -> float:
    """max |a - ref| / max |ref|, over the elements `keep` selects (all by default)."""
    a = a.detach().double()
    if not bool(torch.isfinite(a).all()):
        return math.inf
    denom = ref.detach().abs().max().item() or 1.0
    diff = (a - ref.detach()).abs()
    return (diff if keep is None else diff * keep).max().item() / denom


# Unit roundoff of each input dtype: the ReLU's mask is ambiguous where |pre-activation| is within a few
# roundings of 0 (an unfused chain rounds BN's output, then the sum with z, before the ReLU sees them).
_EPS = {"bf16": 2.0**-8, "fp16": 2.0**-11, "fp32": 2.0**-23}
MASK_BAND = 8  # |pre| <= MASK_BAND * eps * max|pre|: dx and dz are not compared there


def _outputs(torch, F, prov, x_base, dy, z_base=None, ref_state=None):
    """train forward + grads (dz too when z is given) + updated running stats + eval forward with them.
    `prov` is a make_modules entry; with ref_state, `prov` is (None, None, [weight, bias]) and the fp64
    functional reference runs (relu(BN(x) [+ z]) when z is given or prov says relu)."""
    call, bn, params = prov
    x = x_base.detach().clone().requires_grad_(True)
    z = None if z_base is None else z_base.detach().clone().requires_grad_(True)
    if ref_state is not None:  # fp64 functional reference
        w, b = (
            params[0].detach().double().requires_grad_(True),
            params[1].detach().double().requires_grad_(True),
        )
        rm, rv = ref_state["running_mean"].double().clone(), ref_state["running_var"].double().clone()
        x = x_base.detach().double().requires_grad_(True)
        z = None if z_base is None else z_base.detach().double().requires_grad_(True)
        epi = ref_state.get("epilogue")

        act = activation(epi)

        def ref(xx, zz, training):
            y = F.batch_norm(xx, rm, rv, w, b, training, 0.1, 1e-5)
            y = y if zz is None else y + zz
            return _act_fn(torch, act)(y) if act else y

        y = ref(x, z, True)
        grads = torch.autograd.grad(y, [x, w, b, *([z] if z is not None else [])], dy.double())
        with torch.no_grad():
            ye = ref(x_base.double(), None if z_base is None else z_base.double(), False)
            pre = (
                (F.batch_norm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5) + (0 if z is None else z))
                if act in ("relu", "relu6")   # gated: its gate is ambiguous near its edges
                else None
            )
        edges = (0.0, 6.0) if act == "relu6" else (0.0,)
        return dict(zip(("dx", "dw", "db", "dz"), grads), y=y, rm=rm, rv=rv, y_eval=ye, pre=pre, edges=edges)
    bn.train()
    y = _call(call, x, z)
    grads = torch.autograd.grad(y, [x, *params, *([z] if z is not None else [])], dy)
    bn.eval()
    with torch.no_grad():
        ye = _call(call, x_base, z_base)
    return dict(
        zip(("dx", "dw", "db", "dz"), grads),
        y=y,
        rm=bn.running_mean,
        rv=bn.running_var,
        y_eval=ye,
        same_strides=y.stride() == x_base.stride(),
    )


def mode_errors(torch, out, ref, dt="fp32") -> dict:
    """Errors of one provider's outputs against the fp64 reference, per mode. With a ReLU or ReLU6, dx and
    dz are compared where the gate is unambiguous (the pre-activation farther than MASK_BAND roundings of
    dtype `dt` from the gate's edges: 0, and 6 for ReLU6)."""
    keys = [k for k in ("y", "dx", "dw", "db", "dz", "rm", "rv", "y_eval") if k in ref]
    keep = None
    if ref.get("pre") is not None:
        pre = ref["pre"].detach()
        band = MASK_BAND * _EPS[dt] * pre.abs().max()
        keep = torch.stack([(pre - e).abs() > band for e in ref.get("edges", (0.0,))]).all(0).double()
    e = {k: _err(torch, out[k], ref[k], keep if k in ("dx", "dz") else None) for k in keys}
    fwd = max(e["y"], e["rm"], e["rv"])
    bwd = max(e[k] for k in ("dx", "dw", "db", "dz") if k in e)
    return {
        "train_fwd": fwd,
        "bwd": bwd,
        "fwd_bwd": max(fwd, bwd),
        "eval_fwd": e["y_eval"],
        "parts": e,
        "same_strides": out["same_strides"],
    }


# --------------------------------------------------------------------------------------------------
# timing


def time_mode(torch, prov, mode, x_base, dy, timer, z_base=None):
    """Time one mode of one provider (a make_modules entry); fused modes time their base mode's calls
    with z as the second input (its gradient is computed too)."""
    call, bn, params = prov
    mode = base_mode(mode)
    if mode == "eval_fwd":
        bn.eval()

        def fn():
            with torch.no_grad():
                _call(call, x_base, z_base)

        return timer(fn)
    bn.train()
    x = x_base.detach().requires_grad_(True)
    z = None if z_base is None else z_base.detach().requires_grad_(True)
    leaves = [x, *params, *([z] if z is not None else [])]
    if mode == "train_fwd":
        return timer(
            lambda: _call(call, x, z)
        )  # the graph it records is dropped at once, as after a backward
    if mode == "fwd_bwd":
        return timer(lambda: _call(call, x, z).backward(dy), grad_to_none=leaves)
    y = _call(call, x, z)
    # not graphable: autograd runs backward nodes on their forward's stream, here the uncaptured default one
    return timer(lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True), graphable=False)


# --------------------------------------------------------------------------------------------------
# reporting


def summarize(rows, providers) -> dict:
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["mode"], r["dtype"], r["layout"]), []).append(r)
        groups.setdefault((r["mode"], "all", "all"), []).append(r)
    out = []
    for (mode, dt, lay), rs in groups.items():
        g = {"mode": mode, "dtype": dt, "layout": lay, "rows": len(rs)}
        for key in ("speedup_vs_eager", "speedup_vs_compile", "speedup_vs_unfused"):
            g["geomean_" + key] = H.geomean(r.get(key) for r in rs)
            g["geomean_graph_" + key] = H.geomean(r.get("graph_" + key) for r in rs)
        # the slowest row: "no shape below 1.0x" is a per-row criterion
        g["min_graph_speedup_vs_eager"] = min(
            (r["graph_speedup_vs_eager"] for r in rs if r.get("graph_speedup_vs_eager")), default=None
        )
        g["min_speedup_vs_eager"] = min(
            (r["speedup_vs_eager"] for r in rs if r.get("speedup_vs_eager")), default=None
        )
        g["geomean_frac_copy_bw"] = {
            p: H.geomean(r["providers"].get(p, {}).get("frac_copy_bw") for r in rs)
            for p in mode_providers(list(providers), mode)
        }
        out.append(g)
    order = {m: i for i, m in enumerate(H.MODES + H.ALL_FUSED_MODES)}
    out.sort(key=lambda s: (order[s["mode"]], s["dtype"] == "all", s["dtype"], s["layout"]))
    # Whole-network BN time: sum over ResNet-50's 53 layers, only where every one of its shapes was timed.
    rn = []
    for grp in sorted({r["group"] for r in rows if r["group"].startswith("rn50")}):
        for (mode, dt, lay), rs in groups.items():
            if dt == "all" or epilogue(mode):
                continue
            sel = [r for r in rs if r["group"] == grp]
            if sum(r["count"] for r in sel) != 53:
                continue
            tot = {}
            for p in providers:
                ms = [r["providers"].get(p, {}).get("ms") for r in sel]
                tot[p] = (
                    sum(r["count"] * t for r, t in zip(sel, ms)) if all(t is not None for t in ms) else None
                )
            rn.append({"group": grp, "mode": mode, "dtype": dt, "layout": lay, "total_ms": tot})
    return {"groups": out, "resnet50_totals": rn}


def _us(ms):
    return H.fmt(None if ms is None else ms * 1e3, ".1f")


def _x(v):
    return H.fmt(v, ".2f") + "×" if v is not None else "—"


def _pct(v):
    return H.fmt(None if v is None else 100 * v, ".0f") + "%" if v is not None else "—"


def markdown(doc) -> str:
    env, meta, rows, summ = doc["env"], doc["meta"], doc["rows"], doc["summary"]
    provs = meta["providers"]
    # summary columns: every provider some row has (the fused rows add tritonbn_unfused)
    sum_provs = mode_providers(provs, H.FUSED_MODES[0]) if any(r.get("epilogue") for r in rows) else provs
    L = ["# tritonbn batch-norm benchmark", ""]
    status = "complete" if meta["complete"] else f"PARTIAL ({meta.get('stopped_reason')})"
    L.append(f"Status: **{status}**, {len(rows)} of {meta['rows_planned']} rows, {meta['elapsed_s']:.0f} s.")
    if not meta["timing_meaningful"]:
        L.append("**Smoke run (CPU, Triton interpreter): timings are NOT meaningful; only the harness ran.**")
    L += ["", "| environment | |", "|---|---|"]
    for k in (
        "gpu",
        "driver",
        "torch",
        "torch_cuda",
        "cudnn",
        "triton",
        "tritonbn",
        "git_commit",
        "python",
        "time_utc",
    ):
        if env.get(k) is not None:
            L.append(f"| {k} | {env[k]} |")
    cb = meta["copy_bandwidth"]
    L += [
        "",
        f"Copy bandwidth (same run): **{H.fmt(cb['gbs'], '.0f')} GB/s** — `dst.copy_(src)` of "
        f"{cb['bytes'] / 2 / 2**20:.0f} MiB, read + write counted.",
        (
            f"Timing: triton `do_bench` median, warm-up {meta['warmup_ms']} ms, rep {meta['rep_ms']} ms, "
            f"L2 flushed between reps: {meta['l2_flush']}; "
            if meta["timing_meaningful"]
            else "Timing: one wall-clock call each (smoke); "
        )
        + f"parameters: {meta['param_dtype']}; "
        f"torch.compile backend: {meta['compile_backend']}, dynamic=False.",
        "",
        "Byte model (E = numel × itemsize of x): "
        + "; ".join(f"{m} {t}" for m, t in H.BYTE_MODEL_TEXT.items())
        + ". GB/s = model bytes / time; % copy = GB/s / copy bandwidth.",
        "",
        "## Summary (geometric means over shapes; speed-up = other time / tritonbn time)",
        "",
        "Fused modes: tritonbn = the fused op; vs unfused = against tritonbn's BN followed by a separate add "
        "and ReLU.",
        "",
        "| mode | dtype | layout | rows | vs eager | vs compile | vs unfused | "
        + " | ".join(f"{p} % copy" for p in sum_provs)
        + (
            " | vs eager (graphs) | vs compile (graphs) | vs unfused (graphs) | min vs eager (graphs)"
            if meta.get("cuda_graphs")
            else ""
        )
        + " |",
        "|---|---|---|---|---|---|---|" + "---|" * (len(sum_provs) + 4 * bool(meta.get("cuda_graphs"))),
    ]
    for s in summ["groups"]:
        L.append(
            f"| {s['mode']} | {s['dtype']} | {s['layout']} | {s['rows']} | "
            f"{_x(s['geomean_speedup_vs_eager'])} | {_x(s['geomean_speedup_vs_compile'])} | "
            f"{_x(s.get('geomean_speedup_vs_unfused'))} | "
            + " | ".join(_pct(s["geomean_frac_copy_bw"].get(p)) for p in sum_provs)
            + (
                f" | {_x(s.get('geomean_graph_speedup_vs_eager'))}"
                f" | {_x(s.get('geomean_graph_speedup_vs_compile'))}"
                f" | {_x(s.get('geomean_graph_speedup_vs_unfused'))}"
                f" | {_x(s.get('min_graph_speedup_vs_eager'))}"
                if meta.get("cuda_graphs")
                else ""
            )
            + " |"
        )
    if summ["resnet50_totals"]:
        L += [
            "",
            "## ResNet-50: sum over its 53 BN layers (ms)",
            "",
            "| group | mode | dtype | layout | " + " | ".join(provs) + " |",
            "|---|---|---|---|" + "---|" * len(provs),
        ]
        for t in summ["resnet50_totals"]:
            L.append(
                f"| {t['group']} | {t['mode']} | {t['dtype']} | {t['layout']} | "
                + " | ".join(H.fmt(t["total_ms"].get(p), ".3f") for p in provs)
                + " |"
            )
    for mode in meta["modes"]:
        rs = [r for r in rows if r["mode"] == mode]
        if not rs:
            continue
        mp = mode_providers(provs, mode)
        fused = epilogue(mode) is not None
        L += [
            "",
            f"## {mode} ({H.BYTE_MODEL_TEXT[mode]})",
            "",
            "| shape | dtype | layout | "
            + " | ".join(f"{p} µs" for p in mp)
            + " | tritonbn GB/s | % copy ("
            + "/".join(mp)
            + ") | vs eager | vs compile | "
            + ("vs unfused | " if fused else "")
            + "host µs/call ("
            + "/".join(mp)
            + ") | "
            + ("graph µs (" + "/".join(mp) + ") | " if meta.get("cuda_graphs") else "")
            + "err tritonbn | err eager |",
            "|---|---|---|" + "---|" * (len(mp) + 7 + fused + bool(meta.get("cuda_graphs"))),
        ]
        for r in rs:
            P = r["providers"]
            L.append(
                f"| {r['case']} | {r['dtype']} | {SHORT.get(r['layout'], r['layout'])} | "
                + " | ".join("ERR" if P.get(p, {}).get("error") else _us(P.get(p, {}).get("ms")) for p in mp)
                + f" | {H.fmt(P.get('tritonbn', {}).get('gbs'), '.0f')} | "
                + "/".join(_pct(P.get(p, {}).get("frac_copy_bw")) for p in mp)
                + f" | {_x(r['speedup_vs_eager'])} | {_x(r['speedup_vs_compile'])} | "
                + (f"{_x(r.get('speedup_vs_unfused'))} | " if fused else "")
                + "/".join(H.fmt(P.get(p, {}).get("host_us"), ".0f") for p in mp)
                + " | "
                + (
                    "/".join(_us(P.get(p, {}).get("graph_ms")) for p in mp) + " | "
                    if meta.get("cuda_graphs")
                    else ""
                )
                + f"{H.fmt(r['err_tritonbn'], '.1e')}{' **FLAG**' if r['flagged'] else ''} | "
                f"{H.fmt(r['err_eager'], '.1e')} |"
            )
    bad = [r for r in rows if r["flagged"] or any(v.get("error") for v in r["providers"].values())]
    if bad:
        L += ["", "## Errors and flagged rows", ""]
        for r in bad:
            errs = "; ".join(f"{p}: {v['error']}" for p, v in r["providers"].items() if v.get("error"))
            flag = (
                f"tritonbn err {r['err_tritonbn']:.2e} > tol {TOL[r['dtype']]:.0e}. " if r["flagged"] else ""
            )
            L.append(f"- {r['case']} {r['dtype']} {r['layout']} {r['mode']}: {flag}{errs}")
    return "\n".join(L) + "\n"


def plot_png(doc, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, provs = doc["rows"], doc["meta"]["providers"]
    modes = [m for m in doc["meta"]["modes"] if any(r["mode"] == m for r in rows)]
    if not modes:
        return
    n = max(sum(r["mode"] == m for r in rows) for m in modes)
    fig, axes = plt.subplots(
        len(modes), 2, figsize=(min(40, 4 + 0.22 * n) * 1.0 + 4, 3.2 * len(modes)), squeeze=False
    )
    colors = {
        "tritonbn": "tab:red",
        "eager": "tab:blue",
        "compile": "tab:green",
        "tritonbn_compile": "tab:orange",
        UNFUSED: "tab:purple",
    }
    for i, mode in enumerate(modes):
        rs = [r for r in rows if r["mode"] == mode]
        mp = mode_providers(provs, mode)
        labels = [f"{r['case']}|{r['dtype']}|{SHORT.get(r['layout'], r['layout'])}" for r in rs]
        xs = range(len(rs))
        ax = axes[i][0]
        # markers on a log axis: speed-ups of 0.5x and 2x look equally far from 1
        for key, lab, col, mk in (
            ("speedup_vs_eager", "vs eager", "tab:blue", "o"),
            ("speedup_vs_compile", "vs compile", "tab:green", "s"),
        ):
            ys = [r[key] if r[key] else float("nan") for r in rs]
            ax.plot(list(xs), ys, mk, color=col, label=lab, ms=4)
        if any(r["speedup_vs_eager"] or r["speedup_vs_compile"] for r in rs):
            ax.set_yscale("log")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title(f"{mode}: tritonbn speed-up", fontsize=9)
        ax = axes[i][1]
        w = 0.8 / len(mp)
        for j, p in enumerate(mp):
            ax.bar(
                [x + (j - (len(mp) - 1) / 2) * w for x in xs],
                [100 * (r["providers"].get(p, {}).get("frac_copy_bw") or 0) for r in rs],
                w,
                label=p,
                color=colors.get(p),
            )
        ax.axhline(100.0, color="k", lw=0.8)
        ax.set_title(f"{mode}: % of copy bandwidth (byte model)", fontsize=9)
        for ax in axes[i]:
            ax.set_xticks(list(xs))
            ax.set_xticklabels(labels if i == len(modes) - 1 else [""] * len(rs), rotation=90, fontsize=6)
            ax.tick_params(axis="y", labelsize=7)
            ax.legend(fontsize=7)
    gpu = doc["env"].get("gpu") or "CPU smoke (timings meaningless)"
    fig.suptitle(f"tritonbn vs torch, {gpu}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_outputs(doc, out: Path, png: bool) -> None:
    doc["summary"] = summarize(doc["rows"], doc["meta"]["providers"])
    H.write_json_atomic(out / "bench.json", doc)
    H.write_text_atomic(out / "bench.md", markdown(doc))
    if png:
        try:
            plot_png(doc, out / "bench.png")
        except Exception as e:  # a missing matplotlib must not cost the numbers
            print(f"bench: plot failed: {type(e).__name__}: {e}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------


def _setup_dynamo(torch):
    """dynamic=False compiles one graph per shape; lift the recompile caps (8 by default) that would
    otherwise silently fall back to eager after a few shapes."""
    import torch._dynamo.config as cfg

    for name in (
        "recompile_limit",
        "cache_size_limit",
        "accumulated_recompile_limit",
        "accumulated_cache_size_limit",
    ):
        if hasattr(cfg, name):
            setattr(cfg, name, 4096)
    # bwd mode replays one graph's backward (retain_graph=True), which AOTAutograd refuses when it
    # donates saved buffers to the backward; donation saves memory, not time.
    try:
        import torch._functorch.config as fcfg
    except ImportError:
        return
    if hasattr(fcfg, "donated_buffer"):
        fcfg.donated_buffer = False


def planned_strata(todo) -> list[dict]:
    """The rows a plan asks for, per (mode, dtype, layout) stratum, in run order: bench.json's
    ``meta.rows_planned_by_stratum``, against which summary.py tells a complete stratum from a partial one."""
    strata: dict[tuple, list] = {}
    for case, dt, lay, modes in todo:
        for m in modes:
            strata.setdefault((m, dt, lay), []).append(case.name)
    return [{"mode": m, "dtype": dt, "layout": lay, "rows": len(cases), "cases": cases}
            for (m, dt, lay), cases in strata.items()]


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    started = H.start_run("bench", args.smoke, args.out)
    if started is None:
        return 2
    torch, device, env, out = started
    import torch.nn.functional as F

    try:
        import tritonbn as tb
    except Exception as e:  # the other providers still run; every tritonbn cell records the error
        tb = e
        traceback.print_exc()
    _setup_dynamo(torch)
    tuning = None
    if not isinstance(tb, Exception):
        import dataclasses

        tb.ops.TUNING = dataclasses.replace(tb.ops.TUNING, **args.tuning)
        tuning = dataclasses.asdict(tb.ops.TUNING)
    timed = not args.smoke
    if timed:

        def timer(fn, grad_to_none=None, graphable=True):
            t = H.gpu_time_ms(fn, args.warmup, args.rep, grad_to_none)
            t["host_us"] = H.host_us_per_call(fn, grad_to_none=grad_to_none)
            if args.cuda_graphs and graphable:
                try:
                    t["graph_ms"] = H.graph_time_ms(fn, args.warmup, args.rep, grad_to_none)
                except Exception as e:  # capture is best effort; the plain timing stands
                    t["graph_ms"], t["graph_error"] = None, _short(e)
            return t

    else:
        timer = lambda fn, grad_to_none=None, graphable=True: H.wall_time_ms(fn, 1, grad_to_none)
    try:
        copy_bw = H.copy_bandwidth_gbs(device, args.copy_mib * 2**20, args.warmup, args.rep)
    except Exception as e:  # the kernel timings are still worth having without the % column
        copy_bw = {"bytes": 2 * args.copy_mib * 2**20, "ms": None, "gbs": None, "error": _short(e)}
    todo = plan(args)
    meta = {
        "argv": sys.argv[1:] if argv is None else list(argv),
        "providers": args.providers,
        "fused_providers": mode_providers(args.providers, H.FUSED_MODES[0]),
        "modes": args.modes,
        "dtypes": args.dtypes,
        "layouts": args.layouts,
        "param_dtype": args.param_dtype,
        "cuda_graphs": args.cuda_graphs,
        "tuning": tuning,
        "compile_backend": args.compile_backend,
        "warmup_ms": args.warmup,
        "rep_ms": args.rep,
        "l2_flush": H.do_bench_flushes_l2() if timed else None,
        "timing_meaningful": timed,
        "copy_bandwidth": copy_bw,
        "byte_model": H.BYTE_MODEL_TEXT,
        "tolerances": TOL,
        "time_budget_s": args.time_budget,
        "fused_budget_s": args.fused_budget,
        "unfused_byte_model": {m: f"{k}E" for m, k in H.UNFUSED_BYTES_PER_ELEMENT_PASS.items()},
        "rows_planned": sum(len(t[3]) for t in todo),
        "rows_planned_by_stratum": planned_strata(todo),
        "complete": False,
        "stopped_reason": None,
        "elapsed_s": 0.0,
        # --time-budget counts from here: the imports (torch, triton, tritonbn: seconds), the CUDA context
        # and the copy-bandwidth measurement are not in it, so a short budget (ab's share per variant)
        # still measures rows. elapsed_s is the whole run, start-up included.
        "setup_s": round(time.monotonic() - t_start, 2),
    }
    doc = {"env": env, "meta": meta, "rows": [], "summary": {}}
    print(
        f"bench: {env.get('gpu') or 'CPU smoke'} | torch {env['torch']} | triton {env.get('triton')} | "
        f"copy {H.fmt(copy_bw['gbs'], '.0f')} GB/s | {len(todo)} shapes x modes, {meta['rows_planned']} rows "
        f"-> {out}",
        flush=True,
    )
    old = signal.signal(signal.SIGTERM, _sigterm)
    t0 = time.monotonic()  # the time budget's clock (meta.setup_s above)
    durations: dict[str, list[float]] = {"plain": [], "fused": []}
    stopped: dict[str, str] = {}  # phase -> why its remaining items were skipped
    has_fused = any(epilogue(t[3][0]) for t in todo)
    n_err = n_flag = 0
    try:
        for i, (case, dt, lay, modes) in enumerate(todo):
            phase = "fused" if epilogue(modes[0]) else "plain"
            if phase in stopped:
                continue
            elapsed = time.monotonic() - t0
            # the plain rows leave --fused-budget of the time budget to the fused rows after them
            limit = (args.time_budget or 0) - (args.fused_budget if phase == "plain" and has_fused else 0)
            durs = durations[phase]
            if args.time_budget and (
                elapsed >= limit or (durs and elapsed + statistics.median(durs) > limit)
            ):
                done = sum(1 for t in todo[:i] if bool(epilogue(t[3][0])) == (phase == "fused"))
                total = sum(1 for t in todo if bool(epilogue(t[3][0])) == (phase == "fused"))
                stopped[phase] = (
                    f"time budget: {phase} rows stopped at {elapsed:.1f}s (limit {limit:.1f}s of "
                    f"{args.time_budget:.1f}s, after {meta['setup_s']:.1f}s of start-up) after {done} of "
                    f"{total} shapes"
                )
                print(f"bench: {stopped[phase]}", flush=True)
                continue
            tc = time.monotonic()
            try:
                rows = run_case(torch, F, tb, args, case, dt, lay, device, timer, copy_bw, i, modes)
            except Exception as e:  # setup failed (e.g. out of memory): record it, go on with the next shape
                traceback.print_exc()
                rows = [failed_row(case, dt, lay, m, args.providers, _short(e)) for m in modes]
                if device == "cuda":
                    torch.cuda.empty_cache()
            for r in rows:
                n_err += sum(bool(v.get("error")) for v in r["providers"].values())
                n_flag += r["flagged"]
                print(
                    progress(r, len(doc["rows"]) + 1, meta["rows_planned"], time.monotonic() - t0), flush=True
                )
                doc["rows"].append(r)
            durations[phase].append(time.monotonic() - tc)
            meta["elapsed_s"] = time.monotonic() - t_start
            write_outputs(doc, out, png=False)
        meta["complete"] = not stopped
        meta["stopped_reason"] = "; ".join(stopped.values()) or None
    except (Stop, KeyboardInterrupt) as e:
        meta["stopped_reason"] = f"interrupted ({e or 'KeyboardInterrupt'})"
        print(f"bench: {meta['stopped_reason']}", flush=True)
    finally:
        signal.signal(signal.SIGTERM, old)
        meta["elapsed_s"] = time.monotonic() - t_start
        meta["errors"], meta["flagged"] = n_err, n_flag
        write_outputs(doc, out, png=not args.no_png)
    print(summary_text(doc, out), flush=True)
    return 1 if (n_err or n_flag) else 0


def run_case(torch, F, tb, args, case: Case, dt, lay, device, timer, copy_bw, seed, modes=None) -> list[dict]:
    """All `modes` (default args.modes; one epilogue) x providers of one (shape, dtype, layout); nothing
    here raises except Stop."""
    modes = modes or args.modes
    epi = epilogue(modes[0])
    providers = mode_providers(args.providers, modes[0])
    dtype = _torch_dtype(torch, dt)
    pdtype = torch.float32 if args.param_dtype == "fp32" else dtype
    nd, C = case.ndim_bn, case.shape[1]
    torch._dynamo.reset()  # per-shape graphs only: keeps guard lists (host overhead) short
    x = make_input(torch, case.shape, dtype, lay, device, 1000 + seed)
    dy = make_input(torch, case.shape, dtype, lay, device, 2000 + seed)
    z = make_input(torch, case.shape, dtype, lay, device, 3000 + seed) if epi and epi.startswith("add_") \
        else None
    state = bn_state(torch, nd, C, pdtype, device, seed)
    mods = make_modules(torch, providers, tb, nd, C, pdtype, device, state, args.compile_backend, epi)
    errs, errors = {}, {}
    ref_prov = (None, None, [state["weight"], state["bias"]])
    ref = _outputs(torch, F, ref_prov, x, dy, z, ref_state={**state, "epilogue": epi})
    for p, mp in mods.items():
        if isinstance(mp, Exception):
            errors[p] = f"import tritonbn failed: {type(mp).__name__}: {mp}"
            continue
        try:  # also the first call: Triton / Inductor compilation happens here, outside the timings
            errs[p] = mode_errors(torch, _outputs(torch, F, mp, x, dy, z), ref, dt)
        except Exception as e:
            errors[p] = _short(e)
    del ref
    # tritonbn falls back to torch's batch norm where it cannot run Triton (CPU without the interpreter):
    # such a row would compare torch with torch, so say which one ran.
    uses_triton = (
        None if isinstance(tb, Exception) or not hasattr(tb, "uses_triton") else bool(tb.uses_triton(x))
    )
    rows = []
    itemsize = x.element_size()
    for mode in modes:
        nbytes = H.model_bytes(mode, case.numel, itemsize)
        prov = {}
        for p in providers:
            cell = {"err": errs.get(p, {}).get(base_mode(mode)), "error": errors.get(p)}
            if p in errors:
                prov[p] = cell
                continue
            try:
                t = time_mode(torch, mods[p], mode, x, dy, timer, z)
                cell.update(t)
                cell["gbs"] = nbytes / (t["ms"] * 1e-3) / 1e9
                cell["frac_copy_bw"] = cell["gbs"] / copy_bw["gbs"] if copy_bw["gbs"] else None
            except Exception as e:
                cell["error"] = _short(e)
                if device == "cuda":
                    torch.cuda.empty_cache()
            prov[p] = cell
        ms = {p: c.get("ms") for p, c in prov.items() if not c.get("error")}
        t_tb = ms.get("tritonbn")
        et, ee = prov.get("tritonbn", {}).get("err"), prov.get("eager", {}).get("err")
        rows.append(
            {
                "case": case.name,
                "group": case.group,
                "count": case.count,
                "shape": list(case.shape),
                "dtype": dt,
                "param_dtype": str(pdtype).replace("torch.", ""),
                "layout": lay,
                "mode": mode,
                "epilogue": epi,
                "numel": case.numel,
                "bytes": nbytes,
                "unfused_bytes": (
                    H.UNFUSED_BYTES_PER_ELEMENT_PASS[mode] * case.numel * itemsize if epi else None
                ),
                "providers": prov,
                "speedup_vs_eager": ms["eager"] / t_tb if t_tb and ms.get("eager") else None,
                "speedup_vs_compile": ms["compile"] / t_tb if t_tb and ms.get("compile") else None,
                "speedup_vs_unfused": ms[UNFUSED] / t_tb if t_tb and ms.get(UNFUSED) else None,
                **_graph_speedups(prov),
                "tritonbn_uses_triton": uses_triton,
                "err_tritonbn": et,
                "err_eager": ee,
                "err_parts": {p: v["parts"] for p, v in errs.items()},
                "y_strides_match_x": {p: v["same_strides"] for p, v in errs.items()},
                "flagged": et is not None and et > TOL[dt] and et > 2 * (ee or 0.0),
            }
        )
    del mods, x, dy, z
    return rows


def _graph_speedups(prov) -> dict:
    """Speed-ups on CUDA-graph replay times (kernels only), where --cuda-graphs measured them."""
    g = {p: c.get("graph_ms") for p, c in prov.items() if not c.get("error")}
    tb = g.get("tritonbn")
    return {
        "graph_speedup_vs_eager": g["eager"] / tb if tb and g.get("eager") else None,
        "graph_speedup_vs_compile": g["compile"] / tb if tb and g.get("compile") else None,
        "graph_speedup_vs_unfused": g[UNFUSED] / tb if tb and g.get(UNFUSED) else None,
    }


def failed_row(case: Case, dt, lay, mode, providers, error) -> dict:
    return {
        "case": case.name,
        "group": case.group,
        "count": case.count,
        "shape": list(case.shape),
        "dtype": dt,
        "param_dtype": None,
        "layout": lay,
        "mode": mode,
        "epilogue": epilogue(mode),
        "numel": case.numel,
        "bytes": None,
        "providers": {p: {"error": error} for p in mode_providers(list(providers), mode)},
        "speedup_vs_eager": None,
        "speedup_vs_compile": None,
        "speedup_vs_unfused": None,
        "tritonbn_uses_triton": None,
        "err_tritonbn": None,
        "err_eager": None,
        "err_parts": {},
        "y_strides_match_x": {},
        "flagged": False,
    }


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


def progress(r, i, n, elapsed) -> str:
    P = r["providers"]
    times = " ".join(f"{PSHORT.get(p, p)} {'ERR' if P[p].get('error') else _us(P[p].get('ms'))}" for p in P)
    return (
        f"[{i:4d}/{n} {elapsed:5.0f}s] {r['case']:<24} {r['dtype']} {SHORT.get(r['layout']):<6} "
        f"{SHORT.get(r['mode'], r['mode']):<7} us: {times} | {_x(r['speedup_vs_eager'])} vs eager "
        f"{_x(r['speedup_vs_compile'])} vs comp "
        + (f"{_x(r.get('speedup_vs_unfused'))} vs unf " if r.get("epilogue") else "")
        + f"| {_pct(P.get('tritonbn', {}).get('frac_copy_bw'))} copy | "
        f"err {H.fmt(r['err_tritonbn'], '.0e')}{' FLAG' if r['flagged'] else ''}"
    )


def summary_text(doc, out: Path) -> str:
    meta, summ = doc["meta"], doc["summary"]
    lines = [
        f"bench: {'complete' if meta['complete'] else 'PARTIAL: ' + str(meta['stopped_reason'])}; "
        f"{len(doc['rows'])}/{meta['rows_planned']} rows in {meta['elapsed_s']:.0f}s; "
        f"{meta['errors']} provider errors; {meta['flagged']} flagged rows; "
        f"copy bw {H.fmt(meta['copy_bandwidth']['gbs'], '.0f')} GB/s; "
        f"timings {'GPU' if meta['timing_meaningful'] else 'MEANINGLESS (smoke)'}",
        "geomean speed-up of tritonbn (mode dtype layout: vs eager, vs compile, tritonbn % copy"
        + ("; graphs: vs eager, slowest row vs eager" if meta.get("cuda_graphs") else "")
        + "; fused modes: vs unfused):",
    ]
    for s in summ["groups"]:
        lines.append(
            f"  {s['mode']:<18} {s['dtype']:<4} {s['layout']:<13} n={s['rows']:<3} "
            f"{_x(s['geomean_speedup_vs_eager']):>7} {_x(s['geomean_speedup_vs_compile']):>7} "
            f"{_pct(s['geomean_frac_copy_bw'].get('tritonbn')):>5}"
            + (
                f" | graphs {_x(s.get('geomean_graph_speedup_vs_eager')):>7} "
                f"{_x(s.get('min_graph_speedup_vs_eager')):>7}"
                if meta.get("cuda_graphs")
                else ""
            )
            + (f" | vs unfused {_x(s.get('geomean_speedup_vs_unfused'))}" if epilogue(s["mode"]) else "")
        )
    lines.append(
        f"bench: wrote {out}/bench.json, bench.md"
        + ("" if not (out / "bench.png").exists() else ", bench.png")
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
