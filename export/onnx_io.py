"""Export a PyTorch model to a folded, checked and verified ONNX file, written atomically."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field

import onnx
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import ExportError, FoldError, VerificationError
from .fold_module import check_eval, fold_batchnorm
from .onnx_fold import fold_onnx
from .report import FoldReport
from .verify import VerifyResult, verify_onnx

# protobuf cannot serialize a message of 2 GiB or more
MAX_PROTO_BYTES = 2**31 - 1


class EvalBatchNorm(_BatchNorm):
    """Plain torch BN used in the export copy in place of BN subclasses (tritonbn, SyncBatchNorm),
    so the ONNX export never depends on custom kernels or process groups."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


_TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def plain_torch_bn(model: nn.Module) -> nn.Module:
    """Replace (in place, on a copy the caller owns) every non-torch BN by an equivalent torch BN."""
    for name, m in list(model.named_modules()):
        if not isinstance(m, _BatchNorm) or type(m) in _TORCH_BN + (EvalBatchNorm,):
            continue
        cls = next((c for c in _TORCH_BN if isinstance(m, c)), EvalBatchNorm)
        ref = m.running_mean if m.running_mean is not None else m.weight
        new = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                  device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
        new.load_state_dict(m.state_dict())
        new.train(m.training)
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
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "path": self.path, "exporter": self.exporter, "opset": self.opset,
            "dynamic_batch": self.dynamic_batch, "nodes_exported": self.nodes_exported,
            "nodes_final": self.nodes_final, "notes": self.notes,
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


def _as_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not all(
        isinstance(x, torch.Tensor) for x in example_inputs
    ):
        raise ExportError("example_inputs must be a tensor or a tuple of tensors")
    return tuple(example_inputs)


def _export_dynamo(model, args, dynamic_batch, opset, optimize) -> onnx.ModelProto:
    dyn = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dyn = tuple({0: batch} for _ in args)
    kw = {"opset_version": opset} if opset else {}
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)  # silence "torchvision is not installed" and similar chatter
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=dyn, optimize=optimize,
                                     external_data=False, verbose=False, **kw)
    finally:
        log.setLevel(level)
    return prog.model_proto


class _Wrapper(nn.Module):
    """Hides an FX GraphModule from the TorchScript exporter, which mistakes its ``.graph`` for a
    TorchScript graph."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return self.inner(*args)


def _export_torchscript(model, args, dynamic_batch, opset) -> onnx.ModelProto:
    buf = io.BytesIO()
    model = _Wrapper(model).eval()
    names = [f"input_{i}" for i in range(len(args))]
    axes = {n: {0: "batch"} for n in names} if dynamic_batch else None
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, buf, dynamo=False, input_names=names, dynamic_axes=axes,
                          opset_version=opset or 17, do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


def export_model_proto(model, args, dynamic_batch=True, opset=None, optimize=True):
    """``(proto, exporter_name, notes)``: dynamo exporter first, TorchScript exporter as fallback."""
    notes = []
    # torch.export specializes a size-1 dim, so trace with batch 2 when the batch axis is dynamic
    if dynamic_batch and args[0].shape[0] == 1:
        args = tuple(torch.cat([x, x]) for x in args)
    try:
        return _export_dynamo(model, args, dynamic_batch, opset, optimize), "dynamo", notes
    except Exception as e:  # noqa: BLE001 - try the other exporter, keep the reason
        notes.append(f"dynamo exporter failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                     "used the TorchScript exporter")
    try:
        return _export_torchscript(model, args, dynamic_batch, opset), "torchscript", notes
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed: {notes[0]}; TorchScript exporter: "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from e


def write_atomic(path: str, data: bytes, check=None) -> None:
    """Write ``data`` next to ``path`` and rename it into place; ``check(tmp_path)`` may raise to
    abort.  On any failure no temp file is left and an existing ``path`` is untouched."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def serialize(proto: onnx.ModelProto) -> bytes:
    if proto.ByteSize() >= MAX_PROTO_BYTES:
        raise ExportError("the ONNX model is 2 GiB or larger; external-data export is not supported")
    return proto.SerializeToString()


def export_onnx(model: nn.Module, example_inputs, path: str, fold: bool = True, dynamic_batch: bool = True,
                opset: int | None = None, verify: bool = True) -> ExportResult:
    """Fold BN (module pass), export, fold again (ONNX pass), check, verify, write ``path`` atomically.

    ``model`` is never modified.  Raises FoldError for a training-mode model, ExportError when the
    export or the checker fails and VerificationError (with ``.check``) when ONNX Runtime disagrees
    with PyTorch; in all these cases ``path`` is not written.  ``fold=False`` exports without any
    folding of ours (the exporter's own optimizer still runs), e.g. as a baseline.
    """
    if not isinstance(model, nn.Module):
        raise ExportError(f"expected a torch.nn.Module, got {type(model).__name__}")
    args = _as_tuple(example_inputs)
    check_eval(model)
    try:
        work = copy.deepcopy(model)
    except Exception as e:
        raise ExportError(f"cannot deep-copy the model ({type(e).__name__}: {e})") from e
    module_report = None
    if fold:
        work, module_report = fold_batchnorm(work, args)
    work = plain_torch_bn(work).eval()
    proto, exporter, notes = export_model_proto(work, args, dynamic_batch, opset)
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
        raise ExportError(f"onnx.checker rejected the exported model: {e}") from e
    data = serialize(proto)
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    result = ExportResult(os.fspath(path), exporter, opset_used, dynamic_batch, module_report, onnx_report,
                          None, nodes_exported, len(proto.graph.node), notes)

    def check(tmp):
        if verify:
            result.check = verify_onnx(tmp, model, args, dynamic_batch)
            if not result.check.ok:
                raise VerificationError(f"verification failed: {result.check.message}", result.check)

    write_atomic(os.fspath(path), data, check)
    return result
