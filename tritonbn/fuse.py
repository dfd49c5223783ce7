"""``tritonbn.fuse_model``: rewrite a model so that BatchNorm → activation (ReLU, ReLU6, SiLU, Hardswish) and
BatchNorm → add → ReLU / ReLU6 run as one fused tritonbn op (``BatchNormAct1d/2d/3d``), and every other
BatchNorm as a tritonbn ``BatchNorm*d``.

How (each choice avoids a known pitfall of existing tools):
* The caller's model is deep-copied; the copy keeps every module, its class, name, hooks and custom
  methods. Only two things change: BatchNorm classes (a class swap, as in ``convert_model``: same
  parameter and buffer objects, so state_dict keys and values are the model's), and the ``forward`` of
  each module in which something was fused, which becomes the FX-regenerated one (set on a subclass of
  the module's own class, so ``isinstance`` and custom methods still work).
* Each module is traced on its own with every submodule a leaf, so a rewritten forward only calls the
  module's own children and no container's forward is bypassed. A pattern is fused only within one
  forward; a module that cannot be traced keeps its forward and its children are traced on their own.
* The activation is matched per call site (``symbolic_trace`` gives one node per call of a shared
  ``self.relu``); only that call is removed, the activation module stays (``fuse_modules`` replaces a
  shared ReLU by Identity and breaks Bottleneck).
* Exact classes only (as ``torch.fx.experimental.optimization.fuse``): subclasses of BatchNorm or of an
  activation may compute something else.
"""

from __future__ import annotations

import copy
import dis
import inspect
import json
import operator
import types
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from tritonbn import modules as _tbn
from tritonbn import ops as _ops

# Exact classes only: a subclass may compute something else.
_TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_TRITON_BN = (_tbn.BatchNorm1d, _tbn.BatchNorm2d, _tbn.BatchNorm3d)
_ACT_BN = (_tbn.BatchNormAct1d, _tbn.BatchNormAct2d, _tbn.BatchNormAct3d)
_PLAIN = dict(zip(_TORCH_BN + _TRITON_BN, _TRITON_BN * 2))
_ACT = dict(zip(_TORCH_BN + _TRITON_BN, _ACT_BN * 2))

# The activations fused (tritonbn.ops.ACTIVATIONS names), by module class, function and Tensor method:
# name, spelling.
_ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish"}
_ACT_FUNCTIONS = {F.relu: ("relu", "F.relu"), torch.relu: ("relu", "torch.relu"),
                  torch.relu_: ("relu", "torch.relu_"), F.relu6: ("relu6", "F.relu6"),
                  F.silu: ("silu", "F.silu"), F.hardswish: ("hardswish", "F.hardswish")}
_ACT_METHODS = {"relu": ("relu", "Tensor.relu"), "relu_": ("relu", "Tensor.relu_")}
_IN_PLACE_ACT = {torch.relu_}
_ACT_NAMES = {"relu": "ReLU", "relu6": "ReLU6", "silu": "SiLU", "hardswish": "Hardswish"}
# Activations that take the fused add too (a gate, stored as a bitmask; SiLU's and Hardswish's gradients
# would need the residual again).
_WITH_ADD = {name for name, code in _ops.ACTIVATIONS.items() if code in _ops.GATED}
_ADD_FUNCTIONS = {operator.add: "+", operator.iadd: "+=", torch.add: "torch.add"}
_ADD_METHODS = {"add": "Tensor.add", "add_": "Tensor.add_"}
_IN_PLACE_ADDS = {_ADD_FUNCTIONS[operator.iadd], _ADD_METHODS["add_"]}


# --- report ----------------------------------------------------------------------------------------

@dataclass
class Fused:
    bn: str  # qualified name of the BatchNorm; now a BatchNormAct*d under the same name
    into: str  # "BatchNormAct2d", ...
    pattern: str  # "bn_relu", "bn_add_relu", "bn_relu6", "bn_add_relu6", "bn_silu" or "bn_hardswish"
    module: str  # the module whose forward was rewritten ("" = the model itself)
    activation: str  # "relu", "relu6", "silu" or "hardswish": the fused module's ``activation``
    act: str  # how the removed activation was spelled, e.g. "nn.ReLU 'relu'", "F.relu", "nn.ReLU6 '2'"
    add: str | None = None  # how the removed add was spelled: "+", "+=", "torch.add", "Tensor.add_"
    residual: str | None = None  # the add's other operand (its FX node in ``module``'s forward)


@dataclass
class Skipped:
    bn: str
    reason: str
    action: str  # "converted": now an unfused tritonbn BatchNorm*d; "unchanged": left as it was


@dataclass
class Fallback:
    module: str  # a module whose forward is kept as it is; its children were traced on their own
    reason: str


@dataclass
class FuseReport:
    fused: list[Fused] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)  # modules whose forward was regenerated
    warnings: list[str] = field(default_factory=list)

    def skip(self, bn: str, reason: str, action: str) -> None:
        self.skipped.append(Skipped(bn, reason, action))

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def format(self) -> str:
        kinds = Counter(("BN+add+" if f.add is not None else "BN+") + _ACT_NAMES[f.activation]
                        for f in self.fused)
        counts = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
        lines = [f"fused {len(self.fused)} BatchNorm ({counts}), {len(self.skipped)} not fused; "
                 f"forward rewritten in {len(self.rewritten)} modules"]
        for f in self.fused:
            act = f"{_ACT_NAMES[f.activation]} {f.act}"
            how = act if f.add is None else f"add {f.add} with {f.residual}, {act}"
            lines.append(f"  fused     {_show(f.bn)} -> {f.into} in {_forward_of(f.module)} ({how})")
        for s in self.skipped:
            lines.append(f"  {s.action:9s} {_show(s.bn)}: {s.reason}")
        lines += [f"  fallback  {_show(b.module)}: {b.reason}" for b in self.fallbacks]
        lines += [f"  warning   {w}" for w in self.warnings]
        return "\n".join(lines)

    __str__ = format


def _show(name: str) -> str:
    return f"'{name}'" if name else "the model"


def _forward_of(name: str) -> str:
    return f"'{name}'.forward" if name else "the model's forward"


# --- graph helpers ---------------------------------------------------------------------------------

