"""No silently wrong exports: the TorchScript fallback is loud, a trace that warns is refused unless
allowed, verification tries inputs of several magnitudes, and the requested opset is produced or refused."""

import os
import warnings

import onnx
import pytest
import torch
import tritonbn.export.onnx_io as onnx_io
from export_models import DataDependent, ShapeConstant, TinyResNet, randomize_all
from torch import nn
from tritonbn.export import ExporterFallbackWarning, ExportError, VerificationError, export_onnx, verify_onnx
from tritonbn.export.cli import main

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _no_dynamo(reason="no dynamo today"):
    def broken(*a, **k):
        raise RuntimeError(reason)

    return broken


def test_data_dependent_branch_is_refused(tmp_path):
    """The issue's repro: exported as "verified" before, although ONNX ignores the branch."""
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="trace may be wrong") as err, \
            pytest.warns(ExporterFallbackWarning, match="dynamo exporter failed"):
        export_onnx(randomize_all(DataDependent()), (X,), str(path))
    msg = str(err.value)
    assert "x.abs().max() > 100" in msg  # where the dynamo exporter gave up
    assert "allow_trace_warnings=True" in msg and "\x1b[" not in msg
    assert not os.listdir(tmp_path)


def test_allowed_trace_is_still_checked_at_other_magnitudes(tmp_path):
    """Allowing the trace does not let it through: torch returns 0 on randn * 1000, ONNX does not."""
    with pytest.raises(VerificationError, match=r"randn\*1000"), pytest.warns(ExporterFallbackWarning):
        export_onnx(randomize_all(DataDependent()), (X,), str(tmp_path / "m.onnx"), allow_trace_warnings=True)
    assert not os.listdir(tmp_path)


def test_verify_tries_several_magnitudes(tmp_path):
    """An ONNX file that matches the model on randn inputs only (it lacks the branch) fails verification."""
    model = randomize_all(DataDependent())
    plain = nn.Sequential(model.conv, model.bn).eval()
    export_onnx(plain, (X,), str(tmp_path / "plain.onnx"))
    check = verify_onnx(str(tmp_path / "plain.onnx"), model, (X,))
    assert not check.ok and "randn*1000" in check.message
    kinds = [r["inputs"] for r in check.runs]
    assert kinds == ["example", "randn", "randn", "randn*0.001", "randn*1000", "randn+10"]
    assert [r["ok"] for r in check.runs] == [True, True, True, True, False, True]


def test_verify_catches_a_wrong_channel_far_below_the_peak(tmp_path):
    """The tolerance was 1e-4 * max|output| over the whole tensor: a sign flip of a channel 1e5 times
    smaller than the other passed."""
    from onnx import numpy_helper

    m = nn.Sequential(nn.Conv2d(3, 2, 1)).eval()
    with torch.no_grad():
        m[0].bias.zero_()
        m[0].weight[0] = 100.0
        m[0].weight[1] = 0.001
    path, bad = str(tmp_path / "m.onnx"), str(tmp_path / "bad.onnx")
    assert export_onnx(m, (X,), path).check.ok  # the small channel's own rounding passes
    proto = onnx.load(path)
    for t in proto.graph.initializer:
        a = numpy_helper.to_array(t).copy()
        if a.ndim == 4:
            a[1] *= -1
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    onnx.save(proto, bad)
    check = verify_onnx(bad, m, (X,))
    assert not check.ok and "channel 1" in check.message and "tolerance" in check.message


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_channel_tolerance_allows_rounding_at_the_peak(dtype):
    """A tiny channel may be computed from terms as large as the peak: a few ulps of the peak pass, a
    wrong sign of a channel well above that floor does not."""
    from tritonbn.export.verify import compare

    ref = torch.zeros(2, 3, 4, dtype=dtype)
    ref[:, 0] = 1000.0
    ref[:, 1] = 1e-3
    ref[:, 2] = -20.0
    ulp = torch.finfo(dtype).eps * 1000.0
    got = ref.double().numpy().copy()
    got[:, 1] += 4 * ulp  # the tiny channel off by 4 ulps of the peak
    assert compare([ref], [got.astype(ref.numpy().dtype)])["ok"]
    got[:, 2] *= -1
    result = compare([ref], [got.astype(ref.numpy().dtype)])
    assert not result["ok"] and "channel 2" in result["why"]


