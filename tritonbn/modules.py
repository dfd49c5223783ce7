"""Drop-in ``BatchNorm1d/2d/3d`` modules (subclasses of torch's, same arguments, state and semantics), and
``BatchNormAct1d/2d/3d``: batch norm + optional residual add + activation in one fused op."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Proxy as _FxProxy

from tritonbn.dispatch import functorch_active, uses_triton
from tritonbn.functional import activation_code, batch_norm_impl, fusable_residual, supported
from tritonbn.torch_math import epilogue


class _TritonBatchNormMixin:
    """Replaces ``_BatchNorm.forward``; everything else (state, ``reset_*``, ``extra_repr``) is torch's."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(input, None, None, False)
        return self._bn_forward(input, None, 0)

    def _scripted_forward(self, input: torch.Tensor, residual: torch.Tensor | None, activation: str | None,
                          residual_in_place: bool) -> torch.Tensor:
        """What ``torch.jit.script`` compiles: torch's own ``_BatchNorm.forward`` (TorchScript cannot call a
        parent class's method, nor run tritonbn's Python dispatch), then the residual add and activation."""
        self._check_input_dim(input)
        momentum = self.momentum
        factor = 0.0
        if momentum is not None:
            factor = momentum
        if self.training and self.track_running_stats:
            num_batches = self.num_batches_tracked
            if num_batches is not None:
                num_batches.add_(1)
                if momentum is None:
                    factor = 1.0 / float(num_batches)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        y = F.batch_norm(input, self.running_mean if keep else None, self.running_var if keep else None,
                         self.weight, self.bias, bn_training, factor, self.eps)
        if residual is not None:
            if residual_in_place:
                y = y.add_(residual)
            else:
                y = y + residual
        if activation is not None:   # (TorchScript compares only a refined str)
            if activation == "relu":
                y = torch.relu(y)
            elif activation == "relu6":
                y = F.relu6(y)
            elif activation == "silu":
                y = F.silu(y)
            elif activation == "hardswish":
                y = F.hardswish(y)
        return y

    @torch.jit.unused
    def _bn_forward(self, input: torch.Tensor, residual: torch.Tensor | None, activation: int
                    ) -> torch.Tensor:
        if isinstance(input, _FxProxy):
            return _fx_leaf(self, input)
        self._check_input_dim(input)
        # Parameters and buffers straight from their dicts: nn.Module.__getattr__ is slow, and this runs
        # once per layer per step. Not there when a parametrization (torch.nn.utils.parametrize) or a
        # forward pre-hook (weight_norm, spectral_norm, prune) provides them: then as attributes.
        params, buffers = self._parameters, self._buffers
        weight = params["weight"] if "weight" in params else self.weight
        bias = params["bias"] if "bias" in params else self.bias
        training = self.training
        if not training or self.track_running_stats:
            running_mean = buffers["running_mean"] if "running_mean" in buffers else self.running_mean
            running_var = buffers["running_var"] if "running_var" in buffers else self.running_var
        else:
            running_mean = running_var = None
        bn_training = training or (running_mean is None and running_var is None)
        num_batches = buffers.get("num_batches_tracked") if training and self.track_running_stats else None
        if torch.jit.is_tracing():
            # TorchScript tracing (ONNX export with dynamo=False): torch's own module code, so the trace
            # holds torch's ops and no shape check of ours turns into a TracerWarning.
            return self._torch_forward(input, running_mean, running_var, bn_training, num_batches is not None,
                                       residual, activation)
        if functorch_active():
            # torch.func (grad, vmap, ...): torch's module exactly, which increments num_batches_tracked
            # first, so that the in-place update a transform forbids raises before any state changes.
            return epilogue(nn.modules.batchnorm._BatchNorm.forward(self, input), residual, activation)
        momentum = self.momentum
        if uses_triton(input) and (momentum is None or type(momentum) in (float, int)) and \
                supported(input, running_mean, running_var, weight, bias, bn_training, self.eps):
            # num_batches_tracked is incremented by the kernels (eager): nothing changes if a check raises.
            return batch_norm_impl(input, running_mean, running_var, weight, bias, bn_training, momentum,
                                   self.eps, num_batches, num_batches is not None, residual, activation)
        # (a momentum of another type: F.batch_norm raises torch's TypeError, before any state changes)
        return self._torch_forward(input, running_mean, running_var, bn_training, num_batches is not None,
                                   residual, activation)

    @torch.jit.unused
    def _torch_forward(self, input, running_mean, running_var, bn_training, tracking, residual, activation):
        """torch's own ``_BatchNorm.forward``, except that ``num_batches_tracked`` is incremented only once
        ``F.batch_norm`` has succeeded (torch increments it first, so a call that raises changes state)."""
        factor = 0.0 if self.momentum is None else self.momentum
        if tracking and self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked + 1)
        y = F.batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training, factor,
                         self.eps)
        if tracking:
            self.num_batches_tracked.add_(1)
        return epilogue(y, residual, activation)


