"""``tritonbn-export`` / ``python -m tritonbn.export``: fold BatchNorm, export to ONNX and verify."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from .errors import ExportError, TritonbnExportError, VerificationError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tritonbn-export",
        description="Fold BatchNorm into neighbouring layers, export to ONNX and verify the result "
        "against PyTorch with ONNX Runtime.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="PKG.MODULE:FACTORY", help="callable that returns the model")
    src.add_argument("--onnx-in", metavar="FILE", help="fold an existing ONNX file")
    src.add_argument("--demo", action="store_true", help="train, fold, export and verify a small ResNet")
    p.add_argument("--checkpoint", help="state_dict to load into the model (torch.load weights_only=True)")
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224")
    p.add_argument("--eval", action="store_true",
                   help="call model.eval() first (otherwise a training-mode model is refused)")
    p.add_argument("-o", "--output", help="output ONNX file")
    p.add_argument("--report", help="write the fold/verification report as JSON here")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-dynamic-batch", action="store_true", help="export with a fixed batch size")
    p.add_argument("--no-fold", action="store_true", help="export without folding (baseline)")
    return p


def _shape(text: str | None) -> tuple[int, ...]:
    if not text:
        raise ExportError("--input-shape is required with --model (e.g. --input-shape 1,3,224,224)")
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise ExportError(f"bad --input-shape {text!r}: expected comma-separated integers") from None
    if not shape or any(d <= 0 for d in shape):
        raise ExportError(f"bad --input-shape {text!r}: dimensions must be positive")
    return shape


def load_factory_model(spec: str, checkpoint: str | None = None):
    """Build the model from ``pkg.module:factory`` and optionally load a state_dict."""
    import torch

    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ExportError(f"--model must look like pkg.module:factory, got {spec!r}")
    try:
        obj = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's factory being unimportable
        raise ExportError(f"cannot import {mod_name!r}: {type(e).__name__}: {e}") from e
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ExportError(f"{mod_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ExportError(f"{spec} is not callable")
    try:
        model = obj()
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{spec}() failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    if checkpoint:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"cannot load checkpoint {checkpoint!r}: {type(e).__name__}: {e}") from e
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        try:
            model.load_state_dict(state)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"checkpoint does not match the model: {str(e).splitlines()[0]}") from e
    return model


def _write_report(path: str | None, data: dict) -> None:
    if path:
        from .onnx_io import write_atomic

        write_atomic(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def _run_model(args) -> int:
    import torch

    from .onnx_io import export_onnx

    if not args.output:
        raise ExportError("-o/--output is required")
    shape = _shape(args.input_shape)
    model = load_factory_model(args.model, args.checkpoint)
    if args.eval:
        model.eval()
    ref = next(iter(model.parameters()), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    result = export_onnx(model, (x,), args.output, fold=not args.no_fold,
                         dynamic_batch=not args.no_dynamic_batch, opset=args.opset)
    print(result.format())
    _write_report(args.report, result.to_dict())
    return 0


def _run_onnx(args) -> int:
    import onnx

    from .onnx_fold import fold_onnx
    from .onnx_io import serialize, write_atomic
    from .verify import verify_onnx_pair

    if not args.output:
        raise ExportError("-o/--output is required")
    try:
        with open(args.onnx_in, "rb") as f:
            proto = onnx.load_from_string(f.read())
        onnx.checker.check_model(proto)
        if not proto.graph.node:
            raise ValueError("the graph has no nodes")
    except OSError as e:
        raise ExportError(f"cannot read {args.onnx_in!r}: {e.strerror}") from e
    except Exception as e:  # noqa: BLE001 - protobuf DecodeError, checker errors, ...
        raise ExportError(f"{args.onnx_in!r} is not a valid ONNX model: {str(e).splitlines()[0]}") from e
    folded, report = fold_onnx(proto)
    shape = _shape(args.input_shape) if args.input_shape else None
    check = verify_onnx_pair(proto, folded, shape=shape)
    print(report.format())
    if not check.ok:
        raise VerificationError(f"verification failed: {check.message}", check)
    write_atomic(args.output, serialize(folded))
    print(f"verified: {check.message}\nwrote {args.output}")
    _write_report(args.report, {"onnx_report": report.to_dict(), "verification": check.to_dict()})
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.demo:
            from .demo import run_demo

            return run_demo(output=args.output, report_path=args.report, opset=args.opset)
        return _run_model(args) if args.model else _run_onnx(args)
    except TritonbnExportError as e:
        print(f"tritonbn-export: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - one line for users; TRITONBN_EXPORT_DEBUG=1 for the traceback
        if os.environ.get("TRITONBN_EXPORT_DEBUG"):
            raise
        print(f"tritonbn-export: internal error: {type(e).__name__}: {e} "
              "(set TRITONBN_EXPORT_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
