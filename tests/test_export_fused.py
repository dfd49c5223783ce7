"""The export tool on fused models (tritonbn.fuse_model / BatchNormAct*d): only the BN part folds, the add
and the ReLU stay, and everything matches the *unfused* model. Tiny shapes (tritonbn runs interpreted)."""

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from export_models import assert_untouched, count_bn, ort_run, randomize_all, randomize_bn, snapshot
from resnet_models import resnet18_like, resnet50_like
from torch import fx, nn
from tritonbn.export import export_onnx, fold_batchnorm, verify_onnx
from tritonbn.export.cli import main

import tritonbn

X_SHAPE = (2, 3, 16, 16)
RESNETS = {"basic": resnet18_like, "bottleneck": resnet50_like}


def _x(shape=X_SHAPE, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _resnet(kind, dtype=torch.float32):
    torch.manual_seed(0)
    return randomize_all(RESNETS[kind]()).to(dtype).eval()


def _fused(model, x):
    fused, report = tritonbn.fuse_model(model, (x,))
    return fused.eval(), report


def _graph_calls(module, target) -> int:
    """Calls of ``target`` (a function) in every FX graph of ``module``."""
    return sum(n.op == "call_function" and n.target is target
               for m in module.modules() if isinstance(m, fx.GraphModule) for n in m.graph.nodes)


def _close(a, b, dtype):
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# --- fold_batchnorm ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_fold_of_fused_resnet_keeps_add_and_relu(kind, dtype):
    """The original bug: every BN folded, the ReLUs and residual adds dropped (max diff 0.42)."""
    model = _resnet(kind, dtype)
    x = _x(dtype=dtype)
    fused, fuse_report = _fused(model, x)
    assert len(fuse_report.fused) >= 7 and any(f.pattern == "bn_add_relu" for f in fuse_report.fused)
    snap = snapshot(fused)
    folded, report = fold_batchnorm(fused, (x,))
    assert_untouched(fused, snap)
    with torch.no_grad():
        _close(folded(x), model(x), dtype)      # the unfused model
        _close(folded(x), fused(x), dtype)
    assert count_bn(folded) == 0 and not report.skipped, report.format()
    by_bn = {f.bn: f for f in report.folded}
    for f in fuse_report.fused:                 # each fused BN folded, its ReLU (and add) kept
        assert by_bn[f.bn].activation == "relu" and by_bn[f.bn].direction == "after"
        assert (by_bn[f.bn].residual is None) == (f.pattern == "bn_relu"), report.format()
    assert _graph_calls(folded, torch.relu) == len(fuse_report.fused)
    n_add = sum(f.pattern == "bn_add_relu" for f in fuse_report.fused)
    assert sum(f.residual is not None for f in report.folded) == n_add
    assert "then + 'x' and relu (kept)" in report.format()
    json.dumps(report.to_dict())


class Unfoldable(nn.Module):
    """Fused BNs that cannot fold, and a broadcasting residual (BatchNormAct's unfused fallback)."""

    def __init__(self, c=4):
        super().__init__()
        self.bn_in = tritonbn.BatchNormAct2d(3)                    # relu(bn(x) + x): no producer layer
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.bn_shared_out = tritonbn.BatchNormAct2d(c)            # conv output has two users
        self.bn_before = tritonbn.BatchNormAct2d(c, activation=None)  # feeds a padded conv
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.bn_relu_before = tritonbn.BatchNormAct2d(c)           # after a pool; its ReLU precedes conv3
        self.conv3 = nn.Conv2d(c, c, 1)
        self.conv4 = nn.Conv2d(c, c, 1)
        self.bn_bcast = tritonbn.BatchNormAct2d(c)                 # residual (N, C, 1, 1): broadcast
        self.bn_hooked = tritonbn.BatchNormAct2d(c)                # a hook: never split, kept whole
        self.bn_hooked.register_forward_hook(lambda m, i, o: None)

    def forward(self, x):
        x = self.bn_in(x, x)
        y = self.conv(x)
        y = self.bn_shared_out(y, y)
        y = self.conv2(self.bn_before(y))
        y = self.conv3(self.bn_relu_before(self.pool(y)))
        y = self.bn_bcast(self.conv4(y), y.mean((2, 3), keepdim=True))
        return self.bn_hooked(y, y)


class BeforeConv(nn.Module):
    """BatchNormAct without activation or residual is a plain BN: it folds into a following conv."""

    def __init__(self):
        super().__init__()
        self.bn = tritonbn.BatchNormAct2d(3, activation=None)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(self.bn(x))


def test_fused_bns_that_cannot_fold_are_kept_with_their_add_and_relu():
    model = randomize_all(Unfoldable())
    x = _x((2, 3, 6, 6))
    folded, report = fold_batchnorm(model, (x,))
    with torch.no_grad():
        _close(folded(x), model(x), torch.float32)
    kept = {s.bn: s for s in report.skipped}
    assert [f.bn for f in report.folded] == ["bn_bcast"], report.format()
    assert report.folded[0].residual == "mean" and report.folded[0].activation == "relu"
    assert set(kept) == {"bn_in", "bn_shared_out", "bn_before", "bn_relu_before", "bn_hooked"}
    assert "input is not produced by" in kept["bn_in"].reason and kept["bn_in"].residual == "x"
    assert "has 2 consumers" in kept["bn_shared_out"].reason and kept["bn_shared_out"].residual == "conv"
    assert "zero padding" in kept["bn_before"].reason and kept["bn_before"].activation is None
    assert "does not feed a Conv" in kept["bn_relu_before"].reason
    assert "hooks" in kept["bn_hooked"].reason and kept["bn_hooked"].activation == "relu"
    assert "kept    bn_in as eval BN, then + 'x' and relu (kept): " in report.format()
    # split calls became plain BNs; the hooked one is still the fused module
    assert isinstance(folded.bn_hooked, tritonbn.BatchNormAct2d)
    assert sum(isinstance(m, tritonbn.BatchNormAct2d) for m in folded.modules()) == 1

    m2 = randomize_all(BeforeConv())
    folded2, report2 = fold_batchnorm(m2)
    assert report2.folded[0].direction == "before" and count_bn(folded2) == 0
    with torch.no_grad():
        _close(folded2(x), m2(x), torch.float32)


def test_shared_fused_bn_called_twice():
    """One BatchNormAct module under two names, called at two sites: each call folds into its own conv."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
            self.bn = randomize_bn(tritonbn.BatchNormAct2d(4))
            self.alias = self.bn

        def forward(self, x):
            return self.bn(self.c1(x)) + self.alias(self.c2(x), self.c1(x))

    model = Shared().eval()
    x = _x((2, 3, 6, 6))
    folded, report = fold_batchnorm(model)
    with torch.no_grad():
        _close(folded(x), model(x), torch.float32)
    assert count_bn(folded) == 0 and len(report.folded) == 2, report.format()


class _StemThenBlock(nn.Module):
    """A fused BN's output (the stem's, inlined: nn.Sequential is traced through) is another fused BN's
    residual in the same graph."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.stem(x)
        return self.relu(self.bn1(self.conv1(x)) + x)


