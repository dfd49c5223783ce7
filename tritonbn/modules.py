"""Drop-in ``BatchNorm1d/2d/3d`` modules: subclasses of torch's, same arguments, state and semantics."""

from __future__ import annotations

import torch
from torch import nn

from tritonbn.functional import batch_norm_impl, check_fusion, check_inputs, uses_triton


class _TritonBatchNormMixin:
    """Replaces ``_BatchNorm.forward``; everything else (state, ``reset_*``, ``extra_repr``) is torch's."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not uses_triton(input):
            return super().forward(input)
        use_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        bn_training = self.training or (running_mean is None and running_var is None)
        weight, bias = self.weight, self.bias
        # Validate before touching num_batches_tracked: a call that raises changes no state.
        check_inputs(input, running_mean, running_var, weight, bias, bn_training)
        momentum = 0.0 if self.momentum is None else self.momentum
        num_batches = None
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum, num_batches = None, self.num_batches_tracked  # 1/num_batches, on the device
        return batch_norm_impl(input, running_mean, running_var, weight, bias, bn_training, momentum,
                               self.eps, num_batches)


class BatchNorm1d(_TritonBatchNormMixin, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on tritonbn kernels; input ``(N, C)`` or ``(N, C, L)``."""


class BatchNorm2d(_TritonBatchNormMixin, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on tritonbn kernels; input ``(N, C, H, W)``."""


class BatchNorm3d(_TritonBatchNormMixin, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on tritonbn kernels; input ``(N, C, D, H, W)``."""


class _BatchNormActMixin(_TritonBatchNormMixin):
    """BatchNorm followed by an optional residual add and an activation, in one fused op:
    ``activation(bn(input) + residual)``. State (parameters, buffers, ``state_dict`` keys) is exactly that
    of ``nn.BatchNorm*d``, so checkpoints load both ways; ``activation`` is a constructor argument
    (``"relu"`` or None), not state."""

    def __init__(self, num_features, *args, activation="relu", **kwargs):
        # Every other argument is the torch class's own (its set varies across torch versions).
        check_fusion(torch.empty(0), None, activation)
        super().__init__(num_features, *args, **kwargs)
        self.activation = activation

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        check_fusion(input, residual, self.activation)
        y = super().forward(input)
        if residual is not None:
            y = y + residual
        if self.activation == "relu":
            y = torch.relu(y)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


class BatchNormAct1d(_BatchNormActMixin, nn.BatchNorm1d):
    """``BatchNorm1d`` + optional residual add + activation, fused; input ``(N, C)`` or ``(N, C, L)``."""


class BatchNormAct2d(_BatchNormActMixin, nn.BatchNorm2d):
    """``BatchNorm2d`` + optional residual add + activation, fused; input ``(N, C, H, W)``."""


class BatchNormAct3d(_BatchNormActMixin, nn.BatchNorm3d):
    """``BatchNorm3d`` + optional residual add + activation, fused; input ``(N, C, D, H, W)``."""


_REPLACEMENTS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


def convert_model(module: nn.Module) -> nn.Module:
    """Swap every torch ``BatchNorm1d/2d/3d`` in ``module`` (``module`` itself included) for the tritonbn
    equivalent, in place, and return the module.

    The objects are kept and only their class changes (tritonbn's classes add no state), so parameters,
    buffers, device, dtype, training flag, hooks and optimizer references all stay valid. Exact torch
    classes only: subclasses (SyncBatchNorm, user classes) are left alone.
    """
    for m in module.modules():
        new_cls = _REPLACEMENTS.get(type(m))
        if new_cls is not None:
            m.__class__ = new_cls
    return module