def test_harmless_trace_warning_needs_explicit_consent(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_io, "_export_dynamo", _no_dynamo())
    m = randomize_all(ShapeConstant())
    with pytest.raises(ExportError, match="Python float"), pytest.warns(ExporterFallbackWarning):
        export_onnx(m, (X,), str(tmp_path / "m.onnx"))
    assert not os.listdir(tmp_path)
    with pytest.warns(ExporterFallbackWarning):
        result = export_onnx(m, (X,), str(tmp_path / "m.onnx"), allow_trace_warnings=True)
    assert result.check.ok and result.exporter == "torchscript"
    assert any("trace warnings allowed" in n and "Python float" in n for n in result.notes)


def test_fallback_reason_is_whole_and_readable(tmp_path, monkeypatch):
    long_tail = "the part after two hundred characters " * 8 + "END-OF-REASON"
    reason = f"\x1b[96mcoloured\x1b[0m first line\n{long_tail}"
    monkeypatch.setattr(onnx_io, "_export_dynamo", _no_dynamo(reason))
    with pytest.warns(ExporterFallbackWarning) as rec:
        result = export_onnx(randomize_all(TinyResNet()), (X,), str(tmp_path / "m.onnx"))
    note = result.notes[0]
    assert note.startswith("TorchScript exporter used because the dynamo exporter failed: RuntimeError:")
    assert "coloured first line" in note and note.endswith("END-OF-REASON") and "\x1b" not in note
    assert "END-OF-REASON" in str(rec[0].message) and result.to_dict()["exporter_errors"]["dynamo"]


def test_cli_repro_fails_in_one_plain_line_without_graph_dump(tmp_path, capfd):
    out = tmp_path / "m.onnx"
    rc = main(["--model", "export_models:data_dependent_factory", "--input-shape", "2,3,8,8", "-o", str(out)])
    o, e = capfd.readouterr()
    assert rc == 1 and not out.exists()
    errors = [ln for ln in e.splitlines() if ln.startswith("tritonbn-export: error:")]
    assert len(errors) == 1 and "--allow-trace-warnings" in errors[0]
    assert "tritonbn-export: warning: the dynamo exporter failed" in e  # says which exporter ran and why
    for text in (o, e):
        assert "GraphModule" not in text and "def forward" not in text and "\x1b[" not in text
        assert "Traceback" not in text


def test_cli_allow_trace_warnings_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(onnx_io, "_export_dynamo", _no_dynamo())
    out = tmp_path / "m.onnx"
    args = ["--model", "export_models:shape_constant_factory", "--input-shape", "2,3,8,8", "-o", str(out)]
    assert main(args) == 1 and not out.exists()
    assert main(args + ["--allow-trace-warnings"]) == 0 and out.exists()
    assert "exporter=torchscript" in capsys.readouterr().out


# --- opset --------------------------------------------------------------------------------------

@pytest.mark.parametrize("opset", range(13, 21))
def test_requested_opset_is_produced(opset, tmp_path):
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExporterFallbackWarning)  # a choice of exporter, not a failure
        result = export_onnx(randomize_all(TinyResNet()), (X,), str(path), opset=opset)
    model = onnx.load(str(path))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    assert result.opset == opset and result.check.ok
    assert result.exporter == ("dynamo" if opset >= 18 else "torchscript")
    if opset < 18:
        assert "opset" in result.notes[0]


@pytest.mark.parametrize("opset", [99, 6, 0, 17.0, True])
def test_unsupported_opset_is_refused(opset, tmp_path):
    with pytest.raises(ExportError, match="opset"):
        export_onnx(randomize_all(TinyResNet()), (X,), str(tmp_path / "m.onnx"), opset=opset)
    assert not os.listdir(tmp_path)


def test_opset_the_fallback_cannot_write_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_io, "_export_dynamo", _no_dynamo())
    with pytest.raises(ExportError, match="cannot write opset 21"):
        export_onnx(randomize_all(TinyResNet()), (X,), str(tmp_path / "m.onnx"), opset=21)


def test_cli_opset(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    base = ["--model", "test_export_e2e:factory", "--input-shape", "2,3,8,8", "-o", str(out)]
    assert main(base + ["--opset", "99"]) == 1 and not out.exists()
    err = capsys.readouterr().err
    assert "opset 99 is not supported" in err and len(err.strip().splitlines()) == 1
    assert main(base + ["--opset", "16"]) == 0
    assert onnx.load(str(out)).opset_import[0].version == 16
