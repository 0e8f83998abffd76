"""`hn-export layers MODEL.onnx`: list the linear layers and the activation sites they form."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click

from graph_passes.attention_op import fused_attentions
from graph_passes.fuse_attention import find_attention
from graph_passes.linears import SiteSelection, find_activation_sites, find_linears
from hn_export.families import selection_for
from hn_export.graph_import import load_graph
from models.families import FAMILIES


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--include", multiple=True, help="Module-path regex of site linears (default: transformer blocks).")
@click.option("--exclude", multiple=True, help="Module-path regex of linears to leave out.")
@click.option("--every-linear", is_flag=True,
              help="Also the linears outside the blocks, as `hn-export MODEL --every-linear` makes them sites.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def layers_command(model: Path, include, exclude, every_linear: bool, as_json: bool) -> None:
    """List MODEL's linear and conv layers (module path, kind, weight, bias, in/out features) and activation sites."""
    ir_model = load_graph(model)  # any exporter: opset converted, exporter fixes, Gemm linears as MatMul
    linears = find_linears(ir_model)
    selection = SiteSelection(include=tuple(include) or SiteSelection().include, exclude=tuple(exclude),
                              explicit=bool(include), outer_linears=every_linear)
    selection = selection_for(ir_model, selection)
    sites = find_activation_sites(ir_model, selection)
    family = selection.roles.family if selection.roles is not None else None
    scan = find_attention(ir_model.graph)
    fused = len(fused_attentions(ir_model.graph))
    note = FAMILIES[family].attention_note if family in FAMILIES else ""
    attention = {"softmax_attentions": len(scan.sites), "fused": fused,
                 "other_softmax": [n.name for n in scan.unrecognised], "note": note}
    if as_json:
        click.echo(json.dumps({
            "family": family,
            "linears": [{"module": lin.module_path, "op": lin.node.op_type, "kind": lin.kind, "weight": lin.weight.name,
                         "bias": lin.bias.name if lin.bias is not None else None,
                         "in_features": lin.in_features, "out_features": lin.out_features,
                         "activation": lin.activation.name} for lin in linears],
            "sites": [{"name": s.name, "role": s.role, "block": s.block, "activation": s.activation.name,
                       "width": s.width, "centered": s.can_center,
                       "linears": [lin.module_path for lin in s.linears]} for s in sites],
            "attention": attention,
        }, indent=2))
        return
    click.echo(f"family: {family} (site roles from its module paths)" if family else
               "family: none recognised (every site has the generic role 'linear')")
    convs = sum(lin.is_conv for lin in linears)
    click.echo(f"{len(linears) - convs} linear layers" + (f", {convs} convolutions" if convs else ""))
    click.echo(f"{'module':<52} {'kind':<10} {'in':>6} {'out':>6}  {'weight':<28} bias")
    for lin in linears:
        bias = lin.bias.name if lin.bias is not None else "-"
        click.echo(f"{lin.module_path:<52} {lin.kind:<10} {lin.in_features:>6} {lin.out_features:>6}  "
                   f"{lin.weight.name:<28} {bias}")
    blocks = {(s.name.split(".")[0], s.block) for s in sites if s.block is not None}  # (block list, index)
    click.echo(f"\n{len(sites)} activation sites" + (f" in {len(blocks)} blocks" if blocks else ""))
    click.echo(f"{'site':<40} {'role':<20} {'width':>6}  linears")
    for s in sites:
        names = ", ".join(re.sub(r"^.*transformer_blocks\.\d+\.", "", lin.module_path) for lin in s.linears)
        click.echo(f"{s.name:<40} {s.role:<20} {s.width:>6}  {names}")
    click.echo(f"\nattention: {len(scan.sites)} softmax attentions (MatMul -> Softmax -> MatMul; --format fused and "
               f"`hn-export optimize --attention fused` make each one hadanorm::Attention)"
               + (f", {fused} already fused" if fused else ""))
    if scan.unrecognised:
        click.echo(f"  {len(scan.unrecognised)} Softmax in other forms, kept as they are: "
                   + ", ".join(n.name for n in scan.unrecognised[:4]) + (" ..." if len(scan.unrecognised) > 4 else ""))
    if note:
        click.echo(f"  {family}: {note}")
