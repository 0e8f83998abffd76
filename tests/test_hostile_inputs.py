"""Hostile inputs (issue 23), command by command: every bad or hostile input ends in exit code 2 and one line
``error: <problem>; <fix>``, no traceback, nothing left at or beside the target, and no input file changed (hashed
before and after). Hand-made instances of each class, plus generated ones (hypothesis: named-array files of random
names, ranks, dtypes and shapes; random bytes and truncations of model, data, statistics and scale files).

One tiny exported model (the session's `tiny_onnx`) serves every case; files derived from it are made once per module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx.external_data_helper
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_cli_compare import calib_file

PROFILE = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                          HealthCheck.data_too_large])
QUANTIZE = ("--method", "quarot", "--no-progress")  # no statistics needed: the cheapest full quantize run
CALIB = ("--calib-samples", "1", "--calib-steps", "2", "--no-progress")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else stat.filemode(path.lstat().st_mode)


def snapshot(*folders: Path) -> dict[Path, str]:
    """Every entry under `folders` (links not followed) with its content hash (files) or mode (the rest)."""
    out = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            regular = path.is_file() and not path.is_symlink()
            out[path] = digest(path) if regular else stat.filemode(path.lstat().st_mode)
    return out


def assert_refused(result, *expected: str) -> str:
    lines = result.err.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.err[-2000:], result.out[-500:])
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err[-2000:]
    assert "Traceback" not in result.err + result.out
    assert "; " in lines[0], lines[0]  # the problem; the fix
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def refused_harmlessly(hn_cli, args, folder: Path, *expected: str) -> str:
    """Run `args`; refused as above, and `folder` (inputs and targets) exactly as before."""
    before = snapshot(folder)
    line = assert_refused(hn_cli(*args), *expected)
    assert snapshot(folder) == before
    return line


@pytest.fixture(scope="module")
def quantized(tiny_onnx, tmp_path_factory) -> Path:
    """tiny quantized with QuaRot (qdq) by the CLI."""
    from tests.cli_runner import run_cli

    out = tmp_path_factory.mktemp("quantized") / "tiny.quarot.onnx"
    assert run_cli([str(tiny_onnx), *QUANTIZE, "-o", str(out)]) == 0
    return out


@pytest.fixture
def work(tiny_onnx, tmp_path) -> Path:
    """A folder holding a copy of the tiny model."""
    shutil.copy(tiny_onnx, tmp_path / "tiny.onnx")
    return tmp_path


def _external(src: Path, dst: Path, location: str) -> None:
    """`src` saved as `dst` with all weights in one external file named `location` (relative to dst's folder)."""
    model = onnx.load(src)
    onnx.external_data_helper.convert_model_to_external_data(model, all_tensors_to_one_file=True, location=location,
                                                             size_threshold=0)
    onnx.save(model, dst)


def _relocate(path: Path, location: str) -> None:
    model = onnx.load(path, load_external_data=False)
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, path)


# ---------------------------------------------------------------------------------------------------------------
# 1. outputs that are not regular files
# ---------------------------------------------------------------------------------------------------------------

def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _device(path: Path) -> None:
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
    except PermissionError:
        pytest.skip("creating a device node needs root")


def _folder(path: Path) -> None:
    path.mkdir()


def _link_to_fifo(path: Path) -> None:
    os.mkfifo(path.with_name("real_fifo"))
    path.symlink_to("real_fifo")


def _link_to_folder(path: Path) -> None:
    path.with_name("real_dir").mkdir()
    path.symlink_to("real_dir")


NOT_REGULAR = {"fifo": _fifo, "device": _device, "folder": _folder, "link to fifo": _link_to_fifo,
               "link to folder": _link_to_folder}

OUTPUT_ARGS = {
    "quantize -o": lambda m, t: [m, *QUANTIZE, "-o", t],
    "quantize -o, its .data": lambda m, t: [m, *QUANTIZE, "-o", t.with_name("q.onnx")],  # t is q.onnx.data
    "--save-stats": lambda m, t: [m, "--method", "hadanorm", "--save-stats", t, "-o", t.with_name("q.onnx"), *CALIB],
    "--save-act-scales": lambda m, t: [m, "--method", "quarot", "--act-granularity", "timestep", "--save-act-scales",
                                       t, "-o", t.with_name("q.onnx"), *CALIB],
    "export -o": lambda m, t: ["export", "--preset", "tiny", "-o", t],
    "diff --json": lambda m, t: ["diff", m, m, "--steps", "0", "--json", t],
}


@pytest.mark.parametrize("kind", list(NOT_REGULAR))
@pytest.mark.parametrize("option", list(OUTPUT_ARGS))
def test_output_that_is_not_a_regular_file_is_refused(hn_cli, work, option, kind):
    target = work / ("q.onnx.data" if option == "quantize -o, its .data" else "target")
    NOT_REGULAR[kind](target)
    refused_harmlessly(hn_cli, OUTPUT_ARGS[option](work / "tiny.onnx", target), work, "not a regular file")
    mode = target.stat().st_mode  # still what it was (a link still leads to it)
    assert {"fifo": stat.S_ISFIFO, "device": stat.S_ISCHR}.get(kind.removeprefix("link to "), stat.S_ISDIR)(mode)


