"""``tritonbn.SyncBatchNorm``: batch statistics synchronised over ``torch.distributed``.

Forward: each rank computes its partial per-channel ``(count, mean, M2)`` with the Triton statistics
kernel (shifted blockwise Welford, partials merged here in float64), one ``all_gather`` exchanges
``3 × C`` float64 values per rank, and Chan's parallel merge (in rank order, so deterministic) gives the
global mean and biased variance; running stats are updated with the global *unbiased* variance, with
``momentum`` or the cumulative factor ``1/num_batches_tracked`` read on the device (no host sync, unlike
torch's SyncBatchNorm). Uneven per-rank batches are weighted by their counts; an empty local batch
contributes count 0.

Backward: the local ``Σdy`` and ``Σdy·x̂`` (x̂ from the global statistics) are all-reduced once; dγ and
dβ are the rank's local shares, as in ``torch.nn.SyncBatchNorm`` (DDP then reduces them); dx uses the
global sums divided by the global count on the device, so nothing waits on the host.

Outside a multi-process training context (eval mode, no process group, world size 1) the module behaves
like ``tritonbn.BatchNorm*d``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from tritonbn import ops
from tritonbn.dispatch import uses_triton
from tritonbn.functional import _param, check_inputs
from tritonbn.modules import _BatchNormActMixin, _TritonBatchNormMixin


def local_stats(x: torch.Tensor, view: ops.View) -> torch.Tensor:
    """Per-channel ``[count, mean, M2]`` (float64, shape ``[3, C]``) of the local batch ``x``."""
    if x.numel() == 0:
        return torch.zeros((3, view.c), dtype=torch.float64, device=x.device)
    parts, _ = ops.bn_stat_partials(x, view)
    # The kernel writes (mean − K_c, M2, count) partials, shifted by K_c = x[0, c, 0].
    shift = torch.as_strided(x, (view.c,), (view.stride_c,), x.storage_offset()).double()
    return _merge(parts[[2, 0, 1]].double(), shift)


def _merge(stats: torch.Tensor, shift=None) -> torch.Tensor:
    """Chan's merge of ``[3, K, C]`` (count, mean, M2) summaries along K, in one fixed order."""
    n_k, mean_k, m2_k = stats[0], stats[1], stats[2]
    n = n_k.sum(0)
    mean = (n_k * mean_k).sum(0) / n.clamp_min(1.0)
    m2 = m2_k.sum(0) + (n_k * (mean_k - mean) ** 2).sum(0)
    if shift is not None:
        mean = mean + shift
    return torch.stack((n, mean, m2))


class SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                process_group, world_size):
        x, view = ops._prepare(x)
        acc = ops._acc_dtype(x.dtype)
        local = local_stats(x, view)
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local, group=process_group)
        n, mean64, m2 = _merge(torch.stack(gathered, dim=1))
        var = m2 / n.clamp_min(1.0)
        mean = mean64.to(acc)
        invstd = torch.rsqrt(var + eps).to(acc)
        if running_mean is not None:
            if momentum is None:
                # this call's count: num_batches_tracked is incremented once the call has succeeded
                factor = (1.0 / (num_batches_tracked.double() + 1.0)) if num_batches_tracked is not None \
                    else 0.0
            else:
                factor = momentum
            unbiased = m2 / (n - 1.0).clamp_min(1.0)
            running_mean.copy_(running_mean.double() * (1.0 - factor) + factor * mean64)
            running_var.copy_(running_var.double() * (1.0 - factor) + factor * unbiased)
        stats = torch.cat((mean, invstd))
        y = ops.normalize(x, weight, bias, stats, stats, True, eps)[0]
        saved = (x, weight, stats, n.to(acc))
        ctx.save_for_backward(*saved)
        ctx.meta = ops.saved_meta(saved) if ops.saved_tensor_hooks_active() else None
        ctx.process_group = process_group
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        x, weight, stats, n = saved if ctx.meta is None else \
            ops.restore_saved(saved, ctx.meta, ("input", "weight", "statistics", "count"))
        dy = ops._like(x, dy)
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        sums = ops.bn_backward_sums(x, dy, stats)
        dw = sums[1].to(weight.dtype) if need_dw and weight is not None else None
        db = sums[0].to(ctx.bias_dtype) if need_db and ctx.bias_dtype is not None else None
        dx = None
        if need_dx:
            sums = sums.clone()
            dist.all_reduce(sums, group=ctx.process_group)
            # The sums are pre-divided by the global count, so the kernel's count is 1.
            dx = ops.bn_backward_dx(x, dy, weight, stats, sums / n.clamp_min(1.0), 1)
        return dx, dw, db, None, None, None, None, None, None, None


class SyncBatchNorm(_TritonBatchNormMixin, nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` on tritonbn kernels: same arguments, state and semantics (statistics
    synchronised over ``process_group`` in training mode when more than one process takes part)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        world_size = 1
        process_group = None
        if self.training and dist.is_available() and dist.is_initialized():
            process_group = self.process_group or dist.group.WORLD
            world_size = dist.get_world_size(process_group)
        if world_size <= 1:
            return super().forward(input)   # local batch norm (eval, single process)
        if not uses_triton(input):
            # torch's own SyncBatchNorm (which synchronises, or raises where it cannot), never a local one
            return nn.SyncBatchNorm.forward(self, input)
        return self._synchronised(input, process_group, world_size)

    @torch.compiler.disable
    def _synchronised(self, input, process_group, world_size):
        """The cross-process training call, run eagerly under ``torch.compile`` (a graph break: its
        collectives and launches are not traceable)."""
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        weight, bias = _param(self.weight), _param(self.bias)
        # Checked on an empty slice: one value per channel locally is fine (the global batch is larger).
        check_inputs(input.narrow(0, 0, 0), running_mean, running_var, weight, bias, True)
        num_batches = None
        if self.track_running_stats and self.num_batches_tracked is not None:
            num_batches = self.num_batches_tracked
        y = SyncBatchNormFunction.apply(input, weight, bias, running_mean, running_var, num_batches,
                                        self.momentum, self.eps, process_group, world_size)
        if num_batches is not None:   # once the call has succeeded: a call that raises does not count
            num_batches.add_(1)
        return y


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every batch-norm layer (torch's or tritonbn's ``BatchNorm*d``, ``torch.nn.SyncBatchNorm``)
    in ``module`` by ``tritonbn.SyncBatchNorm``, sharing its parameters and buffers, like
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``. Returns the converted module."""
    out = module
    if isinstance(module, _BatchNormActMixin):
        raise TypeError(f"convert_sync_batchnorm: got a fused {type(module).__name__} (activation="
                        f"{module.activation!r}), which SyncBatchNorm cannot replace without losing its "
                        "activation and residual: convert the unfused model first, then call fuse_model (it "
                        "leaves SyncBatchNorm layers unfused)")
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out
