"""fold_batchnorm (module form): every layer kind, the unsafe patterns, and 'model untouched'."""

import copy

import pytest
import torch
from export_models import (
    BasicBlock,
    TinyResNet,
    assert_untouched,
    count_bn,
    randomize_all,
    randomize_bn,
    snapshot,
)
from torch import nn
from tritonbn.export import FoldError, fold_batchnorm
from tritonbn.export.fold_module import cast_once

torch.manual_seed(0)


def _check(model, x, folded_count, example=True):
    model = randomize_all(model)
    snap = snapshot(model)
    with torch.no_grad():
        ref = model(x)
    folded, report = fold_batchnorm(model, (x,) if example else None)
    assert_untouched(model, snap)
    with torch.no_grad():
        out = folded(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert len(report.folded) == folded_count, report.format()
    return folded, report


CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups,bias", [(1, True), (1, False), (2, True), (8, False)])
def test_conv_then_bn(dims, groups, bias):
    m = nn.Sequential(CONV[dims](8, 8, 3, padding=1, groups=groups, bias=bias), BN[dims](8))
    # 1-d needs example inputs (test_conv1d_bn1d_needs_example_inputs); 2-d/3-d BN accept batched input only
    folded, _ = _check(m, torch.randn((2, 8) + (6,) * dims), 1, example=dims == 1)
    assert count_bn(folded) == 0


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("cin,cout,groups", [(8, 8, 1), (8, 8, 4), (4, 8, 2), (8, 4, 4), (6, 6, 6)])
def test_conv_transpose_then_bn(dims, cin, cout, groups):
    m = nn.Sequential(CONVT[dims](cin, cout, 3, stride=2, groups=groups), BN[dims](cout))
    folded, _ = _check(m, torch.randn((2, cin) + (4,) * dims), 1, example=dims == 1)
    assert count_bn(folded) == 0


@pytest.mark.parametrize("affine", [True, False])
def test_linear_then_bn1d_needs_2d_proof(affine):
    m = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5, affine=affine))
    x = torch.randn(4, 6)
    _check(m, x, 1, example=True)
    _, report = _check(m, x, 0, example=False)  # rank unknown: kept, with a reason
    assert "example_inputs" in report.skipped[0].reason


@pytest.mark.parametrize("as_", ["tensor", "tuple", "list"])
def test_example_inputs_as_tensor_tuple_or_list(as_):
    """As for export_onnx: a list of example inputs is the forward's arguments, not one argument."""
    m = randomize_all(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)))
    x = torch.randn(4, 6)
    folded, report = fold_batchnorm(m, {"tensor": x, "tuple": (x,), "list": [x]}[as_])
    assert len(report.folded) == 1 and count_bn(folded) == 0
    torch.testing.assert_close(folded(x), m(x), rtol=1e-5, atol=1e-5)


def test_example_inputs_the_model_rejects_are_a_fold_error():
    m = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(FoldError, match="fails on example_inputs: RuntimeError") as err:
        fold_batchnorm(m, [torch.randn(2, 5, 8, 8)])
    assert "\n" not in str(err.value)
    with pytest.raises(FoldError, match="tuple/list"):
        fold_batchnorm(m, {"x": torch.randn(2, 3, 8, 8)})


def test_linear_on_3d_input_is_not_folded():
    # BatchNorm1d normalizes axis 1 of [N, C, L]; Linear acts on the last axis: different channels.
    m = nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(3))
    _, report = _check(m, torch.randn(2, 3, 5), 0)
    assert "rank" in report.skipped[0].reason


@pytest.mark.parametrize("padding,mode,foldable", [
    (0, "zeros", True), (1, "reflect", True), (1, "replicate", True), (1, "circular", True),
    (1, "zeros", False), ("same", "zeros", False), ("valid", "zeros", True),
])
@pytest.mark.parametrize("groups", [1, 2])
def test_bn_before_conv(padding, mode, foldable, groups):
    conv = nn.Conv2d(4, 6, 3, padding=padding, padding_mode=mode, groups=groups)
    m = nn.Sequential(nn.BatchNorm2d(4), conv)
    folded, report = _check(m, torch.randn(2, 4, 7, 7), int(foldable))
    if foldable:
        assert report.folded[0].direction == "before" and count_bn(folded) == 0
    else:
        assert "padding" in report.skipped[0].reason and count_bn(folded) == 1


def test_bn_before_linear():
    m = nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 3))
    folded, report = _check(m, torch.randn(4, 5), 1)
    assert report.folded[0].direction == "before" and count_bn(folded) == 0