def _hooks(m: nn.Module) -> str | None:
    kinds = [k for k, d in (("forward", m._forward_hooks), ("forward pre", m._forward_pre_hooks),
                            ("backward", m._backward_hooks), ("backward pre", m._backward_pre_hooks)) if d]
    return " and ".join(kinds) + " hooks" if kinds else None


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _activation(node: fx.Node, root: nn.Module):
    """``(input, name, spelling, problem)`` when ``node`` is a fused kind of activation, else None.
    ``problem`` says why this call may not be removed (its hooks would no longer run, ...)."""
    if node.op == "call_module":
        m = root.get_submodule(node.target)
        base = next((cls for cls in _ACT_MODULES if isinstance(m, cls)), None)
        if base is None:
            return None
        name, what = _ACT_MODULES[base], base.__name__
        spelling, problem = f"nn.{what} '{node.target}'", None
        if type(m) is not base:
            problem = f"'{node.target}' is a {type(m).__name__}, a {what} subclass (its forward may differ)"
        elif _hooks(m):
            problem = f"{what} '{node.target}' has {_hooks(m)}, which would no longer run"
        elif "forward" in m.__dict__:
            problem = f"{what} '{node.target}' has its forward overridden on the instance"
        elif node.kwargs or len(node.args) != 1:
            problem = f"{what} '{node.target}' is called with extra arguments"
        return (node.args[0] if node.args else None), name, spelling, problem
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        name, spelling = _ACT_FUNCTIONS[node.target]
        extra = set(node.kwargs) - {"input", "inplace"} or len(node.args) > 2
        return _arg(node, 0, "input"), name, spelling, (
            f"the {_ACT_NAMES[name]} is called with extra arguments" if extra else None)
    if node.op == "call_method" and node.target in _ACT_METHODS:
        name, spelling = _ACT_METHODS[node.target]
        extra = node.kwargs or len(node.args) != 1
        return node.args[0], name, spelling, (
            f"the {_ACT_NAMES[name]} is called with extra arguments" if extra else None)
    return None


def _add(node: fx.Node):
    """``(a, b, spelling, in_place, problem)`` when ``node`` adds two values, else None."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        spelling, in_place = _ADD_FUNCTIONS[node.target], node.target is operator.iadd
        if node.target is torch.add:
            a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
            extra = set(node.kwargs) - {"input", "other", "alpha", "out"} or len(node.args) > 2
        else:
            a, b = node.args[0], node.args[1]
            extra = bool(node.kwargs)
    elif node.op == "call_method" and node.target in _ADD_METHODS:
        spelling, in_place = _ADD_METHODS[node.target], node.target == "add_"
        a, b = node.args[0], _arg(node, 1, "other")
        extra = set(node.kwargs) - {"other", "alpha"} or len(node.args) > 2
    else:
        return None
    alpha = node.kwargs.get("alpha", 1)
    problem = None
    if node.kwargs.get("out") is not None:
        problem = f"the add ({spelling}) writes to out="
    elif isinstance(alpha, fx.Node) or alpha != 1 or isinstance(alpha, bool):
        problem = f"the add ({spelling}) has alpha={alpha}"
    elif extra:
        problem = f"the add ({spelling}) is called with extra arguments"
    return a, b, spelling, in_place, problem


def _mutated_input(node: fx.Node, root: nn.Module):
    """The input that ``node`` updates in place and returns (``a += b``, ``a.add_(b)``, ``a.relu_()``,
    an in-place activation), or None."""
    add = _add(node)
    if add is not None:
        return add[0] if add[3] else None
    act = _activation(node, root)
    if act is None or act[3] is not None:
        return None
    if node.op == "call_module":
        return act[0] if root.get_submodule(node.target).inplace else None
    if node.op == "call_method":
        return act[0] if node.target == "relu_" else None
    return act[0] if node.target in _IN_PLACE_ACT or _arg(node, 1, "inplace", False) is True else None


def _follow_in_place(graph: fx.Graph, root: nn.Module) -> None:
    """An in-place op returns the tensor it updated, so every later use of that tensor may use the op's
    result instead: ``out.add_(identity); out = relu(out)`` becomes a chain BN → add → ReLU."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in graph.nodes:
        a = _mutated_input(n, root)
        if isinstance(a, fx.Node):
            for user in list(a.users):
                if user is not n and order[user] > order[n]:
                    user.replace_input_with(a, n)


def _describe(node: fx.Node, root: nn.Module) -> str:
    if node.op == "output":
        return "the return value"
    if node.op == "call_module":
        return f"module '{node.target}' ({type(root.get_submodule(node.target)).__name__})"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def _mode_state():
    """Grad, inference and autocast modes, and saved-tensor hooks: FX symbolic tracing drops ``no_grad`` /
    ``autocast`` blocks and ``torch.utils.checkpoint`` (whose non-reentrant form installs hooks)."""
    try:
        autocast = tuple(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))
    except TypeError:  # torch < 2.4 takes no device type
        autocast = (torch.is_autocast_cpu_enabled(), torch.is_autocast_enabled())
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast,
            not _ops.saved_tensor_hooks_active())


class _InPlaceProxy(fx.Proxy):
    """Records ``a += b`` (every augmented assignment) as ``operator.iadd(a, b)``: ``fx.Proxy`` has no
    in-place methods, so Python would run ``a = a + b`` and the rewritten forward would lose the update of
    a view (``out[:, :2] += y``) or of a tensor the caller passed in, and promote where ``+=`` does not."""


def _in_place_method(op):
    def method(self, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})
    return method


for _name in ("iadd", "isub", "imul", "imatmul", "itruediv", "ifloordiv", "imod", "ipow", "ilshift",
              "irshift", "iand", "ixor", "ior"):
    setattr(_InPlaceProxy, f"__{_name}__", _in_place_method(getattr(operator, _name)))


class _LeafTracer(fx.Tracer):
    """Traces one module's own forward: every submodule call is a leaf ``call_module`` node."""

    def __init__(self):
        super().__init__()
        self.start_state = _mode_state()
        self.mode_changed = False

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _InPlaceProxy(node, self)

    def create_node(self, *args, **kwargs):
        if _mode_state() != self.start_state:
            self.mode_changed = True
        return super().create_node(*args, **kwargs)


class _NotRewritable(Exception):
    pass


# Attributes FX itself sets on the traced module (tensor constants the graph reads with get_attr).
_TRACER_ATTRS = ("_tensor_constant", "_param_constant")


