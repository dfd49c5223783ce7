"""Export a PyTorch model to a folded, checked and verified ONNX file, written atomically."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, field

import onnx
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tritonbn import modules as _tbn
from tritonbn import sync_batchnorm as _tsync

from .errors import (
    ExporterFallbackWarning,
    ExportError,
    FoldError,
    VerificationError,
    clean_text,
    first_line,
    one_line,
)
from .fold_module import as_input_tuple, check_eval, fold_batchnorm
from .fused_bn import is_fused, torch_class
from .onnx_fold import fold_onnx
from .outputs import StagedWrites, check_output_paths, write_atomic  # noqa: F401 - write_atomic: kept API
from .report import FoldReport
from .verify import VerifyResult, batched_inputs, verify_onnx

# protobuf cannot serialize a message of 2 GiB or more
MAX_PROTO_BYTES = 2**31 - 1
MIN_OPSET = 7
# torch's dynamo exporter writes opset 18 and converts upwards; converting down fails for common ops
# (Relu, Pad, ReduceMean), so lower opsets come from the TorchScript exporter, which writes 7..20.
DYNAMO_MIN_OPSET = 18
TORCHSCRIPT_MAX_OPSET = 20
TORCHSCRIPT_DEFAULT_OPSET = 17


class EvalBatchNorm(_BatchNorm):
    """Plain torch BN used in the export copy in place of BN subclasses whose forward is tritonbn's or
    SyncBatchNorm's, so the ONNX export never depends on custom kernels or process groups."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


_TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# forwards that compute torch's eval BN with other code (tritonbn's kernels, SyncBatchNorm's process
# group); a BN with torch's own forward exports as it is, one with any other forward is the user's code
_SWAPPED_FORWARDS = (_tbn.BatchNorm2d.forward, nn.SyncBatchNorm.forward, _tsync.SyncBatchNorm.forward)


def _torch_replacement(m: nn.Module):
    """The torch class to export ``m`` with, or None to export ``m`` through its own forward."""
    if not isinstance(m, _BatchNorm) or "forward" in m.__dict__:
        return None
    if is_fused(m):
        return torch_class(m)  # None when it overrides BatchNormAct's forward
    if type(m).forward not in _SWAPPED_FORWARDS:
        return None
    return next((c for c in _TORCH_BN if isinstance(m, c)), EvalBatchNorm)


def plain_torch_bn(model: nn.Module) -> nn.Module:
    """Replace (in place, on a copy the caller owns) every BN whose forward is tritonbn's or SyncBatchNorm's
    by an equivalent torch BN holding its standard state (a subclass's extra state is not used by that
    forward); a fused tritonbn BatchNormAct by torch BN + add + activation.  Any other BN (torch's own, or
    a subclass with its own forward) is exported through its own forward."""
    for name, m in list(model.named_modules()):
        cls = _torch_replacement(m)
        if cls is None:
            continue
        ref = m.running_mean if m.running_mean is not None else m.weight
        new = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                  device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
        state = m.state_dict()
        new.load_state_dict({k: state[k] for k in new.state_dict()})
        new.train(m.training)
        if is_fused(m):
            new.activation = m.activation
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model


@dataclass
class ExportResult:
    path: str
    exporter: str  # "dynamo" or "torchscript"
    opset: int
    dynamic_batch: bool
    module_report: FoldReport | None
    onnx_report: FoldReport | None
    check: VerifyResult | None
    nodes_exported: int = 0  # ONNX nodes straight out of torch.onnx.export
    nodes_final: int = 0
    notes: list[str] = field(default_factory=list)  # which exporter ran and why, allowed trace warnings
    exporter_errors: dict = field(default_factory=dict)  # full (ANSI-free) text of each exporter failure

    def to_dict(self) -> dict:
        return {
            "path": self.path, "exporter": self.exporter, "opset": self.opset,
            "dynamic_batch": self.dynamic_batch, "nodes_exported": self.nodes_exported,
            "nodes_final": self.nodes_final, "notes": self.notes, "exporter_errors": self.exporter_errors,
            "module_report": self.module_report.to_dict() if self.module_report else None,
            "onnx_report": self.onnx_report.to_dict() if self.onnx_report else None,
            "verification": self.check.to_dict() if self.check else None,
        }

    def format(self) -> str:
        lines = [f"exported {self.path} (exporter={self.exporter}, opset={self.opset}, "
                 f"dynamic batch={self.dynamic_batch}, nodes {self.nodes_exported} -> {self.nodes_final})"]
        lines += [r.format() for r in (self.module_report, self.onnx_report) if r is not None]
        if self.check is not None:
            lines.append(("verified: " if self.check.ok else "VERIFICATION FAILED: ") + self.check.message)
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = format


