"""`hn-export bundle`: write the folder a device needs for text to image (see `hn_export.bundle`).

    hn-export bundle --preset tiny -o tiny_bundle/                      # seeded tiny pipeline, no files needed
    hn-export bundle --checkpoint ./PixArt-Sigma-XL-2-512-MS -o px512/   # local diffusers folder, no hub access
    hn-export bundle --checkpoint DIR --sizes 512x512,768x768 --method hadanorm --format nbits -o px/
    hn-export bundle --checkpoint ./PixArt-Sigma-XL-2-1024-MS --sizes 1024x768,768x1024,1024x1024 -o px1024/
    hn-export bundle --checkpoint ./PixArt-Sigma-XL-2-1024-MS --sizes bins -o px_bins/   # diffusers' 33 bins
    hn-export bundle --checkpoint DIR --no-quantize -o px_fp32/         # every component in float: the reference
    hn-export bundle --preset sd3-tiny -o sd3_bundle/                   # Stable Diffusion 3: three text encoders

The transformer quantize options are those of ``hn-export MODEL.onnx --w4a4``: the same option group
(`hn_export.cli_quantize.QuantOptions`, `--format` defaulting to ``fused``), without the files of `QuantizeFiles`
(``--calib``, ``--stats``, ``--act-scales`` and their ``--save-*``, which hold one size's data) and
``--transform-only``; each size is calibrated by the quantize job's own denoising trajectories. Bad input is one
``error:`` line, exit code 2, nothing written.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import click

from graph_passes.quantization import OutputFormat
from hn_export.bundle import SIZES_BINS, BundleJob, parse_sizes, run_bundle
from hn_export.bundle_components import DEFAULT_ENCODER_BITS, DEFAULT_ENCODER_BLOCK, ENCODER_BITS
from hn_export.cli_options import RayOptions, ray_options
from hn_export.cli_quantize import QuantOptions, quant_options
from hn_export.errors import UserError
from models.pipeline_presets import pipeline_preset_names

DEFAULT_FORMAT = OutputFormat.FUSED  # --format defaults to fused here


@dataclasses.dataclass(frozen=True)
class EncoderOptions:
    """The text encoders' options: weight-only bits and block, and the tokens the runtime keeps of a prompt."""

    bits: int = DEFAULT_ENCODER_BITS
    block: int = DEFAULT_ENCODER_BLOCK
    max_sequence_length: int | None = None


def encoder_options(command):
    """Adds --encoder-bits, --encoder-block and --max-sequence-length, passed as one `EncoderOptions` (`encoder`)."""
    options = [
        click.option("--encoder-bits", type=click.Choice([str(b) for b in ENCODER_BITS]),
                     default=str(DEFAULT_ENCODER_BITS), show_default=True,
                     help="Weight-only bits of the text encoders' linears (MatMulNBits; T5, and SD3's two CLIP "
                          "encoders)."),
        click.option("--encoder-block", type=int, default=DEFAULT_ENCODER_BLOCK, show_default=True,
                     help="Block size of the encoder's weight quantization (a power of two >= 16)."),
        click.option("--max-sequence-length", type=int,
                     help="T5 tokens the runtime keeps of a prompt (longer ones are truncated with a warning). "
                          "Default: the pipeline's (PixArt-Sigma 300, SD3 256)."),
    ]

    @functools.wraps(command)
    def wrapper(*args, encoder_bits: str, encoder_block: int, max_sequence_length: int | None, **kwargs):
        return command(*args, encoder=EncoderOptions(int(encoder_bits), encoder_block, max_sequence_length), **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", metavar="DIR", type=click.Path(path_type=Path),
              help="Local diffusers pipeline folder: PixArtSigmaPipeline (model_index.json, text_encoder/, "
                   "tokenizer/, transformer/, vae/, scheduler/) or StableDiffusion3Pipeline (also text_encoder_2/, "
                   "text_encoder_3/, tokenizer_2/, tokenizer_3/); never downloads.")
@click.option("--preset", "pipeline_preset", metavar="NAME",
              help="A pipeline built from seeded weights (models.pipelines, models.pipelines_sd3): " + ", ".join(pipeline_preset_names()) + ".")
@click.option("--preset-seed", type=int, default=0, show_default=True, help="Seed of the --preset weights.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Bundle folder to write (new, empty, or an older bundle, replaced at the end).")
@click.option("--sizes", metavar="WxH[,WxH...]|bins",
              help="Image sizes in pixels (width x height, multiples of 16), one transformer each (default: the "
                   "transformer's own size); 'bins': diffusers' aspect-ratio table for the checkpoint's sample size "
                   "(PixArtSigmaPipeline's resolution binning: 33 sizes at 256-1024 px, 40 at 2048 px).")
@click.option("--no-quantize", is_flag=True, help="Every component in float32 (the reference bundle).")
@click.option("--no-split-prompt", is_flag=True,
              help="One whole transformer graph per size (default: a step graph and a prompt graph, the caption's "
                   "work once per prompt: `hn-export split-prompt`).")
@encoder_options
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@quant_options(default_format=DEFAULT_FORMAT)
@ray_options
def bundle_command(checkpoint: Path | None, pipeline_preset: str | None, preset_seed: int, output: Path,
                   sizes: str | None, no_quantize: bool, no_split_prompt: bool, encoder: EncoderOptions,
                   no_progress: bool, quant: QuantOptions, ray_options: RayOptions) -> None:
    """Write a text-to-image bundle (text encoder, W4A4 transformer, VAE decoder, tokenizer, scheduler) that
    `hn-run` runs with onnxruntime, numpy and tokenizers only."""
    given = [name for name, value in (("--checkpoint", checkpoint), ("--preset", pipeline_preset)) if value is not None]
    if len(given) != 1:
        raise UserError("give exactly one pipeline source" + (f", got {' and '.join(given)}" if given else ""),
                        "pass --checkpoint DIR or --preset NAME")
    # the transformers' job template (model_path and output are set per size), checked as the quantize command's
    quantize = None if no_quantize else quant.job(Path("transformer.onnx"), Path("transformer.q.onnx"))
    bins = sizes is not None and sizes.strip().lower() == SIZES_BINS
    job = BundleJob(output=output, checkpoint=checkpoint, preset=pipeline_preset, preset_seed=preset_seed,
                    sizes=() if bins else parse_sizes(sizes), bins=bins, quantize=quantize,
                    encoder_bits=None if no_quantize else encoder.bits, encoder_block=encoder.block,
                    max_sequence_length=encoder.max_sequence_length, progress=not no_progress,
                    split_prompt=not no_split_prompt)
    with ray_options.cluster() as cluster:  # each size's calibration as a map-reduce on it
        if quantize is not None:
            job = dataclasses.replace(job, quantize=dataclasses.replace(quantize, cluster=cluster))
        report = run_bundle(job)
    for line in report.quantize_summaries:
        click.echo(line)
    for entry in report.files:
        detail = ", ".join(str(v) for v in (entry.bits, entry.method, entry.format) if v)
        click.echo(f"{entry.role:18s} {entry.path} ({entry.bytes / 1e6:.2f} MB{', ' + detail if detail else ''})")
    click.echo(f"wrote {report.output}/ (sizes {', '.join(f'{w}x{h}' for w, h in report.sizes)}); run it with "
               f"hn-run {report.output} \"a prompt\" -o image.png")