def _undo_attribute_writes(snapshot: list) -> list:
    """Restore the modules' attributes to ``snapshot`` (``[(module, dict(vars(module)))]``); the names the
    traced forward set, replaced or deleted (FX's own constants on the root module are kept)."""
    written = []
    root = snapshot[0][0]
    for m, before in snapshot:
        now = m.__dict__
        for k in list(now):
            if k not in before:
                if m is root and k.startswith(_TRACER_ATTRS):
                    continue
                written.append(k)
                del now[k]
            elif now[k] is not before[k] and k != "training":
                written.append(k)
                now[k] = before[k]
        for k in before.keys() - now.keys():
            written.append(k)
            now[k] = before[k]
    return written


class _watch_autocast:
    """Counts the ``torch.autocast`` blocks (``torch.cuda.amp.autocast`` ... included) entered inside: FX
    drops them, whether they switch autocast on or off (an fp32 island) under the caller's state."""

    def __enter__(self):
        self.entered = []
        cls = torch.amp.autocast_mode.autocast
        self.original = cls.__enter__
        entered, original = self.entered, self.original

        def enter(ctx):
            entered.append(ctx)
            return original(ctx)

        cls.__enter__ = enter
        return self.entered

    def __exit__(self, *exc):
        torch.amp.autocast_mode.autocast.__enter__ = self.original
        return False


def _attribute_chains(module: nn.Module) -> set:
    """Every chain of attribute reads and constant subscripts (``self.layer1[0].bn1`` -> ``("layer1", "0",
    "bn1")``, and each of its prefixes) in the methods of ``module``'s class (and of its bases outside
    torch; ``__init__`` aside) and in a forward set on the instance, nested functions included, read from
    their bytecode. A chain through a local variable (``m = self.sub; m.bn(y)``) is not seen."""
    funcs = [module.__dict__.get("forward")]
    for cls in type(module).__mro__:
        if cls.__module__.split(".")[0] != "torch" and cls is not object:
            funcs += [getattr(v, "__func__", v) for k, v in vars(cls).items() if k != "__init__"]
    chains, codes = set(), [getattr(f, "__code__", None) for f in funcs]
    while codes:
        code = codes.pop()
        if not isinstance(code, types.CodeType):
            continue
        codes += [c for c in code.co_consts if isinstance(c, types.CodeType)]
        chain, index = [], None
        for ins in dis.get_instructions(code):
            if ins.opname in ("LOAD_ATTR", "LOAD_METHOD") and chain is not None:
                chain.append(ins.argval)
                chains.add(tuple(chain))
            elif ins.opname in ("LOAD_CONST", "LOAD_SMALL_INT") and isinstance(ins.argval, int):
                index = str(ins.argval)
                continue
            elif ins.opname in ("BINARY_SUBSCR", "BINARY_OP") and index is not None and chain:
                if ins.opname == "BINARY_OP" and "[" not in str(ins.argrepr):
                    chain = None
                else:
                    chain.append(index)
                    chains.add(tuple(chain))
            elif ins.opname in ("CACHE", "EXTENDED_ARG"):
                continue
            else:   # a new chain starts from any load of a name (self, a global, a local)
                chain = [] if ins.opname.startswith("LOAD_") else None
            index = None
    return chains


def _trace(module: nn.Module) -> fx.Graph:
    """Trace ``module``'s forward, in train and in eval mode; raise _NotRewritable unless one graph
    describes both (a rewritten forward must not bake in either branch of ``if self.training``). The two
    traces run with grad mode on and off, so that a block in the forward that switches it (which FX would
    not record) is seen whatever the caller's mode; an autocast block is seen as it is entered."""
    if "forward" in module.__dict__:
        raise _NotRewritable("forward is overridden on the instance")
    optional = [p.name for p in list(inspect.signature(type(module).forward).parameters.values())[1:]
                if p.default is not inspect.Parameter.empty]
    if optional:
        # FX passes a Proxy for each: `if arg is None` would be fixed to the branch of a given argument.
        raise _NotRewritable(f"forward has optional arguments ({', '.join(optional)}): tracing would fix "
                             "whether they are given")
    modes = [(m, m.training) for m in module.modules()]
    graphs = []
    try:
        for training in (True, False):
            for m, _ in modes:  # flags only: a user's train() override may do more
                m.training = training
            snapshot = [(m, dict(m.__dict__)) for m, _ in modes]
            try:
                with torch.inference_mode(False), torch.set_grad_enabled(training), \
                        _watch_autocast() as entered:
                    tracer = _LeafTracer()
                    graph = tracer.trace(module)
            except Exception as e:  # noqa: BLE001 - any tracing failure means "keep this forward"
                msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                raise _NotRewritable(f"not FX-traceable ({type(e).__name__}: {msg})") from e
            finally:
                written = _undo_attribute_writes(snapshot)
            if tracer.mode_changed or entered:
                raise _NotRewritable("forward changes grad mode, autocast or saved-tensor hooks "
                                     "(torch.utils.checkpoint): FX tracing does not record it")
            if written:
                names = ", ".join(sorted(set(written))[:3])
                raise _NotRewritable(f"forward sets module attributes ({names}): a rewritten one would not")
            graphs.append(graph)
    finally:
        for m, training in modes:
            m.training = training
    if graphs[0].python_code("self").src != graphs[1].python_code("self").src:
        raise _NotRewritable("forward depends on self.training or on the grad mode (its traced graphs "
                             "differ between train mode with grad on and eval mode with grad off)")
    return graphs[0]


class _MetaRecorder(fx.Interpreter):
    """Runs a traced graph (as ``fx.passes.shape_prop.ShapeProp`` does) and records the shape, dtype and
    device of the watched nodes' values, once per call."""

    def __init__(self, module, graph, watch, sink):
        super().__init__(module, graph=graph)
        self.watch, self.sink = watch, sink

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.watch:
            meta = (tuple(out.shape), out.dtype, out.device) if isinstance(out, torch.Tensor) else None
            self.sink.setdefault(n, []).append(meta)
        return out


# --- the pass --------------------------------------------------------------------------------------

@dataclass
class _Plan:
    bn: fx.Node
    act: fx.Node
    activation: str
    act_spelling: str
    add: fx.Node | None = None
    add_spelling: str | None = None
    other: fx.Node | None = None


@dataclass
class _Traced:
    name: str
    module: nn.Module
    graph: fx.Graph
    new_attrs: set  # attributes the tracer added (tensor constants); removed unless rewritten


