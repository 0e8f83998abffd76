"""Reading and writing ONNX model files safely.

Reads fail with a one-line `UserError` naming the file and the fix. Writes are atomic: the model (and its external
data file, when the weights pass 2 GB) are written to a temporary folder beside the target and renamed into place, so
an interrupted or failed write never leaves a partial ``.onnx`` or ``.onnx.data`` behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import onnx_ir as ir

from hn_export.errors import UserError

logger = logging.getLogger(__name__)

# Protobuf cannot hold more than 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000
# What the passes write (blocked QuantizeLinear needs opset 21) and what onnxruntime 1.20+ loads.
MIN_OPSET, MAX_OPSET = 21, 21
MAX_IR_VERSION = 10
SMALL_EXTERNAL_TENSOR_BYTES = 4096


def external_data_name(path: Path) -> str:
    return path.name + ".data"


def load_model(path: str | os.PathLike, what: str = "model", any_opset: bool = False) -> ir.Model:
    """Load an ONNX model, checking that it exists, parses, and that its external data files are present.
    `any_opset`: skip the opset check (`hn_export.graph_import` converts other opsets)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} file {path} does not exist", "check the path")
    if path.is_dir():
        raise UserError(f"{what} path {path} is a folder, not an ONNX file", "pass the .onnx file inside it")
    if path.stat().st_size == 0:
        raise UserError(f"{what} file {path} is empty", "re-export it with `hn-export export`")
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf raises several types for garbage bytes
        raise UserError(
            f"{what} file {path} is not a readable ONNX model ({type(exc).__name__})",
            "pass an .onnx file written by `hn-export export` or torch.onnx.export",
        ) from None
    _check_external_data(model, path)
    _check_versions(model, path, check_opset=not any_opset)
    _inline_small_external_tensors(model)
    return model


def _inline_small_external_tensors(model: ir.Model) -> None:
    """Read external tensors under 4 KB into memory. Shape/axes constants must be inline for onnxruntime's shape
    inference when a graph is passed as bytes, and for onnx.checker on the graphs the passes write."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and tensor.nbytes < SMALL_EXTERNAL_TENSOR_BYTES:
            value.const_value = ir.tensor(tensor.numpy(), name=value.name)


def _check_versions(model: ir.Model, path: Path, check_opset: bool = True) -> None:
    opset = model.opset_imports.get("", model.graph.opset_imports.get(""))
    if check_opset and opset is not None and not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(
            f"{path} uses ONNX opset {opset}; hn-export reads and writes opset {MIN_OPSET}",
            "re-export with `hn-export export` (opset 21) or convert it with onnx.version_converter",
        )
    if model.ir_version > MAX_IR_VERSION:
        raise UserError(
            f"{path} has ONNX IR version {model.ir_version}, newer than {MAX_IR_VERSION}, which hn-export writes and "
            "onnxruntime 1.20+ loads",
            "re-export with `hn-export export` or save it with ir_version 10",
        )


def _check_external_data(model: ir.Model, path: Path) -> None:
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            data_path = Path(tensor.base_dir) / tensor.location
            if not data_path.exists():
                raise UserError(
                    f"external data file {data_path} of {path} is missing",
                    f"keep {tensor.location} beside {path.name}",
                )
            if data_path.stat().st_size < tensor.offset + tensor.length:
                raise UserError(
                    f"external data file {data_path} of {path} is truncated",
                    "re-export the model",
                )


def model_nbytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def check_output_path(output: Path, *inputs: Path) -> None:
    """Refuse to overwrite an input and fail early (before long work) when the folder is not writable."""
    out = output.resolve()
    if out.is_dir():
        raise UserError(f"output path {output} is a folder", "pass a file name such as model.onnx")
    for inp in inputs:
        inp_r = Path(inp).resolve()
        if out == inp_r or out == inp_r.with_name(inp_r.name + ".data"):
            raise UserError(f"output path {output} is the input file", "choose another -o path")
    parent = out.parent
    blocking = next((p for p in [parent, *parent.parents] if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise UserError(f"output path {output}: {blocking} is a file, not a folder", "choose another -o path")
    if not parent.is_dir():
        raise UserError(f"output folder {parent} does not exist", "create it or choose another -o path")
    if not os.access(parent, os.W_OK):
        raise UserError(f"output folder {parent} is not writable", "choose another -o path")


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write a report file through a temporary name and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_model(model: ir.Model, path: str | os.PathLike) -> list[Path]:
    """Write `model` to `path` atomically; external data (``path.data``) when weights exceed the 2 GB limit.

    Returns the files written.
    """
    path = Path(path)
    check_output_path(path)
    use_external = model_nbytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES
    if not use_external:
        # Weights loaded lazily from the input's data file must end up in this file, not as links to that one.
        for value in model.graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                value.const_value = ir.tensor(value.const_value.numpy(), name=value.name)
    data_name = external_data_name(path)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".hn-export-", dir=path.parent))
    try:
        tmp_model = tmp_dir / path.name
        if use_external:
            ir.save(model, tmp_model, external_data=data_name)
        else:
            ir.save(model, tmp_model)
        written = [path]
        if use_external:
            os.replace(tmp_dir / data_name, path.parent / data_name)
            written.append(path.parent / data_name)
        os.replace(tmp_model, path)
        stale = path.parent / data_name
        if not use_external and stale.exists():
            stale.unlink()  # a data file from an older, larger model of the same name
    except OSError as exc:
        raise UserError(f"could not write {path}: {exc.strerror}", "check free disk space and permissions") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("wrote %s", ", ".join(str(p) for p in written))
    return written