@pytest.mark.parametrize("kind", ["fifo", "file"])
def test_report_folder_that_is_not_a_folder(hn_cli, work, kind):
    target = work / "reports"
    _fifo(target) if kind == "fifo" else target.write_text("a file\n")
    for args in (["compare", work / "tiny.onnx", "--methods", "none", "--bits", "w4a4", "--out", target],
                 ["sensitivity", work / "tiny.onnx", "--methods", "none", "--out", target],
                 ["compare", work / "tiny.onnx", "--methods", "none", "--bits", "w4a4", "--keep-models", target,
                  "--out", work / "cmp"],
                 ["demo", "--out", target]):
        refused_harmlessly(hn_cli, args, work, "not a folder")


@pytest.mark.parametrize("command, name", [("compare", "results.json"), ("sensitivity", "sensitivity.png"),
                                           ("demo", "latency.json")])
def test_report_file_that_is_a_fifo(hn_cli, work, command, name):
    (work / "reports").mkdir()
    os.mkfifo(work / "reports" / name)
    args = {"compare": ["compare", work / "tiny.onnx"], "sensitivity": ["sensitivity", work / "tiny.onnx"],
            "demo": ["demo"]}[command]
    refused_harmlessly(hn_cli, [*args, "--out", work / "reports"], work, "not a regular file")


# ---------------------------------------------------------------------------------------------------------------
# 2. never delete or overwrite what an input reads
# ---------------------------------------------------------------------------------------------------------------

def test_output_whose_data_file_is_the_inputs_weights(hn_cli, tiny_onnx, tmp_path):
    """The stale-.data cleanup must not delete the input's weights (the input still loads afterwards)."""
    _external(tiny_onnx, tmp_path / "fp32.onnx", "tiny_ext.onnx.data")
    refused_harmlessly(hn_cli, [tmp_path / "fp32.onnx", *QUANTIZE, "-o", tmp_path / "tiny_ext.onnx"], tmp_path,
                       "tiny_ext.onnx.data", "which the input reads")
    assert hn_cli("layers", tmp_path / "fp32.onnx").exit_code == 0


def test_no_output_may_be_an_input(hn_cli, tiny_onnx, tmp_path):
    from tests.cli_runner import run_cli

    _external(tiny_onnx, tmp_path / "fp32.onnx", "w.bin")
    model, calib, stats = tmp_path / "fp32.onnx", calib_file(tmp_path / "calib.npz"), tmp_path / "stats.npz"
    assert run_cli([str(model), "--method", "hadanorm", "--save-stats", str(stats), "-o", str(tmp_path / "first.onnx"),
                    *CALIB]) == 0
    (tmp_path / "first.onnx").unlink()
    hadanorm = ("--method", "hadanorm", *CALIB)
    for args in ([model, *QUANTIZE, "-o", model],  # the input itself
                 [model, *QUANTIZE, "-o", tmp_path / "w.bin"],  # its external data
                 [model, *hadanorm, "--stats", stats, "-o", stats],
                 [model, *hadanorm, "--calib", calib, "-o", calib],
                 [model, *hadanorm, "--calib", calib, "--save-stats", calib, "-o", tmp_path / "q.onnx"],
                 [model, *hadanorm, "--stats", stats, "--save-stats", tmp_path / "w.bin", "-o", tmp_path / "q.onnx"],
                 ["diff", model, model, "--steps", "0", "--json", model],
                 ["diff", model, tiny_onnx, "--steps", "0", "--json", tmp_path / "w.bin"],
                 ["diff", tiny_onnx, tiny_onnx, "--steps", "0", "--inputs", calib, "--json", calib]):
        refused_harmlessly(hn_cli, args, tmp_path, "input")


def test_fifo_as_any_input_is_refused_not_read(work, saved):
    """A FIFO (or device) given as an input would block a reader forever: refused without opening it. Run in a
    subprocess with a timeout, so that a regression fails instead of hanging the suite."""
    fifo = work / "fifo"
    os.mkfifo(fifo)
    model, out = str(work / "tiny.onnx"), str(work / "q.onnx")
    runs = [[str(fifo), *QUANTIZE, "-o", out],
            [model, "--method", "hadanorm", "--calib", str(fifo), "-o", out, "--no-progress"],
            [model, "--method", "hadanorm", "--stats", str(fifo), "-o", out, "--no-progress"],
            [model, "--method", "quarot", "--act-scales", str(fifo), "-o", out, "--no-progress"],
            ["diff", model, model, "--steps", "0", "--inputs", str(fifo)],
            ["compare", model, "--inputs", str(fifo), "--out", str(work / "cmp")],
            ["export", "--config", str(fifo), "-o", str(work / "e.onnx")]]
    before = snapshot(work)
    result = _run_python("""
        import json, sys
        from hn_export.cli import main
        for args in json.loads(sys.argv[1]):
            try:
                main(args)
                print(0, flush=True)
            except SystemExit as exc:
                print(exc.code, flush=True)
    """, json.dumps(runs), timeout=120)
    assert result.stdout.split() == ["2"] * len(runs), (result.stdout, result.stderr[-3000:])
    lines = result.stderr.strip().splitlines()
    reasons = ("not a regular file", "not an activation scale table", "not a calibration statistics file")
    assert len(lines) == len(runs), lines
    assert all(line.startswith("error: ") and any(r in line for r in reasons) for line in lines), lines
    assert snapshot(work) == before