def _plan(b: fx.Node, root: nn.Module):
    """A _Plan for the BN call ``b``, or the reason it cannot be fused (structure only)."""
    if b.kwargs or len(b.args) != 1:
        return "BN is called with extra arguments"
    if len(b.users) != 1:
        return f"BN output has {len(b.users)} users" if b.users else "BN output is unused"
    user = next(iter(b.users))
    if user.op == "output":
        return "BN output is the return value (fusion stays within one module's forward)"
    act = _activation(user, root)
    if act is not None:
        inp, name, spelling, problem = act
        return problem or (_Plan(b, user, name, spelling) if inp is b else
                           f"BN output is not the {_ACT_NAMES[name]}'s input")
    add = _add(user)
    if add is None:
        return (f"BN output feeds {_describe(user, root)}, not an activation (ReLU, ReLU6, SiLU, Hardswish) "
                "or an add")
    a, other, add_spelling, in_place, problem = add
    if problem:
        return problem
    if a is b and other is b:
        return "the add adds the BN output to itself"
    if a is not b:
        if in_place:
            return f"the in-place add ({add_spelling}) updates its other operand, not the BN output"
        other = a
    if not isinstance(other, fx.Node):
        return f"the add's other operand is a {type(other).__name__}, not a tensor (it would broadcast)"
    if len(user.users) != 1:
        return f"add result has {len(user.users)} users" if user.users else "add result is unused"
    r = next(iter(user.users))
    act = _activation(r, root)
    if act is None:
        return f"add result feeds {_describe(r, root)}, not a ReLU or ReLU6"
    inp, name, spelling, problem = act
    if problem:
        return problem
    if name not in _WITH_ADD:
        return (f"add result feeds a {_ACT_NAMES[name]}: the add is fused only before a ReLU or ReLU6 (the "
                f"{_ACT_NAMES[name]}'s gradient would need the residual again)")
    if inp is not user:
        return f"add result is not the {_ACT_NAMES[name]}'s input"
    # The fused call moves to the add (where the other operand exists), past every node in between: each
    # of them must provably leave the BN input (or any view of it) unchanged, and none may read the BN's
    # buffers (it would see them before this call's update).
    problem = _moved_past(b, user, root)
    if problem:
        return problem
    return _Plan(b, r, name, spelling, user, add_spelling, other)


def _moved_past(b: fx.Node, add: fx.Node, root: nn.Module) -> str | None:
    """Why the BN call ``b`` may not move down to ``add``, or None. Conservative: every node in between
    must be known to update no tensor in place (the BN input, or a view of it, would otherwise be read after
    the update), and none may use the BN module's own parameters or buffers (a read of the running stats
    would come before this call's update)."""
    state = set()  # values that are, or may alias, a parameter or buffer of the BN module
    between = False
    for n in b.graph.nodes:
        if n is add:
            return None
        if (n.op == "get_attr" and (n.target == b.target or n.target.startswith(f"{b.target}."))
                or any(a in state for a in n.all_input_nodes)):
            state.add(n)
        if between:
            if n in state:
                return f"'{n.name}', between the BN and the add, uses the BN's parameters or buffers"
            why = _mutation(n, root)
            if why:
                return f"'{n.name}', between the BN and the add, {why} (the fused call would run after it)"
        between = between or n is b
    return None


# What may run between a BN and the add it moves to: only calls known to update no tensor in place.
_PURE_OPERATORS = {getattr, len, operator.getitem, operator.add, operator.sub, operator.mul,
                   operator.truediv, operator.floordiv, operator.mod, operator.pow, operator.matmul,
                   operator.neg, operator.pos, operator.abs, operator.invert, operator.not_, operator.truth,
                   operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
                   operator.and_, operator.or_, operator.xor, operator.lshift, operator.rshift}
# Python-level functions (no ATen builtin, so no schema to read): pure unless called with inplace=True or
# out=. (The builtins among them, e.g. F.conv2d, are read from their schema.)
_PURE_PYTHON_FUNCTIONS = {getattr(F, name) for name in (
    "relu", "relu6", "silu", "hardswish", "hardsigmoid", "gelu", "sigmoid", "tanh", "leaky_relu", "elu",
    "selu", "celu", "mish", "hardtanh", "threshold", "softmax", "log_softmax", "softplus", "glu",
    "logsigmoid", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "max_pool1d",
    "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "interpolate", "upsample", "pad", "layer_norm", "group_norm", "normalize",
    "linear", "conv1d", "conv2d", "conv3d", "pixel_shuffle", "pixel_unshuffle") if hasattr(F, name)}
_PURE_PYTHON_FUNCTIONS |= {torch.split, torch.einsum, torch.broadcast_tensors}
# Tensor methods that are Python bindings of no ATen operator of their name.
_PURE_METHODS = {"float", "double", "half", "bfloat16", "int", "long", "short", "bool", "byte", "char",
                 "cpu", "cuda", "type", "size", "dim"}
_NOT_PURE_METHODS = {"backward"}  # its schema declares no write, but it accumulates into .grad
# Standard torch.nn layers that change nothing but their own state (when not inplace=True), and
# tritonbn's own modules.
_PURE_MODULES = {getattr(nn, name) for name in (
    "Identity", "Flatten", "Unflatten", "Linear", "Bilinear", "Conv1d", "Conv2d", "Conv3d",
    "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "GroupNorm", "LayerNorm", "RMSNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "LocalResponseNorm", "ReLU", "ReLU6", "SiLU", "Hardswish", "Hardsigmoid", "GELU", "Sigmoid", "Tanh",
    "LeakyReLU", "ELU", "SELU", "CELU", "Mish", "Hardtanh", "Threshold", "PReLU", "Softplus", "Softmax",
    "LogSoftmax", "Softmax2d", "GLU", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout",
    "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d",
    "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d",
    "Upsample", "UpsamplingNearest2d", "UpsamplingBilinear2d", "PixelShuffle", "PixelUnshuffle",
    "ChannelShuffle", "ZeroPad1d", "ZeroPad2d", "ZeroPad3d", "ConstantPad1d", "ConstantPad2d",
    "ConstantPad3d", "ReflectionPad1d", "ReflectionPad2d", "ReflectionPad3d", "ReplicationPad1d",
    "ReplicationPad2d", "ReplicationPad3d", "CircularPad1d", "CircularPad2d", "CircularPad3d")
    if hasattr(nn, name)} | set(_TRITON_BN) | set(_ACT_BN)
