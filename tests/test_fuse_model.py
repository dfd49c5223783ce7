"""tritonbn.fuse_model: ResNet-18/50-structured models fused and trained against the unfused torch model
and a float64 reference, every ReLU/add spelling, the unsafe patterns left unfused (with their reason),
the per-module fallback, checkpoints, compile and DDP. Tiny shapes (the kernels run in the interpreter)."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from resnet_models import BasicBlock, MobileNetV2, resnet18_like, resnet50_like
from torch import nn

import tritonbn

X_SHAPE = (2, 3, 16, 16)


def _x(seed=0, shape=X_SHAPE, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)


def _model(kind, **kw):
    torch.manual_seed(0)
    return {"basic": resnet18_like, "bottleneck": resnet50_like}[kind](**kw)


def _relu_calls(model, x):
    """Calls of nn.ReLU modules during one forward (no_grad, so no state but the running stats moves)."""
    count = [0]
    handles = [m.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
               for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return count[0]


def _snapshot(model):
    """Everything fuse_model must leave alone: state (bitwise), module classes, attributes and hooks."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    structure = [(name, type(m), type(m).forward, sorted(m.__dict__), m.training,
                  [dict(getattr(m, h)) for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")])
                 for name, m in model.named_modules()]
    return state, structure


def _assert_rel(actual, expected, tol, msg=""):
    """max |actual - expected| within ``tol`` of the expected tensor's scale (gradients here are O(1), and
    some are exactly 0 in exact arithmetic)."""
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.abs().max().item(), 1e-2)
    assert err <= tol * scale, f"{msg}: max error {err:.3g}, scale {scale:.3g}"


def _assert_same_state(a, b, **tol):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        if k.endswith("num_batches_tracked"):
            assert torch.equal(sa[k], sb[k]), k
        else:
            torch.testing.assert_close(sa[k].to(sb[k].dtype), sb[k], msg=k, **tol)


# --- ResNet structure ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_resnet_fused_trains_like_torch_and_float64(kind):
    torch_model = _model(kind)
    ref64 = copy.deepcopy(torch_model).double()
    fused, report = tritonbn.fuse_model(torch_model, (_x(),))

    n_blocks, per_block = 3, {"basic": 2, "bottleneck": 3}[kind]
    assert len(report.fused) == 1 + n_blocks * per_block
    assert sum(f.pattern == "bn_add_relu" for f in report.fused) == n_blocks
    assert all(s.bn.endswith("downsample.1") and s.action == "converted" for s in report.skipped)
    assert "BN output is the return value" in report.skipped[0].reason
    assert not report.fallbacks and not report.warnings
    assert sorted(report.rewritten) == ["", "layer1.0", "layer1.1", "layer2.0"]
    for name, m in fused.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            fused_here = any(f.bn == name for f in report.fused)
            assert type(m) is (tritonbn.BatchNormAct2d if fused_here else tritonbn.BatchNorm2d), name
            # A class swap: the module must hold what a constructed one holds (BatchNormAct adds no state).
            fresh = type(m)(m.num_features, **({"activation": "relu"} if fused_here else {}))
            assert sorted(m.__dict__) == sorted(fresh.__dict__), name
            assert getattr(m, "activation", None) == getattr(fresh, "activation", None)
    # No ReLU left: none in the rewritten forwards, no ReLU module called.
    for name in report.rewritten:
        assert "relu" not in type(fused.get_submodule(name))._tritonbn_fused_code
    assert _relu_calls(copy.deepcopy(fused), _x()) == 0
    assert _relu_calls(copy.deepcopy(torch_model), _x()) == 1 + n_blocks * per_block
    # Classes, methods and containers of the model stay usable.
    assert isinstance(fused, type(torch_model)) and isinstance(fused.layer1[0], type(torch_model.layer1[0]))
    assert isinstance(fused.layer1, nn.Sequential) and callable(fused._forward_impl)

    torch_model = copy.deepcopy(torch_model)  # the caller's model is checked untouched elsewhere
    models = (fused, torch_model, ref64)
    opts = [torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9) for m in models]
    for step in range(3):
        x = _x(step + 1)
        outs = []
        for m, opt in zip(models, opts):
            opt.zero_grad()
            y = m(x.to(next(m.parameters()).dtype))
            y.square().sum().backward()
            outs.append(y)
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(outs[0], outs[2].float(), rtol=1e-4, atol=1e-4)
        for (name, p), q, r in zip(fused.named_parameters(), torch_model.parameters(), ref64.parameters()):
            _assert_rel(p.grad, q.grad, 5e-4, name)
            _assert_rel(p.grad, r.grad, 5e-4, name)
        _assert_same_state(fused, torch_model, rtol=1e-4, atol=1e-5)
        _assert_same_state(fused, ref64, rtol=1e-4, atol=1e-4)
        for opt in opts:
            opt.step()
    for m in models:
        m.eval()
    with torch.no_grad():
        y, y_t, y64 = (m(_x(9).to(next(m.parameters()).dtype)) for m in models)
    torch.testing.assert_close(y, y_t, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y, y64.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act_cls,activation", [(nn.ReLU6, "relu6"), (nn.SiLU, "silu")])
def test_mobilenet_v2_fused_trains_like_torch(act_cls, activation):
    """torchvision's MobileNetV2 structure (Conv2dNormActivation = Sequential(conv, BN, ReLU6(inplace));
    inverted residuals ``x + self.conv(x)`` whose last BN has no activation), and its SiLU variant
    (EfficientNet's blocks): every BN followed by its activation is fused, the linear bottlenecks' BNs
    are not (their output leaves the Sequential); same outputs, gradients and state as the model over
    three SGD steps and in eval."""
    torch.manual_seed(0)
    model = MobileNetV2(activation_layer=act_cls)
    x = _x(0, (2, 3, 16, 16))
    fused, report = tritonbn.fuse_model(model, (x,))
    n_act = sum(isinstance(m, act_cls) for m in model.modules())
    assert len(report.fused) == n_act and {f.pattern for f in report.fused} == {f"bn_{activation}"}, report
    assert all("BN output is the return value" in s.reason for s in report.skipped), report
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(report.fused) + len(report.skipped) == n_bn
    calls = [0]
    for m in fused.modules():
        if isinstance(m, act_cls):
            m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    torch_model = copy.deepcopy(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (fused, torch_model)]
    for step in range(3):
        xs = _x(step + 1, (2, 3, 16, 16))
        outs = []
        for m, opt in zip((fused, torch_model), opts):
            opt.zero_grad()
            y = m(xs)
            y.square().sum().backward()
            outs.append(y)
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
        for (name, p), q in zip(fused.named_parameters(), torch_model.parameters()):
            _assert_rel(p.grad, q.grad, 5e-4, name)
        _assert_same_state(fused, torch_model, rtol=1e-4, atol=1e-5)
        for opt in opts:
            opt.step()
    assert calls[0] == 0   # no activation module ran: every one was fused
    fused.eval()
    torch_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(_x(9, (2, 3, 16, 16))), torch_model(_x(9, (2, 3, 16, 16))),
                                   rtol=1e-4, atol=1e-5)


