"""Build a diffusion transformer of any supported family: a preset or config.json with seeded random weights, or a
local checkpoint.

`build_transformer(ModelSource(...))` returns the diffusers model (e.g. `PixArtTransformer2DModel`) in eval mode,
float32. The family (`models.families`) comes from the preset name or from the config's ``_class_name``.

- ``preset``: an architecture from `models.presets.PRESETS`, seeded random weights.
- ``config``: a diffusers ``config.json`` of a supported model class, seeded random weights.
- ``checkpoint``: a local diffusers folder, either the transformer folder itself (``config.json`` + weights) or a
  pipeline folder with a ``transformer/`` subfolder. Loaded with ``local_files_only=True``: nothing is downloaded.

Random weights are the diffusers initialisation drawn under ``torch.manual_seed(seed)`` inside
`torch.random.fork_rng` (the caller's global RNG is untouched; the same seed gives identical weights). With
``init=InitKind.DIT_STATS`` (the default for presets and configs) `models.planting.plant_dit_stats` then plants
DiT-like activation statistics (the family's recipe); ``InitKind.PLAIN`` keeps the plain initialisation. ``init`` does not apply to
checkpoints (their weights are real).

``layers`` keeps the first N blocks (any source); ``sample_size`` changes the latent size (the positional embedding is
not a weight, so this works for checkpoints too). Bad input raises a one-line `models.errors.ModelInputError`.
"""

from __future__ import annotations

import enum
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.errors import ModelInputError as UserError
from models.families import ModelFamily, all_presets, family_of_class

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin")


class InitKind(str, enum.Enum):
    """How random weights are initialised (presets and configs only)."""

    DIT_STATS = "dit-stats"
    PLAIN = "plain"
    OUTLIERS = "outliers"  # dit-stats without its planted per-channel mean offsets


@dataclass
class ModelSource:
    """Where the transformer comes from. Exactly one of `preset`, `checkpoint`, `config`."""

    preset: str | None = None
    checkpoint: Path | None = None
    config: Path | None = None
    layers: int | None = None
    sample_size: int | None = None
    seed: int = 0
    init: InitKind = InitKind.DIT_STATS

    def describe(self) -> str:
        if self.preset is not None:
            what = f"preset {self.preset}"
        elif self.checkpoint is not None:
            what = f"checkpoint {self.checkpoint}"
        else:
            what = f"config {self.config}"
        extras = []
        if self.layers is not None:
            extras.append(f"{self.layers} layers")
        if self.sample_size is not None:
            extras.append(f"sample size {self.sample_size}")
        if self.checkpoint is None:
            extras.append(f"seed {self.seed}, init {InitKind(self.init).value}")
        return what + (f" ({', '.join(extras)})" if extras else "")


def _check_source(source: ModelSource) -> None:
    given = [n for n in ("preset", "checkpoint", "config") if getattr(source, n) is not None]
    if len(given) != 1:
        raise UserError(
            "give exactly one model source" + (f" (got {' and '.join('--' + g for g in given)})" if given else ""),
            "pass one of --preset NAME, --checkpoint DIR or --config config.json",
        )
    if source.layers is not None and source.layers < 1:
        raise UserError(f"--layers must be at least 1, got {source.layers}", "pass --layers 1 or more, or leave it out")
    try:
        InitKind(source.init)
    except ValueError:
        raise UserError(
            f"unknown init {source.init!r}", f"use one of {', '.join(k.value for k in InitKind)}"
        ) from None


def _check_sample_size(sample_size: int, patch_size: int, maximum: int) -> None:
    if not (patch_size <= sample_size <= maximum) or sample_size % patch_size:
        raise UserError(
            f"unsupported sample size {sample_size}",
            f"use a multiple of the patch size {patch_size} between {patch_size} and {maximum} "
            f"(latent size = pixels / 8: 32, 64, 128 are 256, 512, 1024 px)",
        )


def _check_layers_against(source: ModelSource, num_layers: int, what: str) -> None:
    if source.layers is not None and source.layers > num_layers:
        raise UserError(
            f"--layers {source.layers} is more than the {num_layers} blocks of {what}",
            f"pass --layers {num_layers} or fewer",
        )


def _read_config_json(path: Path, what: str) -> dict[str, Any]:
    if path.exists() and not path.is_file():  # a FIFO or device would block or never end
        raise UserError(f"{what} {path} is not a regular file", "pass a diffusers config.json")
    try:
        cfg = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not a text JSON file", "pass a diffusers config.json") from None
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{what} {path} is not valid JSON (line {exc.lineno}: {exc.msg})", "fix or replace the file"
        ) from None
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror}", "check the path and permissions") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{what} {path} is not a JSON object", "pass a diffusers config.json")
    try:
        family = family_of_class(cfg.get("_class_name"), cfg)
    except UserError as exc:
        raise UserError(f"{what} {path}: {exc.problem}", exc.fix) from None
    _check_sizes(cfg, family, f"{what} {path}")
    return cfg, family


# Config entries that count something (blocks, heads, channels, pixels): positive whole numbers (or lists of them).
_SIZE_KEYS = ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "in_channels",
              "out_channels", "sample_size", "patch_size", "caption_channels", "joint_attention_dim",
              "pooled_projection_dim", "cross_attention_dim", "layers_per_block", "norm_num_groups",
              "block_out_channels", "num_embeds_ada_norm", "num_class_embeds")


def _check_sizes(cfg: dict[str, Any], family: ModelFamily, what: str) -> None:
    """A block count of -1 or "two" would build a model with no blocks or fail deep inside diffusers: refuse it."""
    for key in dict.fromkeys((family.layers_key, *_SIZE_KEYS)):
        value = cfg.get(key)
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in items):
            raise UserError(f"{what}: {key} is {value!r}; it must be a positive whole number",
                            f"fix {key} in the config")