_ATEN_MODULES = [m for m in (torch, torch._C._nn, getattr(torch._C, "_fft", None),
                             getattr(torch._C, "_linalg", None), getattr(torch._C, "_special", None))
                 if m is not None]
_IN_PLACE = "updates a tensor in place"


def _mutation(n: fx.Node, root: nn.Module) -> str | None:
    """None when ``n`` is known to update no tensor in place; else why it may (conservative: a call that is
    not known to be pure may)."""
    if n.op in ("placeholder", "get_attr", "output"):
        return None
    if n.kwargs.get("out") is not None:
        return "writes to out="
    if n.op == "call_module":
        return _module_mutation(root.get_submodule(n.target), n.target)
    unknown = f"calls {_describe(n, root)}, which is not known to leave its inputs unchanged"
    if n.op == "call_method":
        if n.target in _PURE_METHODS:
            return None
        if n.target in _NOT_PURE_METHODS:
            return unknown
        return _schema_mutation(f"aten::{n.target}", n, unknown)
    if n.op != "call_function":
        return unknown
    f = n.target
    if f in _PURE_OPERATORS:
        return None
    name = getattr(f, "__name__", None)
    if isinstance(f, types.BuiltinFunctionType) and any(getattr(m, name, None) is f for m in _ATEN_MODULES):
        return _schema_mutation(f"aten::{name}", n, unknown)
    if f in _PURE_PYTHON_FUNCTIONS:
        try:
            bound = inspect.signature(f).bind(*n.args, **n.kwargs).arguments
        except (TypeError, ValueError):
            return unknown
        if bound.get("out") is not None:
            return "writes to out="
        inplace = bound.get("inplace", False)
        return _IN_PLACE if isinstance(inplace, fx.Node) or inplace else None
    return unknown


def _schema_mutation(op: str, n: fx.Node, unknown: str) -> str | None:
    """From the ATen schemas of ``op`` (its every overload): whether a call may write to an argument (a
    ``Tensor(a!)``: ``self`` of ``mul_``, the ``out=`` of ``mul.out``, ...)."""
    try:
        schemas = torch._C._jit_get_schemas_for_operator(op)
    except Exception:  # noqa: BLE001 - no schema: not known to be pure
        schemas = []
    if not schemas:
        return unknown
    for schema in schemas:
        for a in schema.arguments:
            written = a.alias_info is not None and a.alias_info.is_write
            # A keyword-only output (``out=``, ``values=``) is written only by a call that passes it.
            if written and (not a.kwarg_only or a.name in n.kwargs):
                return _IN_PLACE
    return None


def _module_mutation(m: nn.Module, target: str) -> str | None:
    """None when calling ``m`` is known to update no tensor in place (but ``m``'s own state)."""
    what = f"module '{target}'"
    if _hooks(m) or any(getattr(nn.modules.module, h, None) for h in ("_global_forward_hooks",
                                                                       "_global_forward_pre_hooks")):
        return f"calls {what}, which has hooks (they may update a tensor in place)"
    if "forward" in m.__dict__:
        return f"calls {what}, whose forward is overridden on the instance"
    if type(m) is nn.Sequential:
        return next(filter(None, (_module_mutation(c, f"{target}.{name}") for name, c in m.named_children())),
                    None)
    if type(m) not in _PURE_MODULES:
        return f"calls {what} ({type(m).__name__}), which is not known to leave its inputs unchanged"
    return _IN_PLACE if getattr(m, "inplace", False) else None


def _bn_problem(bn: nn.Module) -> str | None:
    hooks = _hooks(bn)
    if hooks:
        return f"BN has {hooks}, which would see the fused output"
    if "forward" in bn.__dict__:
        return "BN has its forward overridden on the instance"
    return None


def _rewrite(t: _Traced, plans: list[_Plan]) -> None:
    graph = t.graph
    # First every residual becomes an argument of its fused call: a residual may be the activation of
    # another plan (``h = relu(bn1(x)); relu(bn2(conv(h)) + h)``), whose node is replaced by that plan's
    # fused call below, which then updates this use too. The residual is passed even when there is none:
    # a plain BatchNorm put in the fused module's place (nn.SyncBatchNorm.convert_sync_batchnorm knows no
    # activation) then raises instead of silently dropping the activation.
    for p in plans:
        p.bn.args = (p.bn.args[0], p.other)
    for p in plans:
        # The BN node becomes the fused call, with the activation's users; with an add it moves to the add,
        # where the residual exists.
        if p.add is not None:
            p.add.prepend(p.bn)
        p.act.replace_all_uses_with(p.bn)
        graph.erase_node(p.act)
        if p.add is not None:
            graph.erase_node(p.add)
    graph.lint()
    m = t.module
    if isinstance(m, fx.GraphModule):  # its class is its own: regenerate its code in place
        m.graph = graph
        m.recompile()
        return
    gm = fx.GraphModule(m, graph, class_name=type(m).__name__)
    cls = type(m)
    # A subclass of the module's own class: isinstance, methods and hooks stay. Its qualname is not
    # importable, so pickling the whole module fails loudly (save the state_dict instead).
    m.__class__ = type(cls)(cls.__name__, (cls,), {
        "forward": type(gm).forward, "__module__": cls.__module__,
        "__qualname__": f"{cls.__qualname__}.<tritonbn fused>", "_tritonbn_fused_code": gm.code})


def _check_example_inputs(example_inputs):
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError("fuse_model: example_inputs must be a tuple of the model's positional arguments (or one "
                    f"Tensor), got {type(example_inputs).__name__}")