def failure_reason(exc: BaseException) -> str:
    """One readable line for an exporter failure, without truncation: the exception's type and message;
    for torch.onnx's long reports, their exception summary and the model code that raised it."""
    text = clean_text(str(exc))
    summary = re.search(r"## Exception summary\s*\n(.*?)(?:\n\s*\n|\Z)", text, re.S)
    head = summary.group(1) if summary else f"{type(exc).__name__}: {text}"
    head = re.sub(r"<class '(?:[\w]+\.)*(\w+)'>", r"\1", head)
    reason = " ".join(head.split())
    where = re.search(r"The following call raised this error:\n(.*?)(?:\n\s*\n|\Z)", text, re.S)
    if where:
        reason += " (raised at " + " ".join(where.group(1).split()) + ")"
    return reason


def check_opset(opset) -> None:
    if opset is None:
        return
    top = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise ExportError(f"opset must be an integer, got {opset!r}")
    if not MIN_OPSET <= opset <= top:
        raise ExportError(f"opset {opset} is not supported: choose {MIN_OPSET} to {top} "
                          f"(the newest the installed onnx {onnx.__version__} knows)")


@contextlib.contextmanager
def _quiet_exporter():
    """Keep the exporters' chatter (progress prints, logger warnings, graphs dumped to stderr on
    failure) off the console and record Python warnings: what matters is reported by us."""
    roots = ("torch", "onnxscript", "onnx_ir")
    loggers = [logging.getLogger(n) for n in roots]
    loggers += [lg for name, lg in list(logging.root.manager.loggerDict.items())
                if isinstance(lg, logging.Logger) and name.split(".")[0] in roots]
    levels = [(lg, lg.level) for lg in loggers]
    for lg, _ in levels:
        lg.setLevel(logging.CRITICAL + 1)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(sink), \
                contextlib.redirect_stderr(sink):
            warnings.simplefilter("always")
            yield caught
    finally:
        for lg, level in levels:
            lg.setLevel(level)


def _export_dynamo(model, args, dynamic_batch, opset, optimize, batched) -> onnx.ModelProto:
    dyn = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dyn = tuple({0: batch} if b else None for b in batched)
    kw = {"opset_version": opset} if opset else {}
    with _quiet_exporter():
        prog = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=dyn, optimize=optimize,
                                 external_data=False, verbose=False, **kw)
    return prog.model_proto