def test_fold_of_a_fused_bn_whose_output_is_another_fused_bns_residual():
    """The second split must add the first one's activation output, not its BN part's (before the fix the
    folded model added the pre-ReLU stem: max error 0.4)."""
    torch.manual_seed(0)
    model = randomize_all(_StemThenBlock()).eval()
    x = _x((2, 3, 8, 8))
    fused, report = _fused(model, x)
    assert sorted(f.pattern for f in report.fused) == ["bn_add_relu", "bn_relu"], report
    folded, fold_report = fold_batchnorm(fused)
    assert count_bn(folded) == 0 and len(fold_report.folded) == 2, fold_report.format()
    with torch.no_grad():
        _close(folded(x), model(x), torch.float32)


# --- export_onnx / verify_onnx ----------------------------------------------------------------------

def test_export_fused_resnet_verifies_against_the_unfused_model(tmp_path):
    model = _resnet("bottleneck")
    x = _x()
    fused, fuse_report = _fused(model, x)
    snap = snapshot(fused)
    path = str(tmp_path / "fused.onnx")
    result = export_onnx(fused, (x,), path)
    assert_untouched(fused, snap)
    assert result.check.ok, result.format()
    assert verify_onnx(path, model, (x,)).ok          # the unfused torch model too
    proto = onnx.load(path)
    ops = [n.op_type for n in proto.graph.node]
    assert "BatchNormalization" not in ops and "Mul" not in ops, ops
    assert ops.count("Relu") == 1 + 3 * 3 and ops.count("Add") == 3
    assert all(f.activation == "relu" for f in result.module_report.folded if "downsample" not in f.bn)
    for n in (1, 3):
        xn = _x((n,) + X_SHAPE[1:], seed=n)
        (got,) = ort_run(proto, {proto.graph.input[0].name: xn.numpy()})
        np.testing.assert_allclose(got, model(xn).detach().numpy(), rtol=1e-4, atol=1e-4)


