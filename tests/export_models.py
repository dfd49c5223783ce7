"""Small models and ONNX graph builders shared by the export tests."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn


def randomize_bn(bn: nn.Module, seed: int = 0) -> nn.Module:
    """Give a BN non-trivial running stats and affine params (eval-mode folding is then visible)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        n = bn.num_features
        bn.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
        bn.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
        if bn.affine:
            bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
            bn.bias.copy_(torch.rand(n, generator=g) * 2 - 1)
        bn.num_batches_tracked.fill_(7)
    return bn


def randomize_all(model: nn.Module) -> nn.Module:
    for i, m in enumerate(model.modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            randomize_bn(m, seed=i)
    return model.eval()


def snapshot(model: nn.Module) -> dict:
    """Bitwise copy of the state and every training flag, to prove a model was not touched."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "ptrs": [t.data_ptr() for t in model.state_dict().values()],
    }


def assert_untouched(model: nn.Module, snap: dict) -> None:
    state = model.state_dict()
    assert state.keys() == snap["state"].keys()
    for k, v in state.items():
        ref = snap["state"][k]
        assert v.dtype == ref.dtype and v.shape == ref.shape and torch.equal(v, ref), k
    assert [m.training for m in model.modules()] == snap["training"]
    assert [t.data_ptr() for t in state.values()] == snap["ptrs"]  # same storage: not replaced


def count_bn(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class Seq(nn.Sequential):
    pass


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, stride=2)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(torch.relu(self.bn(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


# --- hand-built ONNX graphs ---------------------------------------------------------------------

def bn_arrays(c: int, seed: int = 0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [
        (rng.random(c) + 0.5).astype(dtype),  # scale
        (rng.random(c) * 2 - 1).astype(dtype),  # bias
        (rng.random(c) * 2 - 1).astype(dtype),  # mean
        (rng.random(c) * 1.5 + 0.5).astype(dtype),  # var
    ]


def bn_node(x: str, y: str, c: int, inits: list, prefix: str = "bn", seed: int = 0, dtype=np.float32,
            **attrs):
    names = [f"{prefix}_{k}" for k in ("scale", "bias", "mean", "var")]
    for n, a in zip(names, bn_arrays(c, seed, dtype)):
        inits.append(numpy_helper.from_array(a, n))
    return helper.make_node("BatchNormalization", [x] + names, [y], name=prefix, epsilon=1e-3, **attrs)


def make_model(nodes, inits, inputs, outputs, opset: int = 17) -> onnx.ModelProto:
    elem = TensorProto.FLOAT
    ins = [helper.make_tensor_value_info(n, t if isinstance(t, int) else elem, s)
           for n, s, *t in ((*i,) for i in inputs)]
    outs = [helper.make_tensor_value_info(n, elem, s) for n, s in outputs]
    graph = helper.make_graph(nodes, "g", ins, outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return with_output_shapes(model)


def with_output_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fill graph output shapes from shape inference (the checker wants them), then check."""
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for out in model.graph.output:
        if not out.type.tensor_type.HasField("shape") and out.name in known:
            out.type.CopyFrom(known[out.name].type)
    onnx.checker.check_model(model)
    return model


def ort_run(model: onnx.ModelProto, feeds: dict) -> list:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


class DataDependent(nn.Module):
    """The issue-10 repro: a Python branch on tensor values. torch.export refuses it; a TorchScript trace
    bakes in the branch the example inputs take (randn never reaches 100)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if x.abs().max() > 100:
            y = y * 0
        return y


class ShapeConstant(nn.Module):
    """Traces with a TracerWarning ("Converting a tensor to a Python float") that is harmless: the
    channel count really is constant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) / float(x.shape[1])


def data_dependent_factory():
    return randomize_all(DataDependent())


def shape_constant_factory():
    return randomize_all(ShapeConstant())
