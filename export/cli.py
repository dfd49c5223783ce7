"""``tritonbn-export`` / ``python -m tritonbn.export``: fold BatchNorm, export to ONNX and verify."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings

from .errors import (
    ExporterFallbackWarning,
    ExportError,
    TritonbnExportError,
    VerificationError,
    first_line,
    one_line,
)


class _Parser(argparse.ArgumentParser):
    """A usage error is a user error like the others: one line and exit code 1 (argparse's 2 is the
    code of a verification failure here)."""

    def error(self, message: str):
        raise ExportError(f"{message} (see --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
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
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset, produced exactly or refused (default: the exporter's)")
    p.add_argument("--allow-trace-warnings", action="store_true",
                   help="accept a TorchScript trace that warns about data-dependent values (only if those "
                   "values really are constant; the trace is right only for inputs like the example)")
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


@contextlib.contextmanager
def _cwd_on_path():
    """``--model pkg.module:factory`` imports from the current directory, as ``python -m`` does (a
    console script's sys.path starts with its bin/ directory instead)."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def load_factory_model(spec: str, checkpoint: str | None = None):
    """Build the model from ``pkg.module:factory`` and optionally load a state_dict."""
    import torch

    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ExportError(f"--model must look like pkg.module:factory, got {spec!r}")
    try:
        with _cwd_on_path():
            obj = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's factory being unimportable
        raise ExportError(f"cannot import {mod_name!r}: {type(e).__name__}: {first_line(e)}") from e
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
        raise ExportError(f"{spec}() failed: {type(e).__name__}: {first_line(e)}") from e
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    if checkpoint:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except OSError as e:
            raise ExportError(f"cannot read checkpoint {checkpoint!r}: {e.strerror or first_line(e)}") from e
        except Exception as e:  # noqa: BLE001 - corrupt file, pickle refused by weights_only, ...
            raise ExportError(f"cannot load checkpoint {checkpoint!r} (not a torch.save file, or it holds "
                              f"more than tensors): {type(e).__name__}: {first_line(e)}") from e
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        try:
            model.load_state_dict(state)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"checkpoint does not match the model: {first_line(e)}") from e
    return model


# options that only --model uses; the others would silently ignore them
_MODEL_ONLY = {"--checkpoint": "checkpoint", "--input-shape": "input_shape", "--eval": "eval",
               "--no-fold": "no_fold", "--no-dynamic-batch": "no_dynamic_batch"}
_NOT_FOR = {"onnx_in": {"--opset": "opset", "--allow-trace-warnings": "allow_trace_warnings",
                        **{k: v for k, v in _MODEL_ONLY.items() if k != "--input-shape"}},
            "demo": _MODEL_ONLY}


def _refuse_unused_options(args) -> None:
    for mode, options in _NOT_FOR.items():
        if getattr(args, mode):
            given = [flag for flag, attr in options.items() if getattr(args, attr) not in (None, False)]
            if given:
                raise ExportError(f"{', '.join(given)} cannot be used with --{mode.replace('_', '-')}")


def _outputs(args) -> dict:
    return {"-o/--output": args.output, "--report": args.report}


def _inputs(args) -> dict:
    return {"--onnx-in": args.onnx_in, "--checkpoint": args.checkpoint}


def _run_model(args) -> int:
    import torch

    from .onnx_io import check_opset, export_onnx
    from .outputs import check_output_paths

    if not args.output:
        raise ExportError("-o/--output is required")
    shape = _shape(args.input_shape)
    check_opset(args.opset)
    check_output_paths(_outputs(args), _inputs(args))  # before the (possibly long) export
    model = load_factory_model(args.model, args.checkpoint)
    if args.eval:
        model.eval()
    ref = next(iter(model.parameters()), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    result = export_onnx(model, (x,), args.output, fold=not args.no_fold,
                         dynamic_batch=not args.no_dynamic_batch, opset=args.opset,
                         allow_trace_warnings=args.allow_trace_warnings, report_path=args.report)
    print(result.format())
    return 0


def _run_onnx(args) -> int:
    from .onnx_fold import fold_onnx
    from .onnx_io import load_onnx_file, report_json, serialize
    from .outputs import StagedWrites, check_output_paths, refuse_inputs
    from .verify import verify_onnx_pair

    if not args.output:
        raise ExportError("-o/--output is required")
    shape = _shape(args.input_shape) if args.input_shape else None
    check_output_paths(_outputs(args), _inputs(args))
    proto, data_files = load_onnx_file(args.onnx_in)
    refuse_inputs(_outputs(args), {"--onnx-in (its external data)": data_files})
    # onnx.checker is not asked about the input: ONNX Runtime runs models it rejects (e.g. graph
    # outputs without a shape); fold_onnx checks that folding adds no complaint of its own.
    folded, report = fold_onnx(proto)
    check = verify_onnx_pair(proto, folded, shape=shape)
    print(report.format())
    if not check.ok:
        raise VerificationError(f"verification failed: {check.message}", check)
    with StagedWrites() as out:
        out.add(args.output, serialize(folded))
        if args.report:
            data = {"onnx_report": report.to_dict(), "verification": check.to_dict()}
            out.add(args.report, report_json(data))
        out.commit()
    print(f"verified: {check.message}\nwrote {args.output}" + (f" and {args.report}" if args.report else ""))
    return 0


@contextlib.contextmanager
def _plain_fallback_warnings():
    """Say an exporter fallback in one plain line on stderr; other warnings are shown as usual."""
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ExporterFallbackWarning)
            yield
    finally:  # the catch_warnings block has ended: showwarning writes to stderr again
        for w in caught:
            if issubclass(w.category, ExporterFallbackWarning):
                print(f"tritonbn-export: warning: {one_line(str(w.message))}", file=sys.stderr)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
        _refuse_unused_options(args)
        with _plain_fallback_warnings(), _cwd_on_path() if args.model else contextlib.nullcontext():
            if args.demo:
                from .demo import run_demo

                return run_demo(output=args.output, report_path=args.report, opset=args.opset,
                                allow_trace_warnings=args.allow_trace_warnings)
            return _run_model(args) if args.model else _run_onnx(args)
    except TritonbnExportError as e:
        print(f"tritonbn-export: error: {one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - one line for users; TRITONBN_EXPORT_DEBUG=1 for the traceback
        if os.environ.get("TRITONBN_EXPORT_DEBUG"):
            raise
        print(f"tritonbn-export: internal error: {type(e).__name__}: {one_line(str(e))} "
              "(set TRITONBN_EXPORT_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
