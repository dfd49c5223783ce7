"""``python -m tritonbn.export --demo``: train a tiny ResNet built from tritonbn layers, fold, export and
verify it."""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch
from torch import nn


def bn_layers():
    """``(BatchNorm1d, BatchNorm2d, source)``: tritonbn's layers, or torch's if they cannot be loaded."""
    try:
        import tritonbn

        return tritonbn.BatchNorm1d, tritonbn.BatchNorm2d, "tritonbn"
    except (ImportError, AttributeError):
        return nn.BatchNorm1d, nn.BatchNorm2d, "torch"


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, bn2d):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = bn2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = bn2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class DemoNet(nn.Module):
    """Covers the three outcomes: BN after a conv (folded), BN before a layer without zero padding
    (folded into its inputs) and a BN with no foldable neighbour (kept / Mul+Add)."""

    def __init__(self, bn1d=nn.BatchNorm1d, bn2d=nn.BatchNorm2d, classes: int = 10):
        super().__init__()
        self.norm_in = bn2d(3)  # input normalization, folds into the reflect-padded stem
        self.stem = nn.Conv2d(3, 16, 3, padding=1, padding_mode="reflect", bias=False)
        self.stem_bn = bn2d(16)
        self.layer1 = Block(16, 16, 1, bn2d)
        self.layer2 = Block(16, 32, 2, bn2d)
        self.post_bn = bn2d(32)  # after a ReLU, before pooling: nothing to fold into
        self.head_bn = bn1d(32)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(self.norm_in(x))))
        x = self.post_bn(self.layer2(self.layer1(x)))
        return self.fc(self.head_bn(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))


TRAIN_STEPS = 12


def train(model: nn.Module, device, steps: int | None = None, batch: int = 16, seed: int = 0) -> float:
    """A few SGD steps on synthetic data whose labels follow a fixed random projection."""
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(3 * 16 * 16, 10, generator=gen)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss = torch.tensor(0.0)
    for _ in range(TRAIN_STEPS if steps is None else steps):
        x = torch.randn(batch, 3, 16, 16, generator=gen) * 2 + 0.5
        y = (x.flatten(1) @ proj).argmax(1)
        x, y = x.to(device), y.to(device)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def build_and_train(device, log=print):
    bn1d, bn2d, source = bn_layers()
    if source == "torch":
        log("note: tritonbn is not importable; the demo uses torch.nn BatchNorm layers instead")
    torch.manual_seed(0)
    try:
        model = DemoNet(bn1d, bn2d)
        loss = train(model, device)
    except Exception as e:  # noqa: BLE001 - e.g. tritonbn kernels unavailable on this device
        if source == "torch":
            raise
        log(f"note: tritonbn layers failed on {device} ({type(e).__name__}: {str(e)[:120]}); "
            "using torch.nn BatchNorm layers instead")
        source = "torch"
        torch.manual_seed(0)
        model = DemoNet()
        loss = train(model, device)
    return model.cpu().eval(), source, loss


def ort_latency_ms(path: str, x, runs: int = 50) -> float:
    """Median ONNX Runtime CPU latency with ORT's graph optimizations off, so the difference comes
    from the model file itself."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}
    for _ in range(5):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _bn_nodes(path: str) -> tuple[int, int]:
    import onnx

    g = onnx.load(path).graph
    return len(g.node), sum(n.op_type == "BatchNormalization" for n in g.node)


def run_demo(output: str | None = None, report_path: str | None = None, opset: int | None = None,
             allow_trace_warnings: bool = False) -> int:
    import json

    from .onnx_io import check_opset, export_onnx
    from .outputs import StagedWrites, check_output_paths

    check_opset(opset)
    check_output_paths({"-o/--output": output, "--report": report_path})  # before training
    t_start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, source, loss = build_and_train(device)
    print(f"trained DemoNet ({source} BatchNorm) for {TRAIN_STEPS} steps on {device}: loss {loss:.3f}")
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    kw = {"opset": opset, "allow_trace_warnings": allow_trace_warnings}
    with tempfile.TemporaryDirectory() as tmp:
        baseline = export_onnx(model, (x,), os.path.join(tmp, "demo_unfolded.onnx"), fold=False, **kw)
        result = export_onnx(model, (x,), os.path.join(tmp, "demo_folded.onnx"), **kw)
        nodes0, bn0 = _bn_nodes(baseline.path)
        nodes1, bn1 = _bn_nodes(result.path)
        xb = torch.randn(8, 3, 16, 16)
        lat0, lat1 = ort_latency_ms(baseline.path, xb), ort_latency_ms(result.path, xb)
        with open(result.path, "rb") as f:
            folded_bytes = f.read()
    if output:
        result.path = os.fspath(output)
    print()
    print(result.module_report.format())
    print(result.onnx_report.format())
    print()
    print(f"ONNX nodes (torch.onnx.export default -> folded): {nodes0} -> {nodes1}   "
          f"(BatchNormalization {bn0} -> {bn1})")
    runs = result.check.runs
    print(f"verification:       {'OK' if result.check.ok else 'FAILED'}, max rel err "
          f"{result.check.max_rel_err:.2e} ({len(runs)} input sets: batch sizes "
          f"{sorted({r['batch'] for r in runs})}, inputs up to randn*1000)")
    print(f"ORT latency (CPU, 1 thread, graph opts off, batch 8): {lat0:.3f} ms -> {lat1:.3f} ms")
    for note in result.notes:
        print(f"note: {note}")
    with StagedWrites() as out:  # -o and --report: both or neither
        if output:
            out.add(output, folded_bytes)
        if report_path:
            data = {"bn_source": source, "device": device, "train_loss": loss,
                    "latency_ms": {"unfolded": lat0, "folded": lat1},
                    "nodes": {"unfolded": nodes0, "folded": nodes1, "bn_unfolded": bn0, "bn_folded": bn1},
                    **result.to_dict()}
            out.add(report_path, (json.dumps(data, indent=2, default=str) + "\n").encode())
        out.commit()
    print(f"exporter: {result.exporter}, opset {result.opset}; "
          f"{'wrote ' + output if output else 'files written to a temporary directory (use -o to keep)'}")
    print(f"done in {time.perf_counter() - t_start:.1f} s")
    return 0 if result.check.ok else 2
