"""Where a call runs: tritonbn's Triton kernels, torch's batch norm, or (while tracing) custom ops/ATen.

Every layer asks here and nowhere else:

* ``uses_triton(x)``: CUDA tensors run the Triton kernels; CPU tensors run them through Triton's
  interpreter when Triton interprets tritonbn's kernels (TRITON_INTERPRET was on when triton and the kernels
  were loaded: asked of Triton, not of the environment, which may have changed since), or when a launch
  hook records the launches (``tritonbn.compile_gate``); anything else runs torch's batch norm, and so
  does every call under a ``torch.func`` transform (grad, vmap, ...: torch's batch norm supports them).
* ``graph_capture()``: being traced (``torch.compile``, ``torch.export``, TorchScript tracing) rather than
  run eagerly; then ``tracing_for_export()`` tells exporters (which get standard ATen ops) from compile
  (which gets tritonbn's custom ops).
"""

from __future__ import annotations

import torch

from tritonbn import ops

# Whether a torch.func transform (grad, vmap, jacrev, ...) is active: calls under one run torch's batch norm.
functorch_active = torch._C._are_functorch_transforms_active


def uses_triton(x: torch.Tensor) -> bool:
    """Whether ``x`` is normalized by tritonbn's Triton kernels (True) or by torch's batch norm (False)."""
    if functorch_active():
        return False    # torch.func (grad, vmap, jacrev, ...): torch's batch norm, which supports them
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


def compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    if is_compiling is not None:
        return is_compiling()
    return torch._dynamo.is_compiling()  # pragma: no cover (torch < 2.3)
