"""tritonbn-export as a user meets it: user code in the current directory, output files (permissions,
paths checked before the export, all outputs or none) and one-line errors for user mistakes."""

import os
import stat
import sys

import numpy as np
import onnx
import pytest
import torch
from export_models import TinyResNet, make_model, randomize_all
from onnx import helper, numpy_helper
from tritonbn.export.cli import main

FACTORY = ["--model", "test_export_e2e:factory", "--input-shape", "2,3,8,8"]

USER_PKG = '''
import torch
from torch import nn


def factory():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        m[1].running_var.fill_(2.0)
    return m.eval()
'''


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tritonbn-export: error:"), err
    assert "internal error" not in err and "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


def test_model_factory_from_the_current_directory(tmp_path, monkeypatch, capsys):
    """A console script's sys.path starts with its bin/ directory, not the current directory."""
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "models.py").write_text(USER_PKG)
    cwd = os.getcwd()
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", cwd, str(tmp_path))])
    monkeypatch.chdir(tmp_path)
    for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
        monkeypatch.delitem(sys.modules, name)
    rc = main(["--model", "mypkg.models:factory", "--input-shape", "1,3,8,8", "-o", "m.onnx"])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "m.onnx").exists() and str(tmp_path) not in sys.path  # not left behind
    monkeypatch.delitem(sys.modules, "mypkg.models")
    monkeypatch.delitem(sys.modules, "mypkg")


@pytest.fixture
def small_onnx(tmp_path):
    """A Conv+BN ONNX file: ``--onnx-in`` writes its outputs like ``--model`` does, in a fraction of the
    time of a torch export."""
    path = tmp_path / "in" / "small.onnx"
    path.parent.mkdir()
    _conv_bn_onnx(path, ["N", 3, 8, 8])
    return str(path)


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_output_files_respect_the_umask(tmp_path, small_onnx, umask):
    old = os.umask(umask)
    try:
        out, rep = tmp_path / "m.onnx", tmp_path / "r.json"
        assert main(["--onnx-in", small_onnx, "-o", str(out), "--report", str(rep)]) == 0
    finally:
        os.umask(old)
    for f in (out, rep):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, oct(f.stat().st_mode)