def test_bn_before_conv_transpose_is_kept():
    m = nn.Sequential(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 4, 3))
    _check(m, torch.randn(2, 4, 5, 5), 0)


def test_standalone_bn_is_kept_and_reported():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4))
    folded, report = _check(m, torch.randn(2, 3, 5, 5), 0)
    assert count_bn(folded) == 1 and report.skipped[0].bn == "2"
    assert report.to_dict()["skipped"][0]["reason"]


class TwoConsumers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y  # conv output also used without BN


def test_producer_with_another_consumer_is_not_folded():
    _, report = _check(TwoConsumers(), torch.randn(2, 4, 5, 5), 0)
    assert "consumers" in report.skipped[0].reason


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x * 2)


def test_module_called_twice_gets_a_clone():
    folded, report = _check(CalledTwice(), torch.randn(2, 4, 5, 5), 1)
    assert report.folded[0].into != "conv"  # the other call site still uses the original conv
    assert count_bn(folded) == 0


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 1)
        self.b = self.a  # same module registered twice
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x)) + self.b(x)


def test_shared_module_gets_a_clone():
    _check(SharedConv(), torch.randn(2, 4, 5, 5), 1)


class CustomBN(nn.BatchNorm2d):
    """A user BN subclass with torch's forward (only its input check is its own): must not be traced into
    (FX fuse does), and folds."""

    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError("4-D input expected")


class ScaledBN(nn.BatchNorm2d):
    """A BN subclass with its own forward: what it computes is not eval BN."""

    def forward(self, x):
        return super().forward(x) * 2.0 + 1.0