# ---------------------------------------------------------------------------------------------------------------
# 3. external data outside the model's folder
# ---------------------------------------------------------------------------------------------------------------

def _outside(kind: str, tiny: Path, root: Path) -> Path:
    folder = root / "models"
    folder.mkdir()
    _external(tiny, folder / "m.onnx", "w.data")
    shutil.move(folder / "w.data", root / "secret.bin")  # the bytes live outside the model's folder
    if kind == "dotdot":
        _relocate(folder / "m.onnx", "../secret.bin")
    elif kind == "absolute":
        _relocate(folder / "m.onnx", str(root / "secret.bin"))
    else:
        (folder / "w.data").symlink_to(root / "secret.bin")
    return folder / "m.onnx"


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_external_data_outside_the_folder_is_not_read(hn_cli, tiny_onnx, tmp_path, kind):
    model = _outside(kind, tiny_onnx, tmp_path)
    for args in ([model, *QUANTIZE, "-o", tmp_path / "q.onnx"], ["layers", model],
                 ["diff", model, tiny_onnx, "--steps", "0"], ["diff", tiny_onnx, model, "--steps", "0"],
                 ["compare", model, "--methods", "none", "--bits", "w4a4", "--out", tmp_path / "cmp"]):
        line = refused_harmlessly(hn_cli, args, tmp_path, "secret.bin" if kind != "symlink" else "w.data")
        assert "folder" in line


@pytest.mark.parametrize("kind", ["NUL byte", "name too long", "link loop", "fifo", "folder"])
def test_external_data_that_cannot_be_read(hn_cli, tiny_onnx, tmp_path, kind):
    _external(tiny_onnx, tmp_path / "m.onnx", "w.data")
    location = {"NUL byte": "w\x00.data", "name too long": "x" * 5000}.get(kind, "odd.data")
    _relocate(tmp_path / "m.onnx", location)
    if kind == "link loop":
        (tmp_path / "odd.data").symlink_to("odd.data")
    elif kind == "fifo":
        os.mkfifo(tmp_path / "odd.data")
    elif kind == "folder":
        (tmp_path / "odd.data").mkdir()
    for args in ([tmp_path / "m.onnx", *QUANTIZE, "-o", tmp_path / "q.onnx"], ["layers", tmp_path / "m.onnx"]):
        line = refused_harmlessly(hn_cli, args, tmp_path, "external data")
        assert len(line) < 400, line


# ---------------------------------------------------------------------------------------------------------------
# 5. graphs: pass errors and malformed graphs, already quantized
# ---------------------------------------------------------------------------------------------------------------

def test_pass_error_is_one_line(hn_cli, work):
    refused_harmlessly(hn_cli, [work / "tiny.onnx", "--method", "hqdm", "--hadamard", "full", "--format", "fused",
                                "-o", work / "q.onnx", "--no-progress"], work, "the Hadamard mixes 288 input channels")


def _cycle(model: onnx.ModelProto) -> None:
    first = next(n for n in model.graph.node if n.op_type == "MatMul")
    consumer = next(n for n in model.graph.node if first.output[0] in n.input)
    first.input[0] = consumer.output[0]


def _dangling(model: onnx.ModelProto) -> None:
    next(n for n in model.graph.node if n.op_type == "MatMul").input[0] = "nowhere"


def _no_output_shape(model: onnx.ModelProto) -> None:
    model.graph.output[0].type.tensor_type.ClearField("shape")


MALFORMED = {"cycle": _cycle, "dangling input": _dangling, "output without shape": _no_output_shape}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_graph_is_refused_on_load(hn_cli, work, kind):
    model = onnx.load(work / "tiny.onnx")
    MALFORMED[kind](model)
    bad = work / "bad.onnx"
    onnx.save(model, bad)
    for args in ([bad, *QUANTIZE, "-o", work / "q.onnx"], ["layers", bad], ["diff", bad, work / "tiny.onnx"],
                 ["compare", bad, "--out", work / "cmp"], ["sensitivity", bad, "--out", work / "sens"]):
        refused_harmlessly(hn_cli, args, work, "is not a valid ONNX graph")


def test_already_quantized_graph_is_refused(hn_cli, work, quantized):
    shutil.copy(quantized, work / "q.onnx")
    for args in ([work / "q.onnx", *QUANTIZE, "-o", work / "qq.onnx"],
                 [work / "q.onnx", "--method", "hadanorm", "-o", work / "qq.onnx", *CALIB],
                 ["compare", work / "q.onnx", "--out", work / "cmp"], ["sensitivity", work / "q.onnx", "--out",
                                                                         work / "sens"]):
        refused_harmlessly(hn_cli, args, work, "already quantized by hn-export (method quarot, w4a4)")


def test_graph_of_no_family(hn_cli, work):
    model = onnx.load(work / "tiny.onnx")
    renames = {"hidden_states": "x", "timestep": "t", "encoder_hidden_states": "c"}
    for value in model.graph.input:
        value.name = renames.get(value.name, value.name)
    for node in model.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
    del model.metadata_props[:]
    onnx.save(model, work / "nofam.onnx")
    for args in ([work / "nofam.onnx", "--method", "hadanorm", "-o", work / "q.onnx", *CALIB],
                 ["diff", work / "nofam.onnx", work / "nofam.onnx"],
                 ["sensitivity", work / "nofam.onnx", "--out", work / "sens"]):
        refused_harmlessly(hn_cli, args, work, "match no supported model family")


