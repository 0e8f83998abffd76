"""Build a PixArt-Sigma transformer: a preset or config.json with seeded random weights, or a local checkpoint.

`build_transformer(ModelSource(...))` returns a diffusers `PixArtTransformer2DModel` in eval mode, float32.

- ``preset``: an architecture from `models.presets.PRESETS`, seeded random weights.
- ``config``: a diffusers ``config.json`` of a `PixArtTransformer2DModel`, seeded random weights.
- ``checkpoint``: a local diffusers folder, either the transformer folder itself (``config.json`` + weights) or a
  pipeline folder with a ``transformer/`` subfolder. Loaded with ``local_files_only=True``: nothing is downloaded.

Random weights are the diffusers initialisation drawn under ``torch.manual_seed(seed)`` inside
`torch.random.fork_rng` (the caller's global RNG is untouched; the same seed gives identical weights). With
``init=InitKind.DIT_STATS`` (the default for presets and configs) `models.dit_stats.plant_dit_stats` then plants
DiT-like activation statistics; ``InitKind.PLAIN`` keeps the plain initialisation. ``init`` does not apply to
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
from models.presets import PRESETS, PixArtPreset

logger = logging.getLogger(__name__)

PIXART_CLASS_NAME = "PixArtTransformer2DModel"
MAX_SAMPLE_SIZE = 256  # latent 256x256 = 2048 px, the largest PixArt-Sigma resolution
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


def _check_sample_size(sample_size: int, patch_size: int) -> None:
    if not (patch_size <= sample_size <= MAX_SAMPLE_SIZE) or sample_size % patch_size:
        raise UserError(
            f"unsupported sample size {sample_size}",
            f"use a multiple of the patch size {patch_size} between {patch_size} and {MAX_SAMPLE_SIZE} "
            f"(latent size = pixels / 8: 32, 64, 128 are 256, 512, 1024 px)",
        )


def _check_layers_against(source: ModelSource, num_layers: int, what: str) -> None:
    if source.layers is not None and source.layers > num_layers:
        raise UserError(
            f"--layers {source.layers} is more than the {num_layers} blocks of {what}",
            f"pass --layers {num_layers} or fewer",
        )


def _read_config_json(path: Path, what: str) -> dict[str, Any]:
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
    class_name = cfg.get("_class_name")
    if class_name != PIXART_CLASS_NAME:
        found = f"a {class_name}" if class_name else "not a diffusers model config (no _class_name)"
        raise UserError(
            f"{what} {path} is {found}, not a {PIXART_CLASS_NAME}",
            "pass the transformer of a PixArt-Sigma / PixArt-Alpha pipeline",
        )
    return cfg


def _config_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of PixArtTransformer2DModel found in a config dict."""
    import inspect

    from diffusers import PixArtTransformer2DModel

    params = set(inspect.signature(PixArtTransformer2DModel.__init__).parameters) - {"self"}
    return {k: v for k, v in cfg.items() if k in params}


def _seeded_model(kwargs: dict[str, Any], source: ModelSource, what: str):
    from diffusers import PixArtTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(source.seed)
        try:
            model = PixArtTransformer2DModel(**kwargs)
        except (TypeError, ValueError, NotImplementedError, AssertionError, RuntimeError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"cannot build a PixArt transformer from {what}: {msg}", "fix the config") from None
    if InitKind(source.init) in (InitKind.DIT_STATS, InitKind.OUTLIERS):
        from models.dit_stats import plant_dit_stats

        plant_dit_stats(model, source.seed, offsets=InitKind(source.init) == InitKind.DIT_STATS)
    return model


def _from_preset(source: ModelSource):
    if source.preset not in PRESETS:
        raise UserError(f"unknown preset {source.preset!r}", f"use one of: {', '.join(PRESETS)}")
    preset: PixArtPreset = PRESETS[source.preset]
    changes: dict[str, Any] = {}
    if source.layers is not None:
        changes["num_layers"] = source.layers
    if source.sample_size is not None:
        _check_sample_size(source.sample_size, preset.patch_size)
        changes["sample_size"] = source.sample_size
    if changes:
        preset = preset.replace(**changes)
    return _seeded_model(preset.config(), source, f"preset {source.preset}")


