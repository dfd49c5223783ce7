"""Check an exported ONNX file against the PyTorch model with ONNX Runtime (CPU, no graph optimizations)."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .errors import ExportError, first_line

# max |onnx - torch| must stay below REL_TOL[dtype] * max(1, max |torch|)
REL_TOL = {torch.float64: 1e-7, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass
class VerifyResult:
    ok: bool
    max_abs_err: float
    max_rel_err: float  # max abs error divided by max |reference| (per input set; the worst one)
    runs: list[dict] = field(default_factory=list)  # one entry per input set tried
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
        raise ExportError(f"ONNX Runtime cannot load the model: {first_line(e)}") from e


def _is_dynamic_batch(sess) -> bool:
    ins = sess.get_inputs()
    return bool(ins) and all(i.shape and not isinstance(i.shape[0], int) for i in ins)


# Besides the example inputs and random inputs at other batch sizes, random inputs of other magnitudes:
# a traced graph that baked in a data-dependent branch (``if x.abs().max() > 100``) or a value computed
# from the example usually disagrees with the model on one of them.  (scale, offset) of randn.
INPUT_VARIANTS = ((1e-3, 0.0), (1e3, 0.0), (1.0, 10.0))
FP16_MAX_SCALE = 1e2  # keeps randn * scale and what a layer makes of it finite in float16


def variant_label(scale: float, offset: float) -> str:
    label = "randn" if scale == 1 else f"randn*{scale:g}"
    return label + (f"{offset:+g}" if offset else "")


def _with_batch(inputs: tuple, n: int, gen: torch.Generator, scale: float = 1.0, offset: float = 0.0):
    """``(inputs, label)``: random floating inputs of batch ``n`` (randn * scale + offset)."""
    out = []
    if any(x.dtype == torch.float16 for x in inputs):
        scale = min(scale, FP16_MAX_SCALE)
    for x in inputs:
        if x.is_floating_point():
            y = torch.randn((n,) + tuple(x.shape[1:]), generator=gen, dtype=torch.float32) * scale + offset
            y = y.to(x.dtype)
        else:  # integer inputs: reuse real rows so the values stay valid
            y = x[torch.randint(0, x.shape[0], (n,), generator=gen)]
        out.append(y)
    return tuple(out), variant_label(scale, offset)


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
        inf_r = np.isinf(r64)
        if not np.array_equal(inf_r, np.isinf(g64)) or not np.array_equal(r64[inf_r], g64[inf_r]):
            worst.update(ok=False, why=f"output {i}: infinities differ", max_abs_err=float("inf"))
            continue
        finite = ~(nan_r | inf_r)
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
    ``model`` with ``example_inputs``, random inputs of several magnitudes (INPUT_VARIANTS) and, if the
    batch axis is dynamic, random inputs at two other batch sizes.  ``model`` is never modified."""
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
    n0 = example_inputs[0].shape[0] if example_inputs[0].dim() else 1
    batches = [(example_inputs, "example")]
    if dynamic_batch:
        batches += [_with_batch(example_inputs, n, gen) for n in other_batch_sizes(n0)]
    if any(x.is_floating_point() for x in example_inputs) and example_inputs[0].dim():
        batches += [_with_batch(example_inputs, n0, gen, sc, off) for sc, off in INPUT_VARIANTS]
    result = VerifyResult(ok=True, max_abs_err=0.0, max_rel_err=0.0)
    for inputs, label in batches:
        with torch.no_grad():
            ref = _flatten(ref_model(*inputs))
        feeds = {n: x.detach().cpu().numpy() for n, x in zip(names, inputs)}
        try:
            got = sess.run(None, feeds)
        except Exception as e:
            got, cmp = None, {"ok": False, "why": f"ONNX Runtime failed: {first_line(e)}",
                              "max_abs_err": float("inf"), "max_rel_err": float("inf")}
        if got is not None:
            cmp = compare(ref, got)
        run = {"batch": int(inputs[0].shape[0]) if inputs[0].dim() else 1, "inputs": label, **cmp}
        _add_run(result, run)
    if result.ok:
        result.message = (f"ONNX Runtime matches PyTorch on {_describe(result.runs)} "
                          f"(max abs err {result.max_abs_err:.3g}, max rel err {result.max_rel_err:.3g})")
    return result


