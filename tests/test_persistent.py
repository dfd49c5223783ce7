"""The one-launch training forward (``Tuning.persistent``, ``_bn_persistent_forward_kernel``): when the
launcher takes it, its results (outputs, saved statistics, running stats, num_batches_tracked and every
gradient of the backward that reads them) against the float64 reference, its barrier counter, and the
occupancy arithmetic that decides on a GPU whether its grid fits.

Under the interpreter (programs run one at a time) the kernel runs in two launches split at its barrier
(PHASE 1, then 2); its single-launch form (PHASE 0) runs here only on a one-program grid. The CUDA tests
(tests/test_bn_cuda.py) run it whole."""

import dataclasses
import types

import pytest
import reference as ref
import torch
from reference import make_input, rel_err

import tritonbn
from tritonbn import ops

PERSISTENT = "_bn_persistent_forward_kernel"
# Tiny tiles and channel tiles: several row blocks (programs along axis 1) and channel tiles per call, their
# partials merged 2 per step (several steps, the last one masked).
TINY = dict(persistent="always", persistent_tile=8, max_block_c=4, persistent_merge_tile=8)


@pytest.fixture
def launches(monkeypatch):
    """Kernel names launched (and run, through the interpreter)."""
    names = []

    def record_and_run(kernel, grid, args, constexprs, num_warps):
        names.append(kernel.fn.__name__)
        kernel[grid](*args, num_warps=num_warps, **constexprs)

    monkeypatch.setattr(ops, "_launch_hook", record_and_run)
    return names


def _tuning(monkeypatch, **kw):
    monkeypatch.setattr(ops, "TUNING", ops.Tuning(**kw))


