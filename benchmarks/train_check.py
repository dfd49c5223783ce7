"""End-to-end training check: one small ResNet trained twice from the same initial weights, with torch's
BatchNorm layers and with tritonbn's (`tritonbn.convert_model` of a deepcopy), on the same synthetic
batches. The loss curves must track each other; the median time per step of each is reported.

    python -m benchmarks.train_check --out DIR           # GPU: 50 steps, batch 64, 64x64 images;
                                                         #   fp32 NCHW, and bf16 autocast channels_last
    python -m benchmarks.train_check --smoke --out DIR   # CPU + Triton interpreter: 3 tiny steps, no timings

The two models step alternately (ref, tritonbn, ref, ...) so both see the same GPU clocks. Step time is
wall time of forward + backward + SGD step with a device synchronize on either side, median over the
steps after the first `--skip` (which include Triton/cuDNN warm-up). Writes DIR/train.json, DIR/train.md.
Exit status 1 if a configuration fails or its curves do not track.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import traceback
from pathlib import Path

from . import harness as H

# |loss_tritonbn - loss_torch| allowed at any step, as a fraction of the first loss. Same-init runs
# differ only by BN rounding, but the fast-learning phase amplifies any difference (TF32 convolutions
# flip roundings), so a third run -- torch again, weights perturbed by CONTROL_EPS relative noise --
# measures that amplification: tritonbn may also deviate up to NOISE_FACTOR times as much as that control.
# The final losses must agree within the tolerance either way. A wrong BN is off by far more.
TRACK_TOL = {"fp32": 0.02, "bf16": 0.05}
CONTROL_EPS = 1e-6
NOISE_FACTOR = 3.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.train_check",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny model, 3 steps")
    p.add_argument(
        "--out", type=Path, help="output dir (default benchmarks/results/<card>-<date>; smoke: tmp)"
    )
    p.add_argument("--steps", type=int, default=None, help="training steps (default 50; smoke 3)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 64; smoke 4)")
    p.add_argument("--size", type=int, default=None, help="image side (default 64; smoke 8)")
    p.add_argument(
        "--skip", type=int, default=None, help="steps left out of the step-time median (default 5)"
    )
    p.add_argument(
        "--configs",
        default=None,
        help="comma list of fp32_contig,bf16amp_cl (default both; smoke fp32_contig)",
    )
    a = p.parse_args(argv)
    a.steps = a.steps or (3 if a.smoke else 50)
    a.batch = a.batch or (4 if a.smoke else 64)
    a.size = a.size or (8 if a.smoke else 64)
    a.skip = a.skip if a.skip is not None else (0 if a.smoke else 5)
    a.configs = [
        c for c in (a.configs or ("fp32_contig" if a.smoke else "fp32_contig,bf16amp_cl")).split(",") if c
    ]
    bad = [c for c in a.configs if c not in CONFIGS]
    if bad:
        p.error(f"--configs: unknown {bad}; choose from {', '.join(CONFIGS)}")
    return a


CONFIGS = {
    "fp32_contig": {"amp": None, "channels_last": False, "tol_key": "fp32"},
    "bf16amp_cl": {"amp": "bf16", "channels_last": True, "tol_key": "bf16"},
}


def build_model(torch, widths, blocks, num_classes=10):
    """ResNet-style: conv-BN-ReLU stem, stages of basic blocks (BN2d, ReLU, residual), MLP head with BN1d."""
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = None
            if stride != 1 or cin != cout:
                self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (x if self.short is None else self.short(x)))

    layers = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
    cin = widths[0]
    for i, w in enumerate(widths):
        for j in range(blocks):
            layers.append(Block(cin, w, 2 if (i > 0 and j == 0) else 1))
            cin = w
    layers += [
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(cin, 2 * num_classes * 4, bias=False),
        nn.BatchNorm1d(2 * num_classes * 4),
        nn.ReLU(),
        nn.Linear(2 * num_classes * 4, num_classes),
    ]
    return nn.Sequential(*layers)


def count_bn(torch, model, classes=None) -> int:
    classes = classes or (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
    return sum(isinstance(m, classes) for m in model.modules())


def run_config(torch, tb, name, cfg, args, device) -> dict:
    res = {"name": name, "amp": cfg["amp"], "channels_last": cfg["channels_last"], "error": None}
    torch.manual_seed(0)
    widths, blocks = ((4,), 1) if args.smoke else ((64, 128, 256), 2)
    ref = build_model(torch, widths, blocks).to(device)
    tri = tb.convert_model(copy.deepcopy(ref))
    n_bn = count_bn(torch, ref)
    n_tb = count_bn(torch, tri, (tb.BatchNorm1d, tb.BatchNorm2d, tb.BatchNorm3d))
    res.update(bn_layers=n_bn, converted_layers=n_tb)
    if n_tb != n_bn:
        res["error"] = f"convert_model converted {n_tb} of {n_bn} BatchNorm layers"
    fmt = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    ctrl = copy.deepcopy(ref)
    gp = torch.Generator(device="cpu").manual_seed(2)
    with torch.no_grad():
        for p in ctrl.parameters():
            p.mul_(1 + CONTROL_EPS * torch.randn(p.shape, generator=gp).to(p.device))
    models = {
        "torch": ref.to(memory_format=fmt),
        "tritonbn": tri.to(memory_format=fmt),
        "control": ctrl.to(memory_format=fmt),
    }
    opts = {
        k: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        for k, m in models.items()
    }
    g = torch.Generator(device="cpu").manual_seed(1)
    # a few fixed batches, cycled: the models can memorise them, so the loss falls visibly in 50 steps
    data = [
        (
            torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device, memory_format=fmt),
            torch.randint(0, 10, (args.batch,), generator=g).to(device),
        )
        for _ in range(4)
    ]
    res["tritonbn_uses_triton"] = bool(tb.uses_triton(data[0][0])) if hasattr(tb, "uses_triton") else None
    amp_dtype = {"bf16": torch.bfloat16, None: None}[cfg["amp"]]
    losses = {k: [] for k in models}
    times = {k: [] for k in models}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for step in range(args.steps):
        x, y = data[step % len(data)]
        for k, m in models.items():
            m.train()
            sync()
            t0 = time.perf_counter()
            with torch.autocast(device_type=device, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = torch.nn.functional.cross_entropy(m(x), y)
            opts[k].zero_grad(set_to_none=True)
            loss.backward()
            opts[k].step()
            sync()
            times[k].append((time.perf_counter() - t0) * 1e3)
            losses[k].append(float(loss.detach()))
    diffs = [abs(a - b) for a, b in zip(losses["torch"], losses["tritonbn"])]
    ctrl_diff = max(abs(a - b) for a, b in zip(losses["torch"], losses["control"]))
    tol = TRACK_TOL[cfg["tol_key"]] * abs(losses["torch"][0])
    allowed = max(tol, NOISE_FACTOR * ctrl_diff)
    med = {k: statistics.median(v[args.skip :] or v) for k, v in times.items() if k != "control"}
    res.update(
        losses=losses,
        max_abs_loss_diff=max(diffs),
        max_rel_loss_diff=max(d / max(abs(a), 1e-12) for d, a in zip(diffs, losses["torch"])),
        final_abs_loss_diff=diffs[-1],
        control_max_abs_loss_diff=ctrl_diff,
        tol_abs=tol,
        allowed_max_abs_loss_diff=allowed,
        tracks=max(diffs) <= allowed and diffs[-1] <= tol and all(map(_finite, losses["tritonbn"])),
        loss_fell={k: v[-1] < v[0] for k, v in losses.items()},
        step_ms_median=med,
        speedup_vs_torch=med["torch"] / med["tritonbn"] if med["tritonbn"] > 0 else None,
    )
    return res


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


def markdown(doc) -> str:
    env, meta = doc["env"], doc["meta"]
    L = [
        "# tritonbn end-to-end training check",
        "",
        f"{env.get('gpu') or 'CPU smoke'} | torch {env['torch']} | triton {env.get('triton')} | "
        f"commit {env['git_commit']} | {meta['steps']} steps, batch {meta['batch']}, "
        f"{meta['size']}x{meta['size']} images, widths {meta['widths']}",
    ]
    if not meta["timing_meaningful"]:
        L.append("**Smoke run (CPU, Triton interpreter): step times are NOT meaningful.**")
    L += [
        "",
        "| config | BN layers converted | max abs loss diff | control diff | allowed | final diff | tracks | "
        "torch ms/step | tritonbn ms/step | speed-up | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in doc["configs"]:
        med = c.get("step_ms_median", {})
        L.append(
            f"| {c['name']} | {c.get('converted_layers', '—')}/{c.get('bn_layers', '—')} | "
            + " | ".join(
                H.fmt(c.get(k), ".2e")
                for k in (
                    "max_abs_loss_diff",
                    "control_max_abs_loss_diff",
                    "allowed_max_abs_loss_diff",
                    "final_abs_loss_diff",
                )
            )
            + " | "
            f"{'yes' if c.get('tracks') else '**NO**'} | {H.fmt(med.get('torch'), '.2f')} | "
            f"{H.fmt(med.get('tritonbn'), '.2f')} | {H.fmt(c.get('speedup_vs_torch'), '.2f')} | "
            f"{c['error'] or ''} |"
        )
    for c in doc["configs"]:
        if not c.get("losses"):
            continue
        lt, lb = c["losses"]["torch"], c["losses"]["tritonbn"]
        k = max(1, len(lt) // 10)
        L += [
            "",
            f"## Loss curve: {c['name']}",
            "",
            f"| step | torch | tritonbn | diff | control diff (torch, weights ×(1+{CONTROL_EPS:g}·N(0,1))) |",
            "|---|---|---|---|---|",
        ]
        lc = c["losses"]["control"]
        for i in sorted(set(range(0, len(lt), k)) | {len(lt) - 1}):
            L.append(f"| {i} | {lt[i]:.5f} | {lb[i]:.5f} | {lb[i] - lt[i]:+.2e} | {lc[i] - lt[i]:+.2e} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    started = H.start_run("train_check", args.smoke, args.out)
    if started is None:
        return 2
    torch, device, env, out = started
    meta = {
        "steps": args.steps,
        "batch": args.batch,
        "size": args.size,
        "skip": args.skip,
        "widths": [4] if args.smoke else [64, 128, 256],
        "timing_meaningful": not args.smoke,
        "track_tolerance": TRACK_TOL,
        "control_eps": CONTROL_EPS,
        "noise_factor": NOISE_FACTOR,
    }
    doc = {"env": env, "meta": meta, "configs": []}
    try:
        import tritonbn as tb
    except Exception as e:
        traceback.print_exc()
        tb = e
    t0 = time.monotonic()
    for name in args.configs:
        if isinstance(tb, Exception):
            res = {"name": name, "error": f"import tritonbn failed: {type(tb).__name__}: {tb}"}
        else:
            try:
                res = run_config(torch, tb, name, CONFIGS[name], args, device)
            except Exception as e:
                traceback.print_exc()
                res = {"name": name, "error": f"{type(e).__name__}: {e}"[:300]}
        doc["configs"].append(res)
        H.write_json_atomic(out / "train.json", doc)
        H.write_text_atomic(out / "train.md", markdown(doc))
        med = res.get("step_ms_median", {})
        print(
            f"train_check: {name}: tracks={res.get('tracks')} "
            f"max|dloss|={H.fmt(res.get('max_abs_loss_diff'), '.2e')} "
            f"(allowed {H.fmt(res.get('allowed_max_abs_loss_diff'), '.2e')}, control "
            f"{H.fmt(res.get('control_max_abs_loss_diff'), '.2e')}) "
            f"ms/step torch {H.fmt(med.get('torch'), '.2f')} "
            f"tritonbn {H.fmt(med.get('tritonbn'), '.2f')} error={res['error']}",
            flush=True,
        )
    doc["ok"] = all(c.get("tracks") and not c["error"] for c in doc["configs"])
    doc["elapsed_s"] = time.monotonic() - t0
    H.write_json_atomic(out / "train.json", doc)
    print(
        f"train_check: {'OK' if doc['ok'] else 'FAILED'} in {doc['elapsed_s']:.0f}s "
        f"-> {out}/train.json, train.md"
    )
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
