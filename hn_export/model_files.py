"""Reading and writing ONNX model files safely.

Reads fail with a one-line `UserError` naming the file and the fix. Writes are atomic: the model (and its external
data file, when the weights pass 2 GB) are written to a temporary folder beside the target and renamed into place, so
an interrupted or failed write never leaves a partial ``.onnx`` or ``.onnx.data`` behind.

What is refused (one line each): an output path that exists and is not a regular file (a folder, a device node, a
FIFO, a link to one of these), an output path that is an input or that would replace a file an input reads (its
external data included, also through the ``OUT.onnx.data`` beside a model output), and, when reading, an external
data ``location`` that resolves outside the model's folder (absolute paths, ``..``, links leading out): no file
outside the model's folder is read. A model keeps the files it was read from (`input_files`), and `save_model`
refuses to overwrite or delete any of them.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

import onnx
import onnx.external_data_helper
import onnx_ir as ir

from graph_passes.domain import ONNX_OPSET
from hn_export.errors import UserError

logger = logging.getLogger(__name__)

# Protobuf cannot hold more than 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000
# What the passes write (blocked QuantizeLinear needs opset 21) and what onnxruntime 1.20+ loads.
MIN_OPSET = MAX_OPSET = ONNX_OPSET
IR_VERSION = 10  # the IR version hn-export writes; newer ones are refused
SMALL_EXTERNAL_TENSOR_BYTES = 4096


def external_data_name(path: Path) -> str:
    return path.name + ".data"


def load_model(path: str | os.PathLike, what: str = "model", any_opset: bool = False) -> ir.Model:
    """Load an ONNX model, checking that it exists, parses, passes onnx's checker, and that its external data files
    are present and inside the model's folder. `any_opset`: skip the opset check (`hn_export.graph_import` converts
    other opsets). The model remembers the files it was read from (`input_files`)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} file {path} does not exist", "check the path")
    if path.is_dir():
        raise UserError(f"{what} path {path} is a folder, not an ONNX file", "pass the .onnx file inside it")
    if not path.is_file():
        raise UserError(f"{what} path {path} is not a regular file ({_kind(path)})", "pass an .onnx file")
    if path.stat().st_size == 0:
        raise UserError(f"{what} file {path} is empty", "re-export it with `hn-export export`")
    try:
        proto = onnx.load(path, load_external_data=False)  # what ir.load does, with the checks in between
    except Exception as exc:  # protobuf raises several types for garbage bytes
        raise UserError(
            f"{what} file {path} is not a readable ONNX model ({type(exc).__name__})",
            "pass an .onnx file written by `hn-export export` or torch.onnx.export",
        ) from None
    data_files = _check_external_data(proto, path, what)
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, os.path.dirname(path))
    _check_versions(model, path, check_opset=not any_opset)
    opset = model.opset_imports.get("", model.graph.opset_imports.get(""))
    if opset is not None and MIN_OPSET <= opset <= MAX_OPSET:  # other opsets: the converter checks and names the op
        _check_graph(proto if not data_files else path, path, what)  # by path: onnx finds the data files
    _inline_small_external_tensors(model)
    model.meta[_INPUT_FILES] = (path.resolve(), *data_files)
    return model


_INPUT_FILES = "hn_export.input_files"


def input_files(model: ir.Model) -> tuple[Path, ...]:
    """The files `model` was read from (its .onnx and external data files, resolved); empty for a model built in
    memory. `save_model` refuses to overwrite or delete them."""
    return tuple(model.meta.get(_INPUT_FILES, ()))


def keep_input_files(source: ir.Model, model: ir.Model) -> ir.Model:
    """`model` (e.g. a converted copy of `source`) remembers `source`'s input files too."""
    model.meta[_INPUT_FILES] = tuple(dict.fromkeys((*input_files(model), *input_files(source))))
    return model


def _check_graph(model: onnx.ModelProto | Path, path: Path, what: str) -> None:
    """onnx's checker (graph structure: topological order, dangling or duplicate names, attributes, types)."""
    try:
        onnx.checker.check_model(model if isinstance(model, onnx.ModelProto) else os.fspath(model))
    except Exception as exc:
        first = " ".join(str(exc).split())[:300]
        raise UserError(f"{what} file {path} is not a valid ONNX graph ({first})",
                        "re-export it with `hn-export export` or torch.onnx.export") from None


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
    if model.ir_version > IR_VERSION:
        raise UserError(
            f"{path} has ONNX IR version {model.ir_version}, newer than {IR_VERSION}, which hn-export writes and "
            "onnxruntime 1.20+ loads",
            "re-export with `hn-export export` or save it with ir_version 10",
        )


def _shown_location(location: str) -> str:
    """An external-data location as an error line shows it: whole up to 80 characters, else its start and its end
    (the file name stays visible however deep the folder), ``...`` between."""
    return repr(location) if len(location) <= 80 else repr(location[:38] + "..." + location[-39:])


