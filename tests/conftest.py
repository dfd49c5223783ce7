"""Test configuration: without a CUDA device, run the Triton kernels through Triton's interpreter.

TRITON_INTERPRET is read when ``@triton.jit`` decorates a kernel, so it is set here, before any test
module imports tritonbn's kernels.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def device() -> str:
    """Where the kernels under test run: the GPU when there is one, else the CPU interpreter."""
    return "cuda" if HAS_CUDA else "cpu"


def pytest_configure(config):
    # tritonbn.export is the repository's export/ folder mapped into the package by the install
    try:
        found = importlib.util.find_spec("tritonbn.export") is not None
    except ImportError:
        found = False
    if found:
        return
    root = Path(__file__).resolve().parents[1]
    import tritonbn

    in_place = Path(tritonbn.__file__).resolve().parent == root / "tritonbn"
    if in_place and (root / "export" / "__init__.py").is_file():
        # A checkout run in place, not installed (benchmarks/gpu_check.sh on a bare GPU machine): map export/
        # as the install would, for this session only. Tests that start a new process still need the install.
        spec = importlib.util.spec_from_file_location("tritonbn.export", root / "export" / "__init__.py",
                                                      submodule_search_locations=[str(root / "export")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["tritonbn.export"] = module
        spec.loader.exec_module(module)
        tritonbn.export = module
        config._tritonbn_export_mapped = True
        return
    raise pytest.UsageError('tritonbn.export is not importable: install the checkout first, '
                            'pip install -e ".[test]" (see README)')


def pytest_report_header(config):
    if getattr(config, "_tritonbn_export_mapped", False):
        return "tritonbn.export: mapped from the checkout's export/ folder (not installed)"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device (run on a GPU machine: see README)")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


# Launcher tunings (tritonbn.ops.Tuning fields) that kernel tests run under.
TUNINGS = {
    "default": {},
    # tiny tiles and few programs, so every loop, split, merge and partial-block path is taken (up to 12
    # splits per channel tile, merged 2 per step: flat merges of one or two steps, and from 5 splits on the
    # two-level merge, its top level over up to 6 groups in several steps, the last one masked)
    "tiny-tiles": dict(reduce_tile=8, elementwise_tile=8, eval_tile=8, flat_block=32, run_block=32,
                       max_block_c=4, merge_tile=8, interpreter_programs=12, waves=1),
    # the FLAT elementwise addressing on every layout that has it (default: TILED, FLAT for some bitmasks)
    "flat": dict(flat="always", flat_block=64, run_block=64),
}


@pytest.fixture(params=list(TUNINGS))
def tuning(request, monkeypatch):
    """Run a kernel test under each launcher tuning (tritonbn.ops.TUNING)."""
    from tritonbn import ops

    monkeypatch.setattr(ops, "TUNING", ops.Tuning(**TUNINGS[request.param]))
    return request.param
