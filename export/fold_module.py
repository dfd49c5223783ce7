"""Fold eval-mode BatchNorm modules into neighbouring Conv/ConvTranspose/Linear modules (FX).

Design choices (each one avoids a known bug of existing tools):
* Every ``_BatchNorm`` (torch, SyncBatchNorm, tritonbn subclasses) is an FX leaf: never traced into.
* A user's own (non ``torch.nn``) module is a leaf too and is folded *recursively* on its own, so a
  custom module's internals are never inlined into its parent's graph.
* We only fold into layers whose ``forward`` is torch's own (a subclass overriding it, a ``forward``
  replaced on the instance, a parametrized weight or a module with hooks may compute something else),
  and only BNs whose ``forward`` is a known eval-BN one (torch's, SyncBatchNorm's, tritonbn's).
* A layer or BN whose parameters the code also reads directly (an FX ``get_attr``, e.g. ``self.conv.bias``
  or a weight-tied ``x @ self.fc.weight``, in its own graph or a parent's) is not folded: a fold would
  change what those reads see.
* A layer module registered or called more than once is never edited in place: the call site that
  is folded gets its own clone.
* The caller's model is deep-copied first and never touched.
* A fused tritonbn ``BatchNormAct`` call is split into its BN part, the add and the activation first
  (``fused_bn``): only the BN part is folded, the add and activation stay.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from tritonbn import modules as _tbn
from tritonbn import sync_batchnorm as _tsync

from . import fold_math, fused_bn
from .errors import FoldError, first_line
from .report import FoldReport

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# Warn when a BN scale is this large: folded weights become hard to quantize.
HUGE_SCALE = 1e4
# BN forwards that compute exactly eval BN from the running stats (tritonbn's runs its own kernels):
# a BN whose class has another forward (a subclass overriding it) may compute anything.
# tritonbn's SyncBatchNorm: batch norm in eval mode (it synchronises only training statistics).
BN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward, _tbn.BatchNorm2d.forward,
               _tsync.SyncBatchNorm.forward)


def check_eval(model: nn.Module) -> None:
    """Raise FoldError unless every submodule is in eval mode."""
    for name, m in model.named_modules():
        if m.training:
            where = f"submodule '{name}'" if name else "the model"
            raise FoldError(f"{where} is in training mode; call model.eval() before folding/exporting")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _is_torch_module(m: nn.Module) -> bool:
    mod = type(m).__module__
    return mod.startswith(("torch.nn.", "torch.ao.nn.")) or mod in ("torch.nn", "torch.ao.nn")


def _is_user_module(m: nn.Module) -> bool:
    return not isinstance(m, _BatchNorm) and not _is_torch_module(m)


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, _BatchNorm) or _is_user_module(m):
            return True
        return super().is_leaf_module(m, qualname)


def _trace(module: nn.Module) -> fx.GraphModule:
    graph = _LeafTracer().trace(module)
    return fx.GraphModule(module, graph, class_name=type(module).__name__)


def layer_kind(m: nn.Module):
    """Return ``(kind, groups, spatial_dims)`` for a foldable layer, or a string saying why not."""
    for bases, kind in ((_CONVS, "conv"), (_CONV_TS, "conv_transpose"), ((nn.Linear,), "conv")):
        base = next((b for b in bases if isinstance(m, b)), None)
        if base is None:
            continue
        if type(m).forward is not base.forward or getattr(type(m), "_conv_forward", None) is not getattr(
            base, "_conv_forward", None
        ):
            return f"{type(m).__name__} overrides forward"
        if {"forward", "_conv_forward"} & m.__dict__.keys():
            return f"{type(m).__name__} has its forward replaced on the instance"
        if torch.nn.utils.parametrize.is_parametrized(m):
            return f"{type(m).__name__} has a parametrized weight"
        if m._forward_hooks or m._forward_pre_hooks:
            return f"{type(m).__name__} has forward hooks"
        if isinstance(m.weight, nn.parameter.UninitializedParameter):
            return f"{type(m).__name__} is an uninitialized lazy module"
        if not m.weight.is_floating_point():
            return f"{type(m).__name__} weight is not floating point"
        if base is nn.Linear:
            return "conv", 1, 0
        return kind, m.groups, len(m.kernel_size)
    return f"{type(m).__name__} is not a Conv/ConvTranspose/Linear"


def bn_forward_problem(bn: _BatchNorm) -> str | None:
    """Why ``bn``'s forward may not be plain eval BN (None when it is torch's, SyncBatchNorm's or
    tritonbn's); a fused BatchNormAct's forward is judged by ``fused_bn.split_problem``."""
    if "forward" in bn.__dict__:
        return f"{type(bn).__name__} has its forward replaced on the instance"
    if not fused_bn.is_fused(bn) and type(bn).forward not in BN_FORWARDS:
        return f"{type(bn).__name__} overrides forward (what it computes is unknown)"
    return None


def bn_unfoldable(bn: _BatchNorm) -> str | None:
    problem = bn_forward_problem(bn)
    if problem:
        return problem
    if bn.running_mean is None or bn.running_var is None or not bn.track_running_stats:
        return "BN has no running stats (track_running_stats=False): it normalizes by batch stats"
    if isinstance(bn.running_mean, nn.parameter.UninitializedBuffer):
        return "BN is an uninitialized lazy module"
    if bn._forward_hooks or bn._forward_pre_hooks:
        return "BN has forward hooks"
    return None


def bn_affine(bn: _BatchNorm):
    """float64 ``(s, t)`` of an eval BN module."""
    def arr(x):
        return None if x is None else x.detach().cpu().double().numpy()

    w = arr(bn.weight) if bn.affine else None
    b = arr(bn.bias) if bn.affine else None
    return fold_math.bn_scale_shift(arr(bn.running_mean), arr(bn.running_var), bn.eps, w, b)


def cast_once(a64: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """float64 -> ``like.dtype`` with a single rounding (numpy rounds f64->f16 directly; torch goes
    through f32)."""
    np_dtypes = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
    if like.dtype in np_dtypes:
        t = torch.from_numpy(np.ascontiguousarray(a64.astype(np_dtypes[like.dtype])))
    else:  # bfloat16 etc.: torch's cast (may round twice, via float32)
        t = torch.from_numpy(np.ascontiguousarray(a64)).to(like.dtype)
    return t.to(like.device)


def _with_params(layer: nn.Module, w64, b64) -> nn.Module:
    new = copy.deepcopy(layer)
    req = layer.weight.requires_grad
    new.weight = nn.Parameter(cast_once(w64, layer.weight), requires_grad=req)
    new.bias = nn.Parameter(cast_once(b64, layer.weight), requires_grad=req)
    return new


def _zero_padding_free(conv: nn.Module) -> bool:
    if conv.padding_mode != "zeros":  # reflect/replicate/circular pad with (normalized) input values
        return True
    p = conv.padding
    if isinstance(p, str):
        return p == "valid" or all(d * (k - 1) == 0 for d, k in zip(conv.dilation, conv.kernel_size))
    return all(v == 0 for v in p)


@dataclass
class _Ctx:
    report: FoldReport
    bn_ranks: dict  # id(bn module) -> set of input ndims seen with example inputs
    names_per_module: Counter  # id(module) -> number of names it is registered under
    done: dict = field(default_factory=dict)  # id(user module) -> folded replacement
    # id(module) -> (module, qualified get_attr target): modules whose parameters some traced graph
    # reads directly; parents are traced before their user submodules, so a parent's reads are known here
    read_directly: dict = field(default_factory=dict)

    def read_problem(self, m: nn.Module, what: str) -> str | None:
        read = self.read_directly.get(id(m))
        if read is None:
            return None
        return f"parameters of {what} are also read directly ('{read[1]}'), which folding would break"


def _record_direct_reads(gm: fx.GraphModule, prefix: str, ctx: _Ctx) -> None:
    """Note every module whose attribute (a parameter) a ``get_attr`` node of ``gm`` reads."""
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not isinstance(node.target, str):
            continue
        owner_path = node.target.rpartition(".")[0]
        for path in (node.target, owner_path):
            try:
                m = gm.get_submodule(path)
            except AttributeError:
                continue
            ctx.read_directly.setdefault(id(m), (m, _join(prefix, node.target)))
            break


def single_input(node: fx.Node):
    """The argument of a one-argument module call ``m(x)`` or ``m(input=x)`` (torch's and tritonbn's
    BN, Conv and Linear name it ``input``), else None."""
    if len(node.args) == 1 and not node.kwargs:
        return node.args[0]
    if not node.args and set(node.kwargs) == {"input"}:
        return node.kwargs["input"]
    return None


def _set_submodule(gm: nn.Module, target: str, new: nn.Module) -> None:
    parent, _, attr = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, attr, new)


class _GraphFolder:
    def __init__(self, gm: fx.GraphModule, prefix: str, ctx: _Ctx):
        self.gm, self.prefix, self.ctx = gm, prefix, ctx
        self.calls = Counter(
            id(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"
        )
        self.names: dict = {}  # BN call node -> the BN's qualified name (a split call may be retargeted)
        self.epilogue: dict = {}  # BN call node -> what its fused module also computed (report fields)
        self.unsplit: dict = {}  # fused BN call node left whole -> why

    def bn_name(self, node: fx.Node) -> str:
        return self.names.get(node, _join(self.prefix, node.target))

    def split_fused(self) -> None:
        """Split every call of a fused BatchNormAct whose BN part may fold into BN part + add +
        activation (``fused_bn.split_call``); the others stay whole (correct, just not folded)."""
        sites: dict = {}  # id(fused module) -> (module, [(node, operands)])
        for node in self.gm.graph.nodes:
            m = self.module(node)
            if fused_bn.is_fused(m):
                sites.setdefault(id(m), (m, []))[1].append((node, fused_bn.call_operands(node)))
        for m, calls in sites.values():
            problem = bn_unfoldable(m) or fused_bn.split_problem(m)
            if problem is None and any(ops is None for _, ops in calls):
                problem = "BN is called with arguments other than (input, residual)"
            for node, ops in calls:
                self.names[node] = self.bn_name(node)
                residual = None if ops is None else fused_bn.residual_label(ops[1], self.prefix)
                self.epilogue[node] = {"activation": m.activation, "residual": residual}
                if problem:
                    self.unsplit[node] = problem
            if problem:
                continue
            part = fused_bn.plain_part(m)
            if id(m) in self.ctx.bn_ranks:
                self.ctx.bn_ranks[id(part)] = self.ctx.bn_ranks[id(m)]
            if id(m) in self.ctx.read_directly:
                self.ctx.read_directly[id(part)] = (part, self.ctx.read_directly[id(m)][1])
            target = self.part_target(m, calls[0][0].target, part)
            for node, _ in calls:
                node.target = target
                # Operands read now: an earlier split redirected the users of its call (this one among
                # them, when the other's output is this call's residual) to its activation.
                _, residual = fused_bn.call_operands(node)
                fused_bn.split_call(self.gm.graph, node, m.activation, residual)

    def part_target(self, m: nn.Module, target: str, part: nn.Module) -> str:
        """Install the BN part in place of the fused module when no other forward can reach it (one
        name, not inside a user module another forward folds), else under a new name."""
        atoms = target.split(".")
        inside_user = any(_is_user_module(self.gm.get_submodule(".".join(atoms[:i])))
                          for i in range(1, len(atoms)))
        if self.ctx.names_per_module[id(m)] <= 1 and not inside_user:
            _set_submodule(self.gm, target, part)
            return target
        base = target.replace(".", "_") + "_bn"
        name, i = base, 1
        while hasattr(self.gm, name):
            name, i = f"{base}_{i}", i + 1
        self.gm.add_submodule(name, part)
        return name

    def module(self, node) -> nn.Module | None:
        if isinstance(node, fx.Node) and node.op == "call_module":
            return self.gm.get_submodule(node.target)
        return None

    def install(self, node: fx.Node, layer: nn.Module, new: nn.Module) -> str:
        """Point ``node`` at ``new``: in place when ``layer`` is used only here, else as a clone."""
        if self.calls[id(layer)] == 1 and self.ctx.names_per_module[id(layer)] <= 1:
            _set_submodule(self.gm, node.target, new)
            self.calls[id(new)] = 1
            return node.target
        base = node.target.replace(".", "_") + "_bnfold"
        name, i = base, 1
        while hasattr(self.gm, name):
            name, i = f"{base}_{i}", i + 1
        self.gm.add_submodule(name, new)
        self.calls[id(layer)] -= 1
        self.calls[id(new)] = 1
        node.target = name
        return name

    def rank_problem(self, bn: _BatchNorm, kind_info, layer: nn.Module) -> str | None:
        ranks = self.ctx.bn_ranks.get(id(bn))
        want = kind_info[2] + 2
        if isinstance(layer, nn.Linear):
            # Linear acts on the last axis, BN on axis 1: the same axis only for 2-D tensors.
            if ranks is None:
                return "Linear<->BN needs example_inputs to prove the BN input is 2-D"
            if ranks != {2}:
                return f"BN input has rank {sorted(ranks)}, Linear folds only for 2-D tensors"
        elif ranks is None and want == 3:
            # an unbatched (C, L) input makes BatchNorm1d see (N, C) = (C, L): it normalizes along L
            return f"{type(layer).__name__}<->BN needs example_inputs to prove the BN input is 3-D (batched)"
        elif ranks is not None and ranks != {want}:
            return f"BN input has rank {sorted(ranks)}, expected {want} (unbatched input?)"
        return None

    def try_after(self, bn_node: fx.Node, bn: _BatchNorm, name: str) -> str | None:
        prod = single_input(bn_node)
        layer = self.module(prod)
        if layer is None:
            return "input is not produced by a Conv/ConvTranspose/Linear module"
        info = layer_kind(layer)
        if isinstance(info, str):
            return f"producer '{prod.target}': {info}"
        if len(prod.users) != 1:
            return f"output of '{prod.target}' has {len(prod.users)} consumers"
        if single_input(prod) is None:
            return f"'{prod.target}' is called with extra arguments"
        problem = self.ctx.read_problem(layer, f"'{_join(self.prefix, prod.target)}'")
        if problem:
            return problem
        problem = self.rank_problem(bn, info, layer)
        if problem:
            return problem
        kind, groups, _ = info
        s, t = bn_affine(bn)
        n_out = fold_math.out_channels(layer.weight.shape, kind, groups)
        if n_out != len(s):
            return f"'{prod.target}' has {n_out} output channels, BN has {len(s)}"
        w, b = fold_math.fold_after(
            layer.weight.detach().cpu().double().numpy(),
            None if layer.bias is None else layer.bias.detach().cpu().double().numpy(),
            s, t, kind, groups,
        )
        into = self.install(prod, layer, _with_params(layer, w, b))
        bn_node.replace_all_uses_with(prod)
        self.gm.graph.erase_node(bn_node)
        self.ctx.report.fold(name, _join(self.prefix, into), "after", type(layer).__name__,
                             **self.epilogue.get(bn_node, {}))
        self.warn_scale(name, s)
        return None

    def try_before(self, bn_node: fx.Node, bn: _BatchNorm, name: str) -> str | None:
        users = list(bn_node.users)
        if len(users) != 1:
            return f"BN output has {len(users)} consumers"
        cons = users[0]
        layer = self.module(cons)
        if layer is None:
            return "BN output does not feed a Conv/Linear module"
        info = layer_kind(layer)
        if isinstance(info, str):
            return f"consumer '{cons.target}': {info}"
        if single_input(cons) is not bn_node:
            return f"'{cons.target}' is called with extra arguments"
        problem = self.ctx.read_problem(layer, f"'{_join(self.prefix, cons.target)}'")
        if problem:
            return problem
        if isinstance(layer, _CONV_TS):
            return f"BN before ConvTranspose '{cons.target}' is not exact at the borders"
        if not isinstance(layer, nn.Linear) and not _zero_padding_free(layer):
            return (f"BN before '{cons.target}' with zero padding is not exact "
                    "(padded zeros are not normalized)")
        problem = self.rank_problem(bn, info, layer)
        if problem:
            return problem
        kind, groups, _ = info
        s, t = bn_affine(bn)
        n_in = fold_math.in_channels(layer.weight.shape, kind, groups)
        if n_in != len(s):
            return f"'{cons.target}' has {n_in} input channels, BN has {len(s)}"
        w, b = fold_math.fold_before(
            layer.weight.detach().cpu().double().numpy(),
            None if layer.bias is None else layer.bias.detach().cpu().double().numpy(),
            s, t, kind, groups,
        )
        into = self.install(cons, layer, _with_params(layer, w, b))
        bn_node.replace_all_uses_with(single_input(bn_node))
        self.gm.graph.erase_node(bn_node)
        self.ctx.report.fold(name, _join(self.prefix, into), "before", type(layer).__name__,
                             **self.epilogue.get(bn_node, {}))
        self.warn_scale(name, s)
        return None

    def warn_scale(self, name: str, s) -> None:
        if fold_math.max_abs_scale(s) > HUGE_SCALE:
            self.ctx.report.warnings.append(
                f"{name}: BN scale up to {fold_math.max_abs_scale(s):.3g} (tiny running_var); "
                "folded weights may quantize badly"
            )

    def run(self) -> None:
        self.split_fused()
        for node in list(self.gm.graph.nodes):
            bn = self.module(node)
            if not isinstance(bn, _BatchNorm):
                continue
            name = self.bn_name(node)
            reason = (self.unsplit.get(node) or bn_unfoldable(bn)
                      or self.ctx.read_problem(bn, "the BN"))
            if reason is None and single_input(node) is None:
                reason = "BN is called with arguments other than its input"
            if reason is None:
                after = self.try_after(node, bn, name)
                if after is None:
                    continue
                before = self.try_before(node, bn, name)
                if before is None:
                    continue
                reason = f"not after a foldable layer ({after}); not before one ({before})"
            self.ctx.report.skip(name, reason, **self.epilogue.get(node, {}))


def _fold_tree(module: nn.Module, prefix: str, ctx: _Ctx) -> nn.Module:
    try:
        gm = _trace(module)
    except Exception as e:  # noqa: BLE001 - any tracing failure just means "leave this module alone"
        msg = str(e).splitlines()[0][:160] if str(e) else ""
        for name, m in module.named_modules():
            if isinstance(m, _BatchNorm):
                ctx.report.skip(_join(prefix, name), f"'{prefix or type(module).__name__}' is not "
                                f"FX-traceable ({type(e).__name__}: {msg})", **_fused_fields(m))
        return module
    _record_direct_reads(gm, prefix, ctx)
    _GraphFolder(gm, prefix, ctx).run()
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        sub = gm.get_submodule(node.target)
        if _is_user_module(sub):
            if id(sub) not in ctx.done:
                ctx.done[id(sub)] = _fold_tree(sub, _join(prefix, node.target), ctx)
            _set_submodule(gm, node.target, ctx.done[id(sub)])
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _fused_fields(m: nn.Module) -> dict:
    """Report fields of a fused BatchNormAct left whole (its residual, if any, is not known here)."""
    return {"activation": m.activation, "residual": None} if fused_bn.is_fused(m) else {}


def as_input_tuple(example_inputs, error=FoldError, tensors_only=False) -> tuple:
    """A tensor -> ``(tensor,)``; a tuple or list -> a tuple (positional arguments of ``forward``)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or (
        tensors_only and not all(isinstance(x, torch.Tensor) for x in example_inputs)
    ):
        kind = "tensors" if tensors_only else "inputs"
        raise error(f"example_inputs must be a tensor or a tuple/list of {kind}, "
                    f"got {type(example_inputs).__name__}")
    return tuple(example_inputs)


