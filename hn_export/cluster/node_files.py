"""The files a task reads on its node, there once per node.

A model (its ``.onnx`` and external data files) is read by the driver in chunks of `CHUNK_BYTES` and put into
Ray's object store (`ship`): no object passes 2 GB however large the external data, and the driver holds one chunk
at a time. The chunks' references travel inside the task arguments (nested, so Ray does not fetch them for every
task); the first task on a node copies them into the node's folder for the run (`materialize`), under a file lock
that makes the other tasks of that node wait and reuse the copy. With ``--ray-shared-files`` nothing is shipped:
every node reads the files at the path the driver sees (a shared filesystem). Graphs that a task derives from a
model (a quantized grid point, a gated sensitivity graph) are built the same way, once per node (`built_once`).

The node folder is ``<tmp>/hn-export-ray-<job id>/<node id>``; the driver removes it on every node at the end (`cleanup`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from runtime.file_lock import exclusive

CHUNK_BYTES = 256 << 20
_COMPLETE = ".complete"


@dataclasses.dataclass(frozen=True)
class FileSet:
    """Files a task needs: `main` and the files beside it (relative paths), each as object-store chunks, or, when
    `shared`, the folder every node reads them from."""

    key: str  # unique within the run: the node folder's subfolder
    main: str
    chunks: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # (relative path, its chunks' ObjectRefs)
    shared: Path | None = None


def ship(key: str, main: Path, files: tuple[Path, ...], shared: bool, chunk_bytes: int = CHUNK_BYTES) -> FileSet:
    """Driver side: `files` (`main` and the files it reads, inside its folder) as a `FileSet`."""
    import ray

    folder = main.resolve().parent
    if shared:
        return FileSet(key, main.name, shared=folder)
    chunks = []
    for file in dict.fromkeys(Path(f).resolve() for f in (main, *files)):
        refs = []
        with open(file, "rb") as fh:
            while block := fh.read(chunk_bytes):
                refs.append(ray.put(np.frombuffer(block, dtype=np.uint8)))
        chunks.append((str(file.relative_to(folder)), tuple(refs)))
    return FileSet(key, main.resolve().relative_to(folder).as_posix(), tuple(chunks))


def node_root() -> Path:
    """This run's folder on the node the caller runs on (named by the node too: nodes may share a machine)."""
    import ray

    context = ray.get_runtime_context()
    return Path(tempfile.gettempdir()) / f"hn-export-ray-{context.get_job_id()}" / context.get_node_id()[:16]


def built_once(key: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """Node side: the folder ``node_root()/key``, filled by `build` by the first task of this node that asks (a
    failed build leaves no folder behind); returns it and whether this call built it."""
    folder = node_root() / key
    with exclusive(folder.with_name(folder.name + ".lock")):
        if (folder / _COMPLETE).exists():
            return folder, False
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        try:
            build(folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        (folder / _COMPLETE).touch()
        return folder, True


def materialize(files: FileSet) -> tuple[Path, bool]:
    """Node side: the path of `files.main` on this node, and whether this call fetched the files."""
    import ray

    if files.shared is not None:
        return files.shared / files.main, False

    def fetch(folder: Path) -> None:
        for relative, refs in files.chunks:
            target = folder / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as fh:
                for ref in refs:
                    fh.write(ray.get(ref))

    folder, fetched = built_once(files.key, fetch)
    return folder / files.main, fetched


def cleanup() -> None:
    """Node side: remove this run's folder."""
    root = node_root()
    shutil.rmtree(root, ignore_errors=True)
    with contextlib.suppress(OSError):
        root.parent.rmdir()  # the last node of this machine
