"""tritonbn's fused modules (``BatchNormAct1d/2d/3d``) in the export tool.

A ``BatchNormAct`` call ``bn(x, residual)`` computes ``activation(bn(x) + residual)`` (with torch's
broadcasting and type promotion when the residual does not match ``x``: its unfused fallback). It is a
``_BatchNorm``, so without care a fold would treat it as a plain BN and drop the add and the activation.
The folder therefore first *splits* every such call in the FX graph into the BN part (a plain BN module
with the same state), ``operator.add`` and the activation, so that the BN part folds under the same rules
as any BN and the add and activation stay in the graph; the exporter copy gets torch-only modules that
compute the same thing with standard ops.
"""

from __future__ import annotations

import copy
import operator

import torch
from torch import fx, nn

from tritonbn import modules as _tbn
from tritonbn import ops as _ops
from tritonbn import torch_math as _torch_math

FUSED = (_tbn.BatchNormAct1d, _tbn.BatchNormAct2d, _tbn.BatchNormAct3d)
_PLAIN_PART = {_tbn.BatchNormAct1d: _tbn.BatchNorm1d, _tbn.BatchNormAct2d: _tbn.BatchNorm2d,
               _tbn.BatchNormAct3d: _tbn.BatchNorm3d}
_ACT_FORWARD = _tbn.BatchNormAct2d.forward  # the mixin's: the same function object for every rank
# activation name -> the torch function the split graph calls (what tritonbn's unfused epilogue calls)
ACTIVATIONS = {name: _torch_math.ACT_FN.get(code) for name, code in _ops.ACTIVATIONS.items()}


def is_fused(m: nn.Module) -> bool:
    return isinstance(m, FUSED)


def split_problem(m: nn.Module) -> str | None:
    """Why the fused module ``m`` cannot be split into BN + add + activation (None when it can)."""
    if type(m).forward is not _ACT_FORWARD or "forward" in m.__dict__:
        return f"{type(m).__name__} overrides BatchNormAct's forward (what it computes is unknown)"
    if getattr(m, "activation", None) not in ACTIVATIONS:
        return f"activation {m.activation!r} is not supported by the export tool"
    return None


def call_operands(node: fx.Node):
    """``(input, residual)`` of a ``bn(input, residual=None)`` call node, or None for other arguments."""
    names = ("input", "residual")
    if len(node.args) > 2 or set(node.kwargs) - set(names[len(node.args):]):
        return None
    bound = dict(zip(names, node.args), **node.kwargs)
    if "input" not in bound:
        return None
    return bound["input"], bound.get("residual")


def residual_label(residual, prefix: str = "") -> str | None:
    """How the report names the residual: the qualified name of the module that made it, else its FX
    node's name (e.g. a forward argument), or a constant's repr."""
    if residual is None:
        return None
    if not isinstance(residual, fx.Node):
        return repr(residual)
    if residual.op == "call_module":
        return f"{prefix}.{residual.target}" if prefix else residual.target
    return residual.name


def plain_part(m: nn.Module) -> nn.Module:
    """A copy of the fused module ``m`` that computes only its BN (tritonbn ``BatchNorm*d``; same state)."""
    new = copy.deepcopy(m)
    new.__class__ = _PLAIN_PART[next(c for c in FUSED if isinstance(m, c))]
    del new.activation
    new.__dict__.pop("_residual_in_place", None)
    return new


def split_call(graph: fx.Graph, node: fx.Node, activation, residual) -> fx.Node:
    """Rewrite the call ``node`` (now to the BN part) as ``act(node(input) + residual)`` in place: every
    former user of ``node`` reads the last new node instead.  ``bn(x) + residual`` keeps the fused op's
    operand order (its unfused fallback computes that, broadcasting included; where the model's code added
    in place, the fallback keeps the BN output's dtype, which differs only for operands of other dtypes)."""
    users = list(node.users)
    node.args, node.kwargs = (node.args[0] if node.args else node.kwargs["input"],), {}
    last = node
    if residual is not None:
        with graph.inserting_after(last):
            last = graph.call_function(operator.add, (last, residual))
    fn = ACTIVATIONS[activation]
    if fn is not None:
        with graph.inserting_after(last):
            last = graph.call_function(fn, (last,))
    for user in users:
        user.replace_input_with(node, last)
    return last


def epilogue(y: torch.Tensor, residual, activation) -> torch.Tensor:
    """``activation(y + residual)`` with standard torch ops (``activation`` by name)."""
    return _torch_math.epilogue(y, residual, _ops.ACTIVATIONS[activation])


class _TorchActMixin:
    """torch's eval BN, then BatchNormAct's add and activation, with standard ops (exporter copy)."""

    activation = "relu"

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return epilogue(super().forward(input), residual, self.activation)


class TorchBatchNormAct1d(_TorchActMixin, nn.BatchNorm1d):
    pass


class TorchBatchNormAct2d(_TorchActMixin, nn.BatchNorm2d):
    pass


class TorchBatchNormAct3d(_TorchActMixin, nn.BatchNorm3d):
    pass


_TORCH_ACT = {nn.BatchNorm1d: TorchBatchNormAct1d, nn.BatchNorm2d: TorchBatchNormAct2d,
              nn.BatchNorm3d: TorchBatchNormAct3d}


def torch_class(m: nn.Module):
    """The torch-only class computing what the fused module ``m`` computes, or None when its forward is
    not BatchNormAct's (then it exports through its own forward, which emits standard ops too)."""
    if split_problem(m):
        return None
    return next(cls for base, cls in _TORCH_ACT.items() if isinstance(m, base))