def _bn_input_ranks(model: nn.Module, example_inputs) -> dict:
    ranks: dict = {}

    def hook(mod, args):
        if args and isinstance(args[0], torch.Tensor):
            ranks.setdefault(id(mod), set()).add(args[0].dim())

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, _BatchNorm)]
    try:
        with torch.no_grad():
            model(*example_inputs)
    except Exception as e:  # noqa: BLE001 - e.g. a wrong input shape: the caller's mistake, said in one line
        raise FoldError(f"the model fails on example_inputs: {type(e).__name__}: {first_line(e)}") from e
    finally:
        for h in handles:
            h.remove()
    return ranks


def fold_batchnorm(model: nn.Module, example_inputs=None):
    """Return ``(folded_module, FoldReport)``; ``model`` itself is never modified.

    ``example_inputs`` (a tensor, or a tuple or list of ``forward``'s arguments, as for ``export_onnx``)
    is optional; it lets Linear<->BatchNorm1d pairs fold by proving the BN input is 2-D, and
    Conv1d/ConvTranspose1d<->BatchNorm1d pairs by proving it is 3-D (batched).  Raises
    FoldError if the model is in training mode or fails on ``example_inputs``.
    """
    if not isinstance(model, nn.Module):
        raise FoldError(f"expected a torch.nn.Module, got {type(model).__name__}")
    check_eval(model)
    try:
        work = copy.deepcopy(model)
    except Exception as e:
        raise FoldError(f"cannot deep-copy the model ({type(e).__name__}: {e})") from e
    if example_inputs is not None:
        example_inputs = as_input_tuple(example_inputs)
    report = FoldReport(form="module")
    ranks = _bn_input_ranks(work, example_inputs) if example_inputs is not None else {}
    names = Counter(id(m) for _, m in work.named_modules(remove_duplicate=False))
    ctx = _Ctx(report, ranks, names)
    bn_names = [n for n, m in work.named_modules() if isinstance(m, _BatchNorm)]
    folded = _fold_tree(work, "", ctx)
    seen = {f.bn for f in report.folded} | {s.bn for s in report.skipped}
    for n in bn_names:
        if n not in seen:
            report.skip(n, "not called as a module in the traced forward (unused or used functionally)",
                        **_fused_fields(work.get_submodule(n)))
    report.bn_before = len(bn_names)
    report.bn_after = sum(isinstance(m, _BatchNorm) for m in folded.modules())
    folded.eval()
    return folded, report
