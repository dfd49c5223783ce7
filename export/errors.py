"""Error types of the export tool; the CLI maps them to one-line messages and exit codes."""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def clean_text(text: str) -> str:
    """``text`` without ANSI colour codes (torch colours some of its error messages)."""
    return _ANSI.sub("", text)


def one_line(text: str) -> str:
    return " ".join(clean_text(text).split())


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (torch's can run to many lines)."""
    return next((ln.strip() for ln in clean_text(str(e)).splitlines() if ln.strip()), type(e).__name__)


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


class ExporterFallbackWarning(UserWarning):
    """The TorchScript exporter was used instead of the dynamo exporter (the reason is in the message)."""
