"""export_onnx / verify_onnx end to end, and the CLI."""

import json
import os

import numpy as np
import onnx
import pytest
import torch
from export_models import TinyResNet, assert_untouched, ort_run, randomize_all, snapshot
from onnx import numpy_helper
from torch import nn
from tritonbn.export import (
    ExporterFallbackWarning,
    ExportError,
    FoldError,
    VerificationError,
    export_onnx,
    verify_onnx,
)
from tritonbn.export.cli import main

import tritonbn


def _failing_verify(message):
    from tritonbn.export.verify import VerifyResult

    return lambda *a, **k: VerifyResult(ok=False, max_abs_err=1.0, max_rel_err=1.0, message=message)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return randomize_all(TinyResNet())


@pytest.fixture(scope="module")
def exported(resnet, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("e2e") / "resnet.onnx")
    snap = snapshot(resnet)
    result = export_onnx(resnet, (torch.randn(2, 3, 8, 8),), path)
    assert_untouched(resnet, snap)
    return path, result


def test_resnet_export_is_folded_verified_and_dynamic(resnet, exported):
    path, result = exported
    assert result.check.ok and result.check.max_abs_err < 1e-4
    assert [(r["batch"], r["inputs"]) for r in result.check.runs] == [
        (2, "example"), (1, "randn"), (3, "randn"), (2, "randn*0.001"), (2, "randn*1000"), (2, "randn+10")]
    model = onnx.load(path)
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert len(result.module_report.folded) == 6 and result.exporter in ("dynamo", "torchscript")
    for n in (1, 5):
        x = torch.randn(n, 3, 8, 8)
        (got,) = ort_run(model, {model.graph.input[0].name: x.numpy()})
        np.testing.assert_allclose(got, resnet(x).detach().numpy(), rtol=1e-4, atol=1e-4)
    json.dumps(result.to_dict())  # report is JSON-serializable
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")]


def test_verify_reports_a_tampered_file(resnet, exported, tmp_path):
    path, _ = exported
    model = onnx.load(path)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    init = next(i for i in model.graph.initializer if i.name == conv.input[1])
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    bad = tmp_path / "tampered.onnx"
    onnx.save(model, str(bad))
    snap = snapshot(resnet)
    check = verify_onnx(str(bad), resnet, (torch.randn(2, 3, 8, 8),))
    assert not check.ok and "tolerance" in check.message
    assert_untouched(resnet, snap)
    assert verify_onnx(path, resnet, torch.randn(4, 3, 8, 8)).ok


def test_verification_failure_writes_nothing_and_keeps_old_file(resnet, tmp_path, monkeypatch):
    import tritonbn.export.onnx_io as onnx_io

    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    monkeypatch.setattr(onnx_io, "verify_onnx", _failing_verify("boom"))
    with pytest.raises(VerificationError, match="boom"):
        export_onnx(resnet, (torch.randn(2, 3, 8, 8),), str(out), dynamic_batch=False)
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.onnx"]


def test_torchscript_exporter_fallback(resnet, tmp_path, monkeypatch):
    import tritonbn.export.onnx_io as onnx_io

    def broken(*a, **k):
        raise RuntimeError("no dynamo today")

    monkeypatch.setattr(onnx_io, "_export_dynamo", broken)
    with pytest.warns(ExporterFallbackWarning, match="no dynamo today"):
        result = export_onnx(resnet, torch.randn(1, 3, 8, 8), str(tmp_path / "ts.onnx"))
    assert result.exporter == "torchscript" and "no dynamo today" in result.notes[0]
    assert result.check.ok and [r["batch"] for r in result.check.runs][:3] == [1, 3, 5]


def test_training_mode_model_is_refused(tmp_path):
    m = TinyResNet().train()
    with pytest.raises(FoldError, match="training mode"):
        export_onnx(m, (torch.randn(2, 3, 8, 8),), str(tmp_path / "m.onnx"))
    assert not os.listdir(tmp_path)