def test_sync_batchnorm_conversion_of_a_fused_model_fails_loudly_and_the_right_order_works():
    """SyncBatchNorm has no fused activation: torch's converter, which swaps every _BatchNorm, makes the
    fused call raise (fuse_model passes the residual even when there is none) instead of silently dropping
    the activation; tritonbn's converter refuses with the right order, which works: convert, then fuse
    (SyncBatchNorm layers stay unfused)."""
    torch.manual_seed(0)
    model = MobileNetV2().eval()
    x = _x(0, (2, 3, 16, 16))
    fused, _ = tritonbn.fuse_model(model, (x,))
    swapped = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(fused))
    with pytest.raises(TypeError, match="positional argument"):
        swapped(x)
    with pytest.raises(TypeError, match="convert the unfused model first, then call fuse_model"):
        tritonbn.convert_sync_batchnorm(copy.deepcopy(fused))
    synced = tritonbn.convert_sync_batchnorm(copy.deepcopy(model))
    fused_synced, report = tritonbn.fuse_model(synced, (x,))
    assert not report.fused and all(s.action == "unchanged" for s in report.skipped), report
    with torch.no_grad():
        torch.testing.assert_close(fused_synced.eval()(x), model(x), rtol=1e-5, atol=1e-6)


def test_input_model_untouched_and_checkpoints_load_both_ways():
    model = _model("bottleneck")
    model.layer1[0].register_forward_hook(lambda *_: None)  # a hook on a rewritten module
    before = _snapshot(model)
    fused, _ = tritonbn.fuse_model(model, (_x(),))
    after = _snapshot(model)
    assert before[1] == after[1]
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    # The fused model's state is the model's, keys and values; the hook moved with its module.
    assert list(fused.state_dict()) == list(model.state_dict())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fused.state_dict().items())
    assert len(fused.layer1[0]._forward_hooks) == 1
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(fused.parameters(), model.parameters()))

    # fused -> torch, and torch -> fused, strict.
    fused.train()
    with torch.no_grad():
        fused(_x(3))  # move running stats, num_batches_tracked
    torch_again = _model("bottleneck")
    torch_again.load_state_dict(fused.state_dict())
    refused, _ = tritonbn.fuse_model(_model("bottleneck", width=2), (_x(),))
    refused.load_state_dict(torch_again.state_dict())
    for m in (fused, torch_again, refused):
        m.eval()
    with torch.no_grad():
        y = fused(_x(4))
        torch.testing.assert_close(torch_again(_x(4)), y, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(refused(_x(4)), y, rtol=1e-5, atol=1e-6)


def test_without_example_inputs_only_provable_adds_are_fused():
    fused, report = tritonbn.fuse_model(_model("basic"))
    assert {f.pattern for f in report.fused} == {"bn_relu"} and len(report.fused) == 4
    needs = [s for s in report.skipped if "needs example_inputs" in s.reason]
    assert [s.bn for s in needs] == ["layer1.0.bn2", "layer1.1.bn2", "layer2.0.bn2"]
    assert all(s.action == "converted" for s in needs)

    class SelfResidual(nn.Module):  # bn(x) + x: provable from the graph
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return F.relu(self.bn(x) + x)

    _, report = tritonbn.fuse_model(SelfResidual())
    assert [(f.bn, f.pattern, f.residual) for f in report.fused] == [("bn", "bn_add_relu", "x")]


def test_fused_module_is_copyable_not_picklable_and_fuses_again():
    fused, _ = tritonbn.fuse_model(_model("basic", layers=(1, 1)), (_x(),))
    fused.eval()
    twin = copy.deepcopy(fused)  # e.g. an EMA copy
    with torch.no_grad():
        assert torch.equal(twin(_x(1)), fused(_x(1)))
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        pickle.dumps(fused)
    again, report = tritonbn.fuse_model(fused, (_x(),))
    assert not report.fused and not report.rewritten
    assert all("already a fused" in s.reason or s.bn.endswith("downsample.1") for s in report.skipped)
    with torch.no_grad():
        assert torch.equal(again(_x(1)), fused(_x(1)))


# --- spellings ------------------------------------------------------------------------------------

class _Pattern(nn.Module):
    def __init__(self, body, shared_relu=False):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True) if shared_relu else nn.ReLU()
        self.body = body

    def forward(self, x, z):
        return self.body(self, x, z)


