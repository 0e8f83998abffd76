"""JSON text of a report: valid JSON always (NaN and infinities, which JSON cannot hold, are written as null)."""

from __future__ import annotations

import json
import math


def finite_or_none(value):
    """`value` with every non-finite float (NaN, +-inf) replaced by None, in nested dicts, lists and tuples."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def report_json(data) -> str:
    """Indented JSON text ending in a newline; raises ValueError rather than write a bare NaN."""
    return json.dumps(finite_or_none(data), indent=2, allow_nan=False) + "\n"