@pytest.mark.parametrize("shape,layout", [
    ((6, 5), "contiguous"), ((3, 7, 5), "contiguous"), ((2, 5, 3, 6), "contiguous"),
    ((3, 7, 4, 5), "channels_last"), ((2, 5, 3, 2, 3), "channels_last"), ((4, 3, 1, 1), "contiguous"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tile", ["tiny", "one-tile"])
def test_persistent_forward_and_its_backward_match_the_reference(shape, layout, dtype, tile, launches,
                                                                  monkeypatch):
    _tuning(monkeypatch, **(TINY if tile == "tiny" else dict(persistent="always")))
    c = shape[1]
    torch.manual_seed(0)
    pdtype = torch.float32
    weight = torch.rand(c, dtype=pdtype) + 0.5
    bias = torch.randn(c, dtype=pdtype)
    rm, rv = torch.randn(c, dtype=pdtype), torch.rand(c, dtype=pdtype) + 0.5
    x = make_input(shape, layout, dtype=dtype)
    expected = ref.bn_forward(x, rm, rv, weight, bias, True, 0.25, 1e-5)
    xg, wg, bg = (t.detach().clone().requires_grad_(True) for t in (x, weight, bias))
    y = tritonbn.batch_norm(xg, rm, rv, wg, bg, training=True, momentum=0.25, eps=1e-5)
    assert launches == [PERSISTENT, PERSISTENT]
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert rel_err(y, expected.y) < tol
    assert rel_err(rm, expected.running_mean) < tol and rel_err(rv, expected.running_var) < tol
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    y.backward(dy)
    dx, dw, db = ref.bn_backward(dy, x, weight, expected.mean, expected.invstd, True)
    assert rel_err(xg.grad, dx) < 10 * tol
    assert rel_err(wg.grad, dw) < 10 * tol and rel_err(bg.grad, db) < 10 * tol


@pytest.mark.parametrize("activation,residual", [("relu", False), ("relu6", False), ("silu", False),
                                                 (None, True)])
def test_persistent_epilogues_and_module_state(activation, residual, launches, monkeypatch):
    """BatchNormAct2d (no bitmask needed): one kernel for the forward, the module's running stats and
    num_batches_tracked (incremented by the last program to leave, after every program read it), two steps,
    the cumulative average, and the gradients of x, γ, β and the residual."""
    _tuning(monkeypatch, **TINY)
    torch.manual_seed(1)
    shape = (3, 5, 3, 4)
    ours = tritonbn.BatchNormAct2d(5, momentum=None, activation=activation)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 4.0)   # ReLU6's upper edge is reached
        ours.bias.uniform_(-1, 1)
    rm, rv = ours.running_mean.clone(), ours.running_var.clone()
    for step in range(2):
        x = make_input(shape, "channels_last" if step else "contiguous", shift=step)
        z = torch.randn(shape) if residual else None
        xg = x.clone().requires_grad_(True)
        zg = z.clone().requires_grad_(True) if residual else None
        launches.clear()
        y = ours(xg, zg)
        assert launches == [PERSISTENT, PERSISTENT]
        expected = ref.bn_forward(x, rm, rv, ours.weight.detach(), ours.bias.detach(), True, 1 / (step + 1),
                                  1e-5, z, activation)
        rm, rv = expected.running_mean, expected.running_var
        assert rel_err(y, expected.y) < 1e-5
        assert ours.num_batches_tracked.item() == step + 1
        assert rel_err(ours.running_mean, rm) < 1e-5 and rel_err(ours.running_var, rv) < 1e-5
        dy = torch.randn(shape)
        ours.weight.grad = ours.bias.grad = None
        y.backward(dy)
        dact = ref.act_grad(activation, expected.pre)
        dx, dw, db = ref.bn_backward(dy, x, ours.weight.detach(), expected.mean, expected.invstd, True, dact)
        assert rel_err(xg.grad, dx) < 1e-4
        assert rel_err(ours.weight.grad, dw) < 1e-4 and rel_err(ours.bias.grad, db) < 1e-4
        if residual:
            assert rel_err(zg.grad, dy * dact) < 1e-6


def test_persistent_leaves_its_counter_at_zero(launches, monkeypatch):
    """The barrier counter is the stream's first reduction counter, which the next launch on the stream
    (any reduction kernel) expects at zero: the last program to leave resets it."""
    _tuning(monkeypatch, **TINY)
    x = make_input((4, 6, 3, 3), "channels_last")
    tritonbn.BatchNorm2d(6)(x)
    assert launches == [PERSISTENT, PERSISTENT]
    cnt = ops._counters(x, -1, None, 1)
    assert int(cnt.abs().sum()) == 0


def test_single_launch_form_on_one_program(launches, monkeypatch):
    """PHASE 0 (what a GPU runs: arrive, wait, merge, normalize, leave, in one launch) on a one-program grid,
    the only grid the interpreter can run it on: the same bits as the two-launch form."""
    _tuning(monkeypatch, persistent="always")
    x = make_input((2, 3, 4, 4), "channels_last")   # one row block of [1, C, N·H·W]
    rm, rv = torch.zeros(3), torch.ones(3)
    _, plan = ops.forward_plan(x, None, None, rm, rv, None, True, 0.1)
    assert plan.persistent[0].grid == (1, 1)
    y2, ws2, _, _ = ops.forward(x, None, None, rm.clone(), rv.clone(), None, True, 0.1, 1e-5)
    whole = ops._Launch(plan.persistent[0].kernel, (1, 1), plan.persistent[0].num_warps,
                        dict(plan.persistent[0].constexprs, PHASE=0))
    y1, ws1 = torch.empty_like(x), torch.empty(plan.persistent_ws)
    rm1, rv1 = rm.clone(), rv.clone()
    cnt = ops._counters(x, -1, None, 1)
    launches.clear()
    whole(None, *ops.persistent_args(plan, x, y1, x, ws1, cnt, rm1, rv1, None, None, None, 0.1, 1e-5))
    assert launches == [PERSISTENT]
    assert torch.equal(y1, y2) and torch.equal(ws1[:6], ws2[:6]) and int(cnt.abs().sum()) == 0
    torch.testing.assert_close(rm1, torch.zeros(3) + 0.1 * x.mean((0, 2, 3)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case,why", [
    ("eval", "no batch statistics"),
    ("fp64", "a test dtype, whose specializations spill on sm_90"),
    ("bitmask", "residual + ReLU: the backward needs the forward's bitmask"),
    ("off", "Tuning.persistent='off' (the default)"),
    ("auto on the CPU", "'auto' decides on a GPU only"),
])
def test_where_the_launcher_keeps_two_launches(case, why, monkeypatch):
    _tuning(monkeypatch, persistent={"off": "off", "auto on the CPU": "auto"}.get(case, "always"))
    x = make_input((2, 3, 4, 4), "contiguous", dtype=torch.float64 if case == "fp64" else torch.float32)
    training = case != "eval"
    bitmask = case == "bitmask"
    _, plan = ops.forward_plan(x, None, None, torch.zeros(3), torch.ones(3), None, training, 0.1,
                               torch.zeros_like(x) if bitmask else None, 1 if bitmask else 0, bitmask)
    assert plan.persistent is None, why
    assert ops.Tuning().persistent == "off"


def test_bad_persistent_value_is_named():
    with pytest.raises(ValueError, match="Tuning.persistent must be"):
        ops.Tuning(persistent="on")


H200 = types.SimpleNamespace(regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                             shared_memory_per_multiprocessor=233472)


@pytest.mark.parametrize("n_regs,shared,warps,props,blocks", [
    (63, 4096, 8, H200, 4),      # 64 registers: 8 warps per partition, 32 per SM
    (76, 4096, 8, H200, 3),      # 80 (allocated in 8s): 6 per partition
    (109, 8192, 8, H200, 2),
    (64, 3072, 16, H200, 2),     # 16-warp programs
    (32, 0, 8, H200, 8),         # by threads: 2048 per SM
    (40, 100_000, 4, H200, 2),   # by shared memory (plus 1 KiB reserved per program)
    (0, 4096, 8, H200, 0),       # unknown registers: nothing fits
    (64, 4096, 8, types.SimpleNamespace(), 0),   # unknown shared memory per SM: nothing fits
])
def test_blocks_per_sm(n_regs, shared, warps, props, blocks):
    assert ops.blocks_per_sm(n_regs, shared, warps, props) == blocks


def test_native_path_keeps_the_one_launch_forward_in_python(monkeypatch):
    """The native path packs plain launches (no cooperative attribute): a plan that runs the one-launch
    forward stays on the Python path, and says why."""
    from tritonbn import native

    _tuning(monkeypatch, persistent="always")
    x = make_input((2, 3, 4, 4), "contiguous")
    _, plan = ops.forward_plan(x, None, None, torch.zeros(3), torch.ones(3), None, True, 0.1)
    plan.persistent_ok = True
    if native.module() is None:
        pytest.skip(f"native extension unavailable: {native.build_error}")
    with pytest.raises(native.NotNative, match="one-launch forward"):
        native.build_forward(plan, x)


def test_tuning_field_round_trips_through_bench_overrides():
    import argparse

    from benchmarks import bench

    parser = argparse.ArgumentParser()
    out = bench._tuning_overrides("persistent=auto,persistent_tile=8192", parser)
    assert dataclasses.replace(ops.Tuning(), **out).persistent == "auto" and out["persistent_tile"] == 8192