def _shared(m, x, z):
    y = m.relu(m.bn(x))
    return m.relu(y + z)  # the one ReLU module, called twice


def _discarded_relu_(m, x, z):
    y = m.bn(x)
    y.relu_()
    return y


def _discarded_add_(m, x, z):
    y = m.bn(x)
    y.add_(z)
    y = torch.relu(y)
    return y


def _iadd(m, x, z):
    y = m.bn(x)
    y += z
    return m.relu(y)


RELU_SPELLINGS = {
    "nn.ReLU": lambda m, x, z: m.relu(m.bn(x)),
    "F.relu": lambda m, x, z: F.relu(m.bn(x)),
    "F.relu_inplace": lambda m, x, z: F.relu(m.bn(x), inplace=True),
    "torch.relu": lambda m, x, z: torch.relu(m.bn(x)),
    "torch.relu_": lambda m, x, z: torch.relu_(m.bn(x)),
    ".relu()": lambda m, x, z: m.bn(x).relu(),
    ".relu_()": lambda m, x, z: m.bn(x).relu_(),
    ".relu_() discarded": _discarded_relu_,
}
ADD_SPELLINGS = {
    "bn + z": lambda m, x, z: m.relu(m.bn(x) + z),
    "z + bn": lambda m, x, z: m.relu(z + m.bn(x)),
    "+=": _iadd,
    "torch.add": lambda m, x, z: F.relu(torch.add(m.bn(x), z)),
    "torch.add(z, bn, alpha=1)": lambda m, x, z: F.relu(torch.add(z, m.bn(x), alpha=1)),
    ".add": lambda m, x, z: m.bn(x).add(z).relu(),
    ".add_": lambda m, x, z: m.bn(x).add_(z).relu_(),
    ".add_ discarded": _discarded_add_,
}


