"""Packaging: the export tool installs as ``tritonbn.export`` (from the repository's top-level export/
folder) and no top-level ``export`` module is installed; ``python -m tritonbn.export`` and the
``tritonbn-export`` console script lead to it; the test extra holds what the test suite needs."""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run_elsewhere(tmp_path, *args):
    """Run this interpreter in an empty directory (not the checkout) without PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)


def test_import_path_is_tritonbn_export_only(tmp_path):
    code = ("import importlib.util, json, tritonbn.export, tritonbn.export.cli; "
            "print(json.dumps([importlib.util.find_spec('export') is None, tritonbn.export.__file__]))")
    p = _run_elsewhere(tmp_path, "-c", code)
    assert p.returncode == 0, p.stderr
    no_top_level_export, init = json.loads(p.stdout.strip().splitlines()[-1])
    assert no_top_level_export, "a top-level `export` module is importable outside the checkout"
    assert Path(init).parent.name == "export"


def test_python_m_tritonbn_export(tmp_path):
    p = _run_elsewhere(tmp_path, "-m", "tritonbn.export", "--help")
    assert p.returncode == 0 and "usage: tritonbn-export" in p.stdout, p.stderr


def test_console_script_entry_point():
    scripts = importlib.metadata.entry_points(group="console_scripts")
    (ep,) = [e for e in scripts if e.name == "tritonbn-export"]
    assert ep.value == "tritonbn.export.cli:main"


def test_test_extra_covers_the_test_suite():
    """README: `pip install -e ".[test]"` then `python -m pytest`; the benchmark smoke test plots."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {r.split(">")[0].split("=")[0].split("[")[0].strip() for r in extras["test"]}
    assert {"pytest", "hypothesis", "ruff", "matplotlib"} <= names
