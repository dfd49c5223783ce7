"""torch.compile (no graph break), torch.export and ONNX export of models with tritonbn layers.

On CPU the custom ops run the kernels through Triton's interpreter (conftest sets TRITON_INTERPRET=1);
shapes are tiny, and most compile tests use the ``aot_eager`` backend (one test uses inductor).
"""

import copy

import pytest
import torch
from torch import nn

import tritonbn
from tritonbn import custom_ops


def _convnet(momentum=0.1, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
        nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5, momentum=momentum, affine=False), nn.Flatten(),
        nn.Linear(5 * 4 * 4, 3), nn.BatchNorm1d(3, momentum=momentum),
    )
    return tritonbn.convert_model(m)


def _randomize_stats(model):
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2.0)
            if m.affine:
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.5, 0.5)
    return model


def _recording_aot_eager(targets):
    """``aot_eager`` that records the call targets of the forward and backward graphs it runs."""
    from torch._dynamo.backends.common import aot_autograd

    def record(gm, example_inputs):
        for n in gm.graph.nodes:
            if n.op == "call_function":
                # A mutating op (bn_batch_stats) appears functionalized: auto_functionalized(op, ...).
                functionalized = str(n.target).startswith("auto_functionalized")
                targets.append(str(n.args[0] if functionalized else n.target))
        return gm

    return aot_autograd(fw_compiler=record, bw_compiler=record)


def _exact(device):
    # Bit-identical on CPU; on a GPU cuDNN/cuBLAS (TF32 convolutions) may pick other algorithms in the
    # traced graph, so the convolution gradients differ by rounding.
    return dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=1e-4, atol=1e-4)


def _train_steps_match(eager, compiled_model, compiled, steps, device, tol):
    for step in range(steps):
        torch.manual_seed(100 + step)
        x = torch.randn(2, 3, 4, 4, device=device)
        y_e, y_c = eager(x), compiled(x)
        torch.testing.assert_close(y_c, y_e, **tol)
        y_e.square().sum().backward()
        y_c.square().sum().backward()
    for (name, p_e), (_, p_c) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, msg=name, **tol)
    for (name, b_e), (_, b_c) in zip(eager.named_buffers(), compiled_model.named_buffers()):
        torch.testing.assert_close(b_c, b_e, msg=name, **tol)
    eager.eval()
    compiled_model.eval()
    x = torch.randn(2, 3, 4, 4, device=device)
    torch.testing.assert_close(compiled(x), eager(x), **tol)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_compile_fullgraph_aot_eager_matches_eager(momentum, device):
    eager = _convnet(momentum).to(device)
    model = copy.deepcopy(eager)
    torch._dynamo.reset()
    targets = []
    compiled = torch.compile(model, fullgraph=True, backend=_recording_aot_eager(targets))
    _train_steps_match(eager, model, compiled, 2, device, _exact(device))
    # The compiled graphs run the custom ops (tritonbn's kernels), not torch's batch norm.
    # Training forward: statistics + normalize; eval: normalize; training backward: one op per layer.
    for op, n in (("bn_batch_stats", 3), ("bn_normalize", 6), ("bn_backward", 3)):
        assert sum(t.startswith(f"tritonbn.{op}") for t in targets) == n, (op, targets)
    assert not any("batch_norm" in t for t in targets)
    assert int(model[1].num_batches_tracked) == 2


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiling_the_torch_model_first_leaves_tritonbn_compiled_on_its_kernels(backend, device):
    """A torch model and its tritonbn copy share their forward code (torchvision's, nn.Sequential's):
    compiled one after the other in one process, without a Dynamo reset, the tritonbn copy still runs
    tritonbn's custom ops, not the torch model's compiled graph (the H200 run of 2026-11-28 measured a
    compiled "tritonbn" ResNet-50 whose losses equalled torch's to the bit)."""
    from tritonbn import ops

    torch.manual_seed(0)
    theirs = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1),
                           nn.BatchNorm2d(5)).to(device)
    ours = tritonbn.convert_model(copy.deepcopy(theirs))
    x = torch.randn(2, 3, 4, 4, device=device)
    torch._dynamo.reset()
    torch.compile(theirs, backend=backend)(x).sum().backward()
    launches = []
    real = ops._Launch.__call__

    def count(self, *args):
        launches.append(self.kernel.fn.__name__)
        return real(self, *args)

    ops._Launch.__call__ = count
    try:
        y = torch.compile(ours, backend=backend)(x)
        y.sum().backward()
    finally:
        ops._Launch.__call__ = real
    assert len(launches) == 2 * 2 + 2 * 2, launches     # 2 layers: 2 forward and 2 backward launches each
    assert int(ours[1].num_batches_tracked) == 1


