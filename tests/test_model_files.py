"""Model files: external data in and out (the >2 GB path, exercised with a small threshold), atomic writes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from hn_export import model_files
from hn_export.errors import UserError
from tests.graphs import mlp_model


def write_external(path):
    ir.save(mlp_model(72, 288), path, external_data=path.name + ".data", size_threshold_bytes=0)


@pytest.mark.parametrize("external_output", [False, True])
def test_output_is_self_contained(tmp_path, monkeypatch, external_output):
    """Weights read lazily from the input's data file are written into the output's own file(s)."""
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    write_external(src_dir / "m.onnx")
    model = model_files.load_model(src_dir / "m.onnx")
    expected = {k: v.const_value.numpy().copy() for k, v in model.graph.initializers.items()}
    if external_output:
        monkeypatch.setattr(model_files, "EXTERNAL_DATA_THRESHOLD_BYTES", 1000)
    written = model_files.save_model(model, out_dir / "q.onnx")
    assert [p.name for p in written] == (["q.onnx", "q.onnx.data"] if external_output else ["q.onnx"])
    del model
    (src_dir / "m.onnx.data").unlink()  # the output must not need the input's data
    reloaded = model_files.load_model(out_dir / "q.onnx")
    assert {k: np.array_equal(v.const_value.numpy(), expected[k]) for k, v in reloaded.graph.initializers.items()} \
        == {k: True for k in expected}
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in written)


def test_missing_and_truncated_external_data(tmp_path):
    write_external(tmp_path / "m.onnx")
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(UserError, match="is truncated"):
        model_files.load_model(tmp_path / "m.onnx")
    data.unlink()
    with pytest.raises(UserError, match="external data file .* is missing"):
        model_files.load_model(tmp_path / "m.onnx")


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    model = mlp_model(72, 288)

    def boom(*args, **kwargs):
        (args[1] if len(args) > 1 else kwargs["path"]).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_files.ir, "save", boom)
    with pytest.raises(UserError, match="No space left on device"):
        model_files.save_model(model, tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []
