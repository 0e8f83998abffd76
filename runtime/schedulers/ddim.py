"""DDIM in numpy: diffusers' ``DDIMScheduler`` (the DiT and UNet families' sampler: LDM's DDIM with eta 0), float32
like diffusers, float16 outputs op by op as torch rounds them.

Noise schedule (VP): betas ``linear``, ``scaled_linear`` (linspace of the square roots, squared),
``squaredcos_cap_v2`` (``1 - abar(t + 1/N) / abar(t)`` capped at 0.999, ``abar(t) = cos^2((t + 0.008) / 1.008 pi /
2)``) or ``trained_betas``, optionally rescaled to zero terminal SNR (``sqrt(abar)`` shifted and scaled to end at 0);
``a_t = cumprod(1 - betas)`` (float32, accumulated in float64 as torch does). Inference timesteps, descending, by
``timestep_spacing``: ``leading`` ``(0 .. n - 1) (N // n) + steps_offset``, ``trailing`` ``round(N, N - N / n, ..) -
1``, ``linspace`` ``round(linspace(0, N - 1, n))``. One step goes from t to ``t' = t - N // n`` (for every spacing,
as diffusers), with ``a_t'`` = ``a_0`` or 1 (``set_alpha_to_one``) past the start:

    epsilon:       x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t)
    sample:        eps = (x - sqrt(a_t) x0) / sqrt(1 - a_t)
    v_prediction:  x0 = sqrt(a_t) x - sqrt(1 - a_t) v,   eps = sqrt(a_t) v + sqrt(1 - a_t) x
    x0 clipped to +-clip_sample_range (``clip_sample``)
    std = eta sqrt((1 - a_t') / (1 - a_t) (1 - a_t / a_t'))
    x_t' = sqrt(a_t') x0 + sqrt(1 - a_t' - std^2) eps (+ std noise)

with ``eta > 0`` drawing the noise from a `runtime.seeded_noise.TorchGenerator` (the stream a ``torch.Generator``
with the same seed gives diffusers) or taking it as ``variance_noise``.

Bit for bit diffusers' arithmetic where torch's float32 square root is correctly rounded (measured with MKL's AVX2
code). x86 torch on an AVX-512 CPU takes MKL's ``vsSqrt``, one ulp low for 0.6% of arguments; where a schedule value
is one of them the difference grows along the trajectory (a step scales a sample difference by sqrt(a_t' / a_t)): up
to 3.7e-5 for DiT's settings over 1..60 steps (order-1 latents), none at 20 steps for DiT's and the UNet's settings.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from runtime.schedulers.dpm_solver import torch_linspace_f32
from runtime.schedulers.settings import SchedulerConfigError, config_from_settings
from runtime.seeded_noise import TorchGenerator

logger = logging.getLogger(__name__)

F32 = np.float32

_SUPPORTED = {
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
}
_OFF = ("thresholding",)


@dataclasses.dataclass
class DDIMConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Sequence[float] | None = None
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "DDIMConfig":
        """From diffusers' scheduler config keys; a setting this implementation lacks is refused by name."""
        return config_from_settings(cls, "DDIM", settings, _OFF, _SUPPORTED)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    """torch.cumprod of float32: accumulated in float64, each product rounded to float32."""
    return np.cumprod(x.astype(np.float64)).astype(F32)