# ---------------------------------------------------------------------------------------------------------------
# 7, 9, 10, 11: options
# ---------------------------------------------------------------------------------------------------------------

BAD_OPTIONS = {
    "--include regex": (lambda m, w: [m, "--include", "(", "-o", w / "q.onnx"], "not a valid regular expression"),
    "--exclude regex": (lambda m, w: [m, "--exclude", "[a", "-o", w / "q.onnx"], "not a valid regular expression"),
    "layers --include regex": (lambda m, w: ["layers", m, "--include", "*x"], "not a valid regular expression"),
    "--alpha nan": (lambda m, w: [m, "--method", "smoothquant", "--alpha", "nan", "-o", w / "q.onnx"],
                    "not a finite number"),
    "--min-sqnr nan": (lambda m, w: ["diff", m, m, "--steps", "0", "--min-sqnr", "nan"], "not a finite number"),
    "--hadamard-block 7": (lambda m, w: [m, "--method", "hadanorm", "--hadamard", "block", "--hadamard-block", "7",
                                         "-o", w / "q.onnx", *CALIB], "power of two"),
    "--hadamard-block 64 on width 72": (lambda m, w: [m, "--method", "hadanorm", "--hadamard", "block",
                                                      "--hadamard-block", "64", "-o", w / "q.onnx", *CALIB],
                                        "width 72 is not a multiple of the Hadamard block size 64"),
    "compare --methods ''": (lambda m, w: ["compare", m, "--methods", "", "--out", w / "cmp"], "names no value"),
    "compare empty grid": (lambda m, w: ["compare", m, "--formats", "fused", "--act-granularities", "timestep",
                                         "--out", w / "cmp"], "grid is empty"),
    "export num_layers two": (lambda m, w: ["export", "--config", _config(w, num_layers="two"), "-o", w / "e.onnx"],
                              "num_layers is 'two'"),
    "export num_layers -1": (lambda m, w: ["export", "--config", _config(w, num_layers=-1), "-o", w / "e.onnx"],
                             "num_layers is -1"),
}


def _config(folder: Path, **change) -> Path:
    from models.presets import PRESETS

    path = folder / "config.json"
    path.write_text(json.dumps({"_class_name": "PixArtTransformer2DModel", **PRESETS["tiny"].config, **change}))
    return path


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_option(hn_cli, work, case, monkeypatch):
    make, expected = BAD_OPTIONS[case]
    import hn_export.calibration

    monkeypatch.setattr(hn_export.calibration, "trajectory", _no_work)  # every refusal comes before calibration
    refused_harmlessly(hn_cli, make(work / "tiny.onnx", work), work, expected)


def _no_work(*args, **kwargs):
    raise AssertionError("work started before the options were checked")


def test_compare_reference_at_another_resolution(hn_cli, work, monkeypatch):
    model = onnx.load(work / "tiny.onnx")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value, dims[3].dim_value = 16, 16
    onnx.save(model, work / "ref16.onnx")
    import hn_export.calibration

    monkeypatch.setattr(hn_export.calibration, "trajectory", _no_work)
    refused_harmlessly(hn_cli, ["compare", work / "tiny.onnx", "--reference", work / "ref16.onnx", "--out",
                                work / "cmp"], work, "same resolution")


def _nan_weights(src: Path, dst: Path) -> None:
    model = onnx.load(src)
    init = next(i for i in model.graph.initializer if i.name.endswith("proj_out.bias"))
    array = onnx.numpy_helper.to_array(init).copy()
    array[...] = np.nan
    init.CopyFrom(onnx.numpy_helper.from_array(array, init.name))
    onnx.save(model, dst)


def test_nan_sqnr_fails_the_gate_and_json_stays_valid(hn_cli, work):
    _nan_weights(work / "tiny.onnx", work / "nan.onnx")
    result = hn_cli("diff", work / "nan.onnx", work / "tiny.onnx", "--steps", "0", "--min-sqnr", "15", "--json",
                    work / "d.json")
    assert result.exit_code == 1, (result.exit_code, result.err)
    assert "SQNR is NaN" in result.err
    text = (work / "d.json").read_text()
    assert "NaN" not in text
    assert json.loads(text)["outputs"]["single_call"]["sqnr_db"] is None


def test_diff_without_family_runs_on_inputs(hn_cli, work):
    """`diff --inputs` on a graph of no known family (the README says diff takes it): single call only."""
    model = onnx.load(work / "tiny.onnx")
    del model.metadata_props[:]
    for value in model.graph.input:
        if value.name == "timestep":
            value.name = "t"
    for node in model.graph.node:
        node.input[:] = ["t" if n == "timestep" else n for n in node.input]
    onnx.save(model, work / "nofam.onnx")
    data = dict(np.load(calib_file(work / "c.npz")))
    np.savez(work / "in.npz", t=data.pop("timestep"), **data)
    result = hn_cli("diff", work / "nofam.onnx", work / "nofam.onnx", "--steps", "0", "--inputs", work / "in.npz")
    assert result.exit_code == 0, result.err
    refused_harmlessly(hn_cli, ["diff", work / "nofam.onnx", work / "nofam.onnx", "--inputs", work / "in.npz"], work,
                       "--steps 0")


