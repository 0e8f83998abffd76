"""``bundle.json``: what a text-to-image bundle folder holds, read and checked on the device (no torch).

`hn-export bundle` writes it (`hn_export.bundle`); `runtime.pipeline.TextToImage` reads it with `load_manifest` and
checks every listed file with `verify_files` (present, a regular file inside the folder, the recorded size and
sha256) before any session is created. Layout (format version 1)::

    {"format": "hn-export-bundle", "format_version": 1, "family": "pixart-sigma", "pipeline": "PixArtSigmaPipeline",
     "source": "...", "versions": {"hn_export": ..., "torch": ..., "onnxruntime": ...},
     "defaults": {"steps": 20, "guidance_scale": 4.5, "negative_prompt": "", "width": 1024, "height": 1024},
     "text": {"max_sequence_length": 300, "preprocess": "lower_strip", "pad_token_id": 0},
     "latent": {"channels": 4, "vae_scale_factor": 8, "scaling_factor": 0.13025, "learned_sigma": true},
     "vae_tiling": {"tile_latent_size": 128, "overlap_factor": 0.25},
     "sizes": [{"width": 1024, "height": 1024, "aspect_ratio": 1.0, "transformer": "transformer_1024x1024.onnx"}],
     "files": [{"path": "text_encoder.onnx", "role": "text_encoder", "bits": 8, "method": "...",
                "sha256": "...", "bytes": 123}, ...]}

A size's ``aspect_ratio`` (optional; height / width when absent) is the ratio key resolution binning compares a
requested height / width with (`runtime.pipeline_sizes.closest_size`): diffusers' table key for a size of its
aspect-ratio table (e.g. 0.57 for 768x1344), else height / width.

File roles: ``text_encoder``, ``transformer`` (one per size; ``width``/``height`` given), ``vae_decoder``,
``tokenizer``, ``scheduler``, ``transformer_prompt`` (a transformer's prompt graph, ``of`` names its step graph:
`runtime.denoiser.Denoiser` loads it from beside the step graph) and ``external_data`` (a ``.onnx.data`` beside its
graph; ``of`` names the graph).
A Stable Diffusion 3 bundle (``"family": "sd3"``) also has ``text_encoder_2`` and ``tokenizer_2`` (CLIP-G; the
first pair is CLIP-L), ``text_encoder_3`` and ``tokenizer_3`` (T5), ``text.clip`` (each CLIP tokenizer's
``max_length`` and ``pad_token_id``), ``text.pooled_width`` and ``latent.shift_factor`` (applied by the VAE graph).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runtime.errors import RuntimeInputError

MANIFEST_NAME = "bundle.json"
FORMAT = "hn-export-bundle"
FORMAT_VERSION = 1
ROLES = ("text_encoder", "transformer", "transformer_prompt", "vae_decoder", "tokenizer", "scheduler", "external_data", "text_encoder_2",
         "text_encoder_3", "tokenizer_2", "tokenizer_3")
# the roles each family's bundle must hold (one file each)
REQUIRED_ROLES = {"pixart-sigma": ("text_encoder", "vae_decoder", "tokenizer", "scheduler"),
                  "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3", "vae_decoder", "tokenizer",
                          "tokenizer_2", "tokenizer_3", "scheduler")}
PREPROCESS = ("lower_strip", "none")  # PixArt's pipelines: prompt.lower().strip() (clean_caption=False)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class BundleFile:
    path: str
    role: str
    sha256: str
    bytes: int
    bits: int | str | None = None
    method: str | None = None
    format: str | None = None  # transformer: qdq, nbits, fused (hn-export's output formats), or None (float)
    width: int | None = None
    height: int | None = None
    of: str | None = None  # external data: the graph it belongs to

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class Manifest:
    folder: Path
    data: Mapping[str, Any]
    files: tuple[BundleFile, ...]

    def file(self, role: str) -> BundleFile:
        matches = [f for f in self.files if f.role == role]
        if len(matches) != 1:
            raise RuntimeInputError(f"{self.folder / MANIFEST_NAME} lists {len(matches)} {role} files, not one; "
                                    "rebuild the bundle with `hn-export bundle`")
        return matches[0]

    def path(self, role: str) -> Path:
        return self.folder / self.file(role).path

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """(width, height) in pixels of every bundled transformer."""
        return [(int(s["width"]), int(s["height"])) for s in self.data["sizes"]]

    @property
    def aspect_ratios(self) -> list[float]:
        """Each size's ratio key for resolution binning (``aspect_ratio``, else height / width)."""
        return [float(s.get("aspect_ratio", int(s["height"]) / int(s["width"]))) for s in self.data["sizes"]]

    def has_size(self, width: int, height: int) -> bool:
        return (width, height) in self.sizes

    def transformer_path(self, width: int, height: int) -> Path:
        for entry in self.data["sizes"]:
            if (int(entry["width"]), int(entry["height"])) == (width, height):
                return self.folder / entry["transformer"]
        have = ", ".join(f"{w}x{h}" for w, h in self.sizes)
        raise RuntimeInputError(f"size {width}x{height} is not in the bundle {self.folder} (it has {have}); pass one "
                                "of those, or rebuild the bundle with `hn-export bundle --sizes ...`")

    @property
    def defaults(self) -> Mapping[str, Any]:
        return self.data["defaults"]

    @property
    def text(self) -> Mapping[str, Any]:
        return self.data["text"]

    @property
    def latent(self) -> Mapping[str, Any]:
        return self.data["latent"]