class _Wrapper(nn.Module):
    """Hides an FX GraphModule from the TorchScript exporter, which mistakes its ``.graph`` for a
    TorchScript graph."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return self.inner(*args)


def _export_torchscript(model, args, dynamic_batch, opset, batched):
    """``(proto, trace_warnings)``; each warning as "file:line: first sentence of the message"."""
    buf = io.BytesIO()
    model = _Wrapper(model).eval()
    names = [f"input_{i}" for i in range(len(args))]
    axes = {n: {0: "batch"} for n, b in zip(names, batched) if b} if dynamic_batch else None
    with _quiet_exporter() as caught:
        torch.onnx.export(model, args, buf, dynamo=False, input_names=names, dynamic_axes=axes,
                          opset_version=opset or TORCHSCRIPT_DEFAULT_OPSET, do_constant_folding=True)
    found = []
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning):
            first = " ".join(str(w.message).split()).split(". ")[0].rstrip(".")
            text = f"{w.filename}:{w.lineno}: {first}"
            if text not in found:
                found.append(text)
    return onnx.load_from_string(buf.getvalue()), found


def export_model_proto(model, args, dynamic_batch=True, opset=None, optimize=True,
                       allow_trace_warnings=False):
    """``(proto, exporter_name, notes, errors)``: the dynamo exporter, or the TorchScript exporter when
    the requested opset is below 18 or the dynamo exporter fails.  A TorchScript trace that warns
    (data-dependent Python control flow, tensors turned into constants) is refused unless
    ``allow_trace_warnings``: such a graph may be right only for the example inputs."""
    check_opset(opset)
    notes: list[str] = []
    errors: dict = {}
    batched = batched_inputs(args)  # decided on the example inputs, before any is doubled
    # torch.export specializes a size-1 dim, so trace with batch 2 when the batch axis is dynamic
    if dynamic_batch and args[0].shape[0] == 1:
        args = tuple(torch.cat([x, x]) if b else x for x, b in zip(args, batched))
    if opset is not None and opset < DYNAMO_MIN_OPSET:
        why = f"opset {opset} was requested and the dynamo exporter writes opset {DYNAMO_MIN_OPSET} or later"
    else:
        try:
            proto = _export_dynamo(model, args, dynamic_batch, opset, optimize, batched)
            return proto, "dynamo", notes, errors
        except Exception as e:  # noqa: BLE001 - try the other exporter, keep the reason
            errors["dynamo"] = clean_text(f"{type(e).__name__}: {e}")
            why = f"the dynamo exporter failed: {failure_reason(e)}"
        if opset is not None and opset > TORCHSCRIPT_MAX_OPSET:
            raise ExportError(f"{why}; the TorchScript exporter cannot write opset {opset} "
                              f"(it writes at most {TORCHSCRIPT_MAX_OPSET})")
        warnings.warn(f"{why}; used the TorchScript exporter instead", ExporterFallbackWarning, stacklevel=3)
    notes.append(f"TorchScript exporter used because {why}")
    try:
        proto, trace_warnings = _export_torchscript(model, args, dynamic_batch, opset, batched)
    except Exception as e:
        errors["torchscript"] = clean_text(f"{type(e).__name__}: {e}")
        raise ExportError(f"torch.onnx.export failed: TorchScript exporter used because {why}; "
                          f"it failed too: {failure_reason(e)}") from e
    if trace_warnings:
        listed = "; ".join(trace_warnings)
        if not allow_trace_warnings:
            raise ExportError(
                f"export refused: the TorchScript exporter (used because {why}) warned that its trace may "
                f"be wrong for other inputs: {listed}. Make the model exportable by torch.export (no "
                "Python control flow on tensor values), or pass allow_trace_warnings=True "
                "(--allow-trace-warnings) if these values really are constant")
        notes.append(f"trace warnings allowed by the caller: {listed}")
    return proto, "torchscript", notes, errors


def external_data_files(proto: onnx.ModelProto, base_dir: str) -> list[str]:
    """The files ``proto``'s tensors keep their data in, resolved against ``base_dir`` (the model file's
    directory, as onnx.load does)."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    return sorted({os.path.join(base_dir, ExternalDataInfo(t).location) for t in _get_all_tensors(proto)
                   if uses_external_data(t)})


def load_onnx_file(path: str) -> tuple[onnx.ModelProto, list[str]]:
    """``(proto, data_files)``: the ONNX model at ``path`` with its external data, if any, read into it
    from the files next to it (``data_files``), so it serializes self-contained wherever it is written.
    Raises ExportError (one line) when the file or its data cannot be read."""
    try:
        with open(path, "rb") as f:
            proto = onnx.load_from_string(f.read())
        if not proto.graph.node:
            raise ValueError("the graph has no nodes")
    except OSError as e:
        raise ExportError(f"cannot read {path!r}: {e.strerror}") from e
    except Exception as e:  # noqa: BLE001 - protobuf DecodeError, ...
        raise ExportError(f"{path!r} is not a valid ONNX model: {first_line(e)}") from e
    base = os.path.dirname(os.path.abspath(path))
    files = external_data_files(proto, base)
    if files:
        try:
            onnx.external_data_helper.load_external_data_for_model(proto, base)
        except Exception as e:  # noqa: BLE001 - a missing or short data file, a location outside `base`
            raise ExportError(f"cannot read the external data of {path!r}: {type(e).__name__}: "
                              f"{first_line(e)}") from e
        if proto.ByteSize() >= MAX_PROTO_BYTES:
            raise ExportError(f"{path!r} with its external data is 2 GiB or larger; "
                              "external-data output is not supported")
    return proto, files