def test_model_export_respects_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert main(FACTORY + ["-o", str(tmp_path / "m.onnx"), "--no-dynamic-batch"]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.onnx").stat().st_mode) == 0o644


def test_replaced_file_keeps_its_permissions(tmp_path, small_onnx):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    out.chmod(0o640)
    assert main(["--onnx-in", small_onnx, "-o", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o640 and out.read_bytes() != b"old"


@pytest.mark.parametrize("case,needle", [
    ("output_is_dir", "is a directory"),
    ("report_is_dir", "is a directory"),
    ("output_under_file", "is not a directory"),
    ("report_under_file", "is not a directory"),
    ("same_file", "name the same file"),
    ("output_is_fifo", "not a regular file"),
    ("report_is_fifo", "not a regular file"),
    ("output_is_broken_link", "not a regular file"),
])
def test_bad_output_paths_fail_before_the_export(tmp_path, capsys, monkeypatch, case, needle):
    import tritonbn.export.onnx_io as onnx_io

    def no_export(*a, **k):
        raise AssertionError("the export ran although an output path is bad")

    monkeypatch.setattr(onnx_io, "export_model_proto", no_export)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    os.mkfifo(tmp_path / "afifo")  # like a device node: os.replace would put a regular file in its place
    os.symlink(tmp_path / "nowhere", tmp_path / "alink")
    out, rep = str(tmp_path / "m.onnx"), str(tmp_path / "r.json")
    out, rep = {
        "output_is_dir": (str(tmp_path / "adir"), rep),
        "report_is_dir": (out, str(tmp_path / "adir")),
        "output_under_file": (str(tmp_path / "afile" / "m.onnx"), rep),
        "report_under_file": (out, str(tmp_path / "afile" / "r.json")),
        "same_file": (out, out),
        "output_is_fifo": (str(tmp_path / "afifo"), rep),
        "report_is_fifo": (out, str(tmp_path / "afifo")),
        "output_is_broken_link": (str(tmp_path / "alink"), rep),
    }[case]
    before = sorted(os.listdir(tmp_path))
    assert main(FACTORY + ["-o", out, "--report", rep]) == 1
    _one_line_error(capsys, needle)
    assert sorted(os.listdir(tmp_path)) == before and not os.listdir(tmp_path / "adir")
    assert stat.S_ISFIFO(os.lstat(tmp_path / "afifo").st_mode) and os.path.islink(tmp_path / "alink")


@pytest.mark.parametrize("source,flag", [("onnx", "-o"), ("onnx", "--report"), ("model", "-o"),
                                         ("model", "--report"), ("onnx_hardlink", "--report")])
def test_output_naming_an_input_is_refused(tmp_path, small_onnx, capsys, monkeypatch, source, flag):
    """``--report in.onnx`` silently overwrote the input."""
    import tritonbn.export.onnx_io as onnx_io

    monkeypatch.setattr(onnx_io, "export_model_proto", lambda *a, **k: pytest.fail("the export ran"))
    if source.startswith("onnx"):
        given = small_onnx
        if source == "onnx_hardlink":
            given = str(tmp_path / "link.onnx")
            os.link(small_onnx, given)
        src, victim = ["--onnx-in", given], small_onnx
    else:
        victim = str(tmp_path / "w.pt")
        torch.save(randomize_all(TinyResNet()).state_dict(), victim)
        src = FACTORY + ["--checkpoint", victim]
    before = open(victim, "rb").read()
    other = str(tmp_path / ("r.json" if flag == "-o" else "m.onnx"))
    outs = ["-o", victim, "--report", other] if flag == "-o" else ["-o", other, "--report", victim]
    assert main(src + outs) == 1
    _one_line_error(capsys, "is the input file of", "refusing to overwrite")
    assert open(victim, "rb").read() == before and not os.path.exists(other)


def _external_data_onnx(directory):
    """small.onnx (Conv, BN, Relu, Conv: the second conv's weight is not folded) keeping its tensors in
    small.data next to it."""
    directory.mkdir()
    _conv_bn_onnx(directory / "plain.onnx", ["N", 3, 8, 8])
    proto = onnx.load(str(directory / "plain.onnx"))
    w2 = np.random.default_rng(1).standard_normal((2, 4, 1, 1)).astype(np.float32)
    proto.graph.initializer.append(numpy_helper.from_array(w2, "W2"))
    proto.graph.node.extend([helper.make_node("Relu", ["y"], ["r"]),
                             helper.make_node("Conv", ["r", "W2"], ["z"])])
    proto.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["N", 2, 6, 6]))
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(directory / "small.onnx"), save_as_external_data=True, location="small.data",
                    size_threshold=0)
    return directory / "small.onnx"