def _check_external_data(proto: onnx.ModelProto, path: Path, what: str) -> tuple[Path, ...]:
    """Every external-data tensor (initializers, Constant attributes, subgraphs) must name a regular file inside the
    model's folder that holds its bytes. Returns those files (resolved)."""
    folder = path.parent.resolve()
    files: dict[Path, None] = {}
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        shown = _shown_location(location)
        fix = f"keep the weights in a file beside {path.name} and name it relative to that folder"
        if not location or os.path.isabs(location) or ".." in Path(location).parts:
            raise UserError(f"{what} file {path}: tensor {tensor.name!r} names external data {shown}, which is "
                            "not a plain file name inside the model's folder", fix)
        data_path = path.parent / location
        try:
            resolved = data_path.resolve()
            data_path.exists()
        except (ValueError, OSError, RuntimeError) as exc:  # a NUL byte, a name too long, a link loop
            raise UserError(f"{what} file {path}: tensor {tensor.name!r} names external data {shown}, which "
                            f"cannot be opened ({type(exc).__name__})", fix) from None
        if not resolved.is_relative_to(folder):
            raise UserError(f"{what} file {path}: external data {shown} of tensor {tensor.name!r} leads out of "
                            f"the model's folder (to {resolved})", fix)
        if not data_path.exists():
            raise UserError(f"external data file {data_path} of {path} is missing",
                            f"keep {location} beside {path.name}")
        if not data_path.is_file():
            raise UserError(f"external data {data_path} of {path} is not a regular file ({_kind(data_path)})", fix)
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
        except ValueError:
            raise UserError(f"{what} file {path}: tensor {tensor.name!r} has a non-numeric external data offset or "
                            "length", "re-export the model") from None
        if offset < 0 or (length < 0 and "length" in info):
            raise UserError(f"{what} file {path}: tensor {tensor.name!r} has a negative external data offset or "
                            "length", "re-export the model")
        if length < 0:
            length = _tensor_nbytes(tensor)
        if length is not None and data_path.stat().st_size < offset + length:
            raise UserError(f"external data file {data_path} of {path} is truncated", "re-export the model")
        files[resolved] = None
    return tuple(files)


def _tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:  # a 4-bit or unknown type: onnx-ir checks when it reads
        return None
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * itemsize


def _kind(path: Path) -> str:
    mode = path.stat().st_mode
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK,
                       "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def model_nbytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def check_output_path(output: Path, *inputs: Path | None, data_file: bool = False, what: str = "output path") -> None:
    """Fail early (before long work): refuse a path that exists and is not a regular file (a folder, a device node,
    a FIFO, or a link to one), a path that is one of `inputs` (files an input reads; None entries are skipped), a
    missing or unwritable folder. `data_file`: a model output, which may also write (or delete a stale)
    ``OUTPUT.data`` beside it: that file is checked too."""
    output = Path(output)
    protected = {Path(p).resolve(): Path(p) for p in inputs if p is not None}
    targets = [output] + ([output.with_name(external_data_name(output))] if data_file else [])
    for target in targets:
        if target.exists() and not target.is_file():
            beside = "" if target == output else f" (the data file beside {output.name})"
            raise UserError(f"{what} {target}{beside} exists and is {_kind(target)}, not a regular file",
                            "choose a new file name")
        resolved = target.resolve()
        if resolved in protected:
            name = protected[resolved]
            problem = (f"{what} {output} is the input file {name}" if target == output else
                       f"{what} {output} would replace or delete {target.name}, which the input reads")
            raise UserError(problem, f"choose another {what.split()[0]} path")
    out = output.resolve()
    parent = out.parent
    blocking = next((p for p in [parent, *parent.parents] if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise UserError(f"{what} {output}: {blocking} is a file, not a folder", "choose another path")
    if not parent.is_dir():
        raise UserError(f"output folder {parent} does not exist", "create it or choose another path")
    if not os.access(parent, os.W_OK):
        raise UserError(f"output folder {parent} is not writable", "choose another path")


def check_output_folder(folder: Path, files: Iterable[str], *inputs: Path | None, what: str = "--out") -> None:
    """A report folder (created when missing) and the files to be written in it, before the work starts."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what} {folder} exists and is {_kind(folder)}, not a folder", "choose a folder path")
    blocking = next((p for p in [folder, *folder.resolve().parents] if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise UserError(f"{what} {folder}: {blocking} is a file, not a folder", "choose another folder")
    if blocking is not None and not os.access(blocking, os.W_OK):
        raise UserError(f"{what} {folder}: {blocking} is not writable", "choose another folder")
    if folder.is_dir():
        for name in files:
            check_output_path(folder / name, *inputs, what=f"{what} file")


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write a report file through a temporary name and a rename; a path that exists and is not a regular file is
    refused, and nothing is left behind when the write fails."""
    path = Path(path)
    check_output_path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"could not write {path}: {exc.strerror}", "check free disk space and permissions") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_model(model: ir.Model, path: str | os.PathLike) -> list[Path]:
    """Write `model` to `path` atomically; external data (``path.data``) when weights exceed the 2 GB limit.

    Returns the files written.
    """
    path = Path(path)
    check_output_path(path, *input_files(model), data_file=True)
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
        if not use_external and (stale.is_symlink() or stale.is_file()):
            stale.unlink()  # a data file from an older, larger model of the same name (never an input's: checked)
    except OSError as exc:
        raise UserError(f"could not write {path}: {exc.strerror}", "check free disk space and permissions") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("wrote %s", ", ".join(str(p) for p in written))
    return written
