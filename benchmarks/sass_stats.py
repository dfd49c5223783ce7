"""Static cost of the elementwise kernels: sm_90 SASS instructions per useful element, no GPU needed.

    python -m benchmarks.sass_stats                        # ResNet-50 / MobileNetV2 shapes, bf16 and fp32
    python -m benchmarks.sass_stats --shapes 32,256,14,14 --dtypes bfloat16 --layouts contiguous

For each (shape, dtype, layout) it records the training forward's launches (CPU tensors, launches recorded
rather than run, as ``tritonbn.compile_gate`` does), compiles the normalize kernel for sm_90 under each
elementwise addressing (TILED, FLAT: ``Tuning.flat``) and counts the SASS instructions of one thread,
divided by the elements it does useful work on (idle lanes of partial tiles count as cost, not work).

Why it matters: a memory-bound pass must issue its instructions as fast as memory delivers elements. An
H200 SM issues 4 warp-instructions (128 lane-instructions) per clock and gets ~4.3 TB/s / 132 SMs / 1.98
GHz ≈ 16 B per clock: 4 bf16 elements (2 B read + 2 B written each) or 2 fp32 ones. So a kernel over
128 / 4 = 32 instructions per bf16 element (64 per fp32 element) cannot reach the copy bandwidth, whatever
its memory access pattern. This is an upper bound from instruction issue alone; timings live in
``benchmarks/bench.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import tempfile

SHAPES = ["32,64,56,56", "32,256,14,14", "32,512,7,7", "32,128,28,28", "32,2048,7,7", "64,144,56,56",
          "64,960,7,7"]


def _sass(kernel, spec, num_warps) -> list[str]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia import compiler as nv

    from tritonbn import ops

    signature, consts, attrs = spec
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, **ops.LAUNCH_OPTIONS})
    cuobjdump = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    ins = [ln.split(";")[0].split("*/")[-1].strip() for ln in out.splitlines()
           if re.match(r"\s+/\*[0-9a-f]{4}\*/", ln)]
    return [i for i in ins if i and not i.startswith("NOP")]


def measure(shape, dtype_name: str, layout: str, flat: str, fused: bool = False) -> dict:
    """One row: the normalize kernel of a training forward; with ``fused``, of BN + add + ReLU (which
    writes the ReLU bitmask)."""
    import torch

    import tritonbn
    from tritonbn import compile_gate, ops

    dtype = getattr(torch, dtype_name)
    x = torch.randn(shape, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    if fused:
        module = tritonbn.BatchNormAct2d(shape[1]) if x.dim() == 4 else tritonbn.BatchNormAct1d(shape[1])
    else:
        module = tritonbn.BatchNorm2d(shape[1]) if x.dim() == 4 else tritonbn.BatchNorm1d(shape[1])
    z = torch.randn_like(x)
    records = []

    def hook(kernel, grid, args, constexprs, num_warps):
        if kernel.fn.__name__ == "_bn_forward_kernel":
            records.append((kernel, compile_gate._specialize(kernel, args, constexprs), num_warps, grid,
                            constexprs))

    saved = ops.TUNING
    ops.TUNING = dataclasses.replace(saved, flat=flat)
    ops._launch_hook = hook
    try:
        module(x, z) if fused else module(x)
    finally:
        ops._launch_hook = None
        ops.TUNING = saved
    kernel, spec, num_warps, grid, consts = records[0]
    ins = _sass(kernel, spec, num_warps)
    threads = grid[0] * num_warps * 32
    useful = x.numel() / threads
    layout_name = {0: "TILED", 1: "FLAT_CL", 2: "FLAT_PLANAR"}[consts["LAYOUT"]]
    return {"shape": list(shape), "dtype": dtype_name, "layout": layout, "addressing": layout_name,
            "bitmask": consts["WRITE_MASK"],
            "tile": [consts["BLOCK_S"], consts["BLOCK_C"]], "instructions_per_thread": len(ins),
            "useful_elements_per_thread": round(useful, 2),
            "instructions_per_element": round(len(ins) / useful, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=";".join(SHAPES), help="';'-separated N,C,H,W shapes")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--layouts", default="contiguous,channels_last")
    p.add_argument("--fused", action="store_true", help="BN + add + ReLU (writes the ReLU bitmask)")
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)   # compiled for sm_90, never interpreted
    print(f"{'shape':>18} {'dtype':>8} {'layout':>13} {'addressing':>11} {'tile':>9} {'instr/thread':>12} "
          f"{'instr/element':>13}")
    for shape in args.shapes.split(";"):
        shape = tuple(int(v) for v in shape.split(","))
        for dtype in args.dtypes.split(","):
            for layout in args.layouts.split(","):
                for flat in ("auto", "always"):
                    r = measure(shape, dtype, layout, flat, args.fused)
                    print(f"{str(tuple(r['shape'])):>18} {dtype:>8} {layout:>13} {r['addressing']:>11} "
                          f"{'x'.join(map(str, r['tile'])):>9} {r['instructions_per_thread']:>12} "
                          f"{r['instructions_per_element']:>13}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
