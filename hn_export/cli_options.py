"""Command-line options as typed groups, shared by the commands, and the checks every command runs before any work.

An option group is a frozen dataclass whose fields are click options: `option_group` adds the options to a command,
which receives one instance per group (``QuantOptions`` of `hn_export.cli_quantize`, used by ``quantize`` and
``bundle``; `Evaluation`, used by ``compare``, ``sensitivity`` and ``diff``; `EvaluationData`, used by ``compare`` and
``sensitivity``; ``GridOptions`` of ``compare``). Each group is checked in one place, its constructor or the method
that turns it into a job, which raises the one-line `UserError`.

Also here: comma lists (``--methods none,hadanorm``, ``--bits w4a4,w6a6``; an empty list is refused), the user input
files ``--calib FILE.npz`` and ``--inputs FILE.npz``, checked before any work with the one checker every command uses
(`hn_export.input_arrays.load_input_file`), so a bad file fails with one line and nothing is written; the weight
block check of the output formats (`check_format_block`), the Hadamard block (`check_hadamard_block`), `EnumChoice`
(a click.Choice over an enum's values that hands the command the member) and `FiniteFloatRange` (a float option that
refuses NaN and infinities).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import click

from graph_passes.quantization import FUSED_MAX_BLOCK, OutputFormat, QuantConfig
from hn_export.cluster.address import parse_address
from hn_export.cluster.ray_session import Cluster
from hn_export.compare import EvaluationInputs
from hn_export.denoise import DenoiseConfig, ModelSignature, load_input_file
from hn_export.errors import UserError
from hn_export.graph_import import check_float_graph
from hn_export.model_files import load_model

E = TypeVar("E", bound=Enum)
F = TypeVar("F", bound=Callable[..., Any])

CALIB_HELP = ("Calibration inputs (.npz with hidden_states, timestep, encoder_hidden_states; first axis = samples) "
              "instead of denoising trajectories; --calib-samples/--calib-steps are then unused.")
INPUTS_HELP = ("Evaluation inputs (.npz named like the graph inputs, rows in (unconditional, conditional) pairs as a "
               "classifier-free-guidance pipeline calls the transformer): the single call runs the rows as stored; "
               "each pair's caption embeddings condition one denoising sample (from seeded latents), so the pairs "
               "set the sample count.")


def option_group(cls: type, name: str, *options: Callable[[F], F], **fixed: Any) -> Callable[[F], F]:
    """A decorator adding `options` (``click.option`` decorators, in the order ``--help`` lists them) to a command
    that receives them as one frozen dataclass: parameter `name` = ``cls(**values, **fixed)``, built once click has
    parsed and range-checked every option, before the command body runs. The fields of `cls` are exactly the
    options' parameters and the `fixed` values."""

    def collect(command: F) -> F:
        @functools.wraps(command)
        def run(*args, **kwargs):
            values = {field: kwargs.pop(field) for field in params}
            return command(*args, **kwargs, **{name: cls(**values, **fixed)})

        for option in reversed(options):  # as if stacked above the command in this order
            run = option(run)
        return run  # type: ignore[return-value]

    def probe() -> None: ...

    for option in options:
        option(probe)
    params = list(dict.fromkeys(p.name for p in probe.__click_params__))  # type: ignore[attr-defined]
    fields = [f.name for f in dataclasses.fields(cls)]
    if sorted([*params, *fixed]) != sorted(fields):
        raise TypeError(f"{cls.__name__} has fields {fields}; its options and fixed values give {[*params, *fixed]}")
    return collect


class EnumChoice(click.Choice):
    """click.Choice over an enum's values (help, metavar and errors as click.Choice's) that hands the command the
    member: a new member is a new choice by itself."""

    def __init__(self, enum_type: type[Enum]) -> None:
        super().__init__([member.value for member in enum_type])
        self.enum_type = enum_type

    def convert(self, value, param, ctx):
        if isinstance(value, self.enum_type):
            return value
        return self.enum_type(super().convert(value, param, ctx))


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


