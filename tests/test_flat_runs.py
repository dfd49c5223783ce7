"""FLAT_RUNS, the planar elementwise addressing in runs of consecutive elements that each lie in at most two
planes: when the launcher takes it, and results (plain and fused, train and eval, forward and backward)
against the float64 reference where runs cross plane ends, batch rows and the last channel."""

import pytest
import reference as ref
import torch
from reference import make_input, rel_err

import tritonbn
from tritonbn import ops


def _plan_layouts(x, training=True, residual=None, activation=0, write_mask=False):
    """(forward layout, its BLOCK_S × BLOCK_C) of the call's plan, recorded without running anything."""
    _, plan = ops.forward_plan(x, None, None, None, None, None, training, 0.1, residual, activation,
                               write_mask)
    c = plan.fwd.constexprs
    return c["LAYOUT"], c["BLOCK_S"] * c["BLOCK_C"], c["BLOCK_C"]


@pytest.mark.parametrize("shape,dtype,tuning_kw,layout", [
    # 7×7 rows start at odd offsets: FLAT_RUNS by default, in 16- and 32-bit dtypes
    ((8, 64, 7, 7), torch.bfloat16, {}, ops.FLAT_RUNS),
    ((8, 64, 7, 7), torch.float32, {}, ops.FLAT_RUNS),
    ((8, 64, 7, 7), torch.float64, {}, ops.TILED),          # 8-byte elements: TILED loads them whole
    ((8, 64, 7, 7), torch.bfloat16, dict(flat="tiled"), ops.TILED),
    ((8, 64, 14, 14), torch.bfloat16, {}, ops.TILED),       # 392-byte rows: 8-byte vectors
    ((8, 64, 14, 14), torch.bfloat16, dict(flat="always"), ops.FLAT_RUNS),
    ((8, 64, 56, 56), torch.float32, {}, ops.TILED),
    ((8, 64, 2, 3), torch.bfloat16, {}, ops.TILED),         # S = 6 < run: runs would span three planes
    ((8, 64, 2, 3), torch.bfloat16, dict(flat="always"), ops.FLAT_PLANAR),
    ((8, 2, 7, 7), torch.float16, {}, ops.FLAT_RUNS),       # a block spans every channel many times
    ((8, 64, 7, 7), torch.bfloat16, dict(flat_run=1), ops.TILED),
])
def test_layout_choice(shape, dtype, tuning_kw, layout, monkeypatch):
    monkeypatch.setattr(ops, "TUNING", ops.Tuning(**tuning_kw))
    got, block, run = _plan_layouts(torch.empty(shape, dtype=dtype))
    assert got == layout
    if layout == ops.FLAT_RUNS:
        assert run == 8 and block == ops.TUNING.run_block // (2 if dtype == torch.float64 else 1)


def test_runs_fit_bounds():
    v = ops.View(n=2, c=3, s=9, stride_n=27, stride_c=9, stride_s=1)
    assert ops._runs_fit(v, 32, 8) and ops._runs_fit(v, 32, 2)
    assert not ops._runs_fit(ops.View(2, 3, 7, 21, 7, 1), 32, 8)   # S < run: a run across three planes
    assert not ops._runs_fit(v, 32, 1)
    assert not ops._runs_fit(v, 4, 8)                         # runs longer than the block
    big = ops.View(n=2**20, c=64, s=49, stride_n=64 * 49, stride_c=49, stride_s=1)   # over 2**31 elements
    assert not ops._runs_fit(big, 4096, 8)
    assert ops._runs_fit(ops.View(n=2**10, c=64, s=49, stride_n=64 * 49, stride_c=49, stride_s=1), 4096, 8)


def test_bad_tunings_are_named():
    with pytest.raises(ValueError, match="Tuning.flat must be"):
        ops.Tuning(flat="planes")
    with pytest.raises(ValueError, match="Tuning.flat_run must be a power of two"):
        ops.Tuning(flat_run=6)


# Small blocks, so that few planes make many blocks: runs end planes mid-run (S = 9, 25, 49: every block
# boundary and plane end misaligned), cross from one batch row to the next (channel C-1 to 0), and the
# last block is partial.
RUN_CASES = [
    ((3, 5, 7, 7), dict(run_block=64)),
    ((2, 3, 3, 3), dict(run_block=32)),              # S = 9
    ((5, 2, 3, 3), dict(run_block=64)),              # C = 2: each block wraps the channels several times
    ((4, 7, 5, 5), dict(run_block=64)),
    ((2, 3, 11), dict(run_block=32)),               # 1-D spatial (BatchNorm1d's (N, C, L))
    ((2, 3, 3, 5, 3), dict(run_block=64)),          # 3-D spatial
    ((3, 6, 4, 4), dict(run_block=64, flat="always")),   # S = 16: runs never cross a plane end
    ((2, 5, 3, 3), dict(run_block=64, flat_run=4, flat="always")),
]


