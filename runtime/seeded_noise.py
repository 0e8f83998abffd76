"""torch's seeded CPU normal noise in numpy, bit for bit: ``torch_randn(shape, seed)`` equals
``torch.randn(shape, generator=torch.Generator().manual_seed(seed))`` (what diffusers' ``randn_tensor`` draws for the
starting latents with a CPU generator, before the scheduler's ``init_noise_sigma``), without torch.

Generator: mt19937 seeded the standard way (``init_genrand(seed mod 2^32)``), numpy's ``MT19937`` bit generator set
to that state. ``uniform32 = (r & (2^24 - 1)) 2^-24`` from one 32-bit draw r; ``uniform64 = (((r1 << 32) | r2) &
(2^53 - 1)) 2^-53`` from two.

numel >= 16 (ATen's ``normal_fill``, in float32 whatever the output dtype; float16 is that rounded): n uniforms
first (float16: the whole blocks' only), then Box-Muller in blocks of 16, pairs (j, j + 8):

    u1 = 1 - d[j],  u2 = d[j + 8],  r = sqrt(-2 log u1),  theta = 2 pi u2,  d[j] = r cos theta,  d[j + 8] = r sin theta

and, when 16 does not divide n, 16 fresh uniforms for the last 16 positions (the tail block overwrites the end of the
last whole block). On x86 torch runs its AVX2 kernel for this (also on AVX-512 CPUs): ``log256_ps`` and
``sincos256_ps`` of ``avx_mathfun.h`` (cephes' single precision polynomials), compiled with multiply-add contraction.
`_log_cephes` and `_sincos_cephes` are those, operation for operation, in float32 with the same fused multiply-adds
(`_fma32`, exact); glibc's ``logf``/``sinf``/``cosf`` in their place give another last bit in 16% of the values.

numel < 16 (ATen's scalar path): ``normal_distribution<double>`` per element, Box-Muller in float64 with the sine
cached for the next element: ``u1, u2 = uniform64, uniform64``, ``r = sqrt(-2 log1p(-u2))``, ``theta = 2 pi u1``,
out ``r cos theta`` then ``r sin theta``, rounded to float32 (then float16).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

F32 = np.float32
F64 = np.float64
_STATE_N = 624
_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))

# avx_mathfun.h's constants, as float32
_SQRTHF = F32(0.707106781186547524)
_LOG_P = tuple(F32(p) for p in (7.0376836292E-2, -1.1514610310E-1, 1.1676998740E-1, -1.2420140846E-1,
                                1.4249322787E-1, -1.6668057665E-1, 2.0000714765E-1, -2.4999993993E-1,
                                3.3333331174E-1))
_LOG_Q1, _LOG_Q2 = F32(-2.12194440e-4), F32(0.693359375)
_FOPI = F32(1.27323954473516)  # 4 / pi
_MINUS_DP = (F32(-0.78515625), F32(-2.4187564849853515625e-4), F32(-3.77489497744594108e-8))
_SINCOF = (F32(-1.9515295891E-4), F32(8.3321608736E-3), F32(-1.6666654611E-1))
_COSCOF = (F32(2.443315711809948E-005), F32(-1.388731625493765E-003), F32(4.166664568298827E-002))
_TWO_PI = F32(2.0 * math.pi)


def _fma32(a, b, c) -> np.ndarray:
    """float32 ``fma(a, b, c)``, one rounding: the product is exact in float64; the float64 sum is made
    round-to-odd (its last bit set when inexact), which then rounds to float32 correctly (53 >= 24 + 2 bits)."""
    p = np.multiply(a, b, dtype=F64)
    c = np.asarray(c, dtype=F64)
    s = p + c
    err = (p - (s - (s - p))) + (c - (s - p))  # TwoSum: p + c = s + err exactly
    even = (s.view(np.int64) & 1) == 0
    s = np.where((err != 0) & even, np.nextafter(s, s + err), s)
    return s.astype(F32)


def _log_cephes(x: np.ndarray) -> np.ndarray:
    """``log256_ps`` for float32 x > 0: x = 2^e m, m in [sqrt(1/2), sqrt(2)), log = e ln2 + log1p(m - 1) with a
    degree-9 polynomial (Horner, fused), ln2 split in q2 + q1."""
    x = np.maximum(x, np.array(0x00800000, np.int32).view(F32))
    bits = x.view(np.int32)
    e = ((bits >> 23) - 127).astype(F32) + F32(1.0)
    x = ((bits & ~0x7F800000) | np.array(0.5, F32).view(np.int32)).view(F32)  # the mantissa in [0.5, 1)
    small = x < _SQRTHF
    e = (e - np.where(small, F32(1.0), F32(0.0))).astype(F32)
    x = ((x - F32(1.0)) + np.where(small, x, F32(0.0))).astype(F32)
    z = (x * x).astype(F32)
    y = np.full_like(x, _LOG_P[0])
    for p in _LOG_P[1:]:
        y = _fma32(y, x, p)
    y = (y * x).astype(F32)
    y = _fma32(y, z, (e * _LOG_Q1).astype(F32))
    y = _fma32(-z, F32(0.5), y)
    return _fma32(e, _LOG_Q2, (x + y).astype(F32))


def _sincos_cephes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``sincos256_ps`` for float32 x >= 0: j = the even integer nearest x 4/pi (from truncation), the reduced
    argument x - j pi/4 in three fused steps (pi/4 = DP1 + DP2 + DP3), a cosine and a sine polynomial in z = x^2,
    selected and signed by j mod 8."""
    j = (x * _FOPI).astype(F32).astype(np.int32)
    j = (j + 1) & ~1
    y = j.astype(F32)
    for dp in _MINUS_DP:
        x = _fma32(y, dp, x)
    z = (x * x).astype(F32)
    c = _fma32(np.full_like(x, _COSCOF[0]), z, _COSCOF[1])
    c = _fma32(c, z, _COSCOF[2])
    c = (c * z).astype(F32)
    c = _fma32(c, z, -(z * F32(0.5)).astype(F32))
    c = (c + F32(1.0)).astype(F32)
    s = _fma32(np.full_like(x, _SINCOF[0]), z, _SINCOF[1])
    s = _fma32(s, z, _SINCOF[2])
    s = (s * z).astype(F32)
    s = _fma32(s, x, x)
    poly = (j & 2) == 0
    sin = np.where(poly, s, c)
    cos = np.where(poly, c, s)
    sin = np.where((j & 4) != 0, -sin, sin)
    cos = np.where((~(j - 2) & 4) != 0, -cos, cos)
    return sin.astype(F32), cos.astype(F32)