def test_compile_inductor_matches_eager(device):
    eager = _convnet(None).to(device)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True)
    _train_steps_match(eager, model, compiled, 2, device, dict(rtol=1e-4, atol=1e-4))


def test_compile_inductor_layers_without_running_stats(device):
    """track_running_stats=False (batch statistics in eval too; the statistics op then mutates nothing,
    ``bn_batch_stats_untracked``: Inductor could not lower the mutable one with both buffers None)."""
    torch.manual_seed(0)
    eager = tritonbn.convert_model(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
        nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5, affine=False, track_running_stats=False), nn.Flatten(),
        nn.Linear(5 * 4 * 4, 3))).to(device)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True)
    _train_steps_match(eager, model, compiled, 2, device, dict(rtol=1e-4, atol=1e-4))


def test_compile_functional_batch_norm_no_graph_break(device):
    def f(x, rm, rv, w, b):
        return tritonbn.batch_norm(x, rm, rv, w, b, training=True, momentum=0.2, eps=1e-3).relu()

    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, device=device).requires_grad_(True)
    w = torch.rand(4, device=device).requires_grad_(True)
    b = torch.randn(4, device=device).requires_grad_(True)
    rm_e, rv_e = torch.zeros(4, device=device), torch.ones(4, device=device)
    rm_c, rv_c = rm_e.clone(), rv_e.clone()
    y_e = f(x, rm_e, rv_e, w, b)
    y_c = torch.compile(f, fullgraph=True, backend="aot_eager")(x, rm_c, rv_c, w, b)
    torch.testing.assert_close(y_c, y_e, **_exact(device))
    torch.testing.assert_close((rm_c, rv_c), (rm_e, rv_e), **_exact(device))
    g_e = torch.autograd.grad(y_e.sum(), (x, w, b))
    g_c = torch.autograd.grad(y_c.sum(), (x, w, b))
    torch.testing.assert_close(g_c, g_e, **_exact(device))


def test_compiled_training_is_bitwise_deterministic(device):
    results = []
    for _ in range(2):
        model = _convnet(0.1).to(device)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.manual_seed(7)
        x = torch.randn(2, 3, 4, 4, device=device)
        y = compiled(x)
        y.square().sum().backward()
        results.append([y] + [p.grad for p in model.parameters()] + list(model.buffers()))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("fused", [False, True])
