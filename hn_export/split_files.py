"""Writing the two files of a split (`graph_passes.prompt_split`): the step graph ``OUT.onnx`` and its prompt graph
``OUT.prompt.onnx`` beside it, each marked with the split's id, the step graph naming its prompt graph and the values
it hands over (what `runtime.denoiser.Denoiser` checks when it loads the pair)."""

from __future__ import annotations

from pathlib import Path

from graph_passes.prompt_split import PromptSplit
from hn_export.metadata_keys import CARRIED_KEY, PROMPT_GRAPH_KEY, SPLIT_ID_KEY
from hn_export.model_files import save_model


def prompt_output(output: Path) -> Path:
    """Where the prompt graph of step graph `output` goes: beside it, ``OUT.prompt.onnx``."""
    return output.with_name(f"{output.stem}.prompt.onnx")


def save_split(split: PromptSplit, output: Path) -> tuple[list[Path], list[Path]]:
    """Write the pair (paths checked by the caller); the files of the step graph and of the prompt graph. A failed
    step graph write removes the prompt graph just written (a prompt graph is never left without its step graph)."""
    prompt_path = prompt_output(output)
    split.step.metadata_props[PROMPT_GRAPH_KEY] = prompt_path.name
    split.step.metadata_props[CARRIED_KEY] = ",".join(split.carried)
    for model in (split.step, split.prompt):
        model.metadata_props[SPLIT_ID_KEY] = split.split_id
    prompt_files = save_model(split.prompt, prompt_path)
    try:
        step_files = save_model(split.step, output)
    except BaseException:
        for path in prompt_files:
            path.unlink(missing_ok=True)
        raise
    return step_files, prompt_files
