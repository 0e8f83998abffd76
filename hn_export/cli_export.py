"""`hn-export export`: build or load a transformer of a supported family and write it as ONNX (opset 21, IR 10).

    hn-export export --preset pixart-sigma-512 -o pixart512.onnx
    hn-export export --preset sd3-medium-256 --layers 2 -o sd3.onnx
    hn-export export --preset tiny --layers 1 --init plain -o tiny.onnx
    hn-export export --checkpoint ./PixArt-Sigma-XL-2-512-MS -o pixart512.onnx     # local diffusers folder
    hn-export export --config transformer/config.json --layers 2 -o small.onnx

Bad input (unknown preset, missing folder, corrupt config, wrong model class, --layers 0, output folder that does not
exist) prints one ``error: ...`` line and exits with code 2 before any long work; no file is written.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from hn_export.errors import UserError
from hn_export.metadata_keys import DTYPE_KEY, SOURCE_KEY, TORCH_KEY, VERSION_KEY
from hn_export.model_files import check_output_path
from models.build import InitKind, ModelSource
from models.families import family_of_preset
from models.presets import PRESETS

logger = logging.getLogger(__name__)


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes} B"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", metavar="NAME", help=f"Architecture with seeded random weights: {', '.join(PRESETS)}.")
@click.option("--checkpoint", metavar="DIR", type=click.Path(path_type=Path),
              help="Local diffusers folder: the transformer folder or a pipeline folder with transformer/.")
@click.option("--config", "config_path", metavar="FILE", type=click.Path(path_type=Path),
              help="A diffusers config.json of a supported model class; seeded random weights.")
@click.option("--layers", type=int,
              help="Keep only the first N transformer blocks (a UNet: N res blocks per level; Flux: N double + 2N "
                   "single).")
@click.option("--sample-size", type=int,
              help="Latent size (pixels / 8; pixels / 4 for the LDM-4 UNet, / 32 for Sana), e.g. 32, 64, 128. One "
                   "file per size.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--init", "init_kind", type=click.Choice([k.value for k in InitKind]), default=InitKind.DIT_STATS.value,
              show_default=True, help="Random weights: DiT-like activation statistics (dit-stats), the same "
              "without planted channel-mean offsets (outliers), or plain diffusers init (presets and configs only).")
@click.option("--fp16", is_flag=True, help="Export a float16 graph (inputs and output float16).")
@click.option("--with-mask", is_flag=True,
              help="Add the encoder_attention_mask input [B, L] (PixArt); the export then has static shapes "
              "(B=2, L=120).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output .onnx file.")
def export_command(preset, checkpoint, config_path, layers, sample_size, seed, init_kind, fp16, with_mask, output):
    """Export a PixArt-Sigma transformer to ONNX (one of --preset, --checkpoint, --config)."""
    given = [name for name, value in (("--preset", preset), ("--checkpoint", checkpoint), ("--config", config_path))
             if value is not None]
    if len(given) != 1:
        raise UserError(
            "give exactly one model source" + (f", got {' and '.join(given)}" if given else ""),
            "pass one of --preset NAME, --checkpoint DIR or --config config.json",
        )
    if layers is not None and layers < 1:
        raise UserError(f"--layers must be at least 1, got {layers}", "pass --layers 1 or more, or leave it out")
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}", f"use one of: {', '.join(PRESETS)}")
    if with_mask and preset is not None and not family_of_preset(preset).supports_mask:
        raise UserError(f"--with-mask: the {family_of_preset(preset).name} family's export has no "
                        "encoder_attention_mask input", "leave out --with-mask")
    inputs = [config_path]
    if checkpoint is not None and checkpoint.is_dir():  # never write over a file of the checkpoint
        inputs += [p for p in checkpoint.rglob("*") if p.is_file()]
    check_output_path(output, *inputs, data_file=True)
    if checkpoint is not None and init_kind != InitKind.DIT_STATS.value:
        logger.warning("--init applies to random weights only; the checkpoint's weights are used as they are")

    source = ModelSource(preset=preset, checkpoint=checkpoint, config=config_path, layers=layers,
                         sample_size=sample_size, seed=seed, init=InitKind(init_kind))

    import torch

    from hn_export import __version__
    from hn_export.export import export_transformer
    from models.build import build_transformer

    logger.info("building %s", source.describe())
    model = build_transformer(source)
    if fp16:
        import diffusers

        level = diffusers.logging.get_verbosity()
        diffusers.logging.set_verbosity_error()
        try:
            model = model.half()  # in place: no float32 copy kept during the export
        finally:
            diffusers.logging.set_verbosity(level)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("%d parameters, %s", n_params, "float16" if fp16 else "float32")
    metadata = {VERSION_KEY: __version__, SOURCE_KEY: source.describe(), DTYPE_KEY: "float16" if fp16 else "float32",
                TORCH_KEY: torch.__version__}
    files = export_transformer(model, output, fp16=fp16, with_mask=with_mask, progress=True, metadata=metadata)
    for f in files:
        click.echo(f"wrote {f} ({_size(f.stat().st_size)})")