def _box_muller_16(blocks: np.ndarray) -> np.ndarray:
    """``normal_fill_16`` on rows of 16 float32 uniforms."""
    u1 = (F32(1.0) - blocks[:, :8]).astype(F32)
    radius = np.sqrt((F32(-2.0) * _log_cephes(u1)).astype(F32))
    sin, cos = _sincos_cephes((_TWO_PI * blocks[:, 8:]).astype(F32))
    return np.concatenate([radius * cos, radius * sin], axis=1).astype(F32)


class TorchGenerator:
    """The stream of ``torch.Generator()`` on CPU: ``TorchGenerator(seed).randn(shape)`` draws what
    ``torch.randn(shape, generator=g)`` draws, call after call, from ``g = torch.Generator().manual_seed(seed)``."""

    def __init__(self, seed: int = 67280421310721):
        self.manual_seed(seed)

    def manual_seed(self, seed: int) -> "TorchGenerator":
        """``init_genrand(seed mod 2^32)`` (torch keeps a seed's low 32 bits); the cached normal is dropped."""
        key = np.empty(_STATE_N, np.uint32)
        value = int(seed) % 2 ** 32
        for j in range(_STATE_N):
            key[j] = value
            value = (1812433253 * (value ^ (value >> 30)) + j + 1) & 0xFFFFFFFF
        self._bits = np.random.MT19937()
        self._bits.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": _STATE_N}}
        self._cached_normal: float | None = None
        self.initial_seed = int(seed)
        return self

    def _raw(self, n: int) -> np.ndarray:
        return self._bits.random_raw(n).astype(np.uint32) if n else np.zeros(0, np.uint32)

    def _uniform32(self, n: int) -> np.ndarray:
        return ((self._raw(n) & 0xFFFFFF).astype(F32) * F32(2.0 ** -24)).astype(F32)

    def _normal64(self) -> float:
        if self._cached_normal is not None:
            value, self._cached_normal = self._cached_normal, None
            return value
        r1, r2, r3, r4 = (int(r) for r in self._raw(4))
        u1 = (((r1 << 32) | r2) & (2 ** 53 - 1)) * 2.0 ** -53
        u2 = (((r3 << 32) | r4) & (2 ** 53 - 1)) * 2.0 ** -53
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._cached_normal = radius * math.sin(theta)
        return radius * math.cos(theta)

    def randn(self, shape: Sequence[int] | int, dtype=np.float32) -> np.ndarray:
        """Standard normal noise of `shape` (float32 or float16), as ``torch.randn`` with this generator."""
        shape = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
        dtype = np.dtype(dtype)
        if dtype not in _DTYPES:
            raise ValueError(f"torch_randn: dtype {dtype} is not implemented; use float32 or float16")
        if any(s < 0 for s in shape):
            raise ValueError(f"torch_randn: negative size in shape {shape}")
        n = math.prod(shape)
        if n < 16:
            out = np.array([self._normal64() for _ in range(n)], F64).astype(F32)
        else:
            whole = n // 16 * 16
            out = np.empty(n, F32)
            # float32 fills all n uniforms before the tail's 16; float16 (a float32 buffer per block) only whole blocks
            drawn = self._uniform32(n if dtype == np.float32 else whole)
            out[:whole] = _box_muller_16(drawn[:whole].reshape(-1, 16)).reshape(-1)
            if n % 16:
                out[n - 16:] = _box_muller_16(self._uniform32(16).reshape(1, 16)).reshape(-1)
        return out.astype(dtype).reshape(shape)


def torch_randn(shape: Sequence[int] | int, seed: int, dtype=np.float32) -> np.ndarray:
    """``torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)`` on CPU, bit for bit."""
    return TorchGenerator(seed).randn(shape, dtype)
