"""Denoising trajectories of an ONNX PixArt transformer: the calibration inputs and the end-to-end metric.

A trajectory is diffusers' `DPMSolverMultistepScheduler` with PixArt-Sigma's scheduler settings, a classifier-free
guidance batch of 2 (unconditional, conditional caption embeddings) per sample, seeded Gaussian latents and seeded
random caption embeddings (no text encoder is needed). The model's learned-sigma half of the output is dropped as
the diffusers pipeline does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np
import onnx_ir as ir

from hn_export.errors import UserError

RunFn = Callable[[dict[str, np.ndarray]], np.ndarray]

# PixArt-Sigma's scheduler_config.json (DPM-Solver++ 2M, linear betas).
PIXART_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
    solver_order=2,
    algorithm_type="dpmsolver++",
    lower_order_final=True,
)


@dataclasses.dataclass(frozen=True)
class ModelSignature:
    """What a denoiser call needs, read from the ONNX graph inputs."""

    latent_shape: tuple[int, int, int]  # C, H, W
    caption_channels: int
    dtype: np.dtype
    has_mask: bool
    fixed_batch: int | None
    fixed_caption_length: int | None

    @classmethod
    def of(cls, model: ir.Model) -> ModelSignature:
        inputs = {v.name: v for v in model.graph.inputs}
        missing = {"hidden_states", "timestep", "encoder_hidden_states"} - inputs.keys()
        if missing:
            raise UserError(
                f"the model has no input(s) {sorted(missing)} (inputs: {sorted(inputs)}); it is not a PixArt "
                "transformer export",
                "export one with `hn-export export`",
            )
        hidden, text = inputs["hidden_states"], inputs["encoder_hidden_states"]
        dims = [d if isinstance(d, int) else None for d in hidden.shape]
        if len(dims) != 4 or None in dims[1:]:
            raise UserError(f"hidden_states has shape {hidden.shape}; expected [B, C, H, W] with static C, H, W",
                            "re-export with `hn-export export`")
        text_dims = [d if isinstance(d, int) else None for d in text.shape]
        return cls(
            latent_shape=tuple(dims[1:]),
            caption_channels=int(text_dims[2]),
            dtype=np.dtype(hidden.dtype.numpy()),
            has_mask="encoder_attention_mask" in inputs,
            fixed_batch=dims[0],
            fixed_caption_length=text_dims[1],
        )


@dataclasses.dataclass(frozen=True)
class DenoiseConfig:
    steps: int = 20
    samples: int = 1
    guidance_scale: float = 4.5
    seed: int = 0
    caption_length: int = 64


def sample_conditions(sig: ModelSignature, config: DenoiseConfig, index: int) -> dict[str, np.ndarray]:
    """Seeded starting latents and (unconditional, conditional) caption embeddings for one sample."""
    rng = np.random.default_rng([config.seed, index])
    length = sig.fixed_caption_length or config.caption_length
    latents = rng.standard_normal((1, *sig.latent_shape))
    captions = rng.standard_normal((2, length, sig.caption_channels)) * 0.2  # T5 outputs are small
    return {"latents": latents.astype(np.float32), "captions": captions.astype(np.float32)}


def load_input_file(path, sig: ModelSignature, what: str) -> dict[str, np.ndarray]:
    """Graph inputs from a user .npz (arrays named like the graph inputs, first axis = samples), checked: readable,
    complete, this resolution, finite."""
    try:
        data = dict(np.load(path))
    except Exception:
        raise UserError(f"{what} {path} is not a readable .npz",
                        "save it with numpy.savez(hidden_states=..., timestep=..., encoder_hidden_states=...)") from None
    needed = ["hidden_states", "timestep", "encoder_hidden_states"] + (["encoder_attention_mask"] if sig.has_mask else [])
    missing = [k for k in needed if k not in data]
    if missing:
        raise UserError(f"{what} {path} lacks arrays {missing}", f"it must hold {needed}")
    if data["hidden_states"].shape[1:] != sig.latent_shape:
        raise UserError(f"hidden_states in {path} has shape {data['hidden_states'].shape}; the model takes "
                        f"[N, {', '.join(map(str, sig.latent_shape))}]", "pass inputs for this resolution")
    for name in needed:
        if np.issubdtype(data[name].dtype, np.floating) and not np.all(np.isfinite(data[name])):
            raise UserError(f"{what} {path}: input {name} contains NaN or inf", "pass finite inputs")
    return {k: data[k] for k in needed}


def model_inputs(sig: ModelSignature, latents: np.ndarray, timestep: float, captions: np.ndarray) -> dict[str, np.ndarray]:
    batch = captions.shape[0]
    feeds = {
        "hidden_states": np.repeat(latents, batch, axis=0).astype(sig.dtype),
        "timestep": np.full((batch,), timestep, dtype=sig.dtype),
        "encoder_hidden_states": captions.astype(sig.dtype),
    }
    if sig.has_mask:
        feeds["encoder_attention_mask"] = np.ones(captions.shape[:2], dtype=sig.dtype)
    return feeds


def make_scheduler(steps: int):
    import torch  # noqa: F401  (diffusers schedulers work on torch tensors)
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(**PIXART_SCHEDULER)
    scheduler.set_timesteps(steps)
    return scheduler


def trajectory(run: RunFn, sig: ModelSignature, config: DenoiseConfig, index: int) -> Iterator[np.ndarray]:
    """Run one sample's denoising loop; yields the latents after every step (the last one is the result)."""
    import torch

    cond = sample_conditions(sig, config, index)
    scheduler = make_scheduler(config.steps)
    latents = torch.from_numpy(cond["latents"]).double()
    channels = sig.latent_shape[0]
    for t in scheduler.timesteps:
        out = run(model_inputs(sig, latents.float().numpy(), float(t), cond["captions"]))
        out = np.asarray(out, dtype=np.float64)[:, :channels]
        uncond, text = out[0:1], out[1:2]
        noise = uncond + config.guidance_scale * (text - uncond)
        latents = scheduler.step(torch.from_numpy(noise), t, latents).prev_sample
        yield latents.numpy()


def denoise(run: RunFn, sig: ModelSignature, config: DenoiseConfig, index: int) -> np.ndarray:
    result = None
    for result in trajectory(run, sig, config, index):
        pass
    return result