class Unfoldable(nn.Module):
    """A standalone BN (after ReLU) and a SyncBatchNorm: kept, exported as plain eval BN/Mul+Add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.sync = nn.SyncBatchNorm(4)

    def forward(self, x):
        return self.sync(self.bn(torch.relu(self.conv(x))) * 2)


def test_kept_bn_exports_as_mul_add(tmp_path):
    m = randomize_all(Unfoldable())
    result = export_onnx(m, (torch.randn(2, 3, 6, 6),), str(tmp_path / "m.onnx"))
    assert result.check.ok and len(result.module_report.skipped) == 2
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert "BatchNormalization" not in ops and "Mul" in ops


def test_tritonbn_model_exports(tmp_path):
    tritonbn = pytest.importorskip("tritonbn")
    m = nn.Sequential(nn.Conv2d(3, 4, 3), tritonbn.BatchNorm2d(4), nn.ReLU(), tritonbn.BatchNorm2d(4))
    m = randomize_all(m)
    snap = snapshot(m)
    result = export_onnx(m, (torch.randn(2, 3, 6, 6),), str(tmp_path / "t.onnx"))
    assert result.check.ok and len(result.module_report.folded) == 1
    assert_untouched(m, snap)


def test_tritonbn_sync_batchnorm_folds_and_exports_as_batch_norm(tmp_path):
    """tritonbn.SyncBatchNorm (what convert_sync_batchnorm gives a DDP model) is batch norm in eval mode:
    folded into the conv before it, and exported as torch BN where it is kept, as torch's SyncBatchNorm."""
    tritonbn = pytest.importorskip("tritonbn")
    m = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), tritonbn.SyncBatchNorm(4), nn.ReLU(),
                                    tritonbn.SyncBatchNorm(4)))
    result = export_onnx(m, (torch.randn(2, 3, 6, 6),), str(tmp_path / "s.onnx"))
    assert result.check.ok
    assert [f.bn for f in result.module_report.folded] == ["1"]
    assert [s.bn for s in result.module_report.skipped] == ["3"]
    assert "overrides forward" not in result.module_report.skipped[0].reason


class ScaledBN(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2.0 + 1.0


@pytest.mark.parametrize("fold", [True, False])
def test_bn_subclass_exports_through_its_own_forward(tmp_path, fold):
    """fold=False replaced it by torch BN ("verification failed"); fold=True folded it as a plain BN."""
    m = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), ScaledBN(4), nn.ReLU(), ScaledBN(4)))
    result = export_onnx(m, (torch.randn(2, 3, 6, 6),), str(tmp_path / "m.onnx"), fold=fold)
    assert result.check.ok
    if fold:
        assert not result.module_report.folded
        assert all("ScaledBN overrides forward" in s.reason for s in result.module_report.skipped)


def test_bn_with_forward_replaced_on_the_instance_exports_it(tmp_path):
    m = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), tritonbn.BatchNorm2d(4)))
    m[2].forward = lambda x: nn.functional.batch_norm(x, m[2].running_mean, m[2].running_var) * 3
    result = export_onnx(m, (torch.randn(2, 3, 6, 6),), str(tmp_path / "m.onnx"), fold=False)
    assert result.check.ok


class BNWithBuffer(nn.BatchNorm2d):
    """torch's forward and one extra buffer."""

    def __init__(self, c):
        super().__init__(c)
        self.register_buffer("calib", torch.ones(c))


class TritonBNWithBuffer(tritonbn.BatchNorm2d):
    def __init__(self, c):
        super().__init__(c)
        self.register_buffer("calib", torch.ones(c))


@pytest.mark.parametrize("bn", [BNWithBuffer, TritonBNWithBuffer])
def test_bn_subclass_with_extra_state_exports(tmp_path, bn):
    """plain_torch_bn's strict load_state_dict raised a raw RuntimeError ("Unexpected key(s) ... calib")."""
    m = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), bn(4)))
    snap = snapshot(m)
    for fold in (True, False):
        result = export_onnx(m, (torch.randn(2, 3, 6, 6),), str(tmp_path / f"m{fold}.onnx"), fold=fold)
        assert result.check.ok
    assert_untouched(m, snap)


class WithGain(nn.Module):
    """A second input without the batch: a per-channel gain of shape [4]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x, gain):
        return self.bn(self.conv(x)) * gain.view(1, -1, 1, 1)


@pytest.mark.parametrize("batch,dynamic", [(2, True), (1, True), (1, False)])
def test_unbatched_second_input_is_kept_as_given(tmp_path, batch, dynamic):
    """Every input was given the batch axis: a raw RuntimeError, or a false VerificationError ("invalid
    dimensions for input: gain") with batch 1 and dynamic_batch=False."""
    m = randomize_all(WithGain())
    path = str(tmp_path / "m.onnx")
    result = export_onnx(m, (torch.randn(batch, 3, 8, 8), torch.rand(4)), path, dynamic_batch=dynamic)
    assert result.check.ok and len(result.module_report.folded) == 1
    x_in, gain_in = onnx.load(path).graph.input
    assert [d.dim_value for d in gain_in.type.tensor_type.shape.dim] == [4]
    assert bool(x_in.type.tensor_type.shape.dim[0].dim_param) == dynamic
    if dynamic:
        assert sorted({r["batch"] for r in result.check.runs}) == sorted({batch, 3, 1 if batch != 1 else 5})


def test_unbatched_input_taken_for_batched_is_one_line_error(tmp_path):
    """gain's first dimension equals the batch (4): taken as batched (the documented rule), the model fails
    on test inputs of another batch size: one line, not a raw RuntimeError."""
    m = randomize_all(WithGain())
    path = str(tmp_path / "m.onnx")
    export_onnx(m, (torch.randn(2, 3, 8, 8), torch.rand(4)), path)
    with pytest.raises(ExportError, match="taken as batched") as err:
        verify_onnx(path, m, (torch.randn(4, 3, 8, 8), torch.rand(4)), dynamic_batch=True)
    assert "\n" not in str(err.value)


# --- CLI ---------------------------------------------------------------------------------------

def factory():
    return randomize_all(TinyResNet())


def train_factory():
    return TinyResNet()


def test_cli_model_and_report(tmp_path, capsys):
    out, rep, ckpt = tmp_path / "m.onnx", tmp_path / "r.json", tmp_path / "w.pt"
    torch.save({"state_dict": factory().state_dict()}, ckpt)
    rc = main(["--model", "test_export_e2e:factory", "--checkpoint", str(ckpt), "--input-shape", "2,3,8,8",
               "-o", str(out), "--report", str(rep), "--no-dynamic-batch"])
    assert rc == 0 and out.exists()
    data = json.loads(rep.read_text())
    assert data["verification"]["ok"] and len(data["module_report"]["folded"]) == 6
    assert "verified" in capsys.readouterr().out


def test_cli_onnx_in(tmp_path, exported):
    path, _ = exported
    out = tmp_path / "again.onnx"
    assert main(["--onnx-in", path, "-o", str(out)]) == 0 and out.exists()


@pytest.mark.parametrize("args,msg", [
    (["--model", "no_such_pkg.mod:f", "--input-shape", "1,3,8,8"], "cannot import"),
    (["--model", "test_export_e2e:nope", "--input-shape", "1,3,8,8"], "no attribute"),
    (["--model", "test_export_e2e:train_factory", "--input-shape", "1,3,8,8"], "training mode"),
    (["--onnx-in", "NOT_ONNX"], "not a valid ONNX model"),
    (["--onnx-in", "MISSING"], "cannot read"),
])
def test_cli_errors_exit_nonzero_without_output(tmp_path, capsys, args, msg):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01 definitely not protobuf \xff" * 10)
    args = [str(bad) if a == "NOT_ONNX" else str(tmp_path / "missing.onnx") if a == "MISSING" else a
            for a in args]
    out = tmp_path / "out.onnx"
    assert main(args + ["-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_verification_failure_exit_code(tmp_path, monkeypatch, capsys):
    import tritonbn.export.onnx_io as onnx_io

    monkeypatch.setattr(onnx_io, "verify_onnx", _failing_verify("bad"))
    out = tmp_path / "m.onnx"
    rc = main(["--model", "test_export_e2e:factory", "--input-shape", "2,3,8,8", "-o", str(out),
               "--no-dynamic-batch"])
    assert rc == 2 and not out.exists() and "verification failed" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_demo(tmp_path, capsys, monkeypatch):
    import tritonbn.export.demo as demo

    monkeypatch.setattr(demo, "TRAIN_STEPS", 2)  # the full demo is timed separately
    # conftest runs tritonbn through Triton's (slow) CPU interpreter; the demo as users run it on a CPU
    # does not (Triton decided that at import, so the dispatch is overridden, not the environment)
    monkeypatch.setattr(tritonbn.modules, "uses_triton", lambda x: x.is_cuda)
    out, rep = tmp_path / "demo.onnx", tmp_path / "demo.json"
    assert main(["--demo", "-o", str(out), "--report", str(rep)]) == 0
    text = capsys.readouterr().out
    assert "folded" in text and "latency" in text and "OK" in text
    data = json.loads(rep.read_text())
    assert data["nodes"]["bn_folded"] == 0 and data["verification"]["ok"]


def test_errors_are_one_family():
    from tritonbn.export import TritonbnExportError

    assert issubclass(FoldError, TritonbnExportError) and issubclass(ExportError, TritonbnExportError)
    assert VerificationError("x").exit_code == 2