# ---------------------------------------------------------------------------------------------------------------
# 4. named-array files (--calib / --inputs), hand-made and generated
# ---------------------------------------------------------------------------------------------------------------

def _arrays(rows: int = 2, **change) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    data = {"hidden_states": rng.standard_normal((rows, 4, 8, 8)).astype(np.float32),
            "timestep": np.linspace(50.0, 900.0, rows).astype(np.float32),
            "encoder_hidden_states": (rng.standard_normal((rows, 7, 32)) * 0.2).astype(np.float32)}
    data.update(change)
    return {k: v for k, v in data.items() if v is not None}


BAD_ARRAYS = {
    "rank of timestep": (_arrays(timestep=np.ones((2, 1), np.float32)), "rank"),
    "caption width": (_arrays(encoder_hidden_states=np.zeros((2, 7, 16), np.float32)), "the model takes [N, ?, 32]"),
    "latent rank": (_arrays(hidden_states=np.zeros((2, 4, 64), np.float32)), "rank"),
    "text array": (_arrays(timestep=np.array(["a", "b"])), "not numbers"),
    "rows disagree": (_arrays(timestep=np.ones(3, np.float32)), "different sample counts"),
    "zero rows": (_arrays(rows=0), "empty axis"),
    "empty caption": (_arrays(encoder_hidden_states=np.zeros((2, 0, 32), np.float32)), "empty axis"),
    "no arrays": ({}, "lacks arrays"),
}


@pytest.mark.parametrize("case", list(BAD_ARRAYS))
@pytest.mark.parametrize("command", ["quantize --calib", "compare --calib", "compare --inputs", "sensitivity --inputs",
                                     "diff --inputs"])
def test_bad_named_arrays(hn_cli, work, monkeypatch, case, command):
    arrays, expected = BAD_ARRAYS[case]
    np.savez(work / "bad.npz", **arrays)
    import hn_export.calibration

    monkeypatch.setattr(hn_export.calibration, "trajectory", _no_work)
    model, bad, out = work / "tiny.onnx", work / "bad.npz", work / "out"
    args = {"quantize --calib": [model, "--method", "hadanorm", "--calib", bad, "-o", out, "--no-progress"],
            "compare --calib": ["compare", model, "--calib", bad, "--out", out],
            "compare --inputs": ["compare", model, "--inputs", bad, "--out", out],
            "sensitivity --inputs": ["sensitivity", model, "--inputs", bad, "--out", out],
            "diff --inputs": ["diff", model, model, "--steps", "0", "--inputs", bad, "--json", out]}[command]
    refused_harmlessly(hn_cli, args, work, expected)


NAMES = st.sampled_from(["hidden_states", "timestep", "encoder_hidden_states", "extra", "sample"])
DTYPES = st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.int8, np.bool_, np.complex64, "U3"])


@st.composite
def named_arrays(draw) -> dict[str, np.ndarray]:
    names = draw(st.lists(NAMES, min_size=0, max_size=5, unique=True))
    out = {}
    for name in names:
        shape = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 7, 8, 32]), min_size=0, max_size=4)))
        dtype = draw(DTYPES)
        array = np.zeros(shape, dtype=dtype) if dtype != "U3" else np.full(shape, "abc")
        if array.size and np.dtype(dtype).kind == "f" and draw(st.booleans()):
            array.flat[0] = draw(st.sampled_from([np.nan, np.inf, 1e30]))
        out[name] = array
    return out


@st.composite
def mutated_arrays(draw) -> dict[str, np.ndarray]:
    """A valid file with one array changed: another dtype, rank or size on one axis, or left out."""
    rows = draw(st.sampled_from([1, 2, 3, 4]))
    data = _arrays(rows=rows)
    name = draw(st.sampled_from(sorted(data)))
    change = draw(st.sampled_from(["dtype", "rank", "axis", "drop"]))
    array = data[name]
    if change == "dtype":
        dtype = draw(DTYPES)
        data[name] = np.full(array.shape, "abc") if dtype == "U3" else array.astype(dtype)
    elif change == "rank":
        data[name] = array.reshape(*array.shape, 1) if draw(st.booleans()) else array.reshape(-1)
    elif change == "axis":
        axis = draw(st.integers(0, array.ndim - 1))
        shape = list(array.shape)
        shape[axis] = draw(st.sampled_from([0, 1, 5, 9]))
        data[name] = np.zeros(shape, array.dtype)
    else:
        del data[name]
    return data


@settings(PROFILE, max_examples=30)
@given(arrays=st.one_of(named_arrays(), mutated_arrays(), mutated_arrays()))
def test_generated_named_arrays(hn_cli, tiny_onnx, tmp_path_factory, arrays):
    """Any named-array file: accepted (exit 0) or refused in one line; never a traceback, never a change."""
    work = tmp_path_factory.mktemp("npz")
    shutil.copy(tiny_onnx, work / "tiny.onnx")
    np.savez(work / "in.npz", **arrays)
    for args in (["diff", work / "tiny.onnx", work / "tiny.onnx", "--steps", "0", "--inputs", work / "in.npz"],
                 [work / "tiny.onnx", "--method", "hadanorm", "--transform-only", "--calib", work / "in.npz", "-o",
                  work / "q.onnx", "--no-progress"]):
        before = snapshot(work)
        result = hn_cli(*args)
        if result.exit_code == 0:
            continue
        assert_refused(result)
        assert snapshot(work) == before