@pytest.mark.parametrize("run_in", ["model_dir", "elsewhere"])
def test_onnx_in_with_external_data(tmp_path, monkeypatch, capsys, run_in):
    """The data was looked up relative to the current directory: from the model's directory the output
    pointed at a data file that is not next to it (exit 0, unloadable), from elsewhere an internal error."""
    import onnxruntime as ort

    src = _external_data_onnx(tmp_path / "model")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / ("model" if run_in == "model_dir" else "elsewhere"))
    out = tmp_path / "out" / "folded.onnx"
    assert main(["--onnx-in", str(src), "-o", str(out)]) == 0, capsys.readouterr().err
    assert os.listdir(tmp_path / "out") == ["folded.onnx"]
    proto = onnx.load(str(out), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    sess = ort.InferenceSession(out.read_bytes(), providers=["CPUExecutionProvider"])  # self-contained
    assert sess.run(None, {"x": np.ones((1, 3, 8, 8), np.float32)})[0].shape == (1, 2, 6, 6)


def test_onnx_in_with_missing_external_data_is_one_line(tmp_path, capsys):
    src = _external_data_onnx(tmp_path / "model")
    os.remove(tmp_path / "model" / "small.data")
    out = tmp_path / "folded.onnx"
    assert main(["--onnx-in", str(src), "-o", str(out)]) == 1
    _one_line_error(capsys, "external data")
    assert not out.exists()


def test_output_naming_the_external_data_is_refused(tmp_path, capsys):
    src = _external_data_onnx(tmp_path / "model")
    data = tmp_path / "model" / "small.data"
    before = data.read_bytes()
    assert main(["--onnx-in", str(src), "-o", str(data)]) == 1
    _one_line_error(capsys, "external data")
    assert data.read_bytes() == before


@pytest.mark.parametrize("args", [[], ["--model"], ["--onnx-in", "a.onnx", "--opset", "x"], ["--bogus"]])
def test_usage_errors_are_one_line_and_not_the_verification_code(capsys, args):
    """argparse exits 2, the code of a verification failure."""
    assert main(args) == 1
    _one_line_error(capsys, "--help")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_unwritable_directory(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(FACTORY + ["-o", str(ro / "m.onnx")]) == 1
    finally:
        ro.chmod(0o700)
    _one_line_error(capsys, "not writable")


def test_unwritable_location(tmp_path, capsys):
    """/proc accepts no new files, even from root."""
    out = tmp_path / "m.onnx"
    assert main(FACTORY + ["-o", str(out), "--report", "/proc/tritonbn-report.json"]) == 1
    _one_line_error(capsys, "not writable")
    assert not out.exists()


@pytest.mark.parametrize("source", ["model", "onnx"])
def test_failure_while_writing_leaves_no_file(tmp_path, small_onnx, capsys, monkeypatch, source):
    """The report cannot be written after all checks passed (disk full): the verified .onnx is not
    written either, and no temporary file or created directory stays behind."""
    import tritonbn.export.outputs as outputs

    real = outputs._create_temp

    def disk_full_for_report(directory, base, *a):
        if base.startswith(".r.json"):
            raise OSError(28, "No space left on device")
        return real(directory, base, *a)

    monkeypatch.setattr(outputs, "_create_temp", disk_full_for_report)
    out, rep = tmp_path / "m.onnx", tmp_path / "sub" / "r.json"
    src = FACTORY + ["--no-dynamic-batch"] if source == "model" else ["--onnx-in", small_onnx]
    assert main(src + ["-o", str(out), "--report", str(rep)]) == 1
    _one_line_error(capsys, "No space left on device")
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_wrong_input_shape_is_a_user_error(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["--model", "test_export_e2e:factory", "--input-shape", "2,3", "-o", str(out)]) == 1
    _one_line_error(capsys, "example inputs of shape 2x3")
    assert not out.exists()


@pytest.mark.parametrize("kind", ["garbage", "truncated", "pickled_object"])
def test_bad_checkpoint_is_one_line(tmp_path, capsys, kind):
    ckpt = tmp_path / "w.pt"
    if kind == "garbage":
        ckpt.write_bytes(b"\x00\x01 not a checkpoint \xff" * 20)
    else:
        torch.save({"state_dict": randomize_all(TinyResNet()).state_dict(),
                    "extra": TinyResNet if kind == "pickled_object" else 1}, ckpt)
        if kind == "truncated":
            ckpt.write_bytes(ckpt.read_bytes()[:500])
    out = tmp_path / "m.onnx"
    assert main(FACTORY + ["--checkpoint", str(ckpt), "-o", str(out)]) == 1
    _one_line_error(capsys, "checkpoint")
    assert not out.exists()


def _conv_bn_onnx(path, input_shape):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W")]
    for name, val in (("s", 1.5), ("b", 0.1), ("m", 0.2), ("v", 2.0)):
        inits.append(numpy_helper.from_array(np.full(4, val, np.float32), name))
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn")]
    onnx.save(make_model(nodes, inits, [("x", input_shape)], [("y", None)]), str(path))


def test_onnx_in_with_dynamic_hw_asks_for_an_input_shape(tmp_path, capsys):
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    _conv_bn_onnx(src, ["N", 3, "H", "W"])
    assert main(["--onnx-in", str(src), "-o", str(out)]) == 1
    _one_line_error(capsys, "--input-shape")
    assert not out.exists()
    assert main(["--onnx-in", str(src), "-o", str(out), "--input-shape", "2,3,8,8"]) == 0 and out.exists()



@pytest.mark.parametrize("args,needle", [
    (["--onnx-in", "m.onnx", "--opset", "13"], "--opset cannot be used with --onnx-in"),
    (["--onnx-in", "m.onnx", "--checkpoint", "w.pt", "--no-fold"], "--checkpoint, --no-fold cannot"),
    (["--demo", "--input-shape", "1,3,8,8"], "--input-shape cannot be used with --demo"),
])
def test_options_that_would_be_ignored_are_refused(tmp_path, capsys, args, needle):
    assert main(args + ["-o", str(tmp_path / "out.onnx")]) == 1
    _one_line_error(capsys, needle)