class StdConv(nn.Conv2d):
    """Weight-standardized conv: overrides forward, so folding into its weight would be wrong."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, self.bias)


def test_custom_bn_subclass_is_a_leaf_and_folds():
    folded, _ = _check(nn.Sequential(nn.Conv2d(3, 4, 3), CustomBN(4)), torch.randn(2, 3, 6, 6), 1)
    assert count_bn(folded) == 0


def test_bn_subclass_with_its_own_forward_is_kept():
    """Was folded as a plain BN (max diff 2.5)."""
    folded, report = _check(nn.Sequential(nn.Conv2d(3, 4, 3), ScaledBN(4)), torch.randn(2, 3, 6, 6), 0)
    assert "ScaledBN overrides forward" in report.skipped[0].reason and count_bn(folded) == 1


@pytest.mark.parametrize("which", [0, 1])
def test_forward_replaced_on_the_instance_is_not_folded(which):
    """``conv.forward = ...`` / ``bn.forward = ...`` (e.g. a monkey-patching tool): was folded as plain."""
    m = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    original = m[which].forward
    m[which].forward = lambda x: original(x).clamp(min=0) * 3
    _, report = _check(m, torch.randn(2, 3, 6, 6), 0)
    assert "forward replaced on the instance" in report.skipped[0].reason


class ReadsBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv.bias.view(1, -1, 1, 1)


class TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.fc(x)) + x @ self.fc.weight  # weight-tied use of fc's weight


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


class ReadsChildWeight(nn.Module):
    """A parent reading a parameter of a layer its (separately folded) user submodule calls."""

    def __init__(self):
        super().__init__()
        self.block = ConvBN()

    def forward(self, x):
        return self.block(x) * self.block.conv.weight.sum()


class ReadsChildBN(ReadsChildWeight):
    def forward(self, x):
        return self.block(x) + self.block.bn.weight.view(1, -1, 1, 1)


@pytest.mark.parametrize("model,x_shape,read", [
    (ReadsBias, (2, 3, 5, 5), "'conv.bias'"),
    (TiedHead, (4, 6), "'fc.weight'"),
    (ReadsChildWeight, (2, 3, 5, 5), "'block.conv.weight'"),
    (ReadsChildBN, (2, 3, 5, 5), "'block.bn.weight'"),
])
def test_parameters_read_directly_are_not_folded(model, x_shape, read):
    """An in-place fold changed what ``self.conv.bias`` etc. read (wrong outputs), or removed the BN a
    parent reads (AttributeError)."""
    _, report = _check(model(), torch.randn(x_shape), 0)
    assert f"also read directly ({read})" in report.skipped[0].reason, report.format()


def test_parameters_read_elsewhere_do_not_block_other_folds():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = ConvBN(), ReadsBias()

        def forward(self, x):
            return self.a(x) + self.b(x)

    _, report = _check(Two(), torch.randn(2, 3, 5, 5), 1)
    assert report.folded[0].bn == "a.bn" and report.skipped[0].bn == "b.bn"


class KeywordCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(input=self.conv(input=x))


def test_calls_with_the_input_as_keyword_fold():
    """``self.bn(input=y)`` was kept as "called with extra arguments"."""
    folded, _ = _check(KeywordCalls(), torch.randn(2, 3, 6, 6), 1)
    assert count_bn(folded) == 0


def test_conv1d_bn1d_needs_example_inputs():
    """Without example inputs, an unbatched (C, L) input would make BatchNorm1d normalize along L."""
    m = randomize_all(nn.Sequential(nn.Conv1d(3, 5, 1), nn.BatchNorm1d(5)))
    x = torch.randn(3, 5)  # unbatched: the conv gives (5, 5), which BN reads as (N, C)
    folded, report = fold_batchnorm(m)
    torch.testing.assert_close(folded(x), m(x))
    assert "example_inputs" in report.skipped[0].reason
    _, report = fold_batchnorm(m, x)
    assert not report.folded and "unbatched" in report.skipped[0].reason
    _check(m, torch.randn(2, 3, 5), 1)


def test_conv_subclass_with_custom_forward_is_not_folded():
    _, report = _check(nn.Sequential(StdConv(3, 4, 3), nn.BatchNorm2d(4)), torch.randn(2, 3, 6, 6), 0)
    assert "overrides forward" in report.skipped[0].reason


def test_custom_modules_are_folded_recursively_not_inlined():
    folded, report = _check(nn.Sequential(BasicBlock(4, 8, 2), BasicBlock(8, 8)), torch.randn(2, 4, 8, 8), 5)
    assert count_bn(folded) == 0
    assert {f.bn for f in report.folded} >= {"0.bn1", "0.down.1", "1.bn2"}


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: FX cannot trace this
            return self.bn(self.conv(x))
        return self.bn(self.conv(-x))


def test_untraceable_module_is_left_alone_with_reason():
    _, report = _check(Untraceable(), torch.randn(2, 3, 5, 5), 0)
    assert "traceable" in report.skipped[0].reason


def test_no_running_stats_is_kept():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    x = torch.randn(2, 3, 5, 5)
    folded, report = fold_batchnorm(m)
    torch.testing.assert_close(folded(x), m(x))
    assert "running stats" in report.skipped[0].reason


def test_training_mode_raises_and_touches_nothing():
    m = TinyResNet().train()
    snap = snapshot(m)
    with pytest.raises(FoldError, match="training mode"):
        fold_batchnorm(m)
    m.layer1.eval()
    m.eval()
    m.layer2.bn1.train()
    with pytest.raises(FoldError, match="layer2.bn1"):
        fold_batchnorm(m)
    m.train()
    assert_untouched(m, snap)


def test_resnet_folds_everything_and_is_runnable():
    folded, report = _check(TinyResNet(), torch.randn(3, 3, 8, 8), 6)
    assert count_bn(folded) == 0 and not report.skipped
    assert '"folded"' in report.to_json() and "folded" in str(report)


def test_fp16_module_fold_rounds_once():
    m = randomize_all(nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))).half()
    folded, _ = fold_batchnorm(m)
    conv, bn = m[0], m[1]
    s = (bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)).detach()
    w64 = (conv.weight.double() * s.view(-1, 1, 1, 1)).detach().numpy()
    assert torch.equal(folded.get_submodule("0").weight.detach(), cast_once(w64, conv.weight))


def test_hooks_and_parametrizations_block_folding():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    m[0].register_forward_hook(lambda mod, i, o: o * 2)
    _, report = _check(m, torch.randn(2, 3, 5, 5), 0)
    assert "hooks" in report.skipped[0].reason
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    torch.nn.utils.parametrize.register_parametrization(m[0], "weight", _Double())
    _, report = _check(m, torch.randn(2, 3, 5, 5), 0)
    assert "parametrized" in report.skipped[0].reason


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


def test_deepcopy_semantics_fold_twice_is_stable():
    m = randomize_all(TinyResNet())
    x = torch.randn(2, 3, 8, 8)
    once, _ = fold_batchnorm(m)
    twice, report = fold_batchnorm(copy.deepcopy(once))
    torch.testing.assert_close(twice(x), m(x), rtol=1e-5, atol=1e-5)
    assert not report.folded


def test_tritonbn_layers_are_treated_like_torch_bn():
    tritonbn = pytest.importorskip("tritonbn")
    m = nn.Sequential(nn.Conv2d(3, 8, 3), tritonbn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                      tritonbn.BatchNorm2d(4))
    for bn in (m[1], m[4]):
        randomize_bn(bn)
    folded, report = _check(m, torch.randn(2, 3, 6, 6), 2, example=False)
    assert count_bn(folded) == 0