def test_custom_ops_opcheck(training, fused, device):
    """Schema, fake (meta) implementations (shapes, dtypes, strides), autograd registration (none: the ops
    are not differentiable, ``custom_ops.Normalize`` is) and the declared mutation of the running stats,
    plain and with the fused residual + ReLU (which adds the bitmask output)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, device=device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.rand(3, device=device, requires_grad=True)
    b = torch.randn(3, device=device, requires_grad=True)
    z = torch.randn_like(x).requires_grad_(True) if fused else None
    act = 1 if fused else 0
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    if training:
        nbt = torch.tensor(3, device=device)
        for momentum in (None, 0.1):
            torch.library.opcheck(torch.ops.tritonbn.bn_batch_stats,
                                  (x.detach(), rm.clone(), rv.clone(), nbt, momentum, 1e-5))
        torch.library.opcheck(torch.ops.tritonbn.bn_batch_stats, (x.detach(), None, None, None, 0.1, 1e-5))
        torch.library.opcheck(torch.ops.tritonbn.bn_batch_stats_untracked, (x.detach(), 1e-5))
        stats = torch.ops.tritonbn.bn_batch_stats(x.detach(), rm, rv, nbt, None, 1e-5)
        mean_src = var_src = stats
    else:
        mean_src, var_src = rm, rv
    args = (x, w, b, z, mean_src, var_src, 1e-5, training, act)
    torch.library.opcheck(torch.ops.tritonbn.bn_normalize, args)
    y, mask = torch.ops.tritonbn.bn_normalize(*args)
    assert mask.numel() == (4 if fused else 0)      # 120 elements: ceil(120 / 32) words
    dy = torch.randn_like(x)
    torch.library.opcheck(torch.ops.tritonbn.bn_backward,
                          (dy, x.detach(), w.detach(), b.detach(), mean_src, var_src, mask if fused else None,
                           1e-5, training, act, True, True, True, fused, torch.float32))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("act,residual", [(0, False), (1, False), (1, True), (0, True), (2, True),
                                          (3, False), (4, False)])
@pytest.mark.parametrize("needs", [(True, True, True, True), (True, False, False, True),
                                   (False, True, True, False), (False, False, True, True)])
def test_normalize_function_gives_the_eager_paths_bits(training, act, residual, needs, device):
    """``custom_ops.Normalize`` (what compiled graphs differentiate: ``bn_normalize`` forward, ``bn_backward``
    backward) against tritonbn's eager path, bit for bit: outputs, running stats and the gradients of each
    subset of (x, weight, bias, residual) asked for; the ops themselves carry no autograd kernel (a
    compiled graph calls them with no Python autograd layer in between)."""
    for name in ("bn_batch_stats", "bn_batch_stats_untracked", "bn_normalize", "bn_backward"):
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"tritonbn::{name}", "Autograd")
    torch.manual_seed(0)
    x0 = torch.randn(3, 5, 4, 3, device=device).contiguous(memory_format=torch.channels_last) * 2 + 1
    z0 = torch.randn_like(x0) if residual else None
    w0, b0 = torch.rand(5, device=device) + 0.5, torch.randn(5, device=device)
    dy = torch.randn_like(x0)
    results = []
    for path in ("eager", "function"):
        x, w, b = x0.clone(), w0.clone(), b0.clone()
        z = z0.clone() if residual else None
        inputs = [t.requires_grad_(need) for t, need in zip((x, w, b, z), needs) if t is not None]
        rm, rv = torch.zeros(5, device=device), torch.ones(5, device=device)
        if path == "eager":
            y = tritonbn.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, residual=z,
                                    activation=[None, "relu", "relu6", "silu", "hardswish"][act])
        else:
            stats = torch.ops.tritonbn.bn_batch_stats(x.detach(), rm, rv, None, 0.1, 1e-5) if training \
                else None
            mean_src, var_src = (stats, None) if training else (rm, rv)
            y = custom_ops.Normalize.apply(x, w, b, z, mean_src, var_src, 1e-5, training, act, False)[0]
        wanted = [t for t in inputs if t.requires_grad]
        results.append([y, rm, rv, *torch.autograd.grad(y, wanted, dy)])
    for a, e in zip(*results):
        assert torch.equal(a, e)


def test_batch_stats_op_updates_running_stats_in_place(device):
    """``bn_batch_stats`` mutates the buffers it is given (what lets Inductor skip copies) exactly as
    F.batch_norm does, and returns ``[mean | invstd]`` against the float64 reference."""
    torch.manual_seed(0)
    x = torch.randn(4, 5, 3, 2, device=device) * 3 + 1
    rm, rv = torch.rand(5, device=device), torch.rand(5, device=device) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    ptrs = (rm.data_ptr(), rv.data_ptr())
    stats = torch.ops.tritonbn.bn_batch_stats(x, rm, rv, None, 0.3, 1e-5)
    F_bn = torch.nn.functional.batch_norm
    F_bn(x, rm_t, rv_t, None, None, True, 0.3, 1e-5)
    assert (rm.data_ptr(), rv.data_ptr()) == ptrs
    torch.testing.assert_close((rm, rv), (rm_t, rv_t), rtol=1e-6, atol=1e-6)
    x64 = x.double()
    mean = x64.mean((0, 2, 3))
    invstd = torch.rsqrt(x64.var((0, 2, 3), correction=0) + 1e-5)
    torch.testing.assert_close(stats.double(), torch.cat((mean, invstd)), rtol=1e-5, atol=1e-6)


def test_compile_inductor_updates_buffers_in_place(device):
    """Under Inductor the statistics op runs on the module's own buffers (no clone of the running stats,
    no copy back: ``mutates_args`` + reinplacing), and both ops read the convolution's output as it is
    (``flexible_layout``: no copy into the traced strides)."""
    import re

    from torch._inductor.utils import run_and_get_code

    model = _convnet(0.1).to(device)
    bn = model[1]
    ptrs = (bn.running_mean.data_ptr(), bn.running_var.data_ptr())
    before = bn.running_mean.clone()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 4, 4, device=device)
    with torch._inductor.config.patch(force_disable_caches=True):
        _, codes = run_and_get_code(lambda: compiled(x).sum().backward())
    code = next(c for c in codes if "bn_batch_stats" in c)
    body = code[code.index("def call("):]
    body = body[:body.find("\ndef ", 1)]   # the call function only
    lines = [ln.strip() for ln in body.splitlines()]
    call = re.compile(r"\w+ = torch\.ops\.tritonbn\.bn_batch_stats\.default\((\w+), (\w+), (\w+),")
    calls = [m.groups() for ln in lines if (m := call.match(ln))]
    assert len(calls) == 3, calls
    for _, rm_arg, rv_arg in calls:
        assert rm_arg.startswith("primals_") and rv_arg.startswith("primals_"), calls   # the buffers
        for buf in (rm_arg, rv_arg):   # used by the op alone: never cloned, copied or written elsewhere
            others = [ln for ln in lines if re.search(rf"\b{buf}\b", ln) and "bn_batch_stats" not in ln
                      and not ln.startswith(("assert_size_stride", "del ")) and not ln.endswith("= args")]
            assert not others, others
    # The first layer's statistics and normalize read the convolution's output buffer itself.
    conv_out = re.search(r"(buf\d+) = extern_kernels\.convolution\(", code).group(1)
    assert calls[0][0] == conv_out
    assert re.search(rf"bn_normalize\.default\({conv_out},", code)
    assert "clone" not in code
    assert (bn.running_mean.data_ptr(), bn.running_var.data_ptr()) == ptrs
    assert not torch.equal(bn.running_mean, before)
    assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("fused", [False, True])
def test_custom_ops_torch_fallback_matches_kernels(fused, device, monkeypatch):
    """Without Triton (CPU, no interpreter) the ops compute the same results with torch's math."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, device=device) * 2 + 1
    w, b = torch.rand(4, device=device), torch.randn(4, device=device)
    z = torch.randn_like(x) if fused else None
    act = 1 if fused else 0
    dy = torch.randn_like(x)
    outs = []
    for triton in (True, False):
        monkeypatch.setattr(custom_ops, "_uses_triton", lambda t, _v=triton: _v)
        rm, rv, nbt = torch.zeros(4, device=device), torch.ones(4, device=device), torch.tensor(2)
        stats = torch.ops.tritonbn.bn_batch_stats(x, rm, rv, nbt.to(device), None, 1e-5)
        y, mask = torch.ops.tritonbn.bn_normalize(x, w, b, z, stats, stats, 1e-5, True, act)
        bwd = torch.ops.tritonbn.bn_backward(dy, x, w, b, stats, stats, mask if fused else None, 1e-5, True,
                                             act, True, True, True, fused, torch.float32)
        ev = torch.ops.tritonbn.bn_normalize(x, w, b, z, rm, rv, 1e-5, False, act)
        ev_bwd = torch.ops.tritonbn.bn_backward(dy, x, w, b, rm, rv, ev[1] if fused else None, 1e-5,
                                                False, act, True, True, True, fused, torch.float32)
        outs.append((stats, rm, rv, y, mask) + bwd + ev + ev_bwd)
    for a, e in zip(*outs):
        if a.dtype == torch.int32:
            assert torch.equal(a, e)        # the ReLU bitmasks agree bit for bit
        else:
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    assert not torch.equal(outs[0][1], torch.zeros(4, device=device))  # running stats updated in place


