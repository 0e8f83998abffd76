"""Flow-matching Euler in numpy: diffusers' ``FlowMatchEulerDiscreteScheduler`` for the settings the families use
(SD3 / SD3.5: ``shift`` 3; Flux-dev: dynamic shifting with ``mu`` and custom sigmas; Flux-schnell: shift 1), bit for
bit: float32 where diffusers computes in torch, float64 or float32 where it computes in numpy, as it does.

The sample moves along ``x_sigma = (1 - sigma) x0 + sigma noise`` from sigma = 1 to 0, the model predicting the
velocity ``v = noise - x0``. Training sigmas ``s = t / N`` for t = N .. 1 (float32, shifted already when the shift
is static). Inference sigmas: ``linspace(s_max, s_min, n)`` of the training ones (float64; with a static shift they are
shifted twice, as in diffusers), or the caller's ``sigmas`` (float32), then shifted

    static:   sigma = shift s / (1 + (shift - 1) s)
    dynamic:  sigma = e^mu / (e^mu + (1 / s - 1))        (time_shift_type "exponential")
              sigma = mu / (mu + (1 / s - 1))            (time_shift_type "linear")

(``mu`` from the image's token count, computed by the pipeline between ``base_shift`` and ``max_shift``), optionally
stretched so that the last sigma is ``shift_terminal``: ``1 - (1 - sigma) (1 - shift_terminal) / (1 - sigma_last)``;
rounded to float32, timesteps ``sigma N`` (float32), a final sigma 0 appended. One Euler step:

    x_next = x + (sigma_next - sigma) v
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from runtime.schedulers.settings import SchedulerConfigError, config_from_settings

logger = logging.getLogger(__name__)

F32 = np.float32

_SUPPORTED = {"time_shift_type": ("exponential", "linear")}
_OFF = ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling")


@dataclasses.dataclass
class FlowMatchEulerConfig:
    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float | None = 0.5  # base_shift .. max_image_seq_len: the pipeline's mu (kept for it to read)
    max_shift: float | None = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None
    time_shift_type: str = "exponential"

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "FlowMatchEulerConfig":
        """From diffusers' scheduler config keys; a setting this implementation lacks is refused by name."""
        return config_from_settings(cls, "FlowMatchEuler", settings, _OFF, _SUPPORTED)