# ---------------------------------------------------------------------------------------------------------------
# 6. statistics and scale files: contents
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tiny_onnx, tmp_path_factory) -> dict[str, Path]:
    """Statistics and a per-timestep scale table of tiny, saved by the CLI."""
    from tests.cli_runner import run_cli

    folder = tmp_path_factory.mktemp("saved")
    stats, scales = folder / "stats.npz", folder / "scales.json"
    assert run_cli([str(tiny_onnx), "--method", "hadanorm", "--act-granularity", "timestep", "--save-stats",
                    str(stats), "--save-act-scales", str(scales), "-o", str(folder / "q.onnx"), *CALIB]) == 0
    return {"stats": stats, "scales": scales}


def _edit_stats(src: Path, dst: Path, edit) -> None:
    with np.load(src) as data:
        arrays = {k: data[k] for k in data.files}
    edit(arrays)
    np.savez(dst, **arrays)


def _first_site(arrays) -> str:
    return next(k for k in arrays if k != "__meta__").rpartition("/")[0]


BAD_STATS = {
    "broken meta": (lambda a: a.update(__meta__=np.array("{not json")), "not a calibration statistics file"),
    "meta not an object": (lambda a: a.update(__meta__=np.array("[1, 2]")), "broken __meta__"),
    "wrong width": (lambda a: a.update({f"{_first_site(a)}/absmax": np.ones(5), f"{_first_site(a)}/centered_absmax":
                                        np.ones(5)}), "has 5 channels"),
    "wrong rank": (lambda a: a.update({f"{_first_site(a)}/absmax": np.ones((2, 72))}), "one float per channel"),
    "negative": (lambda a: a.update({f"{_first_site(a)}/absmax": -a[f"{_first_site(a)}/absmax"]}),
                 "negative or non-finite"),
    "missing site": (lambda a: [a.pop(k) for k in [k for k in a if k.startswith(_first_site(a) + "/")]],
                     "no entry for activation"),
    "renamed site": (lambda a: [a.update({k.replace(_first_site(a), "renamed", 1): a.pop(k)})
                                for k in [k for k in a if k.startswith(_first_site(a) + "/")]],
                     "no entry for activation"),
}


@pytest.mark.parametrize("case", list(BAD_STATS))
def test_bad_statistics(hn_cli, work, saved, case):
    edit, expected = BAD_STATS[case]
    _edit_stats(saved["stats"], work / "stats.npz", edit)
    refused_harmlessly(hn_cli, [work / "tiny.onnx", "--method", "hadanorm", "--stats", work / "stats.npz", "-o",
                                work / "q.onnx", *CALIB], work, expected)


BAD_SCALES = {
    "timesteps a string": (lambda d: d.update(timesteps="999, 500"), "not a flat list of numbers"),
    "timesteps a scalar": (lambda d: d.update(timesteps=999), "not a flat list of numbers"),
    "timesteps nested": (lambda d: d.update(timesteps=[[t] for t in d["timesteps"]]), "not a flat list of numbers"),
    "absmax nested": (lambda d: d["absmax"].update({k: [[v] for v in vs] for k, vs in d["absmax"].items()}),
                      "not a flat list of numbers"),
    "absmax 1e300": (lambda d: d["absmax"].update({k: [1e300] * len(vs) for k, vs in d["absmax"].items()}),
                     "outside 0.."),
    "absmax string": (lambda d: d["absmax"].update({k: "big" for k in d["absmax"]}), "not a flat list of numbers"),
    "not an object": (lambda d: (d.clear(), d.update(absmax=[1, 2])), "is not an activation scale table"),
    "timestep_input unknown": (lambda d: d.update(timestep_input="t"), "is not an input of the graph"),
}


@pytest.mark.parametrize("case", list(BAD_SCALES))
def test_bad_act_scales(hn_cli, work, saved, case):
    edit, expected = BAD_SCALES[case]
    data = json.loads(saved["scales"].read_text())
    edit(data)
    (work / "scales.json").write_text(json.dumps(data))
    refused_harmlessly(hn_cli, [work / "tiny.onnx", "--method", "quarot", "--act-scales", work / "scales.json", "-o",
                                work / "q.onnx", *CALIB], work, expected)