def _check_same_as_torch(model, fused, x, z):
    """One training step and one eval call: outputs, input grads, parameter grads and state."""
    model, fused = copy.deepcopy(model).train(), fused.train()
    outs = []
    for m in (model, fused):
        xx, zz = x.clone().requires_grad_(True), z.clone().requires_grad_(True)
        y = m(xx, zz)
        (y * torch.linspace(-1, 2, y.numel()).view_as(y)).sum().backward()
        outs.append((y, xx.grad, zz.grad, m.bn.weight.grad, m.bn.bias.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    _assert_same_state(fused, model, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x, z), model.eval()(x, z), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spelling", list(RELU_SPELLINGS) + ["shared nn.ReLU(inplace=True)"])
def test_relu_spellings_fuse(spelling):
    body = RELU_SPELLINGS.get(spelling, _shared)
    model = _Pattern(body, shared_relu=body is _shared)
    x, z = _x(1, (2, 3, 2, 2)), _x(2, (2, 3, 2, 2))
    fused, report = tritonbn.fuse_model(model)
    assert [(f.bn, f.pattern) for f in report.fused] == [("bn", "bn_relu")], report
    assert isinstance(fused.bn, tritonbn.BatchNormAct2d) and fused.bn.activation == "relu"
    _check_same_as_torch(model, fused, x, z)


@pytest.mark.parametrize("spelling", ADD_SPELLINGS)
def test_add_spellings_fuse(spelling):
    model = _Pattern(ADD_SPELLINGS[spelling])
    x, z = _x(1, (2, 3, 2, 2)), _x(2, (2, 3, 2, 2))
    fused, report = tritonbn.fuse_model(model, (x, z))
    assert [(f.bn, f.pattern, f.residual) for f in report.fused] == [("bn", "bn_add_relu", "z")], report
    assert "relu" not in type(fused)._tritonbn_fused_code
    _check_same_as_torch(model, fused, x, z)


@pytest.mark.parametrize("spelling", ADD_SPELLINGS)
def test_a_later_residual_unlike_the_examples_runs_unfused_as_the_code_was_written(spelling):
    """Fused on same-dtype examples, then called with a residual of another dtype, or one that
    broadcasts: the fused module computes that call as the model's own code did. ``+`` promotes,
    ``.add_`` and ``+=`` keep the BN output's dtype (and refuse to broadcast it), with the same values
    and grads (the tracer records ``y += z`` as an in-place add: FX's own proxies would run ``y = y + z``)."""
    model = _Pattern(ADD_SPELLINGS[spelling])
    x, z = _x(1, (2, 3, 2, 2)), _x(2, (2, 3, 2, 2))
    fused, report = tritonbn.fuse_model(model, (x, z))
    assert [f.pattern for f in report.fused] == ["bn_add_relu"]
    in_place = spelling.startswith(".add_") or spelling == "+="
    assert report.fused[0].add == ("+=" if spelling == "+=" else "Tensor.add_" if in_place else
                                   report.fused[0].add)
    assert fused.bn._residual_in_place is in_place
    _check_same_as_torch(model, copy.deepcopy(fused), x, z.double())   # (each from the same state)
    with torch.no_grad():
        y, y_torch = copy.deepcopy(fused)(x, z.double()), copy.deepcopy(model)(x, z.double())
    assert y.dtype == y_torch.dtype == (torch.float32 if in_place else torch.float64)
    _check_same_as_torch(model, copy.deepcopy(fused), x, z[:1, :, :1])   # z broadcasts
    small = x[:, :, :1, :1].contiguous()                                # the BN output would broadcast
    if in_place:
        for m in (model, fused):
            with pytest.raises(RuntimeError, match="doesn't match the broadcast shape"):
                m(small, z)
    else:
        _check_same_as_torch(model, copy.deepcopy(fused), small, z)
    scripted = torch.jit.script(copy.deepcopy(fused).eval())
    with torch.no_grad():
        torch.testing.assert_close(scripted(x, z.double()), model.eval()(x, z.double()), rtol=1e-5, atol=1e-6)


class _ActPattern(nn.Module):
    def __init__(self, body, act_cls):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.act = act_cls(inplace=True)
        self.body = body

    def forward(self, x, z):
        return self.body(self, x, z)


ACT_SPELLINGS = {   # spelling: (activation, module class, body, residual fused)
    "nn.ReLU6": ("relu6", nn.ReLU6, lambda m, x, z: m.act(m.bn(x)), False),
    "F.relu6": ("relu6", nn.ReLU6, lambda m, x, z: F.relu6(m.bn(x)), False),
    "F.relu6 in place": ("relu6", nn.ReLU6, lambda m, x, z: F.relu6(m.bn(x), inplace=True), False),
    "nn.ReLU6 after +=": ("relu6", nn.ReLU6, lambda m, x, z: m.act(m.bn(x).add_(z)), True),
    "F.relu6 after +": ("relu6", nn.ReLU6, lambda m, x, z: F.relu6(z + m.bn(x)), True),
    "nn.SiLU": ("silu", nn.SiLU, lambda m, x, z: m.act(m.bn(x)), False),
    "F.silu": ("silu", nn.SiLU, lambda m, x, z: F.silu(m.bn(x)), False),
    "F.silu in place": ("silu", nn.SiLU, lambda m, x, z: F.silu(m.bn(x), inplace=True), False),
    "nn.Hardswish": ("hardswish", nn.Hardswish, lambda m, x, z: m.act(m.bn(x)), False),
    "F.hardswish": ("hardswish", nn.Hardswish, lambda m, x, z: F.hardswish(m.bn(x)), False),
    "F.hardswish in place": ("hardswish", nn.Hardswish, lambda m, x, z: F.hardswish(m.bn(x), inplace=True),
                             False),
}


@pytest.mark.parametrize("spelling", ACT_SPELLINGS)
def test_relu6_and_silu_spellings_fuse(spelling):
    """BN → ReLU6 (MobileNet's Conv-BN-ReLU6) and BN → SiLU (EfficientNet's, YOLO's Conv-BN-SiLU) fuse like
    BN → ReLU, and BN → add → ReLU6 like BN → add → ReLU: same outputs, gradients and state as the model.
    Weights scaled so that ReLU6 clips at 6 too."""
    activation, cls, body, residual = ACT_SPELLINGS[spelling]
    model = _ActPattern(body, cls)
    with torch.no_grad():
        model.bn.weight.mul_(4)
    x, z = _x(1, (2, 3, 2, 2)), _x(2, (2, 3, 2, 2)) * 3
    fused, report = tritonbn.fuse_model(model, (x, z))
    pattern = ("bn_add_" if residual else "bn_") + activation
    assert [(f.bn, f.pattern, f.activation) for f in report.fused] == [("bn", pattern, activation)], report
    assert isinstance(fused.bn, tritonbn.BatchNormAct2d) and fused.bn.activation == activation
    code = type(fused)._tritonbn_fused_code
    assert activation not in code and "act" not in code
    if activation == "relu6":
        with torch.no_grad():
            assert (copy.deepcopy(model)(x, z) == 6).any()
    _check_same_as_torch(model, fused, x, z)


def test_add_of_two_bn_outputs_fuses_the_first():
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn_a, self.bn_b = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

        def forward(self, x, z):
            return F.relu(self.bn_a(x) + self.bn_b(z))

    model = TwoBranches()
    x, z = _x(1, (2, 3, 2, 2)), _x(2, (2, 3, 2, 2))
    fused, report = tritonbn.fuse_model(model, (x, z))
    assert [(f.bn, f.residual) for f in report.fused] == [("bn_a", "bn_b")]
    [skipped] = report.skipped
    assert (skipped.bn, skipped.reason) == ("bn_b", "in the model's forward: its add is fused with 'bn_a'")
    with torch.no_grad():
        torch.testing.assert_close(fused(x, z), model(x, z), rtol=1e-5, atol=1e-6)


class _Chain(nn.Module):
    """Two conv-BN-activation stages in one forward; the second adds the first's output as its residual."""

    def __init__(self, body, act1, act2):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.act1, self.act2 = act1, act2
        self.body = body

    def forward(self, x):
        return self.body(self, x)


def _residual_is_fused_relu(m, x):
    h = m.act1(m.bn1(m.conv1(x)))
    out = m.bn2(m.conv2(h)) + h
    return m.act1(out)  # the one ReLU module, called twice


def _residual_is_fused_silu(m, x):
    y = m.act1(m.bn1(m.conv1(x)))
    return m.act2(y + m.bn2(m.conv2(y)))


def _residual_is_fused_add_relu(m, x):
    h = m.act1(m.bn1(m.conv1(x)) + x)
    out = m.bn2(m.conv2(h))
    out += h
    return m.act2(out)


def _residual_fused_later(m, x):  # the residual's BN comes after the BN whose call moves to the add
    out = m.bn2(m.conv2(x))
    h = F.silu(m.bn1(m.conv1(x)))
    return F.relu6(out + h)


CHAINS = {  # case: (body, act1, act2, [(bn, pattern, residual)])
    "relu(bn2(conv(h)) + h), h = relu(bn1(..))": (
        _residual_is_fused_relu, nn.ReLU(), nn.Identity(), [("bn1", "bn_relu", None),
                                                            ("bn2", "bn_add_relu", "act1")]),
    "relu6(y + bn2(conv(y))), y = silu(bn1(..))": (
        _residual_is_fused_silu, nn.SiLU(), nn.ReLU6(), [("bn1", "bn_silu", None),
                                                         ("bn2", "bn_add_relu6", "act1")]),
    "relu6(bn2(..) += h), h = relu(bn1(..) + x)": (
        _residual_is_fused_add_relu, nn.ReLU(inplace=True), nn.ReLU6(inplace=True),
        [("bn1", "bn_add_relu", "x"), ("bn2", "bn_add_relu6", "act1")]),
    "relu6(bn2(..) + silu(bn1(..))), bn1 after bn2": (
        _residual_fused_later, nn.Identity(), nn.Identity(), [("bn1", "bn_silu", None),
                                                              ("bn2", "bn_add_relu6", "silu")]),
}


@pytest.mark.parametrize("case", CHAINS)
def test_residual_that_is_another_fused_activation(case):
    """The add's other operand is the output of another fused BN+activation of the same forward (whose
    activation call is removed): both fuse, with the outputs, gradients and running stats of the model."""
    body, act1, act2, expected = CHAINS[case]
    torch.manual_seed(0)
    model = _Chain(body, act1, act2)
    with torch.no_grad():
        model.bn1.weight.mul_(3)
        model.bn2.weight.mul_(3)  # ReLU6 clips
    x = _x(1, (2, 4, 3, 3))
    fused, report = tritonbn.fuse_model(model, (x,))
    assert [(f.bn, f.pattern, f.residual) for f in report.fused] == expected, report
    assert not report.skipped and report.rewritten == [""]
    model, fused = copy.deepcopy(model).train(), fused.train()
    grads = []
    for m in (model, fused):
        xx = x.clone().requires_grad_(True)
        y = m(xx)
        (y * torch.linspace(-1, 2, y.numel()).view_as(y)).sum().backward()
        grads.append([y, xx.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    _assert_same_state(fused, model, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-6)


def test_adds_are_proven_under_the_callers_autocast():
    class ResidualFromInput(nn.Module):  # under autocast: bf16 BN output + fp32 input
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)) + x)

    torch.manual_seed(0)
    model = ResidualFromInput()
    _, report = tritonbn.fuse_model(model, (_x(),))
    assert len(report.fused) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, report = tritonbn.fuse_model(model, (_x(),))
    assert not report.fused and "the add promotes dtype (BN output torch.bfloat16" in report.skipped[0].reason

    resnet = _model("basic", layers=(1, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, report = tritonbn.fuse_model(resnet, (_x(),))
        assert sum(f.pattern == "bn_add_relu" for f in report.fused) == 2
        y, y_torch = fused(_x(1)), resnet(_x(1))
    assert y.dtype == y_torch.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_torch.float(), rtol=0.05, atol=0.05)


# --- unsafe patterns -----------------------------------------------------------------------------

def _bn_two_users(m, x, z):
    y = m.bn(x)
    return F.relu(y) + y


def _add_two_users(m, x, z):
    s = m.bn(x) + z
    return F.relu(s) * s


def _two_calls(m, x, z):
    return F.relu(m.bn(x)) + F.relu(m.bn(z))


def _bn_relu(m, x, z):
    return m.relu(m.bn(x))


def _in_place_between(m, x, z):
    y = m.bn(x)
    x.mul_(2)  # the fused call would move after this, and read the updated x
    return F.relu(y + z)


class _ScaleInPlace(nn.Module):  # a user module that updates its argument in place
    def forward(self, t):
        return t.mul_(2)


@torch.fx.wrap
def _double(t):  # traced as one call (of a function not known to be pure)
    return t.mul_(2)


def _out_between(m, x, z):
    y = m.bn(x)
    identity = torch.mul(x, 2.0, out=x)  # x updated in place (out=) after the BN read it
    return m.relu(y + identity)


def _between(call):
    def body(m, x, z):
        y = m.bn(x)
        identity = call(m, x)
        return m.relu(y + identity)
    return body


def _reads_running_mean(m, x, z):
    y = m.bn(x)
    shifted = z.transpose(1, 3) - m.bn.running_mean  # the fused call would update it after this read
    return F.relu(y + z) * shifted.transpose(1, 3)


UNSAFE = {  # case: (forward body, expected reason)
    "BN output with 2 users": (_bn_two_users, "BN output has 2 users"),
    "add result with 2 users": (_add_two_users, "add result has 2 users"),
    "broadcasting add": (lambda m, x, z: F.relu(m.bn(x) + z[:1, :, :1]), "the add broadcasts"),
    "dtype-promoting add": (lambda m, x, z: F.relu(m.bn(x) + z.double()), "the add promotes dtype"),
    "add with alpha": (lambda m, x, z: F.relu(torch.add(m.bn(x), z, alpha=2)), "has alpha=2"),
    "add of a Python number": (lambda m, x, z: F.relu(m.bn(x) + 1.0), "not a tensor"),
    "in-place add into the other operand": (lambda m, x, z: F.relu(z.add_(m.bn(x))),
                                            "updates its other operand"),
    "in-place update between BN and add": (_in_place_between, "'mul_', between the BN and the add, updates"),
    "out= between BN and add": (_out_between, "'mul', between the BN and the add, writes to out="),
    "F.relu(x, True) between BN and add": (_between(lambda m, x: F.relu(x, True)),
                                           "'relu', between the BN and the add, updates a tensor in place"),
    "user module between BN and add": (_between(lambda m, x: m.scale(x)),
                                       "calls module 'scale' (_ScaleInPlace), which is not known to leave"),
    "user module in a Sequential between BN and add": (
        _between(lambda m, x: m.seq(x)), "calls module 'seq.1' (_ScaleInPlace), which is not known to leave"),
    "user function between BN and add": (_between(lambda m, x: _double(x)),
                                         "calls _double, which is not known to leave its inputs unchanged"),
    "running stats read between BN and add": (_reads_running_mean, "uses the BN's parameters or buffers"),
    "ReLU with hooks": (_bn_relu, "ReLU 'relu' has forward hooks"),
    "BN with hooks": (_bn_relu, "BN has forward hooks"),
    "BN called twice": (_two_calls, "BN is called 2 times"),
    "BN feeds a LeakyReLU": (lambda m, x, z: F.leaky_relu(m.bn(x)), "feeds leaky_relu, not an activation"),
    "add feeds a SiLU": (lambda m, x, z: F.silu(m.bn(x) + z), "the add is fused only before a ReLU or ReLU6"),
    "add feeds a Hardswish": (lambda m, x, z: F.hardswish(m.bn(x) + z),
                              "the add is fused only before a ReLU or ReLU6"),
    "hardtanh(0, 6)": (lambda m, x, z: F.hardtanh(m.bn(x), 0.0, 6.0), "feeds hardtanh, not an activation"),
    "add feeds a sigmoid": (lambda m, x, z: torch.sigmoid(m.bn(x) + z), "add result feeds sigmoid"),
}


@pytest.mark.parametrize("case", UNSAFE)
def test_unsafe_patterns_left_unfused_with_reason(case):
    body, reason = UNSAFE[case]
    model = _Pattern(body)
    if case == "ReLU with hooks":
        model.relu.register_forward_hook(lambda mod, args, out: out * 2)
    if case == "BN with hooks":
        model.bn.register_forward_hook(lambda mod, args, out: None)
    model.scale, model.seq = _ScaleInPlace(), nn.Sequential(nn.Identity(), _ScaleInPlace())
    x, z = _x(1, (2, 3, 2, 2)), _x(2, (2, 3, 2, 2))
    fused, report = tritonbn.fuse_model(model, (x, z))
    assert torch.equal(x, _x(1, (2, 3, 2, 2))) and torch.equal(z, _x(2, (2, 3, 2, 2)))  # run on copies
    assert not report.fused and not report.rewritten
    [skipped] = report.skipped
    assert skipped.bn == "bn" and skipped.action == "converted" and reason in skipped.reason, report
    assert type(fused.bn) is tritonbn.BatchNorm2d
    with torch.no_grad():
        y = model.eval()(x.clone(), z.clone())
        torch.testing.assert_close(fused.eval()(x.clone(), z.clone()), y, rtol=1e-5, atol=1e-6)


def _pure_between(m, x, z):
    y = m.bn(x)
    i = m.down(z)  # nn.Sequential of standard layers (torchvision's downsample)
    i = torch.flatten(i, 2).view(i.shape).contiguous()
    i = torch.cat([F.interpolate(F.avg_pool2d(i, 1), scale_factor=1.0), i], 1)[:, :3] * 1.0
    i = F.relu(i.float())
    return m.relu(y + i)


def test_calls_known_to_be_pure_between_bn_and_add_still_fuse():
    """The BN call moves past them to the add: standard modules, ATen functions and methods without out=,
    Python-level torch.nn.functional without inplace=True, operators."""
    model = _Pattern(_pure_between)
    model.down = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    x, z = _x(1, (2, 3, 2, 2)), _x(2, (2, 3, 2, 2))
    fused, report = tritonbn.fuse_model(model, (x, z))
    assert [(f.bn, f.pattern) for f in report.fused] == [("bn", "bn_add_relu")], report
    _check_same_as_torch(model, fused, x, z)


def test_subclasses_and_syncbn_are_left_alone():
    class MyBN(nn.BatchNorm2d):
        pass

    model = nn.Sequential(nn.Conv2d(3, 3, 1), MyBN(3), nn.ReLU(), nn.SyncBatchNorm(3), nn.ReLU(),
                          tritonbn.BatchNorm2d(3), nn.ReLU(), nn.BatchNorm2d(3))
    fused, report = tritonbn.fuse_model(model)
    assert [f.bn for f in report.fused] == ["5"]
    reasons = {s.bn: (s.action, s.reason) for s in report.skipped}
    assert reasons["1"] == ("unchanged", "MyBN is not an exact BatchNorm1d/2d/3d (left as it is)")
    assert reasons["3"][0] == "unchanged" and "SyncBatchNorm" in reasons["3"][1]
    assert reasons["7"][0] == "converted" and "return value" in reasons["7"][1]
    assert type(fused[1]) is MyBN and type(fused[3]) is nn.SyncBatchNorm
    assert type(fused[5]) is tritonbn.BatchNormAct2d and type(fused[7]) is tritonbn.BatchNorm2d
    assert isinstance(fused, nn.Sequential) and len(fused) == 8


# --- fallback ------------------------------------------------------------------------------------

class _Untraceable(nn.Module):
    """An untraceable forward around two torchvision BasicBlocks, plus a BN of its own."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.block1, self.block2 = BasicBlock(4, 4), BasicBlock(4, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        if self.kind == "data" and x.sum() > 0:
            return self.block1(x)
        if self.kind == "training" and self.training:
            x = x * 1.0
        if self.kind in ("no_grad", "no_grad under no_grad"):
            with torch.no_grad():
                x = x * 1.0
        if self.kind == "fp32 island":
            with torch.autocast("cpu", enabled=False):
                x = x * 1.0
        if self.kind == "checkpoint":
            x = torch.utils.checkpoint.checkpoint(torch.sin, x, use_reentrant=False)
        if self.kind == "attribute":
            self.features = x
        if self.kind == "counter":
            self.calls = getattr(self, "calls", 0) + 1
        return self.block2(self.block1(x))


class _Optional(_Untraceable):
    def forward(self, x, scale=None):
        if scale is not None:
            x = x * scale
        return super().forward(x)


@pytest.mark.parametrize("kind,why", [
    ("data", "not FX-traceable (TraceError"),
    ("training", "depends on self.training"),
    ("no_grad", "changes grad mode, autocast or saved-tensor hooks"),
    # FX drops each of these blocks; the fuse call's own mode must not hide them
    ("no_grad under no_grad", "changes grad mode, autocast or saved-tensor hooks"),
    ("fp32 island", "changes grad mode, autocast or saved-tensor hooks"),
    ("checkpoint", "changes grad mode, autocast or saved-tensor hooks"),
    # a rewritten forward would not set them (the tracer would leave a Proxy there)
    ("attribute", "forward sets module attributes (features)"),
    ("counter", "forward sets module attributes (calls)"),
    # `if scale is not None` would be fixed to the given branch: f(x) would then fail
    ("optional", "forward has optional arguments (scale)"),
])
def test_untraceable_forward_falls_back_per_submodule(kind, why):
    torch.manual_seed(0)
    model = (_Optional if kind == "optional" else _Untraceable)(kind)
    x = _x(1, (2, 3, 4, 4))
    with torch.set_grad_enabled(kind != "no_grad under no_grad"):
        fused, report = tritonbn.fuse_model(model, (x,))
    assert [b.module for b in report.fallbacks] == [""] and why in report.fallbacks[0].reason
    assert not any(isinstance(v, torch.fx.Proxy) for m in fused.modules() for v in vars(m).values())
    assert "features" not in vars(model) and "calls" not in vars(model)
    skipped = {s.bn: s.reason for s in report.skipped}
    assert skipped.pop("bn").startswith("called from the model's forward, which is kept")
    if kind == "data":  # block2 did not run on the example input: its add is not proven
        assert skipped == {"block2.bn2": "in 'block2'.forward: the module did not run on example_inputs: "
                                         "cannot prove the add neither broadcasts nor promotes dtype"}
    blocks = {"block1.bn1", "block1.bn2", "block2.bn1", "block2.bn2"}
    assert {f.bn for f in report.fused} == blocks - set(skipped)
    assert type(fused).forward is type(model).forward and type(fused.bn) is tritonbn.BatchNorm2d
    for m in (model, fused):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-6)


# --- report, errors ------------------------------------------------------------------------------

def test_report_to_dict_json_and_text():
    _, report = tritonbn.fuse_model(_model("basic", layers=(1, 1)))
    d = report.to_dict()
    assert set(d) == {"fused", "skipped", "fallbacks", "rewritten", "warnings"}
    assert d["fused"][0] == {"bn": "bn1", "into": "BatchNormAct2d", "pattern": "bn_relu", "module": "",
                             "activation": "relu", "act": "nn.ReLU 'relu'", "add": None, "residual": None}
    assert set(d["skipped"][0]) == {"bn", "reason", "action"}
    assert isinstance(report.to_json(), str)
    text = str(report)
    assert text.startswith("fused 3 BatchNorm (3 BN+ReLU), 3 not fused")
    assert "needs example_inputs" in text


def test_bad_arguments_raise_clearly():
    with pytest.raises(TypeError, match="expected a torch.nn.Module, got list"):
        tritonbn.fuse_model([nn.BatchNorm2d(3)])
    with pytest.raises(TypeError, match="example_inputs must be a tuple"):
        tritonbn.fuse_model(nn.BatchNorm2d(3), {"x": torch.zeros(1)})
    with pytest.raises(TypeError, match="wrapper"):
        tritonbn.fuse_model(nn.DataParallel(nn.BatchNorm2d(3)))
    with pytest.raises(RuntimeError, match="failed on example_inputs"):
        wrong_channels = torch.zeros(2, 5, 2, 2)
        tritonbn.fuse_model(_Pattern(ADD_SPELLINGS["bn + z"]), (wrong_channels, wrong_channels))


# --- compile, DDP --------------------------------------------------------------------------------

def _relu6_silu_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU6(inplace=True),
                         nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5), nn.SiLU(),
                         nn.Conv2d(5, 4, 1), nn.BatchNorm2d(4), nn.Hardswish())


@pytest.mark.parametrize("build,patterns", [
    (lambda: _model("basic", layers=(1, 1)), {"bn_relu", "bn_add_relu"}),
    (_relu6_silu_model, {"bn_relu6", "bn_silu", "bn_hardswish"}),   # the custom ops carry the activation
])
def test_compile_fullgraph_aot_eager_of_fused_model(build, patterns):
    fused, report = tritonbn.fuse_model(build(), (_x(),))
    assert {f.pattern for f in report.fused} == patterns, report
    eager = copy.deepcopy(fused)
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    for step in range(2):
        y_c, y_e = compiled(_x(step)), eager(_x(step))
        torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-6)
        y_c.square().sum().backward()
        y_e.square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    _assert_same_state(fused, eager, rtol=1e-5, atol=1e-6)
    fused.eval()
    eager.eval()
    torch.testing.assert_close(compiled(_x(5)), eager(_x(5)), rtol=1e-5, atol=1e-6)


def test_ddp_of_fused_model(tmp_path):
    """One process, gloo: DDP wraps the fused model as any other (no Python-side state in the way)."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    fused, _ = tritonbn.fuse_model(_model("basic", layers=(1, 1)), (_x(),))
    plain = copy.deepcopy(fused)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(fused)
        for m in (ddp, plain):
            m(_x(1)).square().sum().backward()
    finally:
        dist.destroy_process_group()
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    _assert_same_state(fused, plain, rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_graph_capture_of_fused_resnet_step():
    """A fused ResNet training step captured in one CUDA graph replays like the fused model in eager mode
    (the rewritten forwards hold no Python-side state)."""
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    fmt = torch.channels_last
    fused, report = tritonbn.fuse_model(_model("bottleneck"), (_x(),))
    assert sum(f.pattern == "bn_add_relu" for f in report.fused) == 3
    model = fused.cuda().to(memory_format=fmt)
    eager = copy.deepcopy(model)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def batch():
        return torch.randn(X_SHAPE, device="cuda", generator=gen).contiguous(memory_format=fmt)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (Triton JIT, cuDNN plans) in lockstep
        for _ in range(2):
            x = batch()
            for m in (model, eager):
                m.zero_grad(set_to_none=True)
                m(x).square().sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    static_x = batch()
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = model(static_x)
        static_y.square().sum().backward()
    for _ in range(2):
        x = batch()
        static_x.copy_(x)
        graph.replay()
        eager.zero_grad(set_to_none=True)
        y = eager(x)
        y.square().sum().backward()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_y, y, rtol=1e-5, atol=1e-5)
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
        _assert_same_state(model, eager, rtol=1e-5, atol=1e-6)


class _AliasUpdate(nn.Module):
    """BN + ReLU, then augmented assignments whose in-place effect matters: on a view of the output, and
    on a tensor the caller passed in."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x, acc):
        out = F.relu(self.bn(self.conv(x)))
        half = out[:, :2]
        half += x[:, :2]      # updates out
        half *= 2
        acc += out.detach()   # updates the caller's tensor
        return out


def test_augmented_assignments_keep_their_in_place_effect():
    """FX's proxies have no ``__iadd__``: Python would run ``half = half + x`` and the rewritten forward
    would lose the update of ``out`` and of the caller's ``acc``. tritonbn's tracer records them in place."""
    torch.manual_seed(0)
    model = _AliasUpdate()
    x = _x(1, (2, 4, 3, 3))
    fused, report = tritonbn.fuse_model(model, (x, torch.zeros(2, 4, 3, 3)))
    assert [f.pattern for f in report.fused] == ["bn_relu"]
    for m in (model, fused):
        m.eval()
    acc, acc_fused = torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, acc_fused), model(x, acc), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc_fused, acc, rtol=1e-5, atol=1e-6)
    assert acc.abs().sum() > 0


class _CallsDeepBN(nn.Module):
    """An untraceable forward that also calls a grandchild's BN itself."""

    def __init__(self):
        super().__init__()
        self.sub = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = BasicBlock(4, 4)

    def forward(self, x):
        y = self.sub(x)
        if y.sum() > 0:
            y = y - 1
        return self.block(self.sub[1](y))


def test_a_bn_an_untraced_ancestor_may_call_directly_is_not_fused():
    torch.manual_seed(0)
    model = _CallsDeepBN()
    x = _x(1, (2, 3, 4, 4))
    fused, report = tritonbn.fuse_model(model, (x,))
    reasons = {s.bn: s.reason for s in report.skipped}
    assert "may call it directly (it reads self.sub.1)" in reasons["sub.1"], reasons
    assert {f.bn for f in report.fused} == {"block.bn1", "block.bn2"}    # the blocks' own BNs still fuse
    # A sibling it only calls through its container (self.block(...)) is not refused: only read chains
    # that reach the BN are.
    assert not any("may call it directly" in r for b, r in reasons.items() if b != "sub.1")
    for m in (model, fused):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-6)


class _ListOrTensor(nn.Module):
    """torchvision's _DenseLayer style: ``isinstance(inputs, Tensor)`` on an argument, which tracing
    fixes to the branch of a Proxy (not a Tensor): the rewritten forward then fails on a Tensor."""

    def __init__(self, c):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(c), nn.Conv2d(c, 2, 1)

    def forward(self, inputs):
        if isinstance(inputs, torch.Tensor):
            inputs = [inputs]
        return self.conv(F.relu(self.bn(torch.cat(inputs, 1))))


def test_a_fused_model_that_fails_its_examples_is_not_returned():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _ListOrTensor(4))
    x = _x(1, (2, 3, 4, 4))
    fused, report = tritonbn.fuse_model(model, (x,))
    assert not report.fused and not report.rewritten
    assert report.warnings and "the fused model raised TypeError on example_inputs" in report.warnings[-1]
    assert [(s.bn, s.action) for s in report.skipped] == [("1.bn", "converted")]
    assert type(fused[1].bn) is tritonbn.BatchNorm2d and type(fused[1]).forward is _ListOrTensor.forward
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-6)


