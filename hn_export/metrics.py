"""Error metrics between a candidate output and a reference output (float64 maths)."""

from __future__ import annotations

import dataclasses

import numpy as np


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """10 log10(||ref||^2 / ||ref - cand||^2); +inf when equal."""
    ref = np.asarray(reference, dtype=np.float64)
    err = ref - np.asarray(candidate, dtype=np.float64)
    noise = float(np.sum(err * err))
    signal = float(np.sum(ref * ref))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(signal / noise)


@dataclasses.dataclass(frozen=True)
class Comparison:
    sqnr_db: float
    cosine: float
    max_abs: float
    rel_l2: float

    @classmethod
    def of(cls, reference: np.ndarray, candidate: np.ndarray) -> Comparison:
        ref = np.asarray(reference, dtype=np.float64).ravel()
        cand = np.asarray(candidate, dtype=np.float64).ravel()
        norm = np.linalg.norm(ref) * np.linalg.norm(cand)
        return cls(
            sqnr_db=sqnr_db(ref, cand),
            cosine=float(ref @ cand / norm) if norm else float("nan"),
            max_abs=float(np.max(np.abs(ref - cand))) if ref.size else 0.0,
            rel_l2=float(np.linalg.norm(ref - cand) / np.linalg.norm(ref)) if np.linalg.norm(ref) else float("nan"),
        )