def serialize(proto: onnx.ModelProto) -> bytes:
    if proto.ByteSize() >= MAX_PROTO_BYTES:
        raise ExportError("the ONNX model is 2 GiB or larger; external-data export is not supported")
    return proto.SerializeToString()


def _shapes(args) -> str:
    return ", ".join("x".join(str(d) for d in x.shape) or "scalar" for x in args)


def run_example(model: nn.Module, args: tuple) -> None:
    """Raise ExportError (one line) when the model fails on the example inputs (a wrong input shape is
    the user's mistake, not an internal error)."""
    try:
        with torch.no_grad():
            model(*args)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"the model fails on example inputs of shape {_shapes(args)}: "
                          f"{type(e).__name__}: {first_line(e)}") from e


def export_onnx(model: nn.Module, example_inputs, path: str, fold: bool = True, dynamic_batch: bool = True,
                opset: int | None = None, verify: bool = True, allow_trace_warnings: bool = False,
                report_path: str | None = None) -> ExportResult:
    """Fold BN (module pass), export, fold again (ONNX pass), check, verify, write ``path`` atomically.

    ``example_inputs``: a tensor, or a tuple or list of tensors; the batch is axis 0 of the first one and
    of every other one whose first dimension equals the first one's (``verify.batched_inputs``): only
    those get the dynamic batch axis, the others keep their shape.  ``model`` is never modified.  Raises
    FoldError for a training-mode model, ExportError when the export or the checker fails (or a path
    cannot be written: all paths are checked before the export starts) and VerificationError (with
    ``.check``) when ONNX Runtime disagrees with PyTorch; in all these cases nothing is written.
    ``fold=False`` exports without any folding of ours (the exporter's own optimizer still runs), e.g.
    as a baseline.  ``opset`` is produced exactly or refused.  The TorchScript exporter is used when the
    dynamo exporter fails (with an ExporterFallbackWarning) and for an opset below 18 (as asked: a note in
    the result, no warning); a trace that warns about data-dependent values is refused unless
    ``allow_trace_warnings``.
    ``report_path``: also write ``result.to_dict()`` as JSON there (both files or neither).
    """
    if not isinstance(model, nn.Module):
        raise ExportError(f"expected a torch.nn.Module, got {type(model).__name__}")
    args = as_input_tuple(example_inputs, ExportError, tensors_only=True)
    if dynamic_batch and (not args or not args[0].dim()):
        raise ExportError("dynamic_batch needs a first example input with a batch axis (dim 0); "
                          "pass dynamic_batch=False (--no-dynamic-batch)")
    check_opset(opset)
    check_output_paths({"path": path, "report_path": report_path})
    check_eval(model)
    try:
        work = copy.deepcopy(model)
    except Exception as e:
        raise ExportError(f"cannot deep-copy the model ({type(e).__name__}: {e})") from e
    run_example(work, args)
    module_report = None
    if fold:
        work, module_report = fold_batchnorm(work, args)
    work = plain_torch_bn(work).eval()
    proto, exporter, notes, errors = export_model_proto(work, args, dynamic_batch, opset,
                                                        allow_trace_warnings=allow_trace_warnings)
    nodes_exported = len(proto.graph.node)
    onnx_report = None
    if fold:
        try:
            proto, onnx_report = fold_onnx(proto)
        except FoldError as e:
            raise ExportError(str(e)) from e
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        raise ExportError(f"onnx.checker rejected the exported model: {one_line(str(e))}") from e
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset is not None and opset_used != opset:
        raise ExportError(f"the {exporter} exporter wrote opset {opset_used}, not the requested {opset}")
    data = serialize(proto)
    result = ExportResult(os.fspath(path), exporter, opset_used, dynamic_batch, module_report, onnx_report,
                          None, nodes_exported, len(proto.graph.node), notes, errors)

    def check(tmp):
        if verify:
            result.check = verify_onnx(tmp, model, args, dynamic_batch)
            if not result.check.ok:
                raise VerificationError(f"verification failed: {result.check.message}", result.check)

    with StagedWrites() as out:
        out.add(path, data, check)
        if report_path is not None:
            out.add(report_path, report_json(result.to_dict()))
        out.commit()
    return result


def report_json(data: dict) -> bytes:
    return (json.dumps(data, indent=2, default=str) + "\n").encode()
