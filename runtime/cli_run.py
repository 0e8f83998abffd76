"""`hn-run BUNDLE "prompt" -o image.png`: text to image on the device from a bundle (`runtime.pipeline`).

    hn-run bundle/ "a red fox in the snow" -o fox.png
    hn-run bundle/ "a red fox" --negative "blurry" --steps 20 --guidance 4.5 --seed 7 --size 1024x1024 -o fox.png -v
    hn-run bundle/ "a red fox" --size 1000x700 -o fox.png     # not bundled: generated at the closest aspect ratio

The PNG carries the prompt and settings as text chunks (``prompt``, ``negative_prompt``, ``steps``,
``guidance_scale``, ``seed``, ``size``, ``scheduler``, ``bundle``, and a one-string ``parameters``), and is written
atomically (a temporary file beside it, renamed). ``--size WxH`` runs the bundled transformer of that size; a size
the bundle does not hold is, with ``--resolution-binning`` (the default, as diffusers' ``use_resolution_binning``),
generated at the bundled size of the closest aspect ratio and resized bilinearly and center-cropped to WxH
(`runtime.pipeline_sizes`): an ``info:`` line says so, and so does the PNG (``generated_size`` and
``resolution_binning`` chunks). Bad input (a missing or changed bundle file, a size the bundle does not hold with
``--no-resolution-binning``, a size that is not WxH positive pixels, an output path that is a folder) prints one
``error:`` line and exits with code 2, writing nothing; a prompt longer than the encoder takes is truncated with a
warning, as diffusers does.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

import click

from runtime.errors import RuntimeInputError

logger = logging.getLogger(__name__)


def _parse_size(text: str | None) -> tuple[int | None, int | None]:
    if text is None:
        return None, None
    w, sep, h = text.lower().partition("x")
    try:
        width, height = int(w), int(h) if sep else int(w)
    except ValueError:
        raise RuntimeInputError(f"--size {text!r} is not WIDTHxHEIGHT; write e.g. --size 1024x1024") from None
    if min(width, height) < 1:
        raise RuntimeInputError(f"--size {text!r} is not a positive size; write e.g. --size 1024x1024")
    return width, height


def _check_output(path: Path, bundle: Path) -> None:
    if path.suffix.lower() != ".png":
        raise RuntimeInputError(f"-o {path} is not a .png file name; write e.g. -o image.png")
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise RuntimeInputError(f"-o {path} exists and is not a regular file; choose a new file name")
    if path.resolve().parent == bundle.resolve() and (bundle / "bundle.json").is_file():
        raise RuntimeInputError(f"-o {path} is inside the bundle folder; write the image elsewhere")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise RuntimeInputError(f"output folder {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK):
        raise RuntimeInputError(f"output folder {parent} is not writable; choose another path")


def save_png(image, path: Path, settings: dict, bundle: str) -> None:
    """The image with its settings as PNG text chunks, through a temporary file and a rename."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    fields = {"prompt": settings["prompt"], "negative_prompt": settings["negative_prompt"],
              "steps": settings["steps"], "guidance_scale": settings["guidance_scale"], "seed": settings["seed"],
              "size": f"{settings['width']}x{settings['height']}", "scheduler": settings["scheduler"],
              "bundle": bundle, "software": "hn-run (hn-export runtime)"}
    if settings.get("resolution_binning"):
        fields["generated_size"] = f"{settings['generated_width']}x{settings['generated_height']}"
        fields["resolution_binning"] = settings["resolution_binning"]
    for key, value in fields.items():
        info.add_itxt(key, str(value))
    info.add_itxt("parameters", f"{settings['prompt']}\nNegative prompt: {settings['negative_prompt']}\n"
                                f"Steps: {settings['steps']}, CFG scale: {settings['guidance_scale']}, "
                                f"Seed: {settings['seed']}, Size: {fields['size']}, Sampler: {settings['scheduler']}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except OSError as exc:
        raise RuntimeInputError(f"could not write {path}: {exc.strerror}; check free disk space and permissions") \
            from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--negative", "negative_prompt", help="Negative prompt (default: the bundle's, empty).")
@click.option("--steps", type=click.IntRange(1, 1000), help="Denoising steps (default: the bundle's, 20).")
@click.option("--guidance", type=click.FloatRange(0.0, 100.0), help="Classifier-free guidance scale (default 4.5).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the starting noise (torch's CPU "
              "generator, so the same seed gives diffusers' starting latents).")
@click.option("--size", help="WIDTHxHEIGHT in pixels (default: the bundle's default size). A size the bundle does "
              "not hold is generated at its closest aspect ratio and resized (see --resolution-binning).")
@click.option("--resolution-binning/--no-resolution-binning", default=True, show_default=True,
              help="For a --size the bundle does not hold: generate at the bundled size of the closest aspect ratio "
                   "and resize + center-crop to --size, as diffusers' use_resolution_binning (off: an error).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output .png file.")
@click.option("--threads", type=click.IntRange(1), help="onnxruntime intra-op threads.")
@click.option("--provider", help="onnxruntime execution provider (default: the first available of CUDA, QNN, "
              "CoreML, CPU).")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle files (sizes still checked).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("-v", "--verbose", is_flag=True, help="Print time and peak RSS per stage.")
def run_command(bundle, prompt, negative_prompt, steps, guidance, seed, size, resolution_binning, output, threads,
                provider, no_verify, no_progress, verbose) -> None:
    """Make an image from PROMPT with the bundle folder BUNDLE (written by `hn-export bundle`)."""
    from runtime.pipeline import TextToImage

    width, height = _parse_size(size)
    _check_output(output, bundle)
    pipe = TextToImage(bundle, verify=not no_verify, provider=provider, threads=threads, progress=not no_progress)
    pipe.plan_size(width, height, resolution_binning)  # a size it cannot make: the error before any work
    result = pipe(prompt, negative_prompt, steps=steps, guidance_scale=guidance, seed=seed, width=width,
                  height=height, resolution_binning=resolution_binning)
    save_png(result.image, output, result.settings, pipe.manifest.data.get("source", str(bundle)))
    if verbose:
        for stage in result.stages:
            click.echo(stage.describe(), err=True)
    binned = f" from {result.settings['generated_width']}x{result.settings['generated_height']} by resolution " \
        "binning" if result.settings.get("resolution_binning") else ""
    click.echo(f"wrote {output} ({result.settings['width']}x{result.settings['height']}{binned}, "
               f"{result.settings['steps']} steps, guidance {result.settings['guidance_scale']}, seed {seed})")


def main(argv: list[str] | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    logging.getLogger("runtime").addHandler(handler)
    logging.getLogger("runtime").setLevel(logging.WARNING)
    pipeline_logger = logging.getLogger("runtime.pipeline")  # its info lines (resolution binning) are shown too
    pipeline_level = pipeline_logger.level
    pipeline_logger.setLevel(logging.INFO)
    try:
        run_command.main(args=argv, prog_name="hn-run", standalone_mode=False)
    except RuntimeInputError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        click.echo("error: interrupted; no image was written", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}; see `hn-run --help`", err=True)
        sys.exit(2)
    finally:
        logging.getLogger("runtime").removeHandler(handler)
        pipeline_logger.setLevel(pipeline_level)
    sys.exit(0)


if __name__ == "__main__":
    main()
