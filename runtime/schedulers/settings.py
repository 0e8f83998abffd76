"""Reading a diffusers scheduler config into a numpy scheduler's config dataclass: one check for every class."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any


class SchedulerConfigError(ValueError):
    """A scheduler setting this implementation does not have (one line: the class, the setting, the fix)."""


def config_from_settings(config_cls, scheduler: str, settings: Mapping[str, Any], off: Iterable[str],
                         supported: Mapping[str, tuple]):
    """`config_cls` from diffusers' config keys: a flag in `off` set true, or a value outside `supported[key]`, is
    refused by name (`scheduler` names the class in the message); keys the dataclass lacks are ignored."""
    for key in off:
        if settings.get(key):
            raise SchedulerConfigError(f"{scheduler}: {key}=True is not implemented; use the default")
    for key, allowed in supported.items():
        if key in settings and settings[key] not in allowed:
            raise SchedulerConfigError(f"{scheduler}: {key}={settings[key]!r} is not implemented; use one of "
                                       f"{', '.join(map(str, allowed))}")
    fields = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in settings.items() if k in fields})
