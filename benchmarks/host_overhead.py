"""Where the host time of one tritonbn call goes: ``python -m benchmarks.host_overhead``.

The H200 runs (benchmarks/results/) showed most rows host-bound: the measured time equals the CPU time
to issue the call. This splits that CPU time into

* ``python``: tritonbn's own Python (validation, autograd, launchers) with kernel launches recorded
  instead of run (``tritonbn.ops._launch_hook``): runs on any machine;
* ``triton launch``: one launch of a trivial Triton kernel with as many arguments as ours (GPU only);
* ``module call``: a whole ``tritonbn.BatchNorm2d`` call, forward and forward+backward (GPU only),
  next to ``torch.nn.BatchNorm2d`` for scale.

Host µs per call are medians of repeated timed loops, with the GPU synchronized only between loops.
"""

from __future__ import annotations

import argparse
import os

from .harness import host_us_per_call


def _host_us(fn, loops: int = 7, calls: int = 200, sync=None) -> float:
    return host_us_per_call(fn, n=calls, loops=loops, warmup=20, sync=sync)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="32,64,56,56")
    args = parser.parse_args(argv)
    import torch

    import tritonbn
    from tritonbn import ops

    shape = tuple(int(s) for s in args.shape.split(","))
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else None
    rows = []

    # Pure Python: the launches are recorded, not run (tiny CPU tensors, so no kernel work at all).
    small = torch.randn(2, shape[1], 2, 2, requires_grad=True)
    bn = tritonbn.BatchNorm2d(shape[1])
    bn_eval = tritonbn.BatchNorm2d(shape[1]).eval()
    ops._kernels()   # decorated now, as compiled kernels on a GPU machine, before TRITON_INTERPRET is touched
    ops._launch_hook = lambda *a, **k: None
    interp = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"   # makes CPU tensors take the Triton path (launches are recorded)
    try:
        rows.append(("python: module train forward (3 launches)", _host_us(lambda: bn(small))))
        with torch.no_grad():
            rows.append(("python: module eval forward, no_grad (1 launch)",
                         _host_us(lambda: bn_eval(small.detach()))))
        y = bn(small)
        rows.append(("python: backward (3 launches)",
                     _host_us(lambda: torch.autograd.grad(y, [small, bn.weight, bn.bias],
                                                          torch.ones_like(y), retain_graph=True))))
    finally:
        ops._launch_hook = None
        if interp is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = interp

    if cuda:
        import triton
        import triton.language as tl

        @triton.jit
        def _empty(a_ptr, b_ptr, c_ptr, d_ptr, e_ptr, f_ptr, i0, i1, i2, i3, f0, s0, s1, s2,
                   A: tl.constexpr, B: tl.constexpr, C: tl.constexpr, D: tl.constexpr):
            pass

        t = torch.empty(16, device="cuda")
        launch = lambda: _empty[(1,)](t, t, t, t, t, t, 7, 9, 11, 13, 1e-5, 3, 5, 17,  # noqa: E731
                                      A=1, B=2, C=3, D=4, num_warps=4)
        rows.append(("triton launch: empty kernel, 14 args", _host_us(launch, sync=sync)))

        x = torch.randn(shape, device=device).to(memory_format=torch.channels_last).requires_grad_(True)
        ours = tritonbn.BatchNorm2d(shape[1]).to(device)
        theirs = torch.nn.BatchNorm2d(shape[1]).to(device)
        for name, m in (("tritonbn", ours), ("torch", theirs)):
            rows.append((f"module call: {name} train forward",
                         _host_us(lambda m=m: m(x), calls=50, sync=sync)))
            rows.append((f"module call: {name} train fwd+bwd",
                         _host_us(lambda m=m: m(x).sum().backward(), calls=20, sync=sync)))
    print(f"host µs per call ({'GPU ' + torch.cuda.get_device_name() if cuda else 'CPU only'}, "
          f"torch {torch.__version__})")
    for name, us in rows:
        print(f"  {name:48s} {us:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
