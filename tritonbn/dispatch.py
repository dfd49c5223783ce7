"""Where a call runs: tritonbn's Triton kernels, torch's batch norm, or (while tracing) custom ops/ATen.

Every layer asks here and nowhere else:

* ``uses_triton(x)``: CUDA tensors run the Triton kernels; CPU tensors run them through Triton's
  interpreter when Triton interprets tritonbn's kernels (TRITON_INTERPRET was on when triton and the kernels
  were loaded: asked of Triton, not of the environment, which may have changed since), or when a launch
  hook records the launches (``tritonbn.compile_gate``); anything else runs torch's batch norm, and so
  do the calls whose tensors are not plain memory, or whose ops something traces: under a ``torch.func``
  transform (grad, vmap, ...), under forward-mode AD (``torch.autograd.forward_ad``), on a tensor subclass
  (DTensor, FakeTensor, ...), and eagerly under one of torch's tensor-replacing modes (``FakeTensorMode``,
  ``make_fx``'s proxy mode, functionalization): torch's batch norm supports them all, and they cannot see
  a Triton launch (``make_fx`` would record the output's allocation and nothing that fills it). Modes that
  only observe ops (counters, loggers) see tritonbn's own path.
* ``graph_capture()``: being traced (``torch.compile``, ``torch.export``, TorchScript tracing) rather than
  run eagerly; then ``tracing_for_export()`` tells exporters (which get standard ATen ops) from compile
  (which gets tritonbn's custom ops).
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad

from tritonbn import ops

# Whether a torch.func transform (grad, vmap, jacrev, ...) is active: calls under one run torch's batch norm.
functorch_active = torch._C._are_functorch_transforms_active
_dispatch_modes = torch._C._len_torch_dispatch_stack
_get_mode = torch._C._get_dispatch_mode
_TENSOR_MODES = tuple(getattr(torch._C._TorchDispatchModeKey, k) for k in ("FAKE", "PROXY", "FUNCTIONAL")
                      if hasattr(torch._C._TorchDispatchModeKey, k))
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _tensor_mode_active() -> bool:
    """Whether a mode that replaces or traces tensors (fake tensors, make_fx, functionalization) is on."""
    return _dispatch_modes() > 0 and any(_get_mode(k) is not None for k in _TENSOR_MODES)


def uses_triton(x: torch.Tensor) -> bool:
    """Whether ``x`` is normalized by tritonbn's Triton kernels (True) or by torch's batch norm (False)."""
    if functorch_active() or getattr(_forward_ad, "_current_level", -1) >= 0:
        return False    # torch.func transforms, forward-mode AD: torch's batch norm, which supports them
    if type(x) not in _PLAIN or (not compiling() and _tensor_mode_active()):
        # torch's batch norm, which they understand; a traced call (compile, export) keeps its own path:
        # tritonbn's custom ops, or the ATen its exporters get. (Dynamo cannot trace the mode query.)
        if not graph_capture():
            return False
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and (ops._launch_hook is not None or ops.interpreted())


def graph_capture() -> bool:
    """Whether the caller is being traced (compile, export, TorchScript trace) rather than run eagerly."""
    return torch.jit.is_tracing() or compiling()


def tracing_for_export() -> bool:
    """True under ``torch.export`` (and the ONNX exporters built on it) and TorchScript tracing."""
    if torch.jit.is_tracing():
        return True
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


# Being compiled or exported by Dynamo (torch >= 2.3; tritonbn needs 2.4): bound once, as it is asked on every
# eager call, and Dynamo folds it to a constant.
compiling = torch.compiler.is_compiling
