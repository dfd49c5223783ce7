"""Check an exported ONNX file against the PyTorch model with ONNX Runtime (CPU, no graph optimizations)."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .errors import ExportError, first_line

# max |onnx - torch| must stay below REL_TOL[dtype] * max(1, scale), per channel (see channel_tolerances)
REL_TOL = {torch.float64: 1e-7, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# A channel's scale is its own peak |torch|, but never below this many ulps of the whole output's peak
# divided by REL_TOL: so its tolerance stays at least CHANNEL_FLOOR_ULPS ulps of the peak (see
# channel_tolerances).
CHANNEL_FLOOR_ULPS = 8


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


def _is_dynamic_batch(sess, batched=None) -> bool:
    """Whether every batched input (all when ``batched`` is None) has a symbolic first dimension."""
    ins = [i for k, i in enumerate(sess.get_inputs()) if batched is None or batched[k]]
    return bool(ins) and all(i.shape and not isinstance(i.shape[0], int) for i in ins)


def batched_inputs(inputs: tuple) -> tuple[bool, ...]:
    """Which example inputs carry the batch on axis 0: the first input (when it has a dimension) and
    every other input whose first dimension equals the first input's.  The others (e.g. a per-channel
    gain of shape [C]) are kept as given when the batch size is varied; an example batch size that no
    unbatched input has as its first dimension keeps the two apart."""
    if not inputs or not inputs[0].dim():
        return (False,) * len(inputs)
    n = inputs[0].shape[0]
    return tuple(k == 0 or (x.dim() > 0 and x.shape[0] == n) for k, x in enumerate(inputs))


# Besides the example inputs and random inputs at other batch sizes, random inputs of other magnitudes:
# a traced graph that baked in a data-dependent branch (``if x.abs().max() > 100``) or a value computed
# from the example usually disagrees with the model on one of them.  (scale, offset) of randn.
INPUT_VARIANTS = ((1e-3, 0.0), (1e3, 0.0), (1.0, 10.0))
FP16_MAX_SCALE = 1e2  # keeps randn * scale and what a layer makes of it finite in float16


def variant_label(scale: float, offset: float) -> str:
    label = "randn" if scale == 1 else f"randn*{scale:g}"
    return label + (f"{offset:+g}" if offset else "")


def _with_batch(inputs: tuple, n: int, gen: torch.Generator, scale: float = 1.0, offset: float = 0.0):
    """``(inputs, label)``: random floating inputs of batch ``n`` (randn * scale + offset); inputs without
    the batch (``batched_inputs``) are kept as given."""
    out = []
    if any(x.dtype == torch.float16 for x in inputs):
        scale = min(scale, FP16_MAX_SCALE)
    for x, batched in zip(inputs, batched_inputs(inputs)):
        if not batched:
            y = x
        elif x.is_floating_point():
            y = torch.randn((n,) + tuple(x.shape[1:]), generator=gen, dtype=torch.float32) * scale + offset
            y = y.to(x.dtype)
        else:  # integer inputs: reuse real rows so the values stay valid
            y = x[torch.randint(0, x.shape[0], (n,), generator=gen)]
        out.append(y)
    return tuple(out), variant_label(scale, offset)


def channel_tolerances(mag: np.ndarray, rel_tol: float, eps: float) -> np.ndarray:
    """Tolerance of each channel (axis 1; one value for outputs with fewer than 2 dims) of an output whose
    finite reference magnitudes are ``mag``: ``rel_tol * max(1, max|channel|, floor * max|output|)``.

    Per channel, so that a channel far below the output's peak (a small feature, a rare class) is checked
    at its own scale: against the peak, its sign could flip unnoticed.  The floor keeps rounding from
    failing: a channel computed from terms as large as the peak (e.g. a difference of large values) can
    be off by a few ulps of the peak, so no tolerance goes below CHANNEL_FLOOR_ULPS ulps of it
    (``floor = CHANNEL_FLOOR_ULPS * eps / rel_tol``: about 1e-2 in float32, whose REL_TOL is some
    1600 unit roundoffs, 2e-8 in float64; in float16/bfloat16, where REL_TOL is only 20 or 13 unit
    roundoffs, the floor reaches 1 and the check is the global one).  The absolute floor ``rel_tol``
    (``max(1, ...)``) is unchanged."""
    peak = float(mag.max(initial=0.0))
    floor = min(1.0, CHANNEL_FLOOR_ULPS * eps / rel_tol)
    per = per_channel_max(mag)
    return rel_tol * np.maximum(1.0, np.maximum(per, floor * peak))


def per_channel_max(a: np.ndarray) -> np.ndarray:
    """Max of ``a`` over every axis but 1 (the channel axis); ``[max(a)]`` for fewer than 2 dims."""
    if a.ndim < 2:
        return np.array([a.max(initial=0.0)])
    return np.moveaxis(a, 1, 0).reshape(a.shape[1], -1).max(axis=1, initial=0.0)


def compare(ref: list, got: list) -> dict:
    """Worst error over all outputs; ``ok`` follows the dtype-aware tolerance, per output channel."""
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
        diff = np.where(finite, np.abs(g64 - np.where(finite, r64, 0.0)), 0.0)
        mag = np.where(finite, np.abs(r64), 0.0)
        err = float(diff.max(initial=0.0))
        scale = float(mag.max(initial=0.0))
        rel = err / max(scale, 1e-30)
        worst["max_abs_err"] = max(worst["max_abs_err"], err)
        worst["max_rel_err"] = max(worst["max_rel_err"], rel)
        if not diff.size:
            continue
        rel_tol = REL_TOL.get(r.dtype, 1e-4)
        errs, tols = per_channel_max(diff), channel_tolerances(mag, rel_tol, torch.finfo(r.dtype).eps)
        c = int(np.argmax(errs / tols))
        if not errs[c] <= tols[c]:
            where = f"output {i}, channel {c}" if diff.ndim >= 2 else f"output {i}"
            worst.update(ok=False, why=f"{where}: max abs error {errs[c]:.3g} > tolerance {tols[c]:.3g}")
    return worst


def other_batch_sizes(n: int) -> list[int]:
    return [b for b in (1, 3, 5, 2) if b != n][:2]


def verify_onnx(onnx_model, model: torch.nn.Module, example_inputs, dynamic_batch: bool | None = None,
                seed: int = 0) -> VerifyResult:
    """Run ONNX Runtime on ``onnx_model`` (path or ModelProto) and PyTorch eval on a deep copy of
    ``model`` with ``example_inputs``, random inputs of several magnitudes (INPUT_VARIANTS) and, if the
    batch axis is dynamic, random inputs at two other batch sizes; inputs without the batch
    (``batched_inputs``) are kept as given.  ``model`` is never modified.  Raises ExportError (one line)
    when the model itself fails on some of these inputs."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    sess = _session(onnx_model)
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(example_inputs):
        raise ExportError(f"the ONNX model takes {len(names)} inputs, {len(example_inputs)} were given")
    if dynamic_batch is None:
        dynamic_batch = _is_dynamic_batch(sess, batched_inputs(example_inputs))
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
        try:
            with torch.no_grad():
                ref = _flatten(ref_model(*inputs))
        except Exception as e:  # noqa: BLE001 - e.g. an input taken for batched that is not
            shapes = ", ".join("x".join(map(str, x.shape)) or "scalar" for x in inputs)
            hint = "" if inputs is example_inputs else (
                "; inputs whose first dimension equals the first input's are taken as batched: use an "
                "example batch size no other input has")
            raise ExportError(f"the model fails on {label} inputs of shape {shapes} "
                              f"({type(e).__name__}: {first_line(e)}){hint}") from e
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
