"""A numpy scheduler from diffusers' ``scheduler/scheduler_config.json`` (its ``_class_name`` picks the class).

Each class's config takes the keys it implements and refuses a setting it lacks by name (`SchedulerConfigError`,
one line: the class, the setting, the fix). Keys the numpy classes do not model but that change diffusers' result
when not at their default (``trained_betas`` and ``lambda_min_clipped`` for DPM-Solver) are refused here; keys that
only matter with a refused setting (``dynamic_thresholding_ratio``, ``sample_max_value`` with ``thresholding``), and
keys the diffusers class itself does not take (configs written for another class), are ignored, as diffusers
ignores them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from runtime.schedulers.ddim import DDIM, DDIMConfig
from runtime.schedulers.dpm_solver import DPMSolverConfig, DPMSolverMultistep
from runtime.schedulers.settings import SchedulerConfigError
from runtime.schedulers.flow_euler import FlowMatchEuler, FlowMatchEulerConfig

logger = logging.getLogger(__name__)

# diffusers class name -> (numpy scheduler, its config)
SCHEDULER_CLASSES = {
    "DDIMScheduler": (DDIM, DDIMConfig),
    "DPMSolverMultistepScheduler": (DPMSolverMultistep, DPMSolverConfig),
    "FlowMatchEulerDiscreteScheduler": (FlowMatchEuler, FlowMatchEulerConfig),
}


def _dpm_unmodelled(settings: Mapping[str, Any]) -> None:
    if settings.get("trained_betas") is not None:
        raise SchedulerConfigError("DPMSolverMultistep: trained_betas is not implemented; use beta_schedule linear or "
                                   "scaled_linear with beta_start/beta_end")
    clipped = settings.get("lambda_min_clipped")
    if clipped is not None and not (isinstance(clipped, (int, float)) and math.isinf(clipped) and clipped < 0):
        raise SchedulerConfigError(f"DPMSolverMultistep: lambda_min_clipped={clipped!r} is not implemented; use "
                                   "-inf (the default)")


_UNMODELLED = {"DPMSolverMultistepScheduler": _dpm_unmodelled}


def scheduler_from_config(config: Mapping[str, Any], class_name: str | None = None):
    """The numpy scheduler for a diffusers scheduler config dict (``_class_name`` and its settings); `class_name`
    names the class for a dict without ``_class_name`` (a family's ``scheduler_settings``)."""
    if not isinstance(config, Mapping):
        raise SchedulerConfigError(f"scheduler config must be a dict (scheduler_config.json's contents), not "
                                   f"{type(config).__name__}")
    name = class_name or config.get("_class_name")
    if not name:
        raise SchedulerConfigError("scheduler config has no _class_name; pass scheduler/scheduler_config.json as "
                                   "diffusers wrote it, or name the class")
    if name not in SCHEDULER_CLASSES:
        raise SchedulerConfigError(f"scheduler {name} is not implemented without torch; use one of "
                                   f"{', '.join(sorted(SCHEDULER_CLASSES))} (e.g. DPMSolverMultistepScheduler."
                                   "from_config(scheduler.config) in diffusers)")
    settings = {k: v for k, v in config.items() if not k.startswith("_")}
    if name in _UNMODELLED:
        _UNMODELLED[name](settings)
    scheduler_class, config_class = SCHEDULER_CLASSES[name]
    scheduler = scheduler_class(config_class.from_settings(settings))
    ignored = sorted(set(settings) - {f for f in config_class.__dataclass_fields__})
    if ignored:
        logger.debug("%s: config keys not used by the numpy scheduler: %s", name, ", ".join(ignored))
    return scheduler
