"""Whole-step CUDA-graph capture of a model, one configuration per process: does the replay run, and does
it compute what eager mode computes?

    python -m benchmarks.graph_check --out DIR                # the matrix below, each in its own process
    python -m benchmarks.graph_check --one resnet50,tritonbn,32,bf16,fast,step   # one configuration

A configuration is ``model,variant,batch,amp,launch,part``: model as in model_bench (resnet50, tiny_resnet50,
...), variant torch | tritonbn | fused, amp bf16 | none, launch fast | normal (``Tuning.fast_launch``), part
step (forward, backward, SGD step) | fwdbwd (no optimizer) | fwd (no backward). Each runs model_bench's
recipe (two warm-up steps on a side stream, capture, replays) and then compares three replays with three
eager steps of a twin model that starts from the same weights, buffers and momentum: loss, parameters and
running statistics after each step (relative L2). A crash (an illegal address poisons the whole CUDA
context) is confined to its process and reported with the configuration that caused it.

Why this exists: the first H200 run of model_bench's graph mode (commit 6b0e3d4) died with "an illegal
memory access" on the first replay of tritonbn's ResNet-50 graph, while eager mode, the kernel suite's
per-op graphs and the small CUDA-graph tests ran. The matrix narrows it down in one GPU call.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

MATRIX = [   # most telling first: the budget may stop the matrix early
    "resnet50,tritonbn,32,bf16,fast,step",
    "tiny_resnet50,tritonbn,8,bf16,fast,step",
    "resnet50,tritonbn,32,bf16,normal,step",
    "resnet50,tritonbn,32,bf16,fast,fwdbwd",
    "resnet50,tritonbn,32,bf16,fast,fwd",
    "resnet50,tritonbn,32,none,fast,step",
    "resnet50,fused,32,bf16,fast,step",
    "resnet50,torch,32,bf16,fast,step",
]


def run_one(spec: str, image_size: int) -> dict:
    model_name, variant, batch, amp, launch, part = spec.split(",")
    batch = int(batch)
    import torch

    import tritonbn
    from tritonbn import ops

    from . import harness as H
    from . import models

    ops.TUNING = ops.Tuning(fast_launch=launch == "fast")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model, _ = models.build(torch, model_name, 1000)
    model = model.cuda().to(memory_format=torch.channels_last).train()
    if variant == "tritonbn":
        model = tritonbn.convert_model(model)
    elif variant == "fused":
        model, _ = tritonbn.fuse_model(model)
    g = torch.Generator(device="cpu").manual_seed(batch)
    x = torch.randn(batch, 3, image_size, image_size, generator=g).cuda()
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), generator=g).cuda()
    dtype = torch.bfloat16 if amp == "bf16" else None

    def make_step(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) if part == "step" else None

        def step():
            if part == "fwd":
                with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None,
                                                     cache_enabled=False):
                    return torch.nn.functional.cross_entropy(m(x).float(), y)
            with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None, cache_enabled=False):
                loss = torch.nn.functional.cross_entropy(m(x), y)
            loss.backward()
            if opt is not None:
                opt.step()
            return loss
        return step, opt

    step, opt = make_step(model)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    # The eager twin: same weights, buffers and momentum as the model at capture time.
    twin = copy.deepcopy(model)
    twin_step, twin_opt = make_step(twin)
    if opt is not None:
        twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))

    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    out = {"spec": spec, "captured": True, "replays": []}
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        if part != "fwd":
            twin.zero_grad(set_to_none=False)
            for p in twin.parameters():
                if p.grad is not None:
                    p.grad.zero_()
        eager_loss = twin_step()
        torch.cuda.synchronize()
        params = [p.detach() for p in model.parameters()], [p.detach() for p in twin.parameters()]
        bufs = ([b for n, b in model.named_buffers() if "running" in n],
                [b for n, b in twin.named_buffers() if "running" in n])
        grads = ([p.grad for p in model.parameters() if p.grad is not None],
                 [p.grad for p in twin.parameters() if p.grad is not None])
        out["replays"].append({
            "loss": float(static_loss), "eager_loss": float(eager_loss),
            "params_gap": H.rel_l2(torch, *params), "stats_gap": H.rel_l2(torch, *bufs),
            "grads_gap": H.rel_l2(torch, *grads) if grads[0] and len(grads[0]) == len(grads[1]) else None,
            "finite": math.isfinite(float(static_loss)),
        })
    out["ok"] = all(r["finite"] for r in out["replays"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--one", help="run one configuration in this process and print its JSON")
    p.add_argument("--specs", default=",".join(s.replace(",", ":") for s in MATRIX),
                   help="configurations for the matrix, ':' inside one, ',' between them")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per configuration")
    p.add_argument("--budget", type=float, default=240.0, help="seconds for the whole matrix")
    p.add_argument("--sanitize", action="store_true",
                   help="after the matrix, rerun the first crashing configuration under compute-sanitizer")
    p.add_argument("--sanitize-timeout", type=float, default=120.0)
    p.add_argument("--out", help="directory for graph_check.json")
    args = p.parse_args(argv)
    if args.one:
        try:
            res = run_one(args.one, args.image_size)
        except Exception as e:
            import traceback

            traceback.print_exc()
            res = {"spec": args.one, "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        print("GRAPH_CHECK " + json.dumps(res), flush=True)
        return 0 if res.get("ok") else 1

    t0 = time.monotonic()
    results, crashed = [], None
    for spec in (s.replace(":", ",") for s in args.specs.split(",")):
        left = args.budget - (time.monotonic() - t0)
        if left < 15:
            results.append({"spec": spec, "ok": None, "error": "budget"})
            continue
        res = _child(spec, args, min(args.timeout, left), [])
        results.append(res)
        print(_line(res), flush=True)
        if res.get("ok") is False and "illegal" in str(res.get("error", "")):
            if crashed is None or (spec.startswith("tiny") and not crashed.startswith("tiny")):
                crashed = spec   # the smallest model that crashes: the sanitizer is slow
    if args.sanitize and crashed:
        cmd = ["compute-sanitizer", "--tool", "memcheck", "--print-limit", "6", "--show-backtrace", "no"]
        res = _child(crashed, args, args.sanitize_timeout, cmd)
        res["sanitizer"] = True
        results.append(res)
        print(_line(res), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "graph_check.json").write_text(json.dumps(results, indent=1))
    return 0 if all(r.get("ok") for r in results) else 1


def _child(spec, args, timeout, prefix) -> dict:
    cmd = prefix + [sys.executable, "-m", "benchmarks.graph_check", "--one", spec,
                    "--image-size", str(args.image_size)]
    t = time.monotonic()
    try:
        root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root,
                              env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path))
        text = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"spec": spec, "ok": None, "error": f"timeout after {timeout:.0f}s", "tail": text[-3000:]}
    res = None
    for line in text.splitlines():
        if line.startswith("GRAPH_CHECK "):
            res = json.loads(line[len("GRAPH_CHECK "):])
    if res is None:
        res = {"spec": spec, "ok": False, "error": f"exit {proc.returncode}, no result"}
    res["seconds"] = round(time.monotonic() - t, 1)
    if not res.get("ok"):
        res["tail"] = text[-4000:]
    return res


def _line(res) -> str:
    r = res.get("replays") or []
    gaps = " ".join(f"loss {x['loss']:.4f}/{x['eager_loss']:.4f} params {x['params_gap']:.1e} "
                    f"stats {x['stats_gap']:.1e}" for x in r[:1])
    return (f"graph_check: {res['spec']:<42} ok={res.get('ok')} {res.get('seconds', '')}s "
            f"{res.get('error', '')} {gaps}" + (f"\n{res['tail']}" if res.get("tail") else ""))


if __name__ == "__main__":
    raise SystemExit(main())
