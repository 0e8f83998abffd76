"""One-call SQNR of a graph against the tiny FP32 graph's reference outputs, shared by the CLI tests (the seeded
single call of `hn_export.evaluate`, no denoising)."""

from __future__ import annotations

from pathlib import Path

from hn_export.denoise import DenoiseConfig
from hn_export.evaluate import GraphRunner, evaluate, reference_outputs

EVAL = DenoiseConfig(steps=4, samples=1, seed=7)


def single_call_reference(fp32: Path):
    with GraphRunner(fp32) as runner:
        return reference_outputs(runner, EVAL, with_denoising=False)


def single_call_sqnr(path: Path, reference) -> float:
    with GraphRunner(path) as runner:
        return evaluate(runner, reference, EVAL).single_call.sqnr_db
