"""tritonbn.SyncBatchNorm: 2 processes with gloo on CPU (kernels through the interpreter) must equal one
process running batch norm over the concatenated batch (outputs, dx, dγ, dβ, running stats), with
uneven per-rank batches, a rank whose batch is empty, and a rank with one value per channel.

All cases run inside one spawn of 2 workers (process start-up dominates the cost).
"""

import os

import pytest
import reference as ref
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import tritonbn

# (name, full shape, per-rank batch sizes, layout, momentum)
CASES = [
    ("uneven-nchw", (5, 3, 2, 3), (3, 2), "contiguous", 0.1),
    ("uneven-channels-last", (5, 4, 3, 2), (1, 4), "channels_last", None),
    ("empty-rank", (4, 3, 2, 2), (4, 0), "contiguous", 0.1),
    ("2d-one-row", (3, 6), (2, 1), "contiguous", 0.3),
]
STEPS = 2
COMPILED = "uneven-channels-last"   # also run under torch.compile (the cross-process call: a graph break)


def _case_data(shape, layout, step):
    g = torch.Generator().manual_seed(1000 * step + shape[0])
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 5).float()
    dy = torch.randn(shape, generator=g, dtype=torch.float64).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, dy


def _make_bn(shape, momentum):
    c = shape[1]
    bn = nn.BatchNorm2d(c, momentum=momentum) if len(shape) == 4 else nn.BatchNorm1d(c, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, c))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, c))
    return bn


def _worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results = {}
        runs = [(*case, False) for case in CASES] + [(*c, True) for c in CASES if c[0] == COMPILED]
        for name, shape, sizes, layout, momentum, compiled in runs:
            bn = tritonbn.convert_sync_batchnorm(_make_bn(shape, momentum))
            assert isinstance(bn, tritonbn.SyncBatchNorm)
            call = torch.compile(bn, backend="eager") if compiled else bn
            start = sum(sizes[:rank])
            steps = []
            for step in range(STEPS):
                x, dy = _case_data(shape, layout, step)
                x = x[start:start + sizes[rank]].clone().requires_grad_(True)
                dy = dy[start:start + sizes[rank]]
                bn.weight.grad = bn.bias.grad = None
                y = call(x)
                y.backward(dy)
                steps.append((y.detach(), x.grad, bn.weight.grad.clone(), bn.bias.grad.clone(),
                              bn.running_mean.clone(), bn.running_var.clone()))
            results[name + ("/compiled" if compiled else "")] = (steps, int(bn.num_batches_tracked))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sync_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if torch.cuda.is_available():
        pytest.skip("gloo test of the CPU path; GPU runs use NCCL (see README)")
    tmp = tmp_path_factory.mktemp("syncbn")
    os.environ["TRITON_INTERPRET"] = "1"  # inherited by the spawned workers before they import triton
    mp.spawn(_worker, args=(2, str(tmp / "init"), str(tmp)), nprocs=2, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("case,compiled", [(c, False) for c in CASES] + [(c, True) for c in CASES
                                                                          if c[0] == COMPILED],
                         ids=[c[0] for c in CASES] + [f"{COMPILED}-compiled"])
def test_sync_batchnorm_matches_single_process(case, compiled, sync_results):
    """Output, dx, dγ/dβ (summed over ranks), running stats and num_batches_tracked of 2 ranks against
    the float64 reference on the whole batch; one case also under torch.compile."""
    name, shape, sizes, layout, momentum = case
    name += "/compiled" if compiled else ""
    bn = _make_bn(shape, momentum).double()
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    for step in range(STEPS):
        x, dy = _case_data(shape, layout, step)
        factor = momentum if momentum is not None else 1.0 / (step + 1)
        expect = ref.bn_forward(x, rm, rv, bn.weight, bn.bias, True, factor, 1e-5)
        e_dx, e_dw, e_db = ref.bn_backward(dy, x, bn.weight, expect.mean, expect.invstd, True)
        rm, rv = expect.running_mean, expect.running_var
        parts = [sync_results[r][name][0][step] for r in range(2)]
        y = torch.cat([p[0] for p in parts])
        dx = torch.cat([p[1] for p in parts])
        assert ref.rel_err(y, expect.y) < 1e-5
        assert ref.rel_err(dx, e_dx) < 1e-5
        # dγ, dβ: each rank's local share; their sum (what DDP reduces) is the global gradient.
        assert ref.rel_err(parts[0][2] + parts[1][2], e_dw) < 1e-5
        assert ref.rel_err(parts[0][3] + parts[1][3], e_db) < 1e-5
        for r in range(2):
            assert ref.rel_err(parts[r][4], rm) < 1e-6
            assert ref.rel_err(parts[r][5], rv) < 1e-6
    assert all(sync_results[r][name][1] == STEPS for r in range(2))


def test_sync_batchnorm_without_process_group_is_batchnorm(device):
    """Single process (no process group) and eval mode: plain tritonbn batch norm."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).to(device)
    sync = tritonbn.convert_sync_batchnorm(nn.Sequential(nn.Identity(), bn)).to(device)
    assert isinstance(sync[1], tritonbn.SyncBatchNorm) and sync[1].weight is bn.weight
    ref_bn = tritonbn.BatchNorm2d(3).to(device)
    x = torch.randn(2, 3, 4, 4, device=device)
    torch.testing.assert_close(sync(x), ref_bn(x))
    torch.testing.assert_close(sync[1].running_var, ref_bn.running_var)
    sync.eval()
    ref_bn.eval()
    torch.testing.assert_close(sync(x), ref_bn(x))


def test_cross_process_checks_refuse_mixed_parameter_dtypes():
    """SyncBatchNorm's cross-process path checks its inputs itself (``check_inputs``): parameters and
    running stats of two dtypes are refused, as torch refuses them, since the kernels' plans key on one."""
    from tritonbn.functional import check_inputs

    x = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    rm, rv = torch.zeros(3), torch.ones(3)
    check_inputs(x, rm, rv, torch.ones(3), torch.zeros(3), True)
    with pytest.raises(RuntimeError, match="must share one dtype"):
        check_inputs(x, rm, rv, torch.ones(3, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.bfloat16),
                     True)


def _worker_off_triton(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        assert not tritonbn.uses_triton(torch.zeros(1))     # no interpreter: CPU is not a tritonbn device
        x = torch.randn(4, 3) + rank
        verdicts = []
        for bn in (nn.SyncBatchNorm(3), tritonbn.SyncBatchNorm(3)):
            try:
                bn(x)
                verdicts.append(("ok", bn.running_mean.clone()))
            except Exception as e:  # noqa: BLE001 - compared with torch's verdict
                verdicts.append((f"{type(e).__name__}: {e}", bn.running_mean.clone()))
        torch.save(verdicts, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sync_batchnorm_off_tritonbn_devices_is_torchs(tmp_path):
    """With several processes, an input tritonbn's kernels do not take (here CPU without the interpreter)
    runs torch's own SyncBatchNorm, which synchronises or raises, never a local batch norm: on CPU both
    raise the same error, and the running stats stay untouched."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    interpret = os.environ.pop("TRITON_INTERPRET", None)    # the workers import triton without it
    try:
        mp.spawn(_worker_off_triton, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    for r in range(2):
        (theirs, rm_t), (ours, rm_o) = torch.load(tmp_path / f"rank{r}.pt")
        assert ours == theirs and theirs != "ok"
        assert torch.equal(rm_o, rm_t) and not rm_o.any()