def _probe(model: nn.Module, to_prove: list, example_inputs: tuple) -> dict:
    """Run a copy of ``model`` on the example inputs, each module of ``to_prove`` ((traced, plan) pairs)
    through its traced graph, and return {node: [meta per call]} for the BN inputs and residuals."""
    probe = copy.deepcopy(model)
    sink: dict = {}
    watched: dict = {}  # id(traced) -> (traced, nodes)
    for t, p in to_prove:
        watched.setdefault(id(t), (t, set()))[1].update((p.bn.args[0], p.other))
    for t, watch in watched.values():
        m = probe.get_submodule(t.name)
        for attr in t.new_attrs:  # tensor constants the tracer put on the traced copy
            setattr(m, attr, getattr(t.module, attr))
        if _var_args(m):
            continue  # no proof: the graph's placeholders cannot be matched to the call's arguments
        sig = inspect.signature(type(m).forward)
        recorder = _MetaRecorder(m, t.graph, watch, sink)

        def forward(*args, _m=m, _sig=sig, _rec=recorder, **kwargs):
            bound = _sig.bind(_m, *args, **kwargs)
            bound.apply_defaults()
            return _rec.run(*list(bound.arguments.values())[1:])

        m.forward = forward
    # Copies: a forward may update its inputs in place.
    args = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in example_inputs]
    try:
        with torch.no_grad():
            probe(*args)
    except Exception as e:
        raise RuntimeError(f"fuse_model: the model failed on example_inputs ({type(e).__name__}: {e})") from e
    return sink


def _var_args(m: nn.Module) -> bool:
    params = inspect.signature(type(m).forward).parameters.values()
    return any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


def _add_problem(p: _Plan, metas: dict, have_examples: bool, module: nn.Module) -> str | None:
    x = p.bn.args[0]
    if p.other is x:  # bn(x) + x: BatchNorm keeps its input's shape and dtype
        return None
    if not have_examples:
        return "needs example_inputs to prove the add neither broadcasts nor promotes dtype"
    if _var_args(module):
        return ("forward(*args/**kwargs): example_inputs cannot be matched to its graph to prove the add "
                "neither broadcasts nor promotes dtype")
    xs, others = metas.get(x), metas.get(p.other)
    if not xs or not others:
        return ("the module did not run on example_inputs: cannot prove the add neither broadcasts nor "
                "promotes dtype")
    for xm, om in zip(xs, others):
        if xm is None or om is None:
            return "the add's other operand is not a tensor"
        if xm[0] != om[0]:
            return f"the add broadcasts (BN output {xm[0]}, other operand {om[0]})"
        if xm[1] != om[1]:
            return f"the add promotes dtype (BN output {xm[1]}, other operand {om[1]})"
        if xm[2] != om[2]:
            return f"the add mixes devices (BN output on {xm[2]}, other operand on {om[2]})"
    return None


def fuse_model(model: nn.Module, example_inputs=None) -> tuple[nn.Module, FuseReport]:
    """Return ``(fused_model, report)``: a new model in which every BatchNorm followed only by an activation
    (ReLU, ReLU6, SiLU, Hardswish), or only by an add whose result feeds only a ReLU or ReLU6, is one fused
    tritonbn op, and every other BatchNorm is a tritonbn ``BatchNorm*d``. ``model`` is never modified. Call it
    before building the optimizer (the fused model has its own parameters) and before ``torch.compile`` /
    DDP.

    What is fused: an exact torch or tritonbn ``BatchNorm1d/2d/3d`` module call whose output's only user
    is an activation: a ReLU (``nn.ReLU`` shared or not, in place or not, ``F.relu``,
    ``torch.relu``/``relu_``, ``.relu()``/``.relu_()``), a ReLU6 (``nn.ReLU6``, ``F.relu6``: MobileNet)
    a SiLU (``nn.SiLU``, ``F.silu``: EfficientNet, YOLO) or a Hardswish (``nn.Hardswish``,
    ``F.hardswish``: MobileNetV3); or an add (``+``, ``+=``, ``torch.add`` without alpha/out,
    ``.add``/``.add_``, either operand order) whose result's only user is a ReLU or ReLU6 (a SiLU's or
    Hardswish's gradient would need the residual again), all in the same module's forward. The BN
    becomes a ``BatchNormAct*d`` with that ``activation`` under its own name (state_dict keys and values
    are the model's, so checkpoints load both ways), the add's other operand is passed as its
    ``residual``, and the activation call (not the activation module) is removed from that forward.

    When it is not: a BN whose output leaves its module's forward (the last BN of an ``nn.Sequential``
    followed by a ReLU in the parent: each module's forward is rewritten on its own, so no container is
    bypassed); an intermediate with another user; an add that would broadcast, promote dtype or mix
    devices; a call between the BN and its add (where the fused call runs) that is not known to leave the
    BN input unchanged (in place, ``out=``, a user module or function), or that uses the BN's own
    parameters or buffers; a BN or activation module with hooks (they would no longer run, or see other
    values), a BN called from several places or registered under several names; subclasses (SyncBatchNorm,
    user classes: left unchanged); a module whose forward cannot be traced, switches grad mode, autocast
    or saved-tensor hooks (``torch.utils.checkpoint``) inside, sets module attributes, takes optional
    arguments or depends on ``self.training`` (its forward is kept, its children are handled on their own:
    see ``report.fallbacks``), and a BN such a kept forward may call directly. Every BN is listed in
    ``report.fused`` or ``report.skipped`` with the reason.

    With ``example_inputs``, the fused model is checked against the model on them (eval mode, fp32): if it
    raises or differs beyond rounding, nothing is fused (``report.warnings`` says why).

    ``example_inputs`` (a tuple of positional arguments, or one Tensor) proves the adds: a copy of the
    model runs on them once, under no_grad and the caller's autocast state, and an add is fused only if
    its operands had the same shape, dtype and device in every call. Without them, an add is fused only
    when that is provable from the graph alone (``bn(x) + x``); the others are reported as needing
    example_inputs; BN+activation needs no proof. The proof holds for inputs like the examples: where a later
    call's operands differ (another dtype under autocast, broadcasting shapes), the fused module computes
    that call unfused, as the original code did (``+`` broadcasting and promoting, ``+=`` keeping the BN
    output's dtype). Fuse under the autocast you train with, or with inputs of the training dtype.

    The rewritten forwards are the FX-traced ones: Python values they read (other than
    ``self.training``, which is checked) are fixed at fuse time, and another method that calls a fused
    BN module directly gets ``act(bn(x))``. Rewritten modules are instances of a subclass of their
    class (``isinstance`` and custom methods work; ``copy.deepcopy`` works, pickling the whole module
    does not: save the ``state_dict``).
    """
    _check_model(model)
    example_inputs = _check_example_inputs(example_inputs)
    try:
        work = copy.deepcopy(model)
    except Exception as e:
        raise TypeError(f"fuse_model: cannot deep-copy the model ({type(e).__name__}: {e})") from e
    p = _Pass(work)
    p.trace_all()
    p.find_candidates()
    to_prove = [(t, plan) for t, _, plan in p.accepted
                if plan.add is not None and plan.other is not plan.bn.args[0]]
    metas = _probe(model, to_prove, example_inputs) if to_prove and example_inputs is not None else {}
    p.decide(metas, example_inputs is not None)
    p.apply()
    if example_inputs is not None and p.report.rewritten:
        try:
            why = _differs_on_examples(model, work, example_inputs)
        except _Unchecked as e:
            p.report.warnings.append(f"the fused model was not checked on example_inputs: {e}")
            why = None
        if why is not None:
            return _converted_only(model, p.report, why)
    return work, p.report