def _from_config(source: ModelSource):
    path = Path(source.config)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise UserError(f"config file {path} does not exist", "check the path")
    cfg = _read_config_json(path, "config")
    kwargs = _config_kwargs(cfg)
    num_layers = int(kwargs.get("num_layers", 28))
    _check_layers_against(source, num_layers, f"config {path}")
    if source.layers is not None:
        kwargs["num_layers"] = source.layers
    if source.sample_size is not None:
        _check_sample_size(source.sample_size, int(kwargs.get("patch_size", 2)))
        kwargs["sample_size"] = source.sample_size
    if kwargs.get("use_additional_conditions") is None:
        # diffusers would switch it on for sample_size 128; PixArt-Sigma does not use it and the export
        # has no resolution/aspect-ratio inputs.
        kwargs["use_additional_conditions"] = False
    return _seeded_model(kwargs, source, f"config {path}")


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
    from diffusers import PixArtTransformer2DModel

    folder = resolve_checkpoint(Path(source.checkpoint))
    cfg = _read_config_json(folder / "config.json", "checkpoint config")
    weights = [p for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(".index.json")]
    if not weights:
        raise UserError(
            f"checkpoint folder {folder} has no weights (*.safetensors or *.bin)",
            "copy the diffusion_pytorch_model.* files beside config.json",
        )
    num_layers = int(cfg.get("num_layers", 28))
    _check_layers_against(source, num_layers, f"checkpoint {folder}")
    overrides: dict[str, Any] = {}
    if cfg.get("use_additional_conditions") is None and cfg.get("sample_size") == 128:
        overrides["use_additional_conditions"] = False
    if source.sample_size is not None:
        _check_sample_size(source.sample_size, int(cfg.get("patch_size", 2)))
        overrides["sample_size"] = source.sample_size
    import diffusers

    level = diffusers.logging.get_verbosity()
    diffusers.logging.set_verbosity_error()
    try:
        model = PixArtTransformer2DModel.from_pretrained(
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
    if source.layers is not None and source.layers < len(model.transformer_blocks):
        model.transformer_blocks = torch.nn.ModuleList(list(model.transformer_blocks)[: source.layers])
        model.register_to_config(num_layers=source.layers)
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
    if getattr(model, "use_additional_conditions", False):
        raise UserError(
            "the model uses additional conditions (resolution / aspect ratio embeddings), which the export does not "
            "support",
            "set use_additional_conditions to false in config.json (PixArt-Sigma does not use them)",
        )
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()
    model = model.eval()
    model.requires_grad_(False)
    logger.info("built %s: %d blocks, %d parameters", source.describe(), len(model.transformer_blocks),
                sum(p.numel() for p in model.parameters()))
    return model


def latent_size(model) -> int:
    """The latent height and width the model is exported at."""
    return int(model.config.sample_size)


def caption_width(model) -> int:
    """Width of `encoder_hidden_states` (the T5 feature width when the model projects captions)."""
    cfg = model.config
    return int(cfg.caption_channels if cfg.caption_channels is not None else cfg.cross_attention_dim)


def make_inputs(
    model,
    batch: int = 2,
    caption_length: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    with_mask: bool = False,
) -> dict[str, torch.Tensor]:
    """Random forward inputs (keyword names of the diffusers forward) for `model`."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    s = latent_size(model)
    inputs = {
        "hidden_states": torch.randn(batch, cfg.in_channels, s, s, generator=gen).to(dtype),
        "timestep": (torch.rand(batch, generator=gen) * 999.0).round().to(dtype),
        "encoder_hidden_states": torch.randn(batch, caption_length, caption_width(model), generator=gen).to(dtype),
    }
    if with_mask:
        mask = torch.ones(batch, caption_length, dtype=dtype)
        for b in range(batch):  # keep a prefix of varying length (at least one token), like padded T5 captions
            keep = max(1, caption_length * (b + 1) // (batch + 1))
            mask[b, keep:] = 0
        inputs["encoder_attention_mask"] = mask
    return inputs