def parse_ranks(text: str) -> list[int]:
    """``0,16,32`` -> low-rank branch ranks (``--low-ranks``), each a whole number >= 0."""
    ranks = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        if not (item.isascii() and item.isdigit()):
            raise UserError(f"--low-ranks item {item!r} is not a whole number >= 0", "e.g. --low-ranks 0,16,32")
        ranks.append(int(item))
    if not ranks:
        raise UserError(f"--low-ranks {text!r} names no rank", "e.g. --low-ranks 0,16,32")
    return list(dict.fromkeys(ranks))


def samples_option(default: int):
    """``--samples N``; None when not given, so that it can be checked against ``--inputs``."""
    return click.option("--samples", type=click.IntRange(1), default=None,
                        help=f"Seeded samples [default: {default}; with --inputs: the file's pairs].")


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """How many denoising steps and seeded samples each graph is run for (``--steps``, ``--samples``)."""

    steps: int
    samples: int | None  # None: not given (the command's default, or with --inputs the file's pairs)
    default_samples: int

    def config(self, seed: int) -> DenoiseConfig:
        return DenoiseConfig(steps=self.steps, samples=self.samples or self.default_samples, seed=seed)


def evaluation_options(default_samples: int):
    """``--steps`` and ``--samples`` (compare, sensitivity) as an `Evaluation`, parameter ``evaluation``."""
    return option_group(
        Evaluation, "evaluation",
        click.option("--steps", type=click.IntRange(1), default=20, show_default=True, help="Denoising steps."),
        samples_option(default_samples),
        default_samples=default_samples)


@dataclasses.dataclass(frozen=True)
class EvaluationData:
    """What the graphs of compare and sensitivity are calibrated and run on: ``--calib FILE.npz`` (else
    ``--calib-samples`` denoising trajectories of ``--calib-steps`` steps) and ``--inputs FILE.npz`` (else seeded
    inputs)."""

    calib_inputs: Path | None
    inputs_path: Path | None
    calib_samples: int
    calib_steps: int

    def check(self, model: Path, samples: int | None) -> tuple[ModelSignature, dict | None]:
        """Load MODEL's signature and check both input files against it (and ``--samples``), before any work.

        Returns the signature and the checked ``--inputs`` arrays (None without the option)."""
        loaded = load_model(model, any_opset=True)  # lazy: weights stay on disk
        check_float_graph(loaded, str(model))
        sig = ModelSignature.of(loaded)
        if self.calib_inputs is not None:
            load_input_file(self.calib_inputs, sig, "calibration input file")
        if self.inputs_path is None:
            return sig, None
        if samples is not None:
            raise UserError("--samples and --inputs both given",
                            "drop --samples: the file's (unconditional, conditional) pairs are the samples")
        feeds = load_input_file(self.inputs_path, sig, "inputs file")  # shapes, dtypes, equal row counts, finite
        count = next((int(feeds[name].shape[0]) for name in sig.batched if name in feeds), 0)
        if count == 0 or count % 2:
            raise UserError(f"inputs file {self.inputs_path} holds {count} rows; they are taken in (unconditional, "
                            "conditional) pairs", "pass an even, nonzero number of rows")
        return sig, feeds

    def evaluation_inputs(self, config: DenoiseConfig, feeds: dict | None) -> EvaluationInputs:
        """The inputs every graph runs on: the checked ``--inputs`` arrays (`check`), else seeded ones."""
        return EvaluationInputs(config, feeds, f"file:{self.inputs_path.name}" if feeds is not None else "seeded")

    def calibration(self, seed: int) -> DenoiseConfig:
        return DenoiseConfig(steps=self.calib_steps, samples=self.calib_samples, seed=seed)

    def calibration_report(self, seed: int) -> dict:
        """The calibration as reports record it: the file, or the trajectories."""
        if self.calib_inputs is not None:
            return {"file": self.calib_inputs.name}
        return dataclasses.asdict(self.calibration(seed))


