"""Option groups (`hn_export.cli_options.option_group`): each command receives its options as frozen dataclasses,
the commands that share a group share its declarations, and no command takes ``**kwargs``."""

from __future__ import annotations

import dataclasses
import inspect

import click
import pytest
from click.testing import CliRunner

from graph_passes.methods import Method
from graph_passes.quantization import OutputFormat, WeightRange
from hn_export.cli import cli
from hn_export.cli_options import EnumChoice, option_group
from hn_export.cli_quantize import QuantOptions, QuantizeFiles
from hn_export.errors import UserError


@dataclasses.dataclass(frozen=True)
class Pair:
    method: Method
    count: int
    fixed: str


@click.command()
@option_group(Pair, "pair",
              click.option("--method", type=EnumChoice(Method), default=Method.HADANORM.value, show_default=True),
              click.option("--count", type=int, default=3),
              fixed="x")
@click.option("--flag", is_flag=True)
def _probe(pair: Pair, flag: bool) -> None:
    click.echo(f"{pair!r} {flag}")


def test_group_is_one_frozen_dataclass_of_typed_values():
    result = CliRunner().invoke(_probe, ["--method", "sdcb", "--flag"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"{Pair(Method.SDCB, 3, 'x')!r} True"
    result = CliRunner().invoke(_probe, ["--method", "nope"])
    assert result.exit_code == 2 and "'nope' is not one of" in result.output  # click.Choice's message
    assert "[none|smoothquant|quarot|sdcb|dyncenter|hadanorm|hqdm]" in CliRunner().invoke(_probe, ["--help"]).output


def test_group_fields_must_be_its_options():
    with pytest.raises(TypeError, match="Pair has fields"):
        option_group(Pair, "pair", click.option("--count", type=int))


def _params(name: str) -> dict[str, click.Parameter]:
    return {p.opts[0]: p for p in cli.commands[name].params}


def test_quantize_and_bundle_share_the_quant_options():
    quantize, bundle = _params("quantize"), _params("bundle")
    fields = {f.name for f in dataclasses.fields(QuantOptions)}
    shared = {opt: p for opt, p in quantize.items() if p.name in fields}
    assert len(shared) == 27  # 25 fields; --w4a4/--w6a6/--w8a8 set one
    for opt, param in shared.items():
        other = bundle[opt]
        assert (other.help, other.type.__class__, other.multiple, other.is_flag) == \
            (param.help, param.type.__class__, param.multiple, param.is_flag), opt
        assert other.default == (OutputFormat.FUSED.value if opt == "--format" else param.default), opt
    files = {f.name for f in dataclasses.fields(QuantizeFiles)}
    assert files <= {p.name for p in quantize.values()} and not files & {p.name for p in bundle.values()}


def test_weight_range_choices_follow_the_enum():
    for command in ("quantize", "bundle"):
        assert list(_params(command)["--weight-range"].type.choices) == [m.value for m in WeightRange]


def test_quantize_files_refuse_calib_with_stats():
    with pytest.raises(UserError, match="--calib and --stats both given"):
        QuantizeFiles(calib_inputs="a.npz", stats_path="s.json")


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_no_command_takes_kwargs(name):
    signature = inspect.signature(inspect.unwrap(cli.commands[name].callback))
    kinds = {p.kind for p in signature.parameters.values()}
    assert inspect.Parameter.VAR_KEYWORD not in kinds and inspect.Parameter.VAR_POSITIONAL not in kinds
    assert len(signature.parameters) <= 12, list(signature.parameters)
