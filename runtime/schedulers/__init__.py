"""Numpy schedulers for the device (no torch): diffusers' interface shape, ``set_timesteps(n)`` and
``step(model_output, timestep, sample) -> prev_sample``, tested against diffusers' torch schedulers
(tests/test_schedulers.py, tests/test_schedulers_flow_ddim.py); `scheduler_from_config` builds one from diffusers'
``scheduler_config.json``."""

from runtime.schedulers.ddim import DDIM, DDIMConfig
from runtime.schedulers.dpm_solver import DPMSolverConfig, DPMSolverMultistep
from runtime.schedulers.settings import SchedulerConfigError
from runtime.schedulers.flow_euler import FlowMatchEuler, FlowMatchEulerConfig
from runtime.schedulers.from_config import SCHEDULER_CLASSES, scheduler_from_config

__all__ = ["DDIM", "DDIMConfig", "DPMSolverConfig", "DPMSolverMultistep", "FlowMatchEuler", "FlowMatchEulerConfig",
           "SCHEDULER_CLASSES", "SchedulerConfigError", "scheduler_from_config"]
