"""Options shared by the commands that quantize and evaluate several graphs (`compare`, `sensitivity`).

Comma lists (``--methods none,hadanorm``, ``--bits w4a4,w6a6``; an empty list is refused) and the user input files
``--calib FILE.npz`` and ``--inputs FILE.npz``, checked before any work with the one checker every command uses
(`hn_export.input_arrays.load_input_file`), so a bad file fails with one line and nothing is written; the weight
block check of the output formats (`check_format_block`, also used by the quantize command), the Hadamard block
(`check_hadamard_block`) and `FiniteFloatRange` (a float option that refuses NaN and infinities).
"""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import TypeVar

import click

from graph_passes.quantization import OutputFormat, QuantConfig
from hn_export.denoise import ModelSignature, load_input_file
from hn_export.errors import UserError
from hn_export.graph_import import check_float_graph
from hn_export.model_files import load_model

E = TypeVar("E", bound=Enum)

CALIB_HELP = ("Calibration inputs (.npz with hidden_states, timestep, encoder_hidden_states; first axis = samples) "
              "instead of denoising trajectories; --calib-samples/--calib-steps are then unused.")
INPUTS_HELP = ("Evaluation inputs (.npz named like the graph inputs, rows in (unconditional, conditional) pairs as a "
               "classifier-free-guidance pipeline calls the transformer): the single call runs the rows as stored; "
               "each pair's caption embeddings condition one denoising sample (from seeded latents), so the pairs "
               "set the sample count.")


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses NaN (which passes every comparison check) and infinities."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def parse_list(text: str, enum_type: type[E], option: str) -> list[E]:
    """``a,b,c`` or ``all`` -> enum members; an unknown name is a UserError naming the valid ones."""
    if text == "all":
        return list(enum_type)
    valid = ", ".join(m.value for m in enum_type)
    try:
        chosen = [enum_type(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        raise UserError(f"{option} {text!r} names an unknown value", f"choose from: {valid}, or all") from None
    if not chosen:
        raise UserError(f"{option} {text!r} names no value", f"choose from: {valid}, or all")
    return chosen


def parse_bits(text: str) -> list[QuantConfig]:
    """``w4a4,w6a6`` -> QuantConfigs (2 to 8 bits each)."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            w, a = item.removeprefix("w").split("a")
            out.append(QuantConfig(int(w), int(a)))
        except ValueError:
            raise UserError(f"--bits item {item!r} is not of the form wNaM with N, M in 2..8",
                            "e.g. --bits w4a4,w6a6") from None
    if not out:
        raise UserError(f"--bits {text!r} names no bit width", "e.g. --bits w4a4,w6a6")
    return out


def input_file_options(command):
    """``--calib FILE.npz`` and ``--inputs FILE.npz`` (parameters ``calib_inputs``, ``inputs_path``)."""
    command = click.option("--inputs", "inputs_path", type=click.Path(path_type=Path), help=INPUTS_HELP)(command)
    return click.option("--calib", "calib_inputs", type=click.Path(path_type=Path), help=CALIB_HELP)(command)


def samples_option(default: int):
    """``--samples N``; None when not given, so that it can be checked against ``--inputs``."""
    return click.option("--samples", type=click.IntRange(1), default=None,
                        help=f"Seeded samples [default: {default}; with --inputs: the file's pairs].")


def check_model_and_inputs(model: Path, calib_inputs: Path | None, inputs_path: Path | None,
                           samples: int | None) -> tuple[ModelSignature, dict | None]:
    """Load MODEL's signature and check both input files against it, before any work.

    Returns the signature and the checked ``--inputs`` arrays (None without the option)."""
    loaded = load_model(model, any_opset=True)  # lazy: weights stay on disk
    check_float_graph(loaded, str(model))
    sig = ModelSignature.of(loaded)
    if calib_inputs is not None:
        load_input_file(calib_inputs, sig, "calibration input file")
    if inputs_path is None:
        return sig, None
    if samples is not None:
        raise UserError("--samples and --inputs both given",
                        "drop --samples: the file's (unconditional, conditional) pairs are the samples")
    feeds = load_input_file(inputs_path, sig, "inputs file")  # shapes, dtypes, equal row counts, finite
    count = next((int(feeds[name].shape[0]) for name in sig.batched if name in feeds), 0)
    if count == 0 or count % 2:
        raise UserError(f"inputs file {inputs_path} holds {count} rows; they are taken in (unconditional, "
                        "conditional) pairs", "pass an even, nonzero number of rows")
    return sig, feeds


def check_format_block(fmt: OutputFormat, block: int, weight_bits: int) -> None:
    """Refuse weight blocks a format cannot hold (before any work). A weight narrower than one block is one
    padded block in every format."""
    if fmt is OutputFormat.NBITS and (block < 16 or block & (block - 1)):
        raise UserError(f"--format nbits needs a power-of-two --weight-block >= 16 (MatMulNBits), got {block}",
                        "use --weight-block 128, or --format qdq/fused")
    granule = 8 if weight_bits <= 4 else 4
    if fmt is OutputFormat.FUSED and block % granule:
        raise UserError(f"--format fused needs a --weight-block that is a multiple of {granule} for {weight_bits}-bit "
                        f"weights, got {block}", "use --weight-block 128")


def check_hadamard_block(block: int | None) -> None:
    """``--hadamard-block``: a power of two (before any calibration)."""
    if block is not None and (block < 1 or block & (block - 1)):
        raise UserError(f"--hadamard-block {block} is not a power of two", "use --hadamard-block 32, 64 or 128")