def _eval_model(device):
    return _randomize_stats(_convnet(0.1)).to(device).eval()


def test_torch_export_eval_model(device):
    model = _eval_model(device)
    x = torch.randn(2, 3, 4, 4, device=device)
    ep = torch.export.export(model, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("tritonbn" in t for t in targets)
    assert any("batch_norm" in t for t in targets)
    torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("momentum", [None, 0.1])
def test_torch_export_of_a_training_model_is_aten_and_trains_like_eager(strict, momentum, device):
    """A training-mode export (momentum=None too: the cumulative factor 1/num_batches_tracked is read on
    the device, not baked in) holds only ATen ops, and the exported module trains like the eager one:
    gradients, running stats and num_batches_tracked over steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU())
    model = tritonbn.convert_model(model).to(device)
    eager = copy.deepcopy(model)
    ep = torch.export.export(model, (torch.randn(2, 3, 6, 6, device=device),), strict=strict)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("tritonbn" in t for t in targets), targets
    exported = ep.module()
    for step in range(3):
        x = torch.randn(2, 3, 6, 6, device=device) * (step + 1) + step
        r = torch.randn(2, 4, 4, 4, device=device)
        (exported(x) * r).sum().backward()
        (eager(x) * r).sum().backward()
    params = dict(eager.named_parameters())
    for name, p in exported.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    buffers = dict(eager.named_buffers())
    assert buffers.keys() == dict(exported.named_buffers()).keys()
    for name, b in exported.named_buffers():
        torch.testing.assert_close(b, buffers[name], rtol=1e-5, atol=1e-6, msg=name)
    assert int(buffers["1.num_batches_tracked"]) == 3


@pytest.mark.filterwarnings("error::torch.jit.TracerWarning")
@pytest.mark.parametrize("dynamo", [True, False])
def test_onnx_export_runs_in_onnxruntime(dynamo, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _eval_model("cpu")
    x = torch.randn(2, 3, 4, 4)
    path = str(tmp_path / "model.onnx")
    torch.onnx.export(model, (x,), path, dynamo=dynamo)
    graph = onnx.load(path).graph
    op_types = {n.op_type for n in graph.node}
    assert all(n.domain in ("", "ai.onnx") for n in graph.node), op_types
    assert "BatchNormalization" in op_types or "Conv" in op_types
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("act", [None, "relu"])
def test_compile_fullgraph_takes_the_input_as_its_own_residual(act, device):
    """``act(bn(x) + x)`` (a residual that is the BN's input, which fuse_model fuses without example
    inputs): Dynamo refuses a tensor passed twice to an autograd.Function, so the custom-op path passes it
    once. Outputs, running stats and gradients against torch's module + add + ReLU."""
    torch.manual_seed(0)
    ours = tritonbn.BatchNormAct2d(5, activation=act).to(device)
    theirs = nn.BatchNorm2d(5).to(device)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: ours(t, t), fullgraph=True, backend="aot_eager")
    for _ in range(2):
        x = (torch.randn(3, 5, 4, 3, device=device) * 2 + 1).requires_grad_()
        y = compiled(x)
        y_t = theirs(x) + x
        y_t = torch.relu(y_t) if act else y_t
        dy = torch.randn_like(y)
        g = torch.autograd.grad(y, [x, ours.weight], dy)
        g_t = torch.autograd.grad(y_t, [x, theirs.weight], dy)
        torch.testing.assert_close(y, y_t)
        for a, e in zip(g, g_t):
            torch.testing.assert_close(a, e)
        torch.testing.assert_close(ours.running_var, theirs.running_var)