def _seeded_model(family: ModelFamily, kwargs: dict[str, Any], source: ModelSource, what: str):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(source.seed)
        try:
            model = family.model_class()(**kwargs)
        except (TypeError, ValueError, NotImplementedError, AssertionError, RuntimeError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"cannot build a {family.class_name} from {what}: {msg}", "fix the config") from None
    if InitKind(source.init) in (InitKind.DIT_STATS, InitKind.OUTLIERS):
        family.plant_stats(model, source.seed, offsets=InitKind(source.init) == InitKind.DIT_STATS)
    return model


def _apply_changes(family: ModelFamily, kwargs: dict[str, Any], source: ModelSource) -> dict[str, Any]:
    if source.layers is not None:
        family.set_layers(kwargs, source.layers)
    if source.sample_size is not None:
        _check_sample_size(source.sample_size, family.patch_size(kwargs), family.max_sample_size)
        family.set_sample_size(kwargs, source.sample_size)
    return family.prepare_config(kwargs)


def _from_preset(source: ModelSource):
    presets = all_presets()
    if source.preset not in presets:
        raise UserError(f"unknown preset {source.preset!r}", f"use one of: {', '.join(presets)}")
    family, preset = presets[source.preset]
    kwargs = _apply_changes(family, preset.kwargs(), source)
    return _seeded_model(family, kwargs, source, f"preset {source.preset}")


def _from_config(source: ModelSource):
    path = Path(source.config)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise UserError(f"config file {path} does not exist", "check the path")
    cfg, family = _read_config_json(path, "config")
    kwargs = family.config_kwargs(cfg)
    _check_layers_against(source, family.num_layers(kwargs), f"config {path}")
    kwargs = _apply_changes(family, kwargs, source)
    return _seeded_model(family, kwargs, source, f"config {path}")


def resolve_checkpoint(folder: Path) -> Path:
    """The transformer folder inside `folder` (itself, or `folder/transformer`). Raises `UserError`."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"checkpoint folder {folder} does not exist", "check the path")
    if not folder.is_dir():
        raise UserError(
            f"checkpoint {folder} is a file, not a folder",
            "pass the diffusers folder holding config.json (or a pipeline folder with transformer/)",
        )
    if (folder / "config.json").is_file():
        return folder
    if (folder / "transformer" / "config.json").is_file():
        return folder / "transformer"
    raise UserError(
        f"checkpoint folder {folder} has no config.json (nor transformer/config.json)",
        "pass a diffusers transformer folder or a pipeline folder with a transformer/ subfolder",
    )


def _from_checkpoint(source: ModelSource):
    folder = resolve_checkpoint(Path(source.checkpoint))
    cfg, family = _read_config_json(folder / "config.json", "checkpoint config")
    weights = [p for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(".index.json")]
    if not weights:
        raise UserError(
            f"checkpoint folder {folder} has no weights (*.safetensors or *.bin)",
            "copy the diffusion_pytorch_model.* files beside config.json",
        )
    _check_layers_against(source, family.num_layers(cfg), f"checkpoint {folder}")
    overrides: dict[str, Any] = family.checkpoint_overrides(cfg)
    if source.sample_size is not None:
        _check_sample_size(source.sample_size, family.patch_size(cfg), family.max_sample_size)
        family.set_sample_size(overrides, source.sample_size)
    import diffusers

    level = diffusers.logging.get_verbosity()
    diffusers.logging.set_verbosity_error()
    try:
        model = family.model_class().from_pretrained(
            folder, local_files_only=True, torch_dtype=torch.float32, low_cpu_mem_usage=False, **overrides
        )
    except Exception as exc:  # safetensors / torch / diffusers raise many types for bad files
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        detail = [ln for ln in lines if "size mismatch" in ln or "Missing key" in ln or "Unexpected key" in ln]
        msg = (detail or lines or [""])[0][:200]
        raise UserError(
            f"cannot load the checkpoint in {folder} ({type(exc).__name__}{': ' + msg if msg else ''})",
            "check that the weights match config.json and are not truncated",
        ) from None
    finally:
        diffusers.logging.set_verbosity(level)
    if source.layers is not None:
        family.truncate(model, source.layers)
    return model


def build_transformer(source: ModelSource):
    """Build the transformer described by `source`: eval mode, float32, no gradients needed."""
    _check_source(source)
    if source.preset is not None:
        model = _from_preset(source)
    elif source.config is not None:
        model = _from_config(source)
    else:
        model = _from_checkpoint(source)
    family = family_of_model(model)
    family.check_model(model)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()
    model = model.eval()
    model.requires_grad_(False)
    lists = (getattr(model, name, None) for name in family.block_lists)  # a UNet's mid_block is one module
    blocks = sum(len(c) if isinstance(c, torch.nn.ModuleList) else int(c is not None) for c in lists)
    logger.info("built %s (%s): %d blocks, %d parameters", source.describe(), family.name, blocks,
                sum(p.numel() for p in model.parameters()))
    return model


def family_of_model(model) -> ModelFamily:
    """The family of a built diffusers model (its class, and its config where two families share a class)."""
    return family_of_class(type(model).__name__, dict(model.config))


def make_inputs(
    model,
    batch: int = 2,
    caption_length: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    with_mask: bool = False,
) -> dict[str, torch.Tensor]:
    """Seeded random forward inputs for `model`, named as the graph inputs of its family's export."""
    return family_of_model(model).example_inputs(model, batch, caption_length, seed, dtype, with_mask)


def forward(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sample `model` computes for graph-named `inputs` (the family knows the diffusers keyword layout)."""
    return family_of_model(model).forward(model, inputs)
