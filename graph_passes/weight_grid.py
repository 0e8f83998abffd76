"""The min/max weight grid of one group, shared by every weight range (min/max, MSE, GPTQ): the scale is rounded to
the scale dtype before any integer is set.

- symmetric: ``scale = amax / qmax`` (1 where amax = 0), codes ``round(w / scale)`` in ``[-qmax, qmax]``;
- asymmetric: ``lo = min(w, 0)``, ``hi = max(w, 0)``, ``scale = (hi - lo) / qmax`` (1 where 0),
  ``zero_point = clip(round(-lo / scale), 0, qmax)``, codes ``round(w / scale) + zero_point`` in ``[0, qmax]``.
"""

from __future__ import annotations

import numpy as np


def sym_scale(amax: np.ndarray, qmax: int, scale_dtype: np.dtype) -> np.ndarray:
    scale = amax / qmax
    return np.where(scale > 0, scale, 1.0).astype(scale_dtype)


def asym_scale_zp(wmin: np.ndarray, wmax: np.ndarray, qmax: int,
                  scale_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    scale = (wmax - wmin) / qmax
    scale = np.where(scale > 0, scale, 1.0).astype(scale_dtype)
    zp = np.clip(np.round(-wmin / scale.astype(np.float64)), 0, qmax)
    return scale, zp
