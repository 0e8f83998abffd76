"""Denoising trajectories of an exported transformer: the calibration inputs and the end-to-end metric.

The loop is the same for every family; what differs lives in the family (`models.families`): the scheduler and its
settings, seeded starting latents and conditioning (random caption embeddings or class labels: no text encoder is
needed), the feeds of one classifier-free-guidance call (batch 2: unconditional, conditional) and how its output
becomes the scheduler's model output (a learned-sigma half is dropped, as the diffusers pipelines do). For PixArt:
DPM-Solver++ 2M with the released scheduler settings, guidance 4.5, random T5-sized caption embeddings.

The family of a graph is its ``hn_export.family`` metadata (written by `hn-export export`), else the family whose
inputs the graph has (graphs from other exporters): `hn_export.families.graph_family`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np
import onnx_ir as ir

from hn_export.errors import UserError
from hn_export.families import graph_family
from hn_export.input_arrays import load_input_file  # noqa: F401  (the one checker; re-exported)
from models.errors import ModelInputError
from models.families import FAMILIES, ModelFamily, Signature, supported
from models.families.base import DenoiseSettings
from runtime.denoiser import batched_inputs

RunFn = Callable[[dict[str, np.ndarray]], np.ndarray]

DenoiseConfig = DenoiseSettings  # steps, samples, guidance_scale (None: the family's), seed, caption_length


@dataclasses.dataclass(frozen=True)
class ModelSignature(Signature):
    """What a denoiser call needs, read from the ONNX graph inputs (see `models.families.Signature`), and the graph's
    dimension symbols (input name -> per axis: its symbol name, or None): axes sharing a symbol must agree."""

    symbols: tuple[tuple[str, tuple[str | None, ...]], ...] = ()

    @classmethod
    def of(cls, model: ir.Model) -> ModelSignature:
        """The graph's inputs and family. A graph of no known family gets family "" (it can still be quantized
        with ``--calib FILE.npz`` or a method without statistics; denoising runs need a family)."""
        inputs = {v.name: v for v in model.graph.inputs}
        family = graph_family(model)
        shapes = {name: tuple(d if isinstance(d, int) else None for d in (v.shape or ())) for name, v in inputs.items()}
        dtypes = {name: np.dtype(v.dtype.numpy()) for name, v in inputs.items() if v.dtype is not None}
        symbols = {name: [d if isinstance(d, int) else d.value for d in (v.shape or ())] for name, v in inputs.items()}
        batched = frozenset(batched_inputs(symbols))
        named = tuple((name, tuple(d if isinstance(d, str) and d else None for d in dims))
                      for name, dims in symbols.items())
        if family is None:
            return cls(family="", shapes=shapes, dtypes=dtypes, batched=batched, symbols=named)
        hidden = inputs.get("hidden_states")
        if hidden is None or hidden.shape is None or any(not isinstance(d, int) for d in hidden.shape[1:]):
            raise UserError(f"hidden_states has shape {None if hidden is None else hidden.shape}; expected a batch "
                            "axis and static latent dimensions", "re-export with `hn-export export`")
        return cls(family=family.name, shapes=shapes, dtypes=dtypes, batched=batched, symbols=named)


def family_of(sig: Signature) -> ModelFamily:
    """The family of a signature; a one-line error for graphs of no supported family."""
    if sig.family not in FAMILIES:
        raise UserError(
            f"the model's inputs {sorted(sig.shapes)} match no supported model family ({supported()}), so "
            "hn-export cannot make denoising inputs for it",
            "pass --calib FILE.npz (and --inputs FILE.npz) with the graph's inputs, export it with `hn-export "
            "export`, or add its family (one module in models/families/)",
        )
    return FAMILIES[sig.family]


def guidance_scale_of(sig: Signature, config: DenoiseConfig) -> float:
    """The guidance scale of a run: the config's, else the family's default."""
    return config.guidance_scale if config.guidance_scale is not None else family_of(sig).guidance_scale


def sample_conditions(sig: Signature, config: DenoiseConfig, index: int) -> dict[str, np.ndarray]:
    """Seeded starting ``latents`` and the conditioning of one sample."""
    return family_of(sig).conditions(sig, config, index)


def first_call_feeds(sig: Signature, config: DenoiseConfig, index: int, timestep: float | None = None) -> dict:
    """Feeds of one guidance-pair call at the family's one-call timestep (or `timestep`), from sample `index`."""
    family = family_of(sig)
    cond = family.conditions(sig, config, index)
    t = family.single_call_timestep if timestep is None else timestep
    return family.feeds(sig, cond["latents"], t, cond)


def trajectory(run: RunFn, sig: Signature, config: DenoiseConfig, index: int) -> Iterator[np.ndarray]:
    """Run one sample's denoising loop; yields the latents after every step (the last one is the result)."""
    import torch

    family = family_of(sig)
    scale = guidance_scale_of(sig, config)
    cond = family.conditions(sig, config, index)
    try:
        scheduler = family.scheduler(config.steps, sig)
    except ModelInputError as exc:
        raise UserError(exc.problem, exc.fix) from None
    latents = torch.from_numpy(cond["latents"]).double()
    for t in scheduler.timesteps:
        out = run(family.feeds(sig, latents.float().numpy(), float(t), cond))
        noise = family.guide(np.asarray(out, dtype=np.float64), scale, sig)
        latents = scheduler.step(torch.from_numpy(noise), t, latents).prev_sample
        yield latents.numpy()


def denoise(run: RunFn, sig: Signature, config: DenoiseConfig, index: int) -> np.ndarray:
    result = None
    for result in trajectory(run, sig, config, index):
        pass
    return result