def _fail(folder: Path, problem: str) -> RuntimeInputError:
    return RuntimeInputError(f"bundle {folder}: {problem}; rebuild it with `hn-export bundle`")


def _require(data: Mapping[str, Any], key: str, kind, folder: Path, where: str = "") -> Any:
    value = data.get(key) if isinstance(data, Mapping) else None
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, float, (int, float)))
    if ok and isinstance(value, float) and not math.isfinite(value):
        ok = False
    if not ok:
        raise _fail(folder, f"{MANIFEST_NAME} has no valid {where}{key!r}")
    return value


def load_manifest(folder: str | os.PathLike) -> Manifest:
    """Read and check ``FOLDER/bundle.json`` (structure only; `verify_files` checks the files)."""
    folder = Path(folder)
    if not folder.exists():
        raise RuntimeInputError(f"bundle folder {folder} does not exist; check the path")
    if not folder.is_dir():
        raise RuntimeInputError(f"bundle path {folder} is not a folder; pass the folder `hn-export bundle` wrote")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise RuntimeInputError(f"bundle folder {folder} has no {MANIFEST_NAME}; pass a folder written by "
                                "`hn-export bundle`")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(folder, f"{MANIFEST_NAME} is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _fail(folder, f"{MANIFEST_NAME} is not an {FORMAT} manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise RuntimeInputError(f"bundle {folder} has format version {data.get('format_version')!r}; this runtime "
                                f"reads version {FORMAT_VERSION}: rebuild the bundle or update the runtime")
    files = []
    for entry in _require(data, "files", list, folder):
        if not isinstance(entry, dict):
            raise _fail(folder, f"{MANIFEST_NAME} has a file entry that is not an object")
        name = _require(entry, "path", str, folder, "file ")
        if Path(name).name != name or name in ("", ".", ".."):
            raise _fail(folder, f"{MANIFEST_NAME} names file {name!r}, which is not a plain file name in the folder")
        role = _require(entry, "role", str, folder, f"{name} ")
        if role not in ROLES:
            raise _fail(folder, f"{MANIFEST_NAME} gives {name} the unknown role {role!r}")
        files.append(BundleFile(name, role, _require(entry, "sha256", str, folder, f"{name} "),
                                _require(entry, "bytes", int, folder, f"{name} "), entry.get("bits"),
                                entry.get("method"), entry.get("format"), entry.get("width"), entry.get("height"),
                                entry.get("of")))
    names = [f.path for f in files]
    if len(set(names)) != len(names):
        raise _fail(folder, f"{MANIFEST_NAME} lists a file twice")
    for key in ("defaults", "text", "latent"):
        _require(data, key, dict, folder)
    _require(data["text"], "max_sequence_length", int, folder, "text.")
    if data["text"].get("preprocess", "none") not in PREPROCESS:
        raise _fail(folder, f"text.preprocess {data['text'].get('preprocess')!r} is not one of {', '.join(PREPROCESS)}")
    for key in ("channels", "vae_scale_factor"):
        _require(data["latent"], key, int, folder, "latent.")
    _require(data["latent"], "scaling_factor", (int, float), folder, "latent.")
    for key in ("steps",):
        _require(data["defaults"], key, int, folder, "defaults.")
    _require(data["defaults"], "guidance_scale", (int, float), folder, "defaults.")
    sizes = _require(data, "sizes", list, folder)
    if not sizes:
        raise _fail(folder, f"{MANIFEST_NAME} lists no sizes")
    for entry in sizes:
        if not isinstance(entry, dict) or entry.get("transformer") not in names:
            raise _fail(folder, f"{MANIFEST_NAME} has a size whose transformer is not a listed file")
        for key in ("width", "height"):
            if _require(entry, key, int, folder, "size ") < 1:
                raise _fail(folder, f"{MANIFEST_NAME} has a size whose {key} is not positive")
        if "aspect_ratio" in entry and _require(entry, "aspect_ratio", (int, float), folder, "size ") <= 0:
            raise _fail(folder, f"{MANIFEST_NAME} has a size whose aspect_ratio is not positive")
    manifest = Manifest(folder, data, tuple(files))
    for role in REQUIRED_ROLES.get(data.get("family"), REQUIRED_ROLES["pixart-sigma"]):
        manifest.file(role)
    return manifest


def verify_files(manifest: Manifest, hashes: bool = True) -> None:
    """Every listed file is a regular file in the folder with its recorded size and (`hashes`) sha256."""
    folder = manifest.folder
    resolved_folder = folder.resolve()
    for entry in manifest.files:
        path = folder / entry.path
        if not path.exists():
            raise RuntimeInputError(f"bundle {folder}: {entry.role} file {entry.path} is missing; copy the whole "
                                    "bundle folder again or rebuild it with `hn-export bundle`")
        if not path.is_file() or not path.resolve().is_relative_to(resolved_folder):
            raise RuntimeInputError(f"bundle {folder}: {entry.path} is not a regular file inside the folder; copy "
                                    "the bundle folder again")
        size = path.stat().st_size
        if size != entry.bytes:
            raise RuntimeInputError(f"bundle {folder}: {entry.path} has {size} bytes, {MANIFEST_NAME} says "
                                    f"{entry.bytes} (truncated or replaced); copy the bundle folder again")
        if hashes and sha256_file(path) != entry.sha256:
            raise RuntimeInputError(f"bundle {folder}: {entry.path} does not match its sha256 in {MANIFEST_NAME} "
                                    "(changed or corrupt); copy the bundle folder again or rebuild it")