class FlowMatchEuler:
    """``set_timesteps(n)`` (``mu=`` with dynamic shifting, or ``sigmas=``) then ``step(model_output, timestep,
    sample)`` once per timestep, in order. ``init_noise_sigma`` is 1: the starting latents are the noise itself."""

    init_noise_sigma = 1.0
    order = 1

    def __init__(self, config: FlowMatchEulerConfig | Mapping[str, Any] | None = None, **settings: Any):
        if config is None or isinstance(config, Mapping):
            config = FlowMatchEulerConfig.from_settings({**dict(config or {}), **settings})
        self.config = config
        n = config.num_train_timesteps
        train = np.linspace(1, n, n, dtype=F32)[::-1].copy()
        sigmas = (train / F32(n)).astype(F32)
        if not config.use_dynamic_shifting:
            shift = F32(config.shift)
            sigmas = (shift * sigmas / (F32(1.0) + F32(config.shift - 1) * sigmas)).astype(F32)
        self.sigma_min = float(sigmas[-1])
        self.sigma_max = float(sigmas[0])
        self.timesteps = (sigmas * F32(n)).astype(F32)
        self.sigmas = sigmas
        self.num_inference_steps = 0
        self._step_index = 0

    def _time_shift(self, mu: float, t: np.ndarray) -> np.ndarray:
        # diffusers' numpy expression with sigma = 1: float64 for computed sigmas, float32 for the caller's
        if self.config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
        return mu / (mu + (1 / t - 1) ** 1.0)

    def set_timesteps(self, num_inference_steps: int | None = None, mu: float | None = None,
                      sigmas: Sequence[float] | np.ndarray | None = None) -> None:
        cfg = self.config
        n = cfg.num_train_timesteps
        if cfg.use_dynamic_shifting and mu is None:
            raise SchedulerConfigError("FlowMatchEuler: use_dynamic_shifting=True needs mu in set_timesteps(n, mu=...) "
                                       "(the pipeline's shift for the image's token count)")
        if sigmas is None:
            if num_inference_steps is None or num_inference_steps < 1:
                raise SchedulerConfigError(f"num_inference_steps {num_inference_steps} must be at least 1")
            timesteps = np.linspace(self.sigma_max * n, self.sigma_min * n, num_inference_steps)
            s = timesteps / n
        else:
            s = np.array(sigmas).astype(F32)
            if s.ndim != 1 or len(s) < 1 or (num_inference_steps is not None and len(s) != num_inference_steps):
                raise SchedulerConfigError(f"sigmas must be a list of num_inference_steps ({num_inference_steps}) "
                                           "numbers; pass one sigma per step")
        if cfg.use_dynamic_shifting:
            s = self._time_shift(mu, s)
        else:
            s = cfg.shift * s / (1 + (cfg.shift - 1) * s)
        if cfg.shift_terminal:
            one_minus = 1 - s
            s = 1 - (one_minus / (one_minus[-1] / (1 - cfg.shift_terminal)))
        s = np.asarray(s).astype(F32)
        self.timesteps = (s * F32(n)).astype(F32)
        self.sigmas = np.concatenate([s, np.zeros(1, F32)])
        self.num_inference_steps = len(s)
        self._step_index = 0

    def scale_model_input(self, sample: np.ndarray, timestep: float | None = None) -> np.ndarray:
        return sample

    def index_for_timestep(self, timestep: float) -> int:
        """The index of `timestep` in ``timesteps`` (the second of two equal ones, as diffusers)."""
        hits = np.flatnonzero(self.timesteps == F32(timestep))
        if len(hits) == 0:
            raise SchedulerConfigError(f"timestep {float(timestep)} is not one of the scheduler's timesteps; pass one "
                                       "of .timesteps (after set_timesteps)")
        return int(hits[1] if len(hits) > 1 else hits[0])

    def scale_noise(self, sample: np.ndarray, timestep: float | np.ndarray, noise: np.ndarray) -> np.ndarray:
        """The forward process ``sigma noise + (1 - sigma) sample`` at `timestep` (one per batch row or one for all),
        in the sample's dtype (img2img's starting latents)."""
        dtype = sample.dtype
        steps = np.atleast_1d(np.asarray(timestep))
        sigma = self.sigmas.astype(dtype)[[self.index_for_timestep(t) for t in steps]]
        sigma = sigma.reshape(-1, *([1] * (sample.ndim - 1)))
        return (sigma * noise.astype(dtype) + (dtype.type(1.0) - sigma) * sample).astype(dtype)

    def step(self, model_output: np.ndarray, timestep: float, sample: np.ndarray) -> np.ndarray:
        if self.num_inference_steps == 0:
            raise SchedulerConfigError("call set_timesteps(n) before step()")
        i = self._step_index
        if i >= self.num_inference_steps:
            raise SchedulerConfigError(f"step() called {i + 1} times for {self.num_inference_steps} timesteps; call "
                                       "set_timesteps(n) again")
        if F32(timestep) != self.timesteps[i]:
            raise SchedulerConfigError(f"step() got timestep {float(timestep)}, expected {float(self.timesteps[i])} "
                                       "(the timesteps in order, as set_timesteps made them)")
        dtype = model_output.dtype
        dt = F32(self.sigmas[i + 1] - self.sigmas[i])
        # torch: the 0-d float32 dt on the left of the output is cast to the output's dtype (float16: rounded),
        # the product added to the float32 sample, the sum cast back to the output's dtype
        prev = sample.astype(F32) + dtype.type(dt) * model_output
        self._step_index += 1
        return prev.astype(dtype)
