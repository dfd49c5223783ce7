"""Check an exported ONNX file against the PyTorch model with ONNX Runtime (CPU, no graph optimizations)."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .errors import ExportError

# max |onnx - torch| must stay below REL_TOL[dtype] * max(1, max |torch|)
REL_TOL = {torch.float64: 1e-7, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass
class VerifyResult:
    ok: bool
    max_abs_err: float
    max_rel_err: float  # max abs error divided by max |reference|
    runs: list[dict] = field(default_factory=list)  # one entry per batch size tried
    message: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _flatten(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in out for t in _flatten(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    return []


def _session(onnx_model):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    src = onnx_model.SerializeToString() if hasattr(onnx_model, "SerializeToString") else str(onnx_model)
    try:
        return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"ONNX Runtime cannot load the model: {str(e).splitlines()[0]}") from e


def _is_dynamic_batch(sess) -> bool:
    ins = sess.get_inputs()
    return bool(ins) and all(i.shape and not isinstance(i.shape[0], int) for i in ins)


def _with_batch(inputs: tuple, n: int, gen: torch.Generator) -> tuple:
    out = []
    for x in inputs:
        if x.is_floating_point():
            y = torch.randn((n,) + tuple(x.shape[1:]), generator=gen, dtype=torch.float32).to(x.dtype)
        else:  # integer inputs: reuse real rows so the values stay valid
            y = x[torch.randint(0, x.shape[0], (n,), generator=gen)]
        out.append(y)
    return tuple(out)


def compare(ref: list, got: list) -> dict:
    """Worst error over all outputs; ``ok`` follows the dtype-aware tolerance."""
    worst = {"max_abs_err": 0.0, "max_rel_err": 0.0, "ok": len(ref) == len(got), "why": ""}
    if not worst["ok"]:
        worst["why"] = f"{len(got)} ONNX outputs vs {len(ref)} PyTorch outputs"
        return worst
    for i, (r, g) in enumerate(zip(ref, got)):
        r64 = r.detach().cpu().to(torch.float64).numpy() if r.dtype != torch.bool else r.cpu().numpy()
        g = np.asarray(g)
        if r64.shape != g.shape:
            worst.update(ok=False, why=f"output {i}: shape {g.shape} vs {r64.shape}")
            continue
        if not r.is_floating_point():
            if not np.array_equal(r64, g):
                worst.update(ok=False, why=f"output {i}: integer/bool values differ")
            continue
        g64 = g.astype(np.float64)
        nan_r, nan_g = np.isnan(r64), np.isnan(g64)
        if not np.array_equal(nan_r, nan_g):
            worst.update(ok=False, why=f"output {i}: NaN positions differ", max_abs_err=float("inf"))
            continue
        finite = ~nan_r
        err = float(np.max(np.abs(g64[finite] - r64[finite]), initial=0.0))
        scale = float(np.max(np.abs(r64[finite]), initial=0.0))
        rel = err / max(scale, 1e-30)
        worst["max_abs_err"] = max(worst["max_abs_err"], err)
        worst["max_rel_err"] = max(worst["max_rel_err"], rel)
        tol = REL_TOL.get(r.dtype, 1e-4) * max(1.0, scale)
        if not err <= tol:
            worst.update(ok=False, why=f"output {i}: max abs error {err:.3g} > tolerance {tol:.3g}")
    return worst


def other_batch_sizes(n: int) -> list[int]:
    return [b for b in (1, 3, 5, 2) if b != n][:2]


def verify_onnx(onnx_model, model: torch.nn.Module, example_inputs, dynamic_batch: bool | None = None,
                seed: int = 0) -> VerifyResult:
    """Run ONNX Runtime on ``onnx_model`` (path or ModelProto) and PyTorch eval on a deep copy of
    ``model`` with ``example_inputs`` and, if the batch axis is dynamic, random inputs at two other
    batch sizes.  ``model`` is never modified."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    sess = _session(onnx_model)
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(example_inputs):
        raise ExportError(f"the ONNX model takes {len(names)} inputs, {len(example_inputs)} were given")
    if dynamic_batch is None:
        dynamic_batch = _is_dynamic_batch(sess)
    ref_model = copy.deepcopy(model).eval()
    gen = torch.Generator().manual_seed(seed)
    batches = [example_inputs]
    if dynamic_batch:
        sizes = other_batch_sizes(example_inputs[0].shape[0])
        batches += [_with_batch(example_inputs, n, gen) for n in sizes]
    result = VerifyResult(ok=True, max_abs_err=0.0, max_rel_err=0.0)
    for inputs in batches:
        with torch.no_grad():
            ref = _flatten(ref_model(*inputs))
        feeds = {n: x.detach().cpu().numpy() for n, x in zip(names, inputs)}
        try:
            got = sess.run(None, feeds)
        except Exception as e:
            got, cmp = None, {"ok": False, "why": f"ONNX Runtime failed: {str(e).splitlines()[0]}",
                              "max_abs_err": float("inf"), "max_rel_err": float("inf")}
        if got is not None:
            cmp = compare(ref, got)
        run = {"batch": int(inputs[0].shape[0]), **cmp}
        result.runs.append(run)
        result.max_abs_err = max(result.max_abs_err, cmp["max_abs_err"])
        result.max_rel_err = max(result.max_rel_err, cmp["max_rel_err"])
        if not cmp["ok"]:
            result.ok = False
            result.message = result.message or f"batch {run['batch']}: {cmp['why']}"
    if result.ok:
        result.message = (f"ONNX Runtime matches PyTorch at batch sizes {[r['batch'] for r in result.runs]} "
                          f"(max abs err {result.max_abs_err:.3g})")
    return result


