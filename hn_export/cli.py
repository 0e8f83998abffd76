"""The `hn-export` command line.

`hn-export MODEL.onnx --w4a4` quantizes (the default command); the other jobs are subcommands
(`hn-export export ...`). Bad input prints one line ``error: ...`` and exits with code 2.
"""

from __future__ import annotations

import logging
import signal
import sys

import click

from graph_passes.errors import GraphInputError
from hn_export.errors import UserError
from models.errors import ModelInputError
from runtime.errors import RuntimeInputError

DEFAULT_COMMAND = "quantize"


class DefaultCommandGroup(click.Group):
    """A group whose first argument may be a model path: then the default command runs."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # Group options (-v) may come first; the first non-option argument is a command name or a model path.
        first = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
        if first is not None and args[first] not in self.commands:
            args = [*args[:first], DEFAULT_COMMAND, *args[first:]]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultCommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hn-export")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Export diffusion transformers (PixArt-Sigma/Alpha, SD3, DiT, Flux) to ONNX and quantize them to W4A4 with
    the HadaNorm transform.

    \b
    hn-export export --preset pixart-sigma-256 -o model.onnx
    hn-export model.onnx --w4a4            # writes model.w4a4.onnx
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _register_commands() -> None:
    from hn_export.cli_compare import compare_command
    from hn_export.cli_demo import demo_command
    from hn_export.cli_diff import diff_command
    from hn_export.cli_sensitivity import sensitivity_command
    from hn_export.cli_export import export_command
    from hn_export.cli_families import families_command
    from hn_export.cli_layers import layers_command
    from hn_export.cli_optimize import optimize_command
    from hn_export.cli_quantize import quantize_command

    cli.add_command(export_command, "export")
    cli.add_command(layers_command, "layers")
    cli.add_command(families_command, "families")
    cli.add_command(compare_command, "compare")
    cli.add_command(demo_command, "demo")
    cli.add_command(diff_command, "diff")
    cli.add_command(sensitivity_command, "sensitivity")
    cli.add_command(optimize_command, "optimize")
    from hn_export.cli_bundle import bundle_command; cli.add_command(bundle_command, "bundle")  # noqa: E702
    from hn_export.cli_split import split_prompt_command; cli.add_command(split_prompt_command, "split-prompt")  # noqa
    cli.add_command(quantize_command, DEFAULT_COMMAND)


_register_commands()


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, a CI cancel or `docker stop` send): unwinds like Ctrl-C, so that every temporary file
    and folder is removed on the way out."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning bad input into one line and exit code 2."""
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave SIGTERM alone
        previous = None
    try:
        _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> None:
    try:
        cli.main(args=argv, prog_name="hn-export", standalone_mode=False)
    except (UserError, GraphInputError, RuntimeInputError, ModelInputError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt) as exc:  # click turns KeyboardInterrupt into Abort (the cause)
        if isinstance(exc, Terminated) or isinstance(exc.__cause__, Terminated):
            click.echo("error: terminated (SIGTERM); no output file was written", err=True)
        else:
            click.echo("error: interrupted; no output file was written", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}; see `hn-export --help`", err=True)
        sys.exit(2)
    sys.exit(0)