def _fx_leaf(module, *args):
    """Under ``torch.fx.symbolic_trace``: the module as one ``call_module`` node, as FX keeps torch's own
    BatchNorm (its default tracer takes only torch.nn's modules as leaves, and would trace into tritonbn's
    dispatch, which branches on the input). The traced module then calls this module, kernels and
    train/eval mode included."""
    tracer = next(a for a in args if isinstance(a, _FxProxy)).tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, {})


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
    (``"relu"``, ``"relu6"``, ``"silu"``, ``"hardswish"`` or None), not state. With SiLU or Hardswish a
    residual is added after the kernels (their gradient would need it again)."""

    def __init__(self, num_features, *args, activation="relu", **kwargs):
        # Every other argument is the torch class's own (its set varies across torch versions).
        activation_code(activation)   # validates it
        super().__init__(num_features, *args, **kwargs)
        self.activation = activation
        # Set by fuse_model where the model's code was ``out += residual`` on the BN output: the unfused
        # path then adds in place too (the BN output's dtype kept, as the original code computed).
        self._residual_in_place = False

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(input, residual, self.activation, self._residual_in_place)
        return self._act_forward(input, residual)

    @torch.jit.unused
    def _act_forward(self, input: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if isinstance(input, _FxProxy) or isinstance(residual, _FxProxy):
            return _fx_leaf(self, input) if residual is None else _fx_leaf(self, input, residual)
        act = activation_code(self.activation)
        if residual is not None and (torch.jit.is_tracing() or not fusable_residual(input, residual)):
            # Not fusable (broadcasting, type promotion): the unfused ops, with torch's semantics, so a model
            # that tritonbn.fuse_model rewrote computes what the original did for any input.
            return epilogue(self._bn_forward(input, None, 0), residual, act,
                            getattr(self, "_residual_in_place", False))
        return self._bn_forward(input, residual, act)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


class BatchNormAct1d(_BatchNormActMixin, nn.BatchNorm1d):
    """``BatchNorm1d`` + optional residual add + activation, fused; input ``(N, C)`` or ``(N, C, L)``."""


class BatchNormAct2d(_BatchNormActMixin, nn.BatchNorm2d):
    """``BatchNorm2d`` + optional residual add + activation, fused; input ``(N, C, H, W)``."""


class BatchNormAct3d(_BatchNormActMixin, nn.BatchNorm3d):
    """``BatchNorm3d`` + optional residual add + activation, fused; input ``(N, C, D, H, W)``."""


class LazyBatchNorm1d(_TritonBatchNormMixin, nn.LazyBatchNorm1d):
    """``torch.nn.LazyBatchNorm1d`` on tritonbn kernels: ``num_features`` is inferred on the first call,
    which turns the module into a tritonbn ``BatchNorm1d`` (torch's lazy class would become torch's)."""

    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_TritonBatchNormMixin, nn.LazyBatchNorm2d):
    """``torch.nn.LazyBatchNorm2d`` on tritonbn kernels; becomes a tritonbn ``BatchNorm2d`` on its first
    call."""

    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_TritonBatchNormMixin, nn.LazyBatchNorm3d):
    """``torch.nn.LazyBatchNorm3d`` on tritonbn kernels; becomes a tritonbn ``BatchNorm3d`` on its first
    call."""

    cls_to_become = BatchNorm3d


_REPLACEMENTS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d,
                 nn.LazyBatchNorm1d: LazyBatchNorm1d, nn.LazyBatchNorm2d: LazyBatchNorm2d,
                 nn.LazyBatchNorm3d: LazyBatchNorm3d}


def convert_model(module: nn.Module) -> nn.Module:
    """Swap every torch ``BatchNorm1d/2d/3d`` in ``module`` (``module`` itself included) for the tritonbn
    equivalent, in place, and return the module.

    The objects are kept and only their class changes (tritonbn's classes add no state), so parameters,
    buffers, device, dtype, training flag, hooks and optimizer references all stay valid. Exact torch
    classes only: subclasses (SyncBatchNorm, user classes) are left alone. ``LazyBatchNorm*d`` modules not
    yet called become tritonbn's lazy classes, which turn into tritonbn ``BatchNorm*d`` on their first call.
    ``revert_model`` undoes it.
    """
    for m in module.modules():
        new_cls = _REPLACEMENTS.get(type(m))
        if new_cls is not None:
            m.__class__ = new_cls
    return module


def revert_model(module: nn.Module) -> nn.Module:
    """Undo ``convert_model``: swap every tritonbn ``BatchNorm1d/2d/3d``, ``LazyBatchNorm*d`` and
    ``SyncBatchNorm`` in ``module`` back to torch's class, in place, and return the module. For tools that
    match torch's exact classes (``torch.ao.quantization.fuse_modules``, eager-mode quantization).

    A fused ``BatchNormAct*d`` (from ``fuse_model``) has no torch class: it raises ``TypeError`` naming it,
    and nothing is changed. ``fuse_model`` leaves the model it is given as it was; revert that one.
    """
    from tritonbn.sync_batchnorm import SyncBatchNorm  # (imports this module)

    back = {new: old for old, new in _REPLACEMENTS.items()}
    back[SyncBatchNorm] = nn.SyncBatchNorm
    swaps = []
    for name, m in module.named_modules():
        if isinstance(m, _BatchNormActMixin):
            raise TypeError(f"revert_model: {name or 'the module'!r} is a fused {type(m).__name__} "
                            f"(activation={m.activation!r}), which no torch class replaces without losing "
                            "its activation and residual; fuse_model left the model it was given unchanged: "
                            "revert that one")
        if type(m) in back:
            swaps.append(m)
    for m in swaps:
        m.__class__ = back[type(m)]
    return module