@pytest.mark.parametrize("act,with_residual", [(None, False), ("relu", False), ("relu", True)])
@pytest.mark.parametrize("shape,tuning_kw", RUN_CASES)
def test_runs_match_reference(shape, tuning_kw, act, with_residual, device, monkeypatch):
    monkeypatch.setattr(ops, "TUNING", ops.Tuning(**tuning_kw))
    torch.manual_seed(0)
    c = shape[1]
    x = make_input(shape, "contiguous", device=device).requires_grad_(True)
    z = (torch.randn(shape, device=device) * 1.5).requires_grad_(True) if with_residual else None
    w = (torch.rand(c, device=device) + 0.5).requires_grad_(True)
    b = (torch.randn(c, device=device) * 0.5).requires_grad_(True)
    code = ops.ACTIVATIONS[act]
    layout, _, _ = _plan_layouts(x.detach(), True, z, code, with_residual and act is not None)
    assert layout == ops.FLAT_RUNS
    inputs = (x, w, b) + ((z,) if with_residual else ())
    for training in (True, False):
        rm, rv = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
        expect = ref.bn_forward(x, rm, rv, w, b, training, 0.1, 1e-5, residual=z, activation=act)
        y = tritonbn.batch_norm(x, rm, rv, w, b, training=training, residual=z, activation=act)
        assert rel_err(y, expect.y) < 1e-5, training
        if training:
            assert rel_err(rm, expect.running_mean) < 1e-6 and rel_err(rv, expect.running_var) < 1e-6
        dy = torch.randn_like(y)
        positive = y.detach() > 0 if act else None
        want = list(ref.bn_backward(dy, x, w, expect.mean, expect.invstd, training, positive))
        if with_residual:
            want.append(dy.double() * positive.double() if act else dy.double())
        for i, (got, exp) in enumerate(zip(torch.autograd.grad(y, inputs, dy), want)):
            assert rel_err(got, exp) < 1e-5, (training, i)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_runs_16bit_match_tiled_bitwise(dtype, device, monkeypatch):
    """The same per-element arithmetic whichever addressing: FLAT_RUNS and TILED give identical bits."""
    torch.manual_seed(1)
    x = make_input((3, 5, 7, 7), "contiguous", dtype=dtype, device=device).requires_grad_(True)
    w = (torch.rand(5, device=device) + 0.5).requires_grad_(True)
    b = torch.randn(5, device=device).requires_grad_(True)
    dy = torch.randn_like(x)
    results = []
    for flat in ("auto", "tiled"):
        monkeypatch.setattr(ops, "TUNING", ops.Tuning(flat=flat, run_block=64))
        assert _plan_layouts(x.detach())[0] == (ops.FLAT_RUNS if flat == "auto" else ops.TILED)
        out = []
        for training in (True, False):
            rm, rv = torch.zeros(5, device=device), torch.ones(5, device=device)
            y = tritonbn.batch_norm(x, rm, rv, w, b, training=training)
            out += [y, *torch.autograd.grad(y, (x, w, b), dy)]
        results.append(out)
    for a, t in zip(*results):
        assert torch.equal(a, t)


@pytest.mark.parametrize("activation,training,write_mask,halved", [
    (4, False, False, True),     # Hardswish in eval: forward and dx
    (4, True, False, False),
    (2, False, True, True),      # ReLU6's eval bitmask (forward only)
    (2, False, False, False),
    (3, False, False, False),    # SiLU
])
def test_eval_run_blocks_halved_where_full_ones_spill(activation, training, write_mask, halved):
    """Eval-mode FLAT_RUNS blocks compute 1/√(var+ε) per run; with Hardswish (forward and dx) or ReLU6's
    bitmask, full blocks spill registers on sm_80 / sm_90 (compile gate): those take half blocks."""
    x = torch.empty((8, 64, 7, 7), dtype=torch.bfloat16)
    rm, rv = torch.zeros(64), torch.ones(64)
    z = torch.empty_like(x) if write_mask else None
    _, plan = ops.forward_plan(x, None, None, rm, rv, None, training, 0.1, z, activation, write_mask)
    c = plan.fwd.constexprs
    assert c["LAYOUT"] == ops.FLAT_RUNS
    full = ops.TUNING.run_block
    assert c["BLOCK_S"] * c["BLOCK_C"] == (full // 2 if halved else full)
    if not write_mask:
        flags = ops.backward_flags(torch.float32, None, None, activation, False, True, False, None, False,
                                   False, False)[0]
        bplan = ops.BackwardPlan(ops._dense_view(tuple(x.shape), x.stride()), x.dtype, -1, training, flags)
        d = bplan.dx.constexprs
        assert d["BLOCK_S"] * d["BLOCK_C"] == (full // 2 if halved and activation == 4 else full)