def test_the_example_check_tells_wrong_values_from_rounding():
    from tritonbn.fuse import _differs_on_examples

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    x = _x(1, (2, 3, 4, 4))
    same = tritonbn.convert_model(copy.deepcopy(model))           # tritonbn's kernels: rounding only
    assert _differs_on_examples(model, same, (x,)) is None
    wrong = nn.Sequential(*copy.deepcopy(model), nn.ReLU())     # a dropped or added activation
    assert "output 0 on example_inputs differs by" in _differs_on_examples(model, wrong, (x,))
    shaped = nn.Sequential(*copy.deepcopy(model), nn.Flatten())
    assert "differs in type, shape or dtype" in _differs_on_examples(model, shaped, (x,))


class _HalfOnlyOp(nn.Module):
    def forward(self, x):
        if x.dtype == torch.float32:
            raise TypeError("half only")
        return x


class _HalfOnly(nn.Module):
    """Runs only on half-precision inputs (say, a custom kernel): the fp32 check cannot run it."""

    def __init__(self):
        super().__init__()
        self.bn, self.op = nn.BatchNorm2d(3), _HalfOnlyOp()

    def forward(self, x):
        return self.op(F.relu(self.bn(x)))


def test_a_model_the_example_check_cannot_run_is_fused_with_a_warning():
    fused, report = tritonbn.fuse_model(_HalfOnly(), (_x(1, (2, 3, 4, 4)).half(),))
    assert [f.pattern for f in report.fused] == ["bn_relu"]
    assert report.warnings == ["the fused model was not checked on example_inputs: the model itself raised "
                               "TypeError in eval mode, fp32: half only"]