def _add_run(result: VerifyResult, run: dict) -> None:
    result.runs.append(run)
    result.max_abs_err = max(result.max_abs_err, run["max_abs_err"])
    result.max_rel_err = max(result.max_rel_err, run["max_rel_err"])
    if not run["ok"]:
        result.ok = False
        result.message = result.message or f"batch {run['batch']}, {run['inputs']} inputs: {run['why']}"


def _describe(runs: list) -> str:
    sizes = sorted({r["batch"] for r in runs})
    kinds = list(dict.fromkeys(r["inputs"] for r in runs))
    return f"{len(runs)} input sets (batch sizes {sizes}; inputs {', '.join(kinds)})"


def random_feeds(sess, batch: int = 2, seed: int = 0, shape=None, scale: float = 1.0, offset: float = 0.0):
    """Random inputs for an ONNX session (randn * scale + offset for floating inputs); a symbolic batch
    axis becomes ``batch``.  Other symbolic dims cannot be guessed: ``shape`` (the first input's shape)
    must be given, else ExportError says so."""
    rng = np.random.default_rng(seed)
    feeds = {}
    types = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
    for k, inp in enumerate(sess.get_inputs()):
        if shape is not None and k == 0:
            dims = list(shape)
        else:
            free = [d for j, d in enumerate(inp.shape) if j > 0 and not isinstance(d, int)]
            if free:
                hint = ("pass its shape with --input-shape (e.g. 1,3,224,224)" if k == 0 else
                        "only the first input's shape can be given (--input-shape)")
                raise ExportError(f"input {inp.name!r} has dynamic dimensions {list(inp.shape)} besides the "
                                  f"batch axis, so random test inputs cannot be made: {hint}")
            dims = [d if isinstance(d, int) else batch for d in inp.shape]
        dt = types.get(inp.type)
        if dt is None:
            raise ExportError(f"input '{inp.name}' has unsupported type {inp.type}")
        if np.issubdtype(dt, np.floating):
            sc = min(scale, FP16_MAX_SCALE) if dt == np.float16 else scale
            x = rng.standard_normal(dims) * sc + offset
        else:
            x = rng.integers(0, 2, dims)
        feeds[inp.name] = x.astype(dt)
    return feeds


def verify_onnx_pair(original, folded, batch_sizes=(1, 3), shape=None) -> VerifyResult:
    """Compare two ONNX models (before/after folding) with ONNX Runtime on the same random inputs: at
    each batch size (one run when the batch is fixed or ``shape`` is given), then at several
    magnitudes (INPUT_VARIANTS)."""
    a, b = _session(original), _session(folded)
    result = VerifyResult(ok=True, max_abs_err=0.0, max_rel_err=0.0)
    dynamic = _is_dynamic_batch(a)
    sizes = batch_sizes if dynamic and shape is None else (batch_sizes[0],)
    top = FP16_MAX_SCALE if any(i.type == "tensor(float16)" for i in a.get_inputs()) else float("inf")
    plan = [(n, 1.0, 0.0) for n in sizes] + [(sizes[0], min(sc, top), off) for sc, off in INPUT_VARIANTS]
    for i, (n, scale, offset) in enumerate(plan):
        feeds = random_feeds(a, batch=n, seed=i, shape=shape, scale=scale, offset=offset)
        try:
            ref = [torch.from_numpy(np.asarray(o)) for o in a.run(None, feeds)]
        except Exception as e:  # noqa: BLE001 - e.g. a wrong --input-shape: the caller's mistake
            shapes = ", ".join("x".join(map(str, f.shape)) for f in feeds.values())
            raise ExportError(f"ONNX Runtime cannot run the input model on inputs of shape {shapes}: "
                              f"{first_line(e)}") from e
        try:
            cmp = compare(ref, b.run(None, feeds))
        except Exception as e:  # noqa: BLE001 - the folded model fails where the original runs
            cmp = {"ok": False, "why": f"ONNX Runtime failed on the folded model: {first_line(e)}",
                   "max_abs_err": float("inf"), "max_rel_err": float("inf")}
        first = next(iter(feeds.values())) if feeds else np.zeros(())
        batch = int(first.shape[0]) if first.ndim else 1
        _add_run(result, {"batch": batch, "inputs": variant_label(scale, offset), **cmp})
    if result.ok:
        result.message = (f"folded model matches the input model on {_describe(result.runs)} "
                          f"(max abs err {result.max_abs_err:.3g}, max rel err {result.max_rel_err:.3g})")
    return result