evaluation_data_options = option_group(
    EvaluationData, "data",
    click.option("--calib", "calib_inputs", type=click.Path(path_type=Path), help=CALIB_HELP),
    click.option("--inputs", "inputs_path", type=click.Path(path_type=Path), help=INPUTS_HELP),
    click.option("--calib-samples", type=click.IntRange(1), default=2, show_default=True),
    click.option("--calib-steps", type=click.IntRange(1), default=20, show_default=True),
)
"""``--calib``, ``--inputs``, ``--calib-samples``, ``--calib-steps`` as an `EvaluationData`, parameter ``data``."""


def check_format_block(fmt: OutputFormat, block: int, weight_bits: int, option: str = "--weight-block") -> None:
    """Refuse weight blocks a format cannot hold (before any work); `option`: the flag that gave the block. A weight
    narrower than one block is one padded block in every format."""
    if fmt is OutputFormat.NBITS and (block < 16 or block & (block - 1)):
        raise UserError(f"--format nbits needs a power-of-two {option} >= 16 (MatMulNBits), got {block}",
                        f"use {option} 128, or --format qdq/fused")
    granule = 8 if weight_bits <= 4 else 4
    if fmt is OutputFormat.FUSED and block > FUSED_MAX_BLOCK:
        raise UserError(f"--format fused takes a {option} up to {FUSED_MAX_BLOCK} (its integer kernels' largest), "
                        f"got {block}", f"use {option} 128")
    if fmt is OutputFormat.FUSED and block % granule:
        raise UserError(f"--format fused needs a {option} that is a multiple of {granule} for {weight_bits}-bit "
                        f"weights, got {block}", f"use {option} 128")


def check_hadamard_block(block: int | None) -> None:
    """``--hadamard-block``: a power of two (before any calibration)."""
    if block is not None and (block < 1 or block & (block - 1)):
        raise UserError(f"--hadamard-block {block} is not a power of two", "use --hadamard-block 32, 64 or 128")



@dataclasses.dataclass(frozen=True)
class RayOptions:
    """``--ray ADDRESS``: run the command's calibration (a map-reduce over trajectories) and its grids (one task per
    graph x sample) on a Ray cluster (`hn_export.cluster`), with the same results; ``--ray-shared-files`` and
    ``--ray-task-cpus`` say how the tasks read the model and how many CPUs each takes. Without ``--ray`` nothing
    imports ray."""

    ray: str | None
    ray_shared_files: bool
    ray_task_cpus: int

    def __post_init__(self) -> None:
        if self.ray is not None:
            parse_address(self.ray)  # one line before any work
        elif self.ray_shared_files or self.ray_task_cpus != 1:
            raise UserError("--ray-shared-files / --ray-task-cpus apply to a Ray cluster", "add --ray ADDRESS")

    def cluster(self) -> contextlib.AbstractContextManager[Cluster | None]:
        """The cluster for the command's work (connected on entry, released on exit); None without ``--ray``."""
        if self.ray is None:
            return contextlib.nullcontext()
        return Cluster(parse_address(self.ray), self.ray_shared_files, self.ray_task_cpus)


ray_options = option_group(
    RayOptions, "ray_options",
    click.option("--ray", metavar="ADDRESS",
                 help="Run on a Ray cluster: HOST:PORT (its head, as `ray start --head` prints it), auto (the cluster "
                      "this machine is attached to) or local (start one on this machine). Needs pip install -e "
                      "'.[cluster]' on every node."),
    click.option("--ray-shared-files", is_flag=True,
                 help="With --ray: the model lies on a filesystem every node mounts at the same path; tasks read it "
                      "there instead of receiving it through Ray's object store (once per node)."),
    click.option("--ray-task-cpus", type=click.IntRange(1), default=1, show_default=True,
                 help="With --ray: CPUs each task takes on its node (and the threads of its onnxruntime session)."),
)
"""``--ray``, ``--ray-shared-files``, ``--ray-task-cpus`` as a `RayOptions`, parameter ``ray_options``."""