class _Unchecked(Exception):
    """The model itself does not run in the check's configuration (eval, fp32, no autocast)."""


def _differs_on_examples(model: nn.Module, fused: nn.Module, example_inputs: tuple) -> str | None:
    """Why the fused model does not compute the model's outputs on the example inputs, or None. A safety net
    under what tracing cannot see (an ``isinstance`` test of an argument, say): copies of both run in eval
    mode, without grad or autocast, in fp32 (fp64 models in fp64), so that only wrong values, not
    rounding (tritonbn's kernels against torch's), can exceed the tolerance."""
    wide = any(t.dtype == torch.float64 for t in model.parameters())

    def prepared(t):
        if isinstance(t, nn.Module):
            return t if wide else t.float()
        if isinstance(t, torch.Tensor):
            t = t.detach().clone()
            return t.float() if t.is_floating_point() and not wide else t
        return t

    outs = []
    for m in (model, fused):
        args = [prepared(a) for a in example_inputs]
        try:
            with torch.no_grad(), torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
                outs.append(prepared(copy.deepcopy(m).eval())(*args))
        except Exception as e:  # noqa: BLE001 - reported: the fused model is not returned
            if m is model:
                raise _Unchecked(f"the model itself raised {type(e).__name__} in eval mode, fp32: "
                                 f"{str(e)[:200]}") from e
            return f"the fused model raised {type(e).__name__} on example_inputs: {str(e)[:200]}"
    expect, spec = torch.utils._pytree.tree_flatten(outs[0])
    got, got_spec = torch.utils._pytree.tree_flatten(outs[1])
    if spec != got_spec:
        return "the fused model's outputs on example_inputs are structured differently"
    for i, (e, g) in enumerate(zip(expect, got)):
        if not isinstance(e, torch.Tensor):
            if isinstance(g, torch.Tensor) or type(e) is not type(g) or not bool(e == g):
                return f"output {i} on example_inputs differs ({g!r} for {e!r})"
            continue
        if not isinstance(g, torch.Tensor) or g.shape != e.shape or g.dtype != e.dtype:
            return f"output {i} on example_inputs differs in type, shape or dtype"
        if not e.is_floating_point():
            if not torch.equal(g, e):
                return f"output {i} on example_inputs differs"
            continue
        # relative to the output's peak: rounding differs (tritonbn's kernels, not torch's), values do not
        tol = {torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float32: 1e-4}.get(e.dtype, 1e-9)
        e64, g64 = e.double(), g.double()
        scale = float(e64.abs().nan_to_num(0, 0, 0).max().clamp_min(1e-6)) if e.numel() else 1.0
        err = (g64 - e64).abs().nan_to_num(float("inf"))
        bad = (err > tol * scale) & ~(e64.isnan() & g64.isnan()) & ~((e64 == g64) & e64.isinf())
        if bool(bad.any()):
            return f"output {i} on example_inputs differs by {float(err[bad].max()):.3g} (peak {scale:.3g})"
    return None


def _converted_only(model: nn.Module, report: FuseReport, why: str) -> tuple[nn.Module, FuseReport]:
    """A copy of ``model`` with every exact BatchNorm a tritonbn ``BatchNorm*d`` and no forward rewritten,
    and its report: what the fused model did wrong on the example inputs, for every BN."""
    work = copy.deepcopy(model)
    p = _Pass(work)
    p.report = FuseReport(fallbacks=report.fallbacks, warnings=report.warnings + [
        f"nothing fused: {why} (please report it with the model); every BatchNorm is a plain tritonbn one"])
    p.convert_unfused(set(), lambda bn: f"the fused model differed from the model on example_inputs ({why})")
    return work, p.report


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("fuse_model: expected an eager torch.nn.Module, got a TorchScript module")
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    if isinstance(model, wrappers) or hasattr(model, "_orig_mod"):
        raise TypeError(f"fuse_model: got a {type(model).__name__} wrapper; fuse the plain model, then wrap "
                        "or compile the fused one")


