"""Fold BatchNorm into neighbouring layers and export verified ONNX models.

Public API (imported lazily so ``import tritonbn.export`` stays cheap)::

    folded, report = fold_batchnorm(model)           # nn.Module -> new nn.Module
    proto, report = fold_onnx(onnx.load("m.onnx"))   # ModelProto -> new ModelProto
    result = export_onnx(model, example_inputs, "m.onnx")  # example_inputs: tensor, tuple or list
    check = verify_onnx("m.onnx", model, example_inputs)
"""

from __future__ import annotations

import importlib

_API = {
    "fold_batchnorm": "fold_module",
    "fold_onnx": "onnx_fold",
    "export_onnx": "onnx_io",
    "verify_onnx": "verify",
    "ExportResult": "onnx_io",
    "VerifyResult": "verify",
    "FoldReport": "report",
    "TritonbnExportError": "errors",
    "FoldError": "errors",
    "ExportError": "errors",
    "VerificationError": "errors",
    "ExporterFallbackWarning": "errors",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