def random_feeds(sess, batch: int = 2, seed: int = 0, shape=None) -> dict:
    """Random inputs for an ONNX session; symbolic dims become ``batch`` (first axis) or 1."""
    rng = np.random.default_rng(seed)
    feeds = {}
    types = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
    for k, inp in enumerate(sess.get_inputs()):
        if shape is not None and k == 0:
            dims = list(shape)
        else:
            dims = [d if isinstance(d, int) else (batch if j == 0 else 1) for j, d in enumerate(inp.shape)]
        dt = types.get(inp.type)
        if dt is None:
            raise ExportError(f"input '{inp.name}' has unsupported type {inp.type}")
        x = rng.standard_normal(dims) if np.issubdtype(dt, np.floating) else rng.integers(0, 2, dims)
        feeds[inp.name] = x.astype(dt)
    return feeds


def verify_onnx_pair(original, folded, batch_sizes=(1, 3), shape=None) -> VerifyResult:
    """Compare two ONNX models (before/after folding) on the same random inputs with ONNX Runtime."""
    a, b = _session(original), _session(folded)
    result = VerifyResult(ok=True, max_abs_err=0.0, max_rel_err=0.0)
    dynamic = _is_dynamic_batch(a)
    for i, n in enumerate(batch_sizes if dynamic and shape is None else (None,)):
        feeds = random_feeds(a, batch=n or 1, seed=i, shape=shape)
        ref = [torch.from_numpy(np.asarray(o)) for o in a.run(None, feeds)]
        cmp = compare(ref, b.run(None, feeds))
        run = {"batch": int(next(iter(feeds.values())).shape[0]) if feeds else 0, **cmp}
        result.runs.append(run)
        result.max_abs_err = max(result.max_abs_err, cmp["max_abs_err"])
        result.max_rel_err = max(result.max_rel_err, cmp["max_rel_err"])
        if not cmp["ok"]:
            result.ok, result.message = False, result.message or f"batch {run['batch']}: {cmp['why']}"
    if result.ok:
        result.message = f"folded model matches the input model (max abs err {result.max_abs_err:.3g})"
    return result
