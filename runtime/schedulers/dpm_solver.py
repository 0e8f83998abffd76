"""DPM-Solver++ multistep (orders 1 and 2) in numpy: diffusers' ``DPMSolverMultistepScheduler`` for the settings the
families use (PixArt-Sigma/-Alpha: linear betas, epsilon, ``lower_order_final``; Sana: flow sigmas with a shift,
flow prediction, midpoint), float32 like diffusers.

Noise schedule (VP): ``alphas_cumprod = cumprod(1 - betas)``, ``sigma = sqrt((1 - a) / a)`` per training timestep;
inference timesteps by ``timestep_spacing`` (``linspace`` / ``leading`` / ``trailing``) with their sigmas interpolated
(or flow sigmas ``shift s / (1 + (shift - 1) s)``), then a final sigma (0, or the smallest training sigma). With
``alpha_t = 1 / sqrt(sigma^2 + 1)``, ``sigma_t = sigma alpha_t`` (flow: ``1 - sigma``, ``sigma``) and
``lambda = log alpha_t - log sigma_t``, the data prediction ``x0`` (from epsilon, v, flow or sample outputs) advances

    first order:   x_t = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) x0                      h = lambda_t - lambda_s
    second order:  x_t = (sigma_t / sigma_s0) x - alpha_t (e^-h - 1) (D0 + D1 / 2)          (midpoint)
                   x_t = (sigma_t / sigma_s0) x - alpha_t (e^-h - 1) D0 + alpha_t ((e^-h - 1) / h + 1) D1   (heun)
                   D0 = x0_0, D1 = (x0_0 - x0_1) / r0, r0 = (lambda_s0 - lambda_s1) / h

with diffusers' order rules (first order at the first step, and at the last when ``final_sigmas_type`` is ``zero``,
``euler_at_final``, or ``lower_order_final`` with fewer than 15 steps).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from runtime.schedulers.settings import SchedulerConfigError, config_from_settings

F32 = np.float32


def torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32), bit for bit: a float32 step, the first half counted up from
    start and the second down from end."""
    step = (F32(end) - F32(start)) / F32(max(n - 1, 1))
    i = np.arange(n)
    up = F32(start) + np.float64(step) * i
    down = F32(end) - np.float64(step) * (n - 1 - i)
    return np.where(i < n // 2, up, down).astype(F32)


def _exp32(x: np.float32) -> np.float32:
    """float32 exp rounded from float64: torch's float32 exp in 98-99% of arguments (numpy's float32 exp: 61%)."""
    return F32(np.exp(np.float64(x)))


def _log32(x: np.float32) -> np.float32:
    return F32(np.log(np.float64(x)))


_SUPPORTED = {
    "algorithm_type": ("dpmsolver++",),
    "solver_type": ("midpoint", "heun"),
    "prediction_type": ("epsilon", "v_prediction", "flow_prediction", "sample"),
    "timestep_spacing": ("linspace", "leading", "trailing"),
    "final_sigmas_type": ("zero", "sigma_min"),
    "beta_schedule": ("linear", "scaled_linear"),
}
_OFF = ("thresholding", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
        "rescale_betas_zero_snr", "use_dynamic_shifting")


@dataclasses.dataclass
class DPMSolverConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    solver_order: int = 2
    prediction_type: str = "epsilon"
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    final_sigmas_type: str = "zero"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "DPMSolverConfig":
        """From diffusers' scheduler config keys; a setting this implementation lacks is refused by name."""
        if settings.get("solver_order", 2) not in (1, 2):
            raise SchedulerConfigError("DPMSolverMultistep: solver_order must be 1 or 2 (3 is not implemented)")
        if settings.get("variance_type") not in (None,):
            raise SchedulerConfigError("DPMSolverMultistep: variance_type is not implemented; pass the model output's "
                                       "mean channels (the pipeline splits a learned sigma off first)")
        return config_from_settings(cls, "DPMSolverMultistep", settings, _OFF, _SUPPORTED)


class DPMSolverMultistep:
    """``set_timesteps(n)`` then ``step(model_output, timestep, sample)`` once per timestep, in order."""

    def __init__(self, config: DPMSolverConfig | Mapping[str, Any] | None = None, **settings: Any):
        if config is None or isinstance(config, Mapping):
            config = DPMSolverConfig.from_settings({**dict(config or {}), **settings})
        self.config = config
        n = config.num_train_timesteps
        if config.beta_schedule == "linear":
            betas = torch_linspace_f32(config.beta_start, config.beta_end, n)
        else:  # scaled_linear
            betas = (torch_linspace_f32(config.beta_start ** 0.5, config.beta_end ** 0.5, n) ** F32(2)).astype(F32)
        # torch.cumprod on float32 accumulates in float64: the same bits (small sigmas magnify any difference)
        self.alphas_cumprod = np.cumprod((F32(1.0) - betas).astype(np.float64)).astype(F32)
        self.timesteps = np.zeros(0, np.int64)
        self.sigmas = np.zeros(0, F32)
        self.num_inference_steps = 0
        self._outputs: list[np.ndarray | None] = []
        self._lower_order_nums = 0
        self._step_index = 0

    def set_timesteps(self, num_inference_steps: int) -> None:
        cfg = self.config
        n = cfg.num_train_timesteps
        if num_inference_steps < 1:
            raise SchedulerConfigError(f"num_inference_steps {num_inference_steps} must be at least 1")
        if cfg.timestep_spacing == "linspace":
            timesteps = np.linspace(0, n - 1, num_inference_steps + 1).round()[::-1][:-1].astype(np.int64)
        elif cfg.timestep_spacing == "leading":
            ratio = n // (num_inference_steps + 1)
            timesteps = (np.arange(0, num_inference_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64)
            timesteps += cfg.steps_offset
        else:  # trailing
            timesteps = np.arange(n, 0, -n / num_inference_steps).round().astype(np.int64) - 1
        train_sigmas = (((F32(1.0) - self.alphas_cumprod) / self.alphas_cumprod) ** F32(0.5)).astype(F32)
        if cfg.use_flow_sigmas:
            alphas = np.linspace(1, 1 / n, num_inference_steps + 1)
            s = 1.0 - alphas
            sigmas = np.flip(cfg.flow_shift * s / (1 + (cfg.flow_shift - 1) * s))[:-1].copy()
            timesteps = (sigmas * n).astype(np.int64)
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        last = 0.0 if cfg.final_sigmas_type == "zero" else float(train_sigmas[0])
        self.sigmas = np.concatenate([sigmas, [last]]).astype(F32)
        self.timesteps = timesteps
        self.num_inference_steps = len(timesteps)
        self._outputs = [None] * cfg.solver_order
        self._lower_order_nums = 0
        self._step_index = 0

    # --- the maths, in float32 like diffusers -------------------------------------------------------------------
    def _alpha_sigma(self, sigma: np.float32) -> tuple[np.float32, np.float32]:
        if self.config.use_flow_sigmas:
            return F32(1.0) - sigma, sigma
        alpha = F32(1.0) / np.sqrt(sigma * sigma + F32(1.0))  # torch: x ** 0.5 is sqrt
        return alpha, sigma * alpha

    def _lambda(self, alpha: np.float32, sigma: np.float32) -> np.float32:
        with np.errstate(divide="ignore"):  # the final sigma 0: lambda = +inf, and the update gives x0 (as diffusers)
            return F32(_log32(alpha) - _log32(sigma))

    def _data_prediction(self, output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        kind = self.config.prediction_type
        sigma = self.sigmas[self._step_index]
        if kind == "flow_prediction":
            return sample - sigma * output
        if kind == "sample":
            return output
        alpha_t, sigma_t = self._alpha_sigma(sigma)
        if kind == "epsilon":
            return (sample - sigma_t * output) / alpha_t
        return alpha_t * sample - sigma_t * output  # v_prediction

    def step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        if self.num_inference_steps == 0:
            raise SchedulerConfigError("call set_timesteps(n) before step()")
        if self._step_index >= self.num_inference_steps:
            raise SchedulerConfigError(f"step() called {self._step_index + 1} times for {self.num_inference_steps} "
                                       "timesteps; call set_timesteps(n) again")
        if int(timestep) != int(self.timesteps[self._step_index]):
            raise SchedulerConfigError(f"step() got timestep {timestep}, expected {self.timesteps[self._step_index]} "
                                       "(the timesteps in order, as set_timesteps made them)")
        cfg = self.config
        i, last = self._step_index, self.num_inference_steps
        lower_final = i == last - 1 and (cfg.euler_at_final or (cfg.lower_order_final and last < 15)
                                         or cfg.final_sigmas_type == "zero")
        dtype = model_output.dtype
        x0 = self._data_prediction(model_output.astype(F32), sample.astype(F32)).astype(dtype)
        self._outputs = self._outputs[1:] + [x0]
        x = sample.astype(F32)
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i + 1])
        alpha_s0, sigma_s0 = self._alpha_sigma(self.sigmas[i])
        h = F32(self._lambda(alpha_t, sigma_t) - self._lambda(alpha_s0, sigma_s0))
        em1 = F32(_exp32(-h) - F32(1.0))
        if cfg.solver_order == 1 or self._lower_order_nums < 1 or lower_final:
            prev = (sigma_t / sigma_s0) * x - (alpha_t * em1) * x0
        else:
            alpha_s1, sigma_s1 = self._alpha_sigma(self.sigmas[i - 1])
            h0 = F32(self._lambda(alpha_s0, sigma_s0) - self._lambda(alpha_s1, sigma_s1))
            r0 = F32(h0 / h)
            m0, m1 = self._outputs[-1], self._outputs[-2]
            d0, d1 = m0, (F32(1.0) / r0) * (m0 - m1)
            if cfg.solver_type == "midpoint":
                prev = (sigma_t / sigma_s0) * x - (alpha_t * em1) * d0 - F32(0.5) * (alpha_t * em1) * d1
            else:
                prev = (sigma_t / sigma_s0) * x - (alpha_t * em1) * d0 + (alpha_t * (em1 / h + F32(1.0))) * d1
        if self._lower_order_nums < cfg.solver_order:
            self._lower_order_nums += 1
        self._step_index += 1
        return prev.astype(dtype)
