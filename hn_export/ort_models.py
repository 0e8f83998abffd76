"""Open an in-memory onnx-ir model in onnxruntime, external data included, without copying the weights."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir
import onnxruntime as ort

from runtime.session import NumericsMode, create_session


def _external_files(model: ir.Model) -> set[Path]:
    files = set()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            files.add(Path(tensor.base_dir) / tensor.location)
    return files


@contextlib.contextmanager
def open_session(model: ir.Model, mode: NumericsMode = NumericsMode.AS_WRITTEN,
                 threads: int | None = None) -> Iterator[ort.InferenceSession]:
    """A session for `model`. Weights in external files stay there: the graph is written to a temporary folder
    beside links to those files."""
    proto = ir.serde.serialize_model(model)
    files = _external_files(model)
    if not files:
        yield create_session(proto.SerializeToString(), mode, threads=threads)
        return
    with tempfile.TemporaryDirectory(prefix="hn-export-session-") as tmp:
        for file in files:
            os.symlink(file.resolve(), Path(tmp) / file.name)
        path = Path(tmp) / "model.onnx"
        path.write_bytes(proto.SerializeToString())
        yield create_session(path, mode, threads=threads)