class _MobileYolo(nn.Module):
    """MobileNetV2's Conv-BN-ReLU6 (one with a residual add before the ReLU6), YOLO's Conv-BN-SiLU and
    MobileNetV3's Conv-BN-Hardswish."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(inplace=True))
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.act6 = nn.ReLU6()
        self.yolo = nn.Sequential(nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.SiLU())
        self.v3 = nn.Sequential(nn.Conv2d(6, 5, 1), nn.BatchNorm2d(5), nn.Hardswish())

    def forward(self, x):
        x = self.stem(x)
        x = self.act6(self.bn1(self.conv1(x)) + x)
        return self.v3(torch.nn.functional.silu(self.yolo(x)))


def test_export_fused_relu6_and_silu_verifies_against_the_unfused_model(tmp_path):
    """fuse_model's BN+ReLU6, BN+add+ReLU6, BN+SiLU and BN+Hardswish: the BN parts fold into the convs, the
    activations export as standard ONNX (Clip, Sigmoid·Mul or SiLU's own op, HardSwish), and ONNX Runtime
    matches the unfused model."""
    torch.manual_seed(0)
    model = randomize_all(_MobileYolo()).eval()
    with torch.no_grad():
        for bn in (model.stem[1], model.bn1):
            bn.weight.mul_(6)   # so that ReLU6 clips at 6 too
    x = _x()
    fused, report = _fused(model, x)
    assert sorted(f.pattern for f in report.fused) == ["bn_add_relu6", "bn_hardswish", "bn_relu6",
                                                          "bn_silu"], report
    path = str(tmp_path / "mobile_yolo.onnx")
    result = export_onnx(fused, (x,), path)
    assert result.check.ok, result.format()
    assert verify_onnx(path, model, (x,)).ok
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert "BatchNormalization" not in ops and ops.count("Clip") == 2 and ops.count("Add") == 1, ops
    assert ops.count("HardSwish") == 1, ops
    with torch.no_grad():
        assert (model.stem(x) == 6).any()


@pytest.mark.parametrize("fold", [True, False])
def test_export_unfoldable_fused_bns(tmp_path, fold):
    """Kept fused BNs export as BN (Mul+Add after the ONNX pass) + Add + Relu; TorchScript exporter (opset
    17: quick), whole BatchNormAct modules included (fold=False keeps every one whole)."""
    model = randomize_all(Unfoldable())
    x = _x((2, 3, 6, 6))
    path = str(tmp_path / "u.onnx")
    result = export_onnx(model, (x,), path, opset=17, fold=fold)
    assert result.check.ok, result.format()
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("Relu") == 5 and ops.count("Add") >= 4, ops
    if fold:
        assert "BatchNormalization" not in ops and "Mul" in ops, ops
        assert len(result.module_report.skipped) == 5
        assert "as eval BN, then + 'x' and relu (kept)" in result.format()


# Under TorchScript tracing the layers run torch's own code: no shape check of tritonbn's may turn into a
# TracerWarning (export_onnx refuses traces that warn). The legacy exporter itself is deprecated.
@pytest.mark.filterwarnings("error::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_torch_onnx_export_of_a_fused_model_gives_standard_ops(tmp_path):
    model = _resnet("basic")
    x = _x()
    fused, _ = _fused(model, x)
    for dynamo in (True, False):
        path = str(tmp_path / f"direct_{dynamo}.onnx")
        torch.onnx.export(copy.deepcopy(fused), (x,), path, dynamo=dynamo)
        proto = onnx.load(path)
        assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
        ops = [n.op_type for n in proto.graph.node]
        assert ops.count("Relu") == 1 + 3 * 2 and ops.count("Add") == 3, (dynamo, ops)
        (got,) = ort_run(proto, {proto.graph.input[0].name: x.numpy()})
        np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-4, atol=1e-4)


# --- CLI --------------------------------------------------------------------------------------------

def fused_factory():
    return _fused(_resnet("basic"), _x())[0]


def test_cli_exports_a_fused_model(tmp_path, capsys):
    out, rep = tmp_path / "m.onnx", tmp_path / "r.json"
    rc = main(["--model", "test_export_fused:fused_factory", "--input-shape", "2,3,16,16", "--opset", "17",
               "-o", str(out), "--report", str(rep)])
    assert rc == 0 and out.exists()
    data = json.loads(rep.read_text())
    assert data["verification"]["ok"]
    folded = data["module_report"]["folded"]
    assert len(folded) == 8 and sum(f["activation"] == "relu" for f in folded) == 7
    assert "then + 'x' and relu (kept)" in capsys.readouterr().out
