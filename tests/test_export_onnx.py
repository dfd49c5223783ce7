"""fold_onnx on hand-built graphs, checked with ONNX Runtime (graph optimizations disabled)."""

import numpy as np
import onnx
import pytest
from export_models import bn_arrays, bn_node, make_model, ops, ort_run, with_output_shapes
from onnx import TensorProto, helper, numpy_helper
from tritonbn.export import fold_math, fold_onnx

RNG = np.random.default_rng(0)


def _w(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def _same(model, folded, feeds, tol=1e-5):
    ref, got = ort_run(model, feeds), ort_run(folded, feeds)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g, r, rtol=tol, atol=tol)


def _conv_bn(op="Conv", cin=4, cout=4, group=1, bias=True, pads=(0, 0, 0, 0)):
    w = _w(cout, cin // group, 3, 3) if op == "Conv" else _w(cin, cout // group, 3, 3)
    inits = [numpy_helper.from_array(w, "W")]
    ins = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(_w(cout), "B"))
        ins.append("B")
    conv = helper.make_node(op, ins, ["c"], name="conv", group=group, pads=list(pads))
    bn = bn_node("c", "y", cout, inits)
    return make_model([conv, bn], inits, [("x", ["N", cin, 6, 6])], [("y", None)])


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
@pytest.mark.parametrize("cin,cout,group,bias", [(4, 4, 1, True), (4, 8, 2, False), (8, 4, 4, True),
                                                 (6, 6, 6, False)])
def test_conv_and_conv_transpose(op, cin, cout, group, bias):
    model = _conv_bn(op, cin, cout, group, bias)
    folded, report = fold_onnx(model)
    assert "BatchNormalization" not in ops(folded) and len(report.folded) == 1
    for n in (1, 3):
        _same(model, folded, {"x": _w(n, cin, 6, 6)})


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (5,), (1, 5), (3, 1), ()])
def test_gemm_after(trans_b, c_shape):
    inits = [numpy_helper.from_array(_w(5, 4) if trans_b else _w(4, 5), "B")]
    ins = ["a", "B"]
    if c_shape is not None:
        inits.append(numpy_helper.from_array(_w(*c_shape), "C"))
        ins.append("C")
    gemm = helper.make_node("Gemm", ins, ["g"], name="gemm", transB=trans_b, alpha=0.7, beta=1.8)
    model = make_model([gemm, bn_node("g", "y", 5, inits)], inits, [("a", [3, 4])], [("y", None)])
    folded, report = fold_onnx(model)
    assert ops(folded) == ["Gemm"], report.format()
    _same(model, folded, {"a": _w(3, 4)})


@pytest.mark.parametrize("trans_b", [0, 1])
def test_bn_before_gemm(trans_b):
    w = _w(5, 4) if trans_b else _w(4, 5)
    inits = [numpy_helper.from_array(w, "B"), numpy_helper.from_array(_w(5), "C")]
    gemm = helper.make_node("Gemm", ["z", "B", "C"], ["y"], name="gemm", transB=trans_b, alpha=0.5, beta=2.0)
    model = make_model([bn_node("a", "z", 4, inits), gemm], inits, [("a", ["N", 4])], [("y", None)])
    folded, report = fold_onnx(model)
    assert ops(folded) == ["Gemm"] and report.folded[0].direction == "before"
    _same(model, folded, {"a": _w(3, 4)})


@pytest.mark.parametrize("with_add", [True, False])
def test_matmul_add(with_add):
    inits = [numpy_helper.from_array(_w(4, 5), "W"), numpy_helper.from_array(_w(5), "b")]
    nodes = [helper.make_node("MatMul", ["a", "W"], ["m"], name="mm")]
    last = "m"
    if with_add:
        nodes.append(helper.make_node("Add", ["b", "m"], ["s"], name="add"))
        last = "s"
    nodes.append(bn_node(last, "y", 5, inits))
    model = make_model(nodes, inits, [("a", ["N", 4])], [("y", None)])
    folded, report = fold_onnx(model)
    assert "BatchNormalization" not in ops(folded) and len(report.folded) == 1
    _same(model, folded, {"a": _w(3, 4)})


