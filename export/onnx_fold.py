"""Fold ``BatchNormalization`` nodes of an ONNX graph into neighbouring Conv/ConvTranspose/Gemm/MatMul.

Rules (each one avoids folding something wrongly):
* a BN in training mode (``training_mode=1``, ``is_test=0``, ``spatial=0`` or more than one output)
  is never touched;
* BN parameters and layer weights must be constants: initializers that are not also graph inputs
  (those can be overridden at run time), or ``Constant`` nodes;
* the layer's output must feed only the BN and not be a graph output (or the BN output must feed
  only the layer, for BN-before-layer), and must not be read from a subgraph;
* folded weights always go to a *new* initializer, so a weight shared by several nodes is cloned,
  never edited; unused initializers are dropped at the end;
* a BN with no foldable neighbour becomes ``Mul``+``Add`` with ``[C, 1, ...]`` constants.
Only the main graph is rewritten; BN nodes inside subgraphs or functions are reported and left as is.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import fold_math
from .errors import one_line
from .report import FoldReport

_FLOATS = (np.float16, np.float32, np.float64)
# Deterministic ops whose output is constant when all inputs are (exporters emit e.g. Expand(1.0)
# for the scale of an affine=False BN, or a zero bias for a bias-free conv).
_CONST_OPS = {
    "Constant", "ConstantOfShape", "Identity", "Cast", "CastLike", "Reshape", "Unsqueeze", "Squeeze",
    "Expand", "Concat", "Transpose", "Shape", "Add", "Sub", "Mul", "Div", "Sqrt", "Neg", "Reciprocal",
}
_MAX_CONST_ELEMS = 1 << 24
HUGE_SCALE = 1e4


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node, name, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def _subgraph_names(graph) -> set[str]:
    """Every value name read by a node inside a subgraph (If/Loop/Scan bodies) of ``graph``."""
    names: set[str] = set()

    def visit(g):
        for n in g.node:
            names.update(n.input)
            for a in n.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    visit(sub)

    for n in graph.node:
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                visit(sub)
    return names


def _count_bn(nodes) -> int:
    return sum(n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx") for n in nodes)


class _Folder:
    def __init__(self, model: onnx.ModelProto, report: FoldReport):
        self.model, self.report = model, report
        g = model.graph
        self.nodes = list(g.node)
        graph_inputs = {i.name for i in g.input}
        self.consts = {
            t.name: numpy_helper.to_array(t) for t in g.initializer if t.name not in graph_inputs
        }
        for n in self.nodes:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and _attr(n, "value") is not None:
                self.consts[n.output[0]] = numpy_helper.to_array(_attr(n, "value"))
        self.new_inits: list = []
        self.used_names = {t.name for t in g.initializer} | graph_inputs
        for n in self.nodes:
            self.used_names.update(n.input)
            self.used_names.update(n.output)
        self.outputs = {o.name for o in g.output}
        self.sub_reads = _subgraph_names(g)
        self.ranks, self.elem_types = self._shapes()
        self.reindex()

    def _shapes(self):
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model)
        except Exception:  # noqa: BLE001 - ranks then stay unknown and rank-dependent folds are skipped
            inferred = self.model
        ranks, types = {}, {}
        g = inferred.graph
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            tt = vi.type.tensor_type
            types[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                ranks[vi.name] = len(tt.shape.dim)
        for t in g.initializer:
            ranks[t.name], types[t.name] = len(t.dims), t.data_type
        return ranks, types

    def reindex(self) -> None:
        self.producer, self.consumers = {}, {}
        for n in self.nodes:
            for o in n.output:
                self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.used_names:
            name, i = f"{base}_{i}", i + 1
        self.used_names.add(name)
        return name

    def add_const(self, base: str, arr64: np.ndarray, dtype) -> str:
        name = self.fresh(base)
        arr = np.asarray(arr64).astype(dtype)
        self.new_inits.append(numpy_helper.from_array(arr, name))
        self.consts[name] = arr  # a later BN in a chain may fold into the same layer again
        return name

    def const(self, node, idx: int):
        """The constant array at input ``idx`` of ``node``; None if absent; False if not constant."""
        if len(node.input) <= idx or not node.input[idx]:
            return None
        arr = self.value(node.input[idx])
        return False if arr is None else arr

    def value(self, name: str, depth: int = 0):
        """Constant value of ``name`` (initializer, Constant, or a small all-constant subgraph)."""
        if name in self.consts:
            return self.consts[name]
        node = self.producer.get(name)
        if node is None or depth > 8 or node.op_type not in _CONST_OPS or node.domain not in ("", "ai.onnx"):
            return None
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None
        ins = [self.value(i, depth + 1) if i else None for i in node.input]
        if node.op_type == "CastLike" and ins[0] is not None and ins[1] is None:
            elem = self.elem_types.get(node.input[1])  # only the dtype of input 1 matters
            if elem:
                self.consts[name] = ins[0].astype(helper.tensor_dtype_to_np_dtype(elem))
                return self.consts[name]
        if any(v is None for v, i in zip(ins, node.input) if i):
            return None
        try:
            from onnx.reference import ReferenceEvaluator

            opset = [o for o in self.model.opset_import if o.domain in ("", "ai.onnx")]
            names = [f"in{k}" if i else "" for k, i in enumerate(node.input)]
            n2 = helper.make_node(node.op_type, names, [f"out{k}" for k in range(len(node.output))])
            n2.attribute.extend(node.attribute)
            g = helper.make_graph([n2], "c", [], [helper.make_tensor_value_info(f"out{k}", 0, None)
                                              for k in range(len(node.output))],
                                  [numpy_helper.from_array(np.asarray(v), f"in{k}")
                                   for k, v in enumerate(ins) if v is not None])
            m = helper.make_model(g, opset_imports=opset)
            outs = ReferenceEvaluator(m).run(None, {})
        except Exception:  # noqa: BLE001 - not evaluable: treat as non-constant
            return None
        for o, v in zip(node.output, outs):
            v = np.asarray(v)
            if v.size <= _MAX_CONST_ELEMS:
                self.consts[o] = v
        return self.consts.get(name)

    def only_consumer(self, value: str, node) -> str | None:
        users = self.consumers.get(value, [])
        if value in self.outputs:
            return f"'{value}' is a graph output"
        if value in self.sub_reads:
            return f"'{value}' is read inside a subgraph"
        if len(users) != 1 or users[0] is not node:
            return f"'{value}' has {len(users)} consumers"
        return None

    # --- BN analysis ---------------------------------------------------------------------------
    def bn_params(self, bn):
        if _attr(bn, "training_mode", 0) == 1:
            return "BatchNormalization has training_mode=1"
        if _attr(bn, "is_test", 1) == 0 or _attr(bn, "spatial", 1) == 0:
            return "BatchNormalization is in training mode (is_test=0) or spatial=0"
        if sum(1 for o in bn.output if o) > 1:
            return "BatchNormalization has more than one output (training mode)"
        params = [self.const(bn, i) for i in range(1, 5)]
        if any(p is None or p is False for p in params):
            return "scale/bias/mean/var are not constant initializers"
        if any(p.dtype not in _FLOATS for p in params):
            return f"unsupported parameter dtype {params[0].dtype}"
        scale, bias, mean, var = params
        return fold_math.bn_scale_shift(mean, var, _attr(bn, "epsilon", 1e-5), scale, bias)

    def weight(self, node, idx: int):
        w = self.const(node, idx)
        if w is None or w is False:
            return None, f"{node.op_type} '{node.name}' weight is not a constant initializer"
        if w.dtype not in _FLOATS:
            return None, f"{node.op_type} '{node.name}' weight dtype {w.dtype} is not supported"
        return w, None

    def set_input(self, node, idx: int, name: str) -> None:
        while len(node.input) <= idx:
            node.input.append("")
        node.input[idx] = name

    # --- BN after a layer ------------------------------------------------------------------------
    def try_after(self, bn, s, t) -> str | None:
        x = bn.input[0]
        prod = self.producer.get(x)
        if prod is None or prod.domain not in ("", "ai.onnx"):
            return "input is not produced by a Conv/ConvTranspose/Gemm/MatMul node"
        problem = self.only_consumer(x, bn)
        if problem:
            return problem
        op = prod.op_type
        if op in ("Conv", "ConvTranspose"):
            return self.after_conv(bn, prod, s, t)
        if op == "Gemm":
            return self.after_gemm(bn, prod, s, t)
        if op == "MatMul":
            return self.after_matmul(bn, prod, None, s, t)
        if op == "Add":
            for i in (0, 1):
                mm = self.producer.get(prod.input[i])
                if mm is not None and mm.op_type == "MatMul" and mm.domain in ("", "ai.onnx"):
                    return self.after_matmul(bn, mm, prod, s, t, bias_idx=1 - i)
        return f"producer {op} '{prod.name}' is not foldable"

    def _check_out(self, w, kind, groups, s, what) -> str | None:
        if groups < 1 or w.shape[0] % groups:
            return f"{what}: weight shape {w.shape} does not match group={groups}"
        n = fold_math.out_channels(w.shape, kind, groups)
        return None if n == len(s) else f"{what} has {n} output channels, BN has {len(s)}"

    def after_conv(self, bn, conv, s, t) -> str | None:
        w, why = self.weight(conv, 1)
        if why:
            return why
        b = self.const(conv, 2)
        if b is False:
            return f"{conv.op_type} '{conv.name}' bias is not constant"
        kind = "conv" if conv.op_type == "Conv" else "conv_transpose"
        groups = int(_attr(conv, "group", 1))
        why = self._check_out(w, kind, groups, s, f"{conv.op_type} '{conv.name}'")
        if why or w.ndim < 3:
            return why or f"{conv.op_type} weight has rank {w.ndim}"
        w2, b2 = fold_math.fold_after(w, b, s, t, kind, groups)
        self.set_input(conv, 1, self.add_const(conv.input[1] + "_bnfold", w2, w.dtype))
        self.set_input(conv, 2, self.add_const((conv.name or "conv") + "_bias_bnfold", b2, w.dtype))
        self.splice_after(bn, conv)
        return None

    def after_gemm(self, bn, gemm, s, t) -> str | None:
        w, why = self.weight(gemm, 1)
        if why:
            return why
        c = self.const(gemm, 2)
        if c is False:
            return f"Gemm '{gemm.name}' C is not constant"
        kind = "conv" if _attr(gemm, "transB", 0) else "conv_transpose"  # [N, K] vs [K, N]
        why = self._check_out(w, kind, 1, s, f"Gemm '{gemm.name}'")
        if why:
            return why
        w2, _ = fold_math.fold_after(w, None, s, t, kind, 1)
        beta = float(_attr(gemm, "beta", 1.0))
        c_term = 0.0 if c is None else beta * np.asarray(c, dtype=np.float64)
        c2 = c_term * s + t  # numpy broadcasting keeps C's [M,1]/[M,N]/[N]/scalar forms valid
        self.set_input(gemm, 1, self.add_const(gemm.input[1] + "_bnfold", w2, w.dtype))
        self.set_input(gemm, 2, self.add_const((gemm.name or "gemm") + "_C_bnfold", c2, w.dtype))
        _set_attr(gemm, "beta", 1.0)
        self.splice_after(bn, gemm)
        return None

    def after_matmul(self, bn, mm, add, s, t, bias_idx=None) -> str | None:
        if self.ranks.get(bn.input[0]) != 2:
            return "MatMul output rank is not known to be 2 (BN channel axis 1 must be the last axis)"
        w, why = self.weight(mm, 1)
        if why:
            return why
        if w.ndim != 2:
            return f"MatMul '{mm.name}' weight has rank {w.ndim}"
        why = self._check_out(w, "conv_transpose", 1, s, f"MatMul '{mm.name}'")
        if why:
            return why
        bias = None
        if add is not None:
            problem = self.only_consumer(mm.output[0], add)
            if problem:
                return problem
            bias = self.const(add, bias_idx)
            per_channel = bias is not None and bias is not False and bias.ndim <= 2 and (
                bias.ndim == 0 or bias.shape[-1] in (1, len(s)))
            if not per_channel:
                return f"Add '{add.name}' bias is not a constant per-channel vector"
        w2, _ = fold_math.fold_after(w, None, s, t, "conv_transpose", 1)
        b2 = (0.0 if bias is None else np.asarray(bias, dtype=np.float64)) * s + t
        self.set_input(mm, 1, self.add_const(mm.input[1] + "_bnfold", w2, w.dtype))
        bias_name = self.add_const((mm.name or "matmul") + "_bias_bnfold", b2, w.dtype)
        if add is not None:
            self.set_input(add, bias_idx, bias_name)
            self.splice_after(bn, add)
        else:  # the BN node itself becomes the bias Add
            new = helper.make_node("Add", [bn.input[0], bias_name], [bn.output[0]], name=bn.name)
            self.nodes[self.nodes.index(bn)] = new
        return None

    def splice_after(self, bn, prod) -> None:
        prod.output[0] = bn.output[0]
        self.nodes.remove(bn)

    # --- BN before a layer -----------------------------------------------------------------------
    def try_before(self, bn, s, t) -> str | None:
        y = bn.output[0]
        users = self.consumers.get(y, [])
        if len(users) != 1:
            return f"BN output has {len(users)} consumers"
        cons = users[0]
        problem = self.only_consumer(y, cons)
        if problem:
            return problem
        if cons.domain not in ("", "ai.onnx") or cons.op_type not in ("Conv", "Gemm"):
            return f"BN output feeds {cons.op_type}, not Conv/Gemm"
        if list(cons.input).count(y) != 1 or cons.input[0] != y:
            return f"BN output is not only the data input of {cons.op_type} '{cons.name}'"
        w, why = self.weight(cons, 1)
        if why:
            return why
        b = self.const(cons, 2)
        if b is False:
            return f"{cons.op_type} '{cons.name}' bias is not constant"
        if cons.op_type == "Conv":
            return self.before_conv(bn, cons, w, b, s, t)
        return self.before_gemm(bn, cons, w, b, s, t)

    def before_conv(self, bn, conv, w, b, s, t) -> str | None:
        groups = int(_attr(conv, "group", 1))
        pads = _attr(conv, "pads", []) or []
        auto_pad = _attr(conv, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        kernel_one = all(k == 1 for k in w.shape[2:])
        if any(p != 0 for p in pads) or (auto_pad.startswith("SAME") and not kernel_one):
            return f"BN before Conv '{conv.name}' with zero padding is not exact"
        if w.ndim < 3 or groups < 1 or w.shape[0] % groups:
            return f"Conv '{conv.name}' weight shape {w.shape} does not match group={groups}"
        if fold_math.in_channels(w.shape, "conv", groups) != len(s):
            return f"Conv '{conv.name}' input channels do not match the BN"
        w2, b2 = fold_math.fold_before(w, b, s, t, "conv", groups)
        self.set_input(conv, 1, self.add_const(conv.input[1] + "_bnfold", w2, w.dtype))
        self.set_input(conv, 2, self.add_const((conv.name or "conv") + "_bias_bnfold", b2, w.dtype))
        self.splice_before(bn, conv)
        return None

    def before_gemm(self, bn, gemm, w, c, s, t) -> str | None:
        if _attr(gemm, "transA", 0):
            return f"Gemm '{gemm.name}' has transA=1"
        kind = "conv" if _attr(gemm, "transB", 0) else "conv_transpose"
        if fold_math.in_channels(w.shape, kind, 1) != len(s):
            return f"Gemm '{gemm.name}' input features do not match the BN"
        w2, tb = fold_math.fold_before(w, None, s, t, kind, 1)  # tb = t @ B
        alpha, beta = float(_attr(gemm, "alpha", 1.0)), float(_attr(gemm, "beta", 1.0))
        c2 = (0.0 if c is None else beta * np.asarray(c, dtype=np.float64)) + alpha * tb
        self.set_input(gemm, 1, self.add_const(gemm.input[1] + "_bnfold", w2, w.dtype))
        self.set_input(gemm, 2, self.add_const((gemm.name or "gemm") + "_C_bnfold", c2, w.dtype))
        _set_attr(gemm, "beta", 1.0)
        self.splice_before(bn, gemm)
        return None

    def splice_before(self, bn, cons) -> None:
        cons.input[0] = bn.input[0]
        self.nodes.remove(bn)

    # --- standalone BN ---------------------------------------------------------------------------
    def to_mul_add(self, bn, s, t) -> str | None:
        rank = self.ranks.get(bn.input[0])
        if rank is None or rank < 2:
            return "input rank unknown"
        elem = self.elem_types.get(bn.input[0])
        dtype = helper.tensor_dtype_to_np_dtype(elem) if elem else self.consts[bn.input[1]].dtype
        if dtype not in _FLOATS:
            return f"input dtype {dtype} not supported"
        shape = (len(s),) + (1,) * (rank - 2)
        base = bn.name or bn.output[0]
        s_name = self.add_const(base + "_eval_scale", s.reshape(shape), dtype)
        t_name = self.add_const(base + "_eval_shift", t.reshape(shape), dtype)
        tmp = self.fresh(base + "_scaled")
        mul = helper.make_node("Mul", [bn.input[0], s_name], [tmp], name=self.fresh(base + "_mul"))
        add = helper.make_node("Add", [tmp, t_name], [bn.output[0]], name=self.fresh(base + "_add"))
        i = self.nodes.index(bn)
        self.nodes[i : i + 1] = [mul, add]
        return None

    def run(self) -> None:
        bns = [n for n in self.nodes if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]
        for bn in bns:
            name = bn.name or bn.output[0]
            st = self.bn_params(bn)
            if isinstance(st, str):
                self.report.skip(name, st)
                continue
            s, t = st
            if fold_math.max_abs_scale(s) > HUGE_SCALE:
                self.report.warnings.append(
                    f"{name}: BN scale up to {fold_math.max_abs_scale(s):.3g}; "
                    "folded weights may quantize badly"
                )
            n_before = len(self.report.folded)
            after = self.try_after(bn, s, t)
            before = self.try_before(bn, s, t) if after else None
            if after is None or before is None:
                prod = self.producer.get(bn.input[0]) if after is None else self.consumers[bn.output[0]][0]
                self.report.fold(name, prod.name or prod.output[0], "after" if after is None else "before",
                                 prod.op_type)
                assert len(self.report.folded) == n_before + 1
            else:
                why = f"not after a foldable layer ({after}); not before one ({before})"
                failed = self.to_mul_add(bn, s, t)
                if failed:
                    self.report.skip(name, f"{why}; kept as BatchNormalization: {failed}")
                else:
                    self.report.skip(name, why, action="mul_add")
            self.reindex()

    def finish(self) -> onnx.ModelProto:
        g = self.model.graph
        g.initializer.extend(self.new_inits)
        read = {i for n in self.nodes for i in n.input} | self.outputs | self.sub_reads
        nodes = [n for n in self.nodes if not (n.op_type == "Constant" and n.output[0] not in read)]
        del g.node[:]
        g.node.extend(nodes)
        keep = [t for t in g.initializer if t.name in read or t.name in {i.name for i in g.input}]
        del g.initializer[:]
        g.initializer.extend(keep)
        alive = {o for n in nodes for o in n.output} | {i.name for i in g.input} | {t.name for t in keep}
        vis = [v for v in g.value_info if v.name in alive]
        del g.value_info[:]
        g.value_info.extend(vis)
        return self.model


def validation_errors(model: onnx.ModelProto) -> list[str]:
    """What ``onnx.checker`` and strict shape inference say about ``model`` (one line each)."""
    errors = []
    for what, fn in (("onnx.checker", onnx.checker.check_model),
                     ("shape inference", lambda m: onnx.shape_inference.infer_shapes(m, strict_mode=True))):
        try:
            fn(model)
        except Exception as e:  # noqa: BLE001 - ValidationError, InferenceError, ...
            errors.append(f"{what}: {one_line(str(e))}")
    return errors


def fold_onnx(model: onnx.ModelProto, check: bool = True):
    """Return ``(new_model, FoldReport)``; ``model`` is not modified.

    With ``check`` the input and the result go through ``onnx.checker`` and strict shape inference:
    a complaint about the result that the input did not have (a problem the fold introduced) raises
    FoldError; complaints the input already had (e.g. graph outputs without a shape, which ONNX Runtime
    accepts) are reported as a warning.
    """
    from .errors import FoldError

    if not isinstance(model, onnx.ModelProto):
        raise FoldError(f"expected an onnx.ModelProto, got {type(model).__name__}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    report = FoldReport(form="onnx", nodes_before=len(out.graph.node), bn_before=_count_bn(out.graph.node))
    folder = _Folder(out, report)
    folder.run()
    out = folder.finish()
    nested = _nested_bn_count(out)
    if nested:
        report.warnings.append(
            f"{nested} BatchNormalization node(s) inside subgraphs/functions were left as is")
    report.nodes_after, report.bn_after = len(out.graph.node), _count_bn(out.graph.node)
    if check:
        before = validation_errors(model)
        introduced = [e for e in validation_errors(out) if e not in before]
        if introduced:
            raise FoldError(f"folded ONNX model failed validation: {introduced[0]}")
        report.warnings += [f"the input model already fails validation ({e}); left as is" for e in before]
    return out, report


def _nested_bn_count(model: onnx.ModelProto) -> int:
    count = sum(_count_bn(f.node) for f in model.functions)

    def visit(g):
        nonlocal count
        for n in g.node:
            for a in n.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    count += _count_bn(sub.node)
                    visit(sub)

    visit(model.graph)
    return count