def _squaredcos_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' ``betas_for_alpha_bar`` (cosine), in Python floats, then float32."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]).astype(F32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """diffusers' ``rescale_zero_terminal_snr`` in float32: sqrt(abar) shifted to end at 0 and scaled to keep its
    start."""
    root = np.sqrt(_cumprod_f32((F32(1.0) - betas).astype(F32)))
    first, last = root[0], root[-1]
    root = ((root - last) * F32(first / F32(first - last))).astype(F32)
    abar = (root * root).astype(F32)
    alphas = np.concatenate([abar[:1], (abar[1:] / abar[:-1]).astype(F32)])
    return (F32(1.0) - alphas).astype(F32)


class DDIM:
    """``set_timesteps(n)`` then ``step(model_output, timestep, sample)`` per timestep (stateless between steps, as
    diffusers: any training timestep may be stepped from)."""

    init_noise_sigma = 1.0
    order = 1

    def __init__(self, config: DDIMConfig | Mapping[str, Any] | None = None, **settings: Any):
        if config is None or isinstance(config, Mapping):
            config = DDIMConfig.from_settings({**dict(config or {}), **settings})
        self.config = config
        n = config.num_train_timesteps
        if config.trained_betas is not None:
            betas = np.array(config.trained_betas).astype(F32)
        elif config.beta_schedule == "linear":
            betas = torch_linspace_f32(config.beta_start, config.beta_end, n)
        elif config.beta_schedule == "scaled_linear":
            root = torch_linspace_f32(config.beta_start ** 0.5, config.beta_end ** 0.5, n)
            betas = (root * root).astype(F32)
        else:  # squaredcos_cap_v2
            betas = _squaredcos_betas(n)
        if config.rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas_cumprod = _cumprod_f32((F32(1.0) - betas).astype(F32))
        self.final_alpha_cumprod = F32(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps = np.arange(0, n)[::-1].copy().astype(np.int64)
        self.num_inference_steps = 0

    def set_timesteps(self, num_inference_steps: int) -> None:
        cfg = self.config
        n = cfg.num_train_timesteps
        if not 1 <= num_inference_steps <= n:
            raise SchedulerConfigError(f"num_inference_steps {num_inference_steps} must be in 1..{n} (the training "
                                       "timesteps)")
        if cfg.timestep_spacing == "linspace":
            timesteps = np.linspace(0, n - 1, num_inference_steps).round()[::-1].copy().astype(np.int64)
        elif cfg.timestep_spacing == "leading":
            ratio = n // num_inference_steps
            timesteps = (np.arange(0, num_inference_steps) * ratio).round()[::-1].copy().astype(np.int64)
            timesteps += cfg.steps_offset
        else:  # trailing
            timesteps = np.round(np.arange(n, 0, -n / num_inference_steps)).astype(np.int64) - 1
        self.timesteps = timesteps
        self.num_inference_steps = num_inference_steps

    def scale_model_input(self, sample: np.ndarray, timestep: int | None = None) -> np.ndarray:
        return sample

    def step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: TorchGenerator | None = None,
             variance_noise: np.ndarray | None = None) -> np.ndarray:
        """x_t -> x_t' (see the module docstring), each operation in the dtype torch gives it: the schedule's
        float32 scalars meet the arrays as torch's 0-d tensors do (float16 arrays: a scalar on the left of a product
        is rounded to float16 first, a divisor is not; float32 arrays: float32 throughout)."""
        cfg = self.config
        if self.num_inference_steps == 0:
            raise SchedulerConfigError("call set_timesteps(n) before step()")
        t = int(timestep)
        if not 0 <= t < cfg.num_train_timesteps:
            raise SchedulerConfigError(f"step() got timestep {t}; a training timestep 0..{cfg.num_train_timesteps - 1}"
                                       " is needed (one of .timesteps)")
        if eta > 0 and (generator is None) == (variance_noise is None):
            raise SchedulerConfigError(f"step() with eta={eta} needs exactly one of generator= (a TorchGenerator) and "
                                       "variance_noise= (diffusers' global torch seed cannot be reproduced)")
        prev_t = t - cfg.num_train_timesteps // self.num_inference_steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t = F32(F32(1.0) - a_t)
        sqrt_a, sqrt_b = np.sqrt(a_t), np.sqrt(b_t)
        with np.errstate(divide="ignore", invalid="ignore"):  # a_t = 0 (zero terminal SNR): inf / nan, as diffusers
            if cfg.prediction_type == "epsilon":
                x0 = _div(sample - _mul(sqrt_b, model_output), sqrt_a)
                eps = model_output
            elif cfg.prediction_type == "sample":
                x0 = model_output
                eps = _div(sample - _mul(sqrt_a, x0), sqrt_b)
            else:  # v_prediction
                x0 = _mul(sqrt_a, sample) - _mul(sqrt_b, model_output)
                eps = _mul(sqrt_a, model_output) + _mul(sqrt_b, sample)
            if cfg.clip_sample:
                limit = x0.dtype.type(cfg.clip_sample_range)
                x0 = np.clip(x0, -limit, limit)
            b_prev = F32(F32(1.0) - a_prev)
            variance = F32(F32(b_prev / b_t) * F32(F32(1.0) - F32(a_t / a_prev)))
            std = F32(F32(eta) * np.sqrt(variance))
            if use_clipped_model_output:
                eps = _div(sample - _mul(sqrt_a, x0), sqrt_b)
            direction = _mul(np.sqrt(F32(F32(F32(1.0) - a_prev) - F32(std * std))), eps)
            prev = _mul(np.sqrt(a_prev), x0) + direction
        if eta > 0:
            if variance_noise is None:
                variance_noise = generator.randn(model_output.shape, model_output.dtype)
            prev = prev + _mul(std, variance_noise)
        return prev


def _mul(scalar: np.float32, x: np.ndarray) -> np.ndarray:
    """torch's ``scalar_0d * x``: the scalar in x's dtype, the product rounded to it."""
    return x.dtype.type(scalar) * x


def _div(x: np.ndarray, scalar: np.float32) -> np.ndarray:
    """torch's ``x / scalar_0d``: float16 divided in float32 by the unrounded scalar, then rounded."""
    if x.dtype == np.float16:
        return (x.astype(F32) / scalar).astype(np.float16)
    return x / x.dtype.type(scalar)