def test_matmul_on_3d_input_is_not_folded_into_weights():
    # BN normalizes axis 1, MatMul's channel is the last axis: not the same on a 3-D tensor.
    inits = [numpy_helper.from_array(_w(5, 5), "W")]
    nodes = [helper.make_node("MatMul", ["a", "W"], ["m"], name="mm"), bn_node("m", "y", 3, inits)]
    model = make_model(nodes, inits, [("a", [2, 3, 5])], [("y", None)])
    folded, report = fold_onnx(model)
    assert not report.folded and ops(folded) == ["MatMul", "Mul", "Add"]
    _same(model, folded, {"a": _w(2, 3, 5)})


@pytest.mark.parametrize("pads,foldable", [((0, 0, 0, 0), True), ((1, 1, 1, 1), False)])
def test_bn_before_conv(pads, foldable):
    inits = [numpy_helper.from_array(_w(6, 2, 3, 3), "W")]
    conv = helper.make_node("Conv", ["z", "W"], ["y"], name="conv", group=2, pads=list(pads))
    model = make_model([bn_node("x", "z", 4, inits), conv], inits, [("x", ["N", 4, 6, 6])], [("y", None)])
    folded, report = fold_onnx(model)
    assert ops(folded) == (["Conv"] if foldable else ["Mul", "Add", "Conv"]), report.format()
    _same(model, folded, {"x": _w(2, 4, 6, 6)})


def test_standalone_bn_becomes_mul_add_with_channel_shape():
    inits = []
    relu = helper.make_node("Relu", ["x"], ["r"])
    model = make_model([relu, bn_node("r", "y", 4, inits)], inits, [("x", ["N", 4, 3, 5])], [("y", None)])
    folded, report = fold_onnx(model)
    assert ops(folded) == ["Relu", "Mul", "Add"] and report.skipped[0].action == "mul_add"
    scale = next(t for t in folded.graph.initializer if t.name == folded.graph.node[1].input[1])
    assert list(scale.dims) == [4, 1, 1]
    _same(model, folded, {"x": _w(2, 4, 3, 5)})


@pytest.mark.parametrize("opset", [14, 15])
def test_training_mode_bn_is_never_folded(opset):
    inits = [numpy_helper.from_array(_w(4, 4, 1, 1), "W")]
    conv = helper.make_node("Conv", ["x", "W"], ["c"], name="conv")
    bn = bn_node("c", "y", 4, inits, training_mode=1)
    bn.output.extend(["rm", "rv"])
    model = make_model([conv, bn], inits, [("x", [2, 4, 3, 3])], [("y", None)], opset=opset)
    folded, report = fold_onnx(model)
    assert ops(folded) == ["Conv", "BatchNormalization"]
    assert "training" in report.skipped[0].reason and report.skipped[0].action == "kept"


def test_producer_that_is_a_graph_output_is_not_folded():
    model = _conv_bn()
    model.graph.output.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, None))
    model = with_output_shapes(model)
    folded, report = fold_onnx(model)
    assert "graph output" in report.skipped[0].reason
    _same(model, folded, {"x": _w(2, 4, 6, 6)})


def test_shared_weight_initializer_is_cloned():
    inits = [numpy_helper.from_array(_w(4, 4, 3, 3), "W")]
    c1 = helper.make_node("Conv", ["x", "W"], ["c1"], name="conv1")
    c2 = helper.make_node("Conv", ["x", "W"], ["c2"], name="conv2")
    model = make_model([c1, c2, bn_node("c1", "y1", 4, inits)], inits, [("x", [2, 4, 6, 6])],
                       [("y1", None), ("c2", None)])
    folded, _ = fold_onnx(model)
    names = {t.name for t in folded.graph.initializer}
    assert "W" in names and ops(folded) == ["Conv", "Conv"]
    assert folded.graph.node[1].input[1] == "W" and folded.graph.node[0].input[1] != "W"
    _same(model, folded, {"x": _w(2, 4, 6, 6)})


def test_weights_from_constant_nodes():
    w = _w(4, 4, 1, 1)
    const = helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w))
    conv = helper.make_node("Conv", ["x", "W"], ["c"], name="conv")
    inits = []
    nodes = [const, conv, bn_node("c", "y", 4, inits)]
    model = make_model(nodes, inits, [("x", [2, 4, 3, 3])], [("y", None)])
    folded, _ = fold_onnx(model)
    assert ops(folded) == ["Conv"]
    _same(model, folded, {"x": _w(2, 4, 3, 3)})


