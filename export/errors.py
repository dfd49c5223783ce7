"""Error types of the export tool; the CLI maps them to one-line messages and exit codes."""

from __future__ import annotations


class TritonbnExportError(Exception):
    """Base class of every error the export tool raises on purpose."""

    exit_code = 1


class FoldError(TritonbnExportError):
    """The model cannot be folded at all (e.g. it is in training mode)."""


class ExportError(TritonbnExportError):
    """Loading, exporting or writing the model failed."""


class VerificationError(TritonbnExportError):
    """ONNX Runtime and PyTorch disagree on the exported model."""

    exit_code = 2

    def __init__(self, message: str, check=None):
        super().__init__(message)
        self.check = check
