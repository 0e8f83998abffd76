"""`hn-export split-prompt MODEL.onnx`: split a denoiser graph into a step graph and a prompt graph, so that a denoising
loop computes what depends on the prompt alone (PixArt's caption projection and cross-attention K/V) once per prompt
instead of once per step (`graph_passes.prompt_split`). Writes ``OUT.onnx`` (the step graph, the file to load: its
metadata names the prompt graph) and ``OUT.prompt.onnx`` beside it; `runtime.denoiser.Denoiser` loads the pair and
takes the same feeds as the whole graph."""

from __future__ import annotations

from pathlib import Path

import click

from graph_passes.prompt_split import STEP_INPUTS, split_prompt_graph
from hn_export.errors import UserError
from hn_export.metadata_keys import PROMPT_GRAPH_KEY
from hn_export.model_files import check_output_path, input_files, load_model
from hn_export.split_files import prompt_output, save_split


def default_output(model: Path) -> Path:
    return model.with_name(f"{model.stem}.split.onnx")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Output step graph .onnx (default MODEL.split.onnx); the prompt graph goes beside it as "
                   "OUTPUT-stem.prompt.onnx.")
def split_prompt_command(model: Path, output: Path | None) -> None:
    """Split MODEL (any denoiser graph: float, qdq, nbits, fused) into a step graph (hidden_states, timestep and
    what the prompt graph hands over) and a prompt graph (what depends on the other inputs alone). Load the step
    graph as you load MODEL (hn-run, runtime.denoiser.Denoiser): it takes the same feeds and computes the same ops
    (fused graphs: the same bits), and the prompt part runs once per prompt."""
    output = output or default_output(model)
    prompt_path = prompt_output(output)
    for path in (output, prompt_path):
        check_output_path(path, model, data_file=True)
    graph = load_model(model, any_opset=True)
    for path in (output, prompt_path):
        check_output_path(path, model, *input_files(graph), data_file=True)
    if graph.metadata_props.get(PROMPT_GRAPH_KEY):
        raise UserError(f"{model} is already a step graph (its prompt graph: "
                        f"{graph.metadata_props[PROMPT_GRAPH_KEY]})", "split the whole graph it came from")
    split = split_prompt_graph(graph, STEP_INPUTS)
    step_files, prompt_files = save_split(split, output)
    written = prompt_files + step_files
    ops = ", ".join(f"{op} {count}" for op, count in sorted(split.prompt_ops.items()))
    click.echo(f"prompt graph: {sum(split.prompt_ops.values())} nodes ({ops}), "
               f"{split.prompt_weight_bytes / 1e6:.1f} MB of weights, reading {', '.join(split.prompt_inputs)}; "
               f"{len(split.carried)} values handed to the step graph")
    for path in written:
        click.echo(f"wrote {path}")
