"""Numpy schedulers for the device (no torch): diffusers' interface shape, ``set_timesteps(n)`` and
``step(model_output, timestep, sample) -> prev_sample``, tested against diffusers' torch schedulers
(tests/test_schedulers.py)."""

from runtime.schedulers.dpm_solver import DPMSolverMultistep, SchedulerConfigError

__all__ = ["DPMSolverMultistep", "SchedulerConfigError"]