# ---------------------------------------------------------------------------------------------------------------
# random bytes and truncations of every file kind
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def external(tiny_onnx, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ext")
    _external(tiny_onnx, folder / "m.onnx", "m.onnx.data")
    return folder


@PROFILE
@given(kind=st.sampled_from(["onnx", "data", "stats", "scales"]), cut=st.floats(0.0, 0.999),
       noise=st.one_of(st.none(), st.binary(min_size=1, max_size=64)))
def test_truncated_or_garbage_files(hn_cli, tiny_onnx, external, saved, tmp_path_factory, kind, cut, noise):
    work = tmp_path_factory.mktemp("cut")
    shutil.copy(tiny_onnx, work / "tiny.onnx")
    shutil.copytree(external, work / "ext")
    shutil.copy(saved["stats"], work / "stats.npz")
    shutil.copy(saved["scales"], work / "scales.json")
    victim = {"onnx": work / "tiny.onnx", "data": work / "ext" / "m.onnx.data", "stats": work / "stats.npz",
              "scales": work / "scales.json"}[kind]
    data = victim.read_bytes()
    victim.write_bytes(noise if noise is not None else data[: int(len(data) * cut)])
    model = work / "ext" / "m.onnx" if kind == "data" else work / "tiny.onnx"
    extra = {"stats": ["--method", "hadanorm", "--stats", work / "stats.npz"],
             "scales": ["--method", "quarot", "--act-scales", work / "scales.json"]}.get(kind, list(QUANTIZE))
    before = snapshot(work)
    result = hn_cli(model, *extra, "-o", work / "q.onnx", *CALIB)
    assert_refused(result)
    assert snapshot(work) == before


# ---------------------------------------------------------------------------------------------------------------
# 8. side outputs are checked before the work starts
# ---------------------------------------------------------------------------------------------------------------

SIDE_OUTPUTS = {
    "--save-stats missing folder": lambda m, w: [m, "--method", "hadanorm", "--save-stats", w / "no" / "s.npz", "-o",
                                                 w / "q.onnx", *CALIB],
    "--save-act-scales under a file": lambda m, w: [m, "--method", "quarot", "--act-granularity", "timestep",
                                                    "--save-act-scales", w / "tiny.onnx" / "s.json", "-o",
                                                    w / "q.onnx", *CALIB],
    "diff --json missing folder": lambda m, w: ["diff", m, m, "--json", w / "no" / "d.json"],
    "compare --out under a file": lambda m, w: ["compare", m, "--out", w / "tiny.onnx" / "cmp"],
    "sensitivity --out under a file": lambda m, w: ["sensitivity", m, "--out", w / "tiny.onnx" / "sens"],
    "compare --keep-models under a file": lambda m, w: ["compare", m, "--keep-models", w / "tiny.onnx" / "k",
                                                        "--out", w / "cmp"],
    "--save-stats equal to -o": lambda m, w: [m, "--method", "hadanorm", "--save-stats", w / "q.onnx", "-o",
                                              w / "q.onnx", *CALIB],
}


@pytest.mark.parametrize("case", list(SIDE_OUTPUTS))
def test_side_output_checked_before_work(hn_cli, work, monkeypatch, case):
    import hn_export.calibration
    import hn_export.evaluate

    monkeypatch.setattr(hn_export.calibration, "trajectory", _no_work)
    monkeypatch.setattr(hn_export.evaluate, "Denoiser", _no_work)
    refused_harmlessly(hn_cli, SIDE_OUTPUTS[case](work / "tiny.onnx", work), work)


def test_full_disk_leaves_no_temporary_statistics(work, saved, monkeypatch):
    from hn_export import model_files
    from hn_export.calibration import CalibrationStats
    from hn_export.errors import UserError

    stats = CalibrationStats.load(saved["stats"])
    real = Path.write_bytes

    def full(self, data):
        real(self, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_files.Path, "write_bytes", full)
    before = snapshot(work)
    with pytest.raises(UserError, match="No space left on device"):
        stats.save(work / "s.npz")
    assert snapshot(work) == before


# ---------------------------------------------------------------------------------------------------------------
# 12, 13: signals and messages (subprocesses: the signal, and onnxruntime's own stderr lines)
# ---------------------------------------------------------------------------------------------------------------

def _run_python(code: str, *args, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=Path(__file__).parents[1])


def test_sigterm_during_model_write_leaves_nothing(work):
    """SIGTERM (timeout, CI cancel, docker stop) while the model is being written: exit 2, one line, no temporary
    folder or partial file beside the target."""
    result = _run_python("""
        import os, signal, sys
        import onnx_ir as ir
        from hn_export import model_files
        real = ir.save
        def save(model, path, **kw):
            real(model, path, **kw)  # a partial file inside the temporary folder, then the signal
            os.kill(os.getpid(), signal.SIGTERM)
        model_files.ir.save = save
        from hn_export.cli import main
        main(sys.argv[1:])
    """, work / "tiny.onnx", *QUANTIZE, "-o", work / "q.onnx")
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: terminated (SIGTERM); no output file was written"], result.stderr[-2000:]
    assert sorted(p.name for p in work.iterdir()) == ["tiny.onnx"]


def test_bad_kernel_isa_is_named(kernel_library, work, quantized):
    """An invalid HADANORM_KERNELS_ISA: one line naming it (not a missing library), no onnxruntime log lines."""
    from tests.cli_runner import run_cli

    fused = work / "fused.onnx"
    assert run_cli([str(work / "tiny.onnx"), *QUANTIZE, "--format", "fused", "-o", str(fused)]) == 0
    for value, expected in (("bogus", "HADANORM_KERNELS_ISA=bogus is not a kernel path"),
                            ("neondot" if "avx" in open("/proc/cpuinfo").read() else "avx2",
                             "this CPU (or this build) has no")):
        result = _run_python("import sys; from hn_export.cli import main; main(sys.argv[1:])", "diff", fused,
                             work / "tiny.onnx", "--steps", "0", env={"HADANORM_KERNELS_ISA": value})
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
        assert expected in lines[0] and "onnxruntime" not in lines[0] and "[E:" not in result.stderr


def test_session_errors_are_not_logged_by_onnxruntime(kernel_library, work, capfd, monkeypatch):
    """A session whose kernels fail while onnxruntime creates them: the exception says why; onnxruntime's logger
    prints no ``[E:onnxruntime:...]`` line of its own before the CLI's one line."""
    from tests.cli_runner import run_cli

    fused = work / "fused.onnx"
    assert run_cli([str(work / "tiny.onnx"), *QUANTIZE, "--format", "fused", "-o", str(fused)]) == 0
    import runtime.kernels
    from runtime.session import create_session

    monkeypatch.setattr(runtime.kernels, "check_selected_isa", lambda path: None, raising=False)
    monkeypatch.setenv("HADANORM_KERNELS_ISA", "bogus")
    capfd.readouterr()
    with pytest.raises(Exception, match="HADANORM_KERNELS_ISA=bogus"):
        create_session(fused, kernel_library=True)
    assert "[E:onnxruntime" not in capfd.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# 4. the named-array checker against other families' signatures (no export needed: the signature is the contract)
# ---------------------------------------------------------------------------------------------------------------

def _signature(family: str, inputs: dict[str, tuple], dtypes: dict[str, type] | None = None):
    """A signature as `ModelSignature.of` reads it: dims are ints (static) or symbol names (dynamic)."""
    from hn_export.denoise import ModelSignature

    batched = frozenset(n for n, dims in inputs.items() if dims and dims[0] in ("batch", 2))
    return ModelSignature(family=family, shapes={n: tuple(d if isinstance(d, int) else None for d in dims)
                                                 for n, dims in inputs.items()},
                          dtypes={n: np.dtype((dtypes or {}).get(n, np.float32)) for n in inputs}, batched=batched,
                          symbols=tuple((n, tuple(d if isinstance(d, str) else None for d in dims))
                                        for n, dims in inputs.items()))


def FLUX():  # noqa: N802  (signatures are built when a test runs, so that collection never fails)
    return _signature("flux", {"hidden_states": ("batch", 16, 64), "encoder_hidden_states": ("batch", "caption", 32),
                               "pooled_projections": ("batch", 32), "timestep": ("batch",), "img_ids": (16, 3),
                               "txt_ids": ("caption", 3), "guidance": ("batch",)})


def DIT():  # noqa: N802
    return _signature("dit", {"hidden_states": ("batch", 4, 8, 8), "timestep": ("batch",),
                              "class_labels": ("batch",)}, {"class_labels": np.int64})


def MASKED():  # noqa: N802  (the masked PixArt export: every shape static)
    return _signature("pixart-sigma", {"hidden_states": (2, 4, 8, 8), "timestep": (2,),
                                       "encoder_hidden_states": (2, 120, 32), "encoder_attention_mask": (2, 120)})


def _valid(sig, rows: int) -> dict[str, np.ndarray]:
    out = {}
    for name, shape in sig.shapes.items():
        dims = [rows if (i == 0 and name in sig.batched) else (7 if d is None else d) for i, d in enumerate(shape)]
        out[name] = np.ones(dims, sig.dtypes[name])
    return out


OTHER_FAMILIES = {
    "flux ids width": (FLUX, 2, lambda a: a.update(img_ids=np.zeros((16, 2), np.float32)), "the model takes [16, 3]"),
    "flux txt_ids length": (FLUX, 2, lambda a: a.update(txt_ids=np.zeros((5, 3), np.float32)), "size caption"),
    "flux pooled rank": (FLUX, 2, lambda a: a.update(pooled_projections=np.zeros((2, 1, 32), np.float32)), "rank"),
    "dit labels rank": (DIT, 2, lambda a: a.update(class_labels=np.zeros((2, 1), np.int64)), "rank"),
    "dit labels fractional": (DIT, 2, lambda a: a.update(class_labels=np.array([1.5, 2.0])), "not whole numbers"),
    "dit label out of range": (DIT, 2, lambda a: a.update(class_labels=np.array([1, 5000])), "outside 0..1000"),
    "dit labels text": (DIT, 2, lambda a: a.update(class_labels=np.array(["cat", "dog"])), "not numbers"),
    "static batch": (MASKED, 4, lambda a: None, "batch is fixed at 2"),
    "static caption length": (MASKED, 2, lambda a: a.update(encoder_hidden_states=np.zeros((2, 7, 32), np.float32)),
                              "the model takes [2, 120, 32]"),
    "mask length": (MASKED, 2, lambda a: a.update(encoder_attention_mask=np.ones((2, 7), np.float32)),
                    "the model takes [2, 120]"),
}


@pytest.mark.parametrize("case", list(OTHER_FAMILIES))
def test_named_arrays_of_other_families(tmp_path, case):
    from hn_export.errors import UserError
    from hn_export.input_arrays import load_input_file

    make, rows, edit, expected = OTHER_FAMILIES[case]
    sig = make()
    good = _valid(sig, 2 if make is MASKED else rows)
    np.savez(tmp_path / "good.npz", **good)
    assert sorted(load_input_file(tmp_path / "good.npz", sig, "inputs file", single_call=True)) == sorted(sig.shapes)
    arrays = _valid(sig, rows)
    edit(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError, match="; ") as info:
        load_input_file(tmp_path / "bad.npz", sig, "inputs file", single_call=True)
    assert expected in str(info.value) and "\n" not in str(info.value)