def test_overridable_initializer_is_not_constant():
    model = _conv_bn()
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 4, 3, 3]))
    folded, report = fold_onnx(model)
    assert not report.folded and "BatchNormalization" not in ops(folded)  # Mul+Add instead


def test_chain_of_two_bns_and_input_untouched():
    inits = [numpy_helper.from_array(_w(4, 4, 1, 1), "W")]
    conv = helper.make_node("Conv", ["x", "W"], ["c"], name="conv")
    nodes = [conv, bn_node("c", "b1", 4, inits, prefix="bn1", seed=1),
             bn_node("b1", "y", 4, inits, prefix="bn2")]
    model = make_model(nodes, inits, [("x", ["N", 4, 3, 3])], [("y", None)])
    before = model.SerializeToString()
    folded, report = fold_onnx(model)
    assert model.SerializeToString() == before
    assert ops(folded) == ["Conv"] and len(report.folded) == 2
    _same(model, folded, {"x": _w(2, 4, 3, 3)})


def test_fp16_graph_folds_with_one_rounding():
    w = _w(4, 4, 1, 1, dtype=np.float16)
    inits = [numpy_helper.from_array(w, "W")]
    conv = helper.make_node("Conv", ["x", "W"], ["c"], name="conv")
    bn = bn_node("c", "y", 4, inits, dtype=np.float16)
    x16 = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4, 2, 2])
    y16 = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 4, 2, 2])
    g = helper.make_graph([conv, bn], "g", [x16], [y16], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folded, _ = fold_onnx(model)
    scale, bias, mean, var = bn_arrays(4, 0, np.float16)
    s, t = fold_math.bn_scale_shift(mean, var, 1e-3, scale, bias)
    w64, _ = fold_math.fold_after(w, None, s, t)
    w_name = folded.graph.node[0].input[1]
    new_w = numpy_helper.to_array(next(i for i in folded.graph.initializer if i.name == w_name))
    assert new_w.dtype == np.float16 and np.array_equal(new_w, w64.astype(np.float16))
    _same(model, folded, {"x": _w(1, 4, 2, 2, dtype=np.float16)}, tol=2e-2)


def test_not_a_model_is_refused():
    from tritonbn.export import FoldError

    with pytest.raises(FoldError):
        fold_onnx(b"not a model")
    assert isinstance(fold_onnx(_conv_bn())[0], onnx.ModelProto)


def _without_output_shapes(model):
    """What some exporters write and ONNX Runtime runs, but onnx.checker rejects."""
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    return model


def test_checker_complaint_already_in_the_input_does_not_stop_the_fold():
    model = _without_output_shapes(_conv_bn())
    folded, report = fold_onnx(model)
    assert ops(folded) == ["Conv"] and len(report.folded) == 1
    assert any("already fails validation" in w for w in report.warnings)
    _same(model, folded, {"x": _w(2, 4, 6, 6)})


def test_cli_folds_a_model_the_checker_rejects(tmp_path):
    from tritonbn.export.cli import main

    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_without_output_shapes(_conv_bn()), str(src))
    assert main(["--onnx-in", str(src), "-o", str(out), "--input-shape", "2,4,6,6"]) == 0
    assert ops(onnx.load(str(out))) == ["Conv"]


def test_problem_introduced_by_the_fold_is_still_caught(monkeypatch):
    """Same input complaint before and after is tolerated; a new complaint is not."""
    from tritonbn.export import FoldError, onnx_fold

    real_finish = onnx_fold._Folder.finish

    def finish_with_dangling_input(self):
        m = real_finish(self)
        m.graph.node.append(helper.make_node("Relu", ["no_such_value"], ["dangling"]))
        return m

    monkeypatch.setattr(onnx_fold._Folder, "finish", finish_with_dangling_input)
    for model in (_conv_bn(), _without_output_shapes(_conv_bn())):
        with pytest.raises(FoldError, match="failed validation"):
            fold_onnx(model)