class _Pass:
    def __init__(self, work: nn.Module):
        self.work, self.report = work, FuseReport()
        self.name_of, self.parent_of, self.registrations = {}, {}, Counter()
        for name, m in work.named_modules(remove_duplicate=False):
            self.name_of.setdefault(id(m), name)
            self.registrations[id(m)] += 1
            for child in m.children():
                self.parent_of.setdefault(id(child), m)
        self.bns = [(n, m) for n, m in work.named_modules() if isinstance(m, _BatchNorm)]
        self.traced: list[_Traced] = []
        self.opaque: dict = {}  # id(module) -> why its forward is kept
        self.chains: dict = {}  # id(kept module) -> its _attribute_chains
        self.reasons: dict = {}  # id(bn) -> why it is not fused
        self.accepted: list = []  # (traced, bn, plan) that passed the structural and module checks
        self.chosen: dict = {}  # id(traced) -> plans to apply

    def trace_all(self) -> None:
        """Trace every module that has a BatchNorm below it and a forward of its own."""
        ancestors = {}
        for path, m in self.work.named_modules(remove_duplicate=False):
            if isinstance(m, _BatchNorm):
                atoms = path.split(".") if path else []
                for i in range(len(atoms)):
                    anc = self.work.get_submodule(".".join(atoms[:i]))
                    ancestors.setdefault(id(anc), anc)
        for m in ancestors.values():
            if type(m).forward is nn.Module.forward or isinstance(m, _BatchNorm):  # e.g. ModuleList
                continue
            before = set(m.__dict__)
            try:
                graph = _trace(m)
            except _NotRewritable as e:
                for attr in set(m.__dict__) - before:
                    delattr(m, attr)
                self.opaque[id(m)] = str(e)
                self.report.fallbacks.append(Fallback(self.name_of[id(m)], str(e)))
                continue
            self.traced.append(_Traced(self.name_of[id(m)], m, graph, set(m.__dict__) - before))

    def find_candidates(self) -> None:
        """Structural plans per BN call site, then the conditions on the BN module itself."""
        calls: Counter = Counter()
        candidates = []
        for t in self.traced:
            _follow_in_place(t.graph, t.module)
            for node in t.graph.nodes:
                bn = t.module.get_submodule(node.target) if node.op == "call_module" else None
                if not isinstance(bn, _BatchNorm):
                    continue
                calls[id(bn)] += 1
                plan = _plan(node, t.module)
                if isinstance(plan, str):
                    self.reasons.setdefault(id(bn), f"in {_forward_of(t.name)}: {plan}")
                else:
                    candidates.append((t, bn, plan))
        for t, bn, plan in candidates:
            parent = self.parent_of.get(id(bn))
            if type(bn) not in _ACT:
                problem = "not an exact BatchNorm1d/2d/3d"
            elif calls[id(bn)] > 1:
                problem = f"BN is called {calls[id(bn)]} times (a fused module would change every call)"
            elif self.registrations[id(bn)] > 1:
                problem = f"BN is registered under {self.registrations[id(bn)]} names"
            elif parent is not None and id(parent) in self.opaque:
                problem = self._opaque_reason(parent)
            else:
                problem = self._kept_caller(bn) or _bn_problem(bn)
            if problem:
                self.reasons[id(bn)] = problem
            else:
                self.accepted.append((t, bn, plan))

    def _kept_caller(self, bn: nn.Module) -> str | None:
        """Why a kept (untraced) forward of an ancestor above the BN's parent may call the BN directly
        (``self.sub.bn(y)``), which a fused module would answer with ``act(bn(y))``; None if none does.
        Read from the attribute chains in its class's methods (``_attribute_chains``)."""
        path = self.name_of[id(bn)].split(".")
        anc = self.parent_of.get(id(self.parent_of.get(id(bn))))
        while anc is not None:
            if id(anc) in self.opaque:
                prefix = self.name_of[id(anc)]
                rel = tuple(path[len(prefix.split(".")) if prefix else 0:])
                if id(anc) not in self.chains:
                    self.chains[id(anc)] = _attribute_chains(anc)
                if rel in self.chains[id(anc)]:
                    return (f"{_forward_of(prefix)}, which is kept ({self.opaque[id(anc)]}), may call it "
                            f"directly (it reads self.{'.'.join(rel)})")
            anc = self.parent_of.get(id(anc))
        return None

    def _opaque_reason(self, parent: nn.Module) -> str:
        where = _forward_of(self.name_of[id(parent)])
        return f"called from {where}, which is kept ({self.opaque[id(parent)]})"

    def decide(self, metas: dict, have_examples: bool) -> None:
        claimed = {}  # add / activation node -> the BN fused with it
        for t, bn, plan in self.accepted:
            problem = _add_problem(plan, metas, have_examples, t.module) if plan.add is not None else None
            owner = claimed.get(plan.add) or claimed.get(plan.act)
            if problem is None and owner is not None:
                problem = f"its add is fused with '{owner}'"
            if problem:
                self.reasons[id(bn)] = f"in {_forward_of(t.name)}: {problem}"
                continue
            claimed.update({n: self.name_of[id(bn)] for n in (plan.add, plan.act) if n is not None})
            self.chosen.setdefault(id(t), []).append(plan)
            pattern = ("bn_" if plan.add is None else "bn_add_") + plan.activation
            residual = None if plan.other is None else plan.other.name
            self.report.fused.append(Fused(self.name_of[id(bn)], _ACT[type(bn)].__name__, pattern, t.name,
                                           plan.activation, plan.act_spelling, plan.add_spelling, residual))

    def apply(self) -> None:
        """Rewrite the forwards and swap the BatchNorm classes."""
        fused_ids = set()
        for t in self.traced:
            plans = self.chosen.get(id(t))
            if not plans:
                for attr in t.new_attrs:
                    delattr(t.module, attr)
                continue
            bn_modules = [(t.module.get_submodule(plan.bn.target), plan) for plan in plans]
            _rewrite(t, plans)
            self.report.rewritten.append(t.name)
            for bn, plan in bn_modules:
                bn.__class__ = _ACT[type(bn)]  # adds no state: the same parameters and buffers
                bn.activation = plan.activation
                # (_plan refuses an in-place add that updates the other operand)
                bn._residual_in_place = plan.add_spelling in _IN_PLACE_ADDS
                fused_ids.add(id(bn))
        self.convert_unfused(fused_ids, self._unfused_reason)
        order = {n: i for i, (n, _) in enumerate(self.bns)}
        self.report.fused.sort(key=lambda f: order[f.bn])
        self.report.skipped.sort(key=lambda s: order[s.bn])
        hooks = ("_global_forward_hooks", "_global_forward_pre_hooks")
        if any(getattr(nn.modules.module, h, None) for h in hooks):
            self.report.warnings.append("global module hooks are registered: they no longer see the removed "
                                        "activation calls")

    def convert_unfused(self, fused_ids: set, reason) -> None:
        """Every BN not in ``fused_ids`` becomes a plain tritonbn ``BatchNorm*d`` (exact classes only) and is
        reported as skipped, with ``reason(bn)``."""
        for name, bn in self.bns:
            if id(bn) in fused_ids:
                continue
            if isinstance(bn, _ACT_BN):
                self.report.skip(name, "already a fused tritonbn BatchNormAct", "unchanged")
            elif type(bn) not in _PLAIN:
                why = f"{type(bn).__name__} is not an exact BatchNorm1d/2d/3d (left as it is)"
                self.report.skip(name, why, "unchanged")
            else:
                action = "unchanged" if _PLAIN[type(bn)] is type(bn) else "converted"
                bn.__class__ = _PLAIN[type(bn)]
                self.report.skip(name, reason(bn), action)

    def _unfused_reason(self, bn: nn.Module) -> str:
        if id(bn) in self.reasons:
            return self.reasons[id(bn)]
        parent = self.parent_of.get(id(bn))
        if parent is not None and id(parent) in self.opaque:
            return self._opaque_reason(parent)
        return "not called as a module in any traced forward (unused, or used through its attributes)"
