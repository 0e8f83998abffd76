"""`hn-export optimize MODEL.onnx --attention fused`: replace a graph's softmax attentions by the fused
``hadanorm::Attention`` op and nothing else (an FP32/FP16 graph stays float: measure the attention alone)."""

from __future__ import annotations

from pathlib import Path

import click
import onnx_ir as ir

from graph_passes.attention_op import AttentionPrecision, attention_precisions
from graph_passes.errors import from_pass_error
from graph_passes.fuse_attention import find_attention
from graph_passes.pipeline import attention_pipeline
from hn_export.errors import UserError
from hn_export.graph_import import load_graph
from hn_export.model_files import check_output_path, input_files, save_model
from hn_export.quantize_job import DEFAULT_FUSED_ATTENTION
from hn_export.metadata_keys import ATTENTION_KEY, TRANSFORM_OPS_KEY
from runtime.domain import HADANORM_DOMAIN

_CHOICES = {"fused": DEFAULT_FUSED_ATTENTION, **{p.value: p for p in AttentionPrecision}}


def default_output(model: Path) -> Path:
    return model.with_name(f"{model.stem}.attn.onnx")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--attention", type=click.Choice(sorted(_CHOICES)), required=True,
              help=f"fused: hadanorm::Attention at the default precision ({DEFAULT_FUSED_ATTENTION.value}); float: "
                   "the exact tiled op (fp32); bf16: bf16 operands, fp32 sums (AMX tiles where the CPU has them); "
                   "int8: keys centered and rotated, int8 q k^T and p v (AVX512-VNNI); fast: chosen by the CPU "
                   "that runs the graph (bf16 on AMX, int8 on AVX512-VNNI, float elsewhere).")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output .onnx (default MODEL.attn.onnx).")
def optimize_command(model: Path, attention: str, output: Path | None) -> None:
    """Rewrite MODEL's softmax attentions (MatMul -> Softmax -> MatMul) into hadanorm::Attention: tiled, online
    softmax, memory O(N) instead of O(N^2). Everything else stays as it is."""
    output = output or default_output(model)
    check_output_path(output, model, data_file=True)
    graph = load_graph(model)
    check_output_path(output, model, *input_files(graph), data_file=True)
    scan = find_attention(graph.graph)
    if not scan.sites:
        others = f" ({len(scan.unrecognised)} Softmax nodes in other forms)" if scan.unrecognised else ""
        raise UserError(f"{model} has no softmax attention (MatMul -> Softmax -> MatMul) to fuse{others}",
                        "pass a graph with softmax attention (hn-export layers MODEL lists what it finds)")
    precision = _CHOICES[attention]
    try:
        attention_pipeline(precision)(graph)
    except ir.passes.PassError as exc:
        raise from_pass_error(exc) from None
    graph.metadata_props[ATTENTION_KEY] = attention_precisions(graph.graph)
    ops = sorted({n.op_type for n in graph.graph if n.domain == HADANORM_DOMAIN})
    graph.metadata_props[TRANSFORM_OPS_KEY] = ",".join(ops)
    files = save_model(graph, output)
    kept = f"; {len(scan.unrecognised)} other Softmax kept" if scan.unrecognised else ""
    click.echo(f"attention: {len(scan.sites)} softmax attentions fused ({precision.value}){kept}")
    for path in files:
        click.echo(f"wrote {path}")
