"""Open an in-memory onnx-ir model in onnxruntime, external data included, without copying the weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir
import onnxruntime as ort

from graph_passes.attention_op import AttentionPrecision, fused_attentions
from graph_passes.fuse_attention import find_attention
from graph_passes.pipeline import attention_pipeline
from runtime.kernels import library_path
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
                 threads: int | None = None, fuse_attention: bool = False) -> Iterator[ort.InferenceSession]:
    """A session for `model`. Weights in external files stay there: the graph goes to onnxruntime as bytes with
    ``session.model_external_initializers_file_folder_path`` naming their folder (onnxruntime refuses external data
    outside the model's folder, links included). A graph with fused attention (``hadanorm::Attention``, e.g. from
    `hn-export optimize`) runs it on the kernel library when it is built: its function body would hold the N x N
    scores the op exists to avoid (calibrating a 1024 px model). Priority-based execution order: calibration adds
    reductions that only feed graph outputs (`runtime.session.session_options`). `fuse_attention`: where the kernel
    library is built, the session runs a copy of the graph with its softmax attentions fused in float (within 1e-5 of
    the exported maths, O(N) memory instead of O(N^2); `model` itself is not changed): calibration at 1024 px."""
    proto = ir.serde.serialize_model(model)
    fused = False
    if fuse_attention and library_path() is not None and find_attention(model.graph).sites:
        copy = ir.serde.deserialize_model(proto)  # weights stay where they are (external data, or shared protos)
        attention_pipeline(AttentionPrecision.FLOAT, check=False)(copy)
        proto = ir.serde.serialize_model(copy)
        fused = True
    folders = {file.parent.resolve() for file in _external_files(model)}
    if len(folders) > 1:
        raise ValueError(f"external data in several folders: {sorted(map(str, folders))}")
    folder = folders.pop() if folders else None
    attention = fused or bool(fused_attentions(model.graph))
    yield create_session(proto.SerializeToString(), mode, threads=threads, external_data_folder=folder,
                         kernel_library=attention, priority_order=True)
