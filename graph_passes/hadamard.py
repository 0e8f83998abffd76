"""Orthonormal Hadamard rotations for HadaNorm / QuaRot, built without tables.

A Hadamard matrix of order n is an n x n matrix H with entries +-1 and H H^T = n I, so
H / sqrt(n) is orthonormal. Orders are built by four rules:

* Sylvester: H_1 = [1], H_{2m} = [[H_m, H_m], [H_m, -H_m]]   (every power of two).
* Paley I, q prime, q = 3 (mod 4): with the Jacobsthal matrix Q[i, j] = chi(j - i mod q)
  (chi the Legendre symbol, chi(0) = 0; Q^T = -Q, Q Q^T = q I - J),
  H = I + [[0, 1^T], [-1, Q]] has order q + 1.
* Paley II, q prime, q = 1 (mod 4): Q is symmetric, C = [[0, 1^T], [1, Q]] is a symmetric
  conference matrix (C C^T = q I), and
  H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]] has order 2 (q + 1).
* Kronecker: if H_a and H_b are Hadamard, H_a (x) H_b is Hadamard of order a b.

A rotation of width d = K * M (M = 2^n) is R = (H_K (x) H_M) / sqrt(d) @ diag(s) with optional
random signs s in {+-1}^d. With x viewed row-major as X[a, b] = x[a * M + b] (shape K x M),
R x = vec(H_K' @ (X * S) @ H_M'^T) (primes: normalised factors), so a rotation costs
O(d (K + M)) instead of O(d^2) and the d x d matrix is never formed.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

import numpy as np

from graph_passes.errors import GraphInputError

# How an order is built: ("sylvester", n), ("paley1", q), ("paley2", q) or ("kron", a, b).
Recipe = tuple[str, int] | tuple[str, int, int]


class HadamardMode(enum.Enum):
    """FULL: one Kronecker Hadamard over the whole width; BLOCK: block-diagonal Sylvester blocks."""

    FULL = "full"
    BLOCK = "block"


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@functools.lru_cache(maxsize=None)
def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % p for p in range(2, int(q**0.5) + 1))


@functools.lru_cache(maxsize=None)
def _recipe(n: int) -> Recipe | None:
    """The first rule (Sylvester, Paley I, Paley II, Kronecker) that builds order n, or None."""
    if _is_power_of_two(n):
        return ("sylvester", n)
    if n < 1 or n % 4:  # Hadamard orders above 2 are multiples of 4
        return None
    if (n - 1) % 4 == 3 and _is_prime(n - 1):
        return ("paley1", n - 1)
    if (n // 2 - 1) % 4 == 1 and _is_prime(n // 2 - 1):
        return ("paley2", n // 2 - 1)
    for a in range(2, int(n**0.5) + 1):
        if n % a == 0 and _recipe(a) is not None and _recipe(n // a) is not None:
            return ("kron", a, n // a)
    return None


def is_constructible(n: int) -> bool:
    """Whether hadamard_matrix(n) can be built by Sylvester, Paley I/II and Kronecker products."""
    return _recipe(n) is not None


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _legendre(q: int) -> np.ndarray:
    """chi[x] = Legendre symbol (x / q) for x = 0 .. q-1: 0, +1 on quadratic residues, -1 otherwise."""
    chi = -np.ones(q)
    chi[(np.arange(1, q) ** 2) % q] = 1.0
    chi[0] = 0.0
    return chi


def _bordered(q: int, first_column: float) -> np.ndarray:
    """[[0, 1^T], [first_column * 1, Q]] of order q + 1, Q the Jacobsthal matrix Q[i, j] = chi(j - i)."""
    chi = _legendre(q)
    rotations = np.lib.stride_tricks.sliding_window_view(np.concatenate([chi, chi]), q)  # row s: chi[s + j]
    c = np.zeros((q + 1, q + 1))
    c[0, 1:] = 1.0
    c[1:, 0] = first_column
    np.take(rotations, q - np.arange(q), axis=0, out=c[1:, 1:], mode="clip")  # row i: chi[j - i mod q]
    return c


def _paley1(q: int) -> np.ndarray:
    """I + [[0, 1^T], [-1, Q]]: the bordered matrix has a zero diagonal, so set it to one."""
    h = _bordered(q, -1.0)
    np.fill_diagonal(h, 1.0)
    return h


def _paley2(q: int) -> np.ndarray:
    """C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]], writing the 2 x 2 diagonal blocks in place."""
    h = np.kron(_bordered(q, 1.0), np.array([[1.0, 1.0], [1.0, -1.0]]))
    diag = np.arange(q + 1)
    h.reshape(q + 1, 2, q + 1, 2)[diag, :, diag, :] = np.array([[1.0, -1.0], [-1.0, -1.0]])
    return h


def hadamard_matrix(n: int) -> np.ndarray:
    """Unnormalised Hadamard matrix of order n (float64, entries +-1, H H^T = n I)."""
    recipe = _recipe(n)
    if recipe is None:
        raise GraphInputError(
            f"no Hadamard matrix of order {n} can be built (Sylvester, Paley I/II or Kronecker products)"
        )
    kind = recipe[0]
    if kind == "sylvester":
        return _sylvester(n)
    if kind == "paley1":
        return _paley1(recipe[1])
    if kind == "paley2":
        return _paley2(recipe[1])
    return np.kron(hadamard_matrix(recipe[1]), hadamard_matrix(recipe[2]))


def _normalised(n: int) -> np.ndarray:
    return hadamard_matrix(n) / np.sqrt(n)


@dataclass(frozen=True)
class KroneckerHadamard:
    """The orthonormal rotation kron(left, right) @ diag(signs) of width d = K * M."""

    left: np.ndarray  # K x K orthonormal
    right: np.ndarray  # M x M orthonormal (Sylvester)
    signs: np.ndarray | None  # length d, +-1, or None for no sign flips

    @property
    def dim(self) -> int:
        return self.left.shape[0] * self.right.shape[0]

    def _sign_vector(self) -> np.ndarray:
        return np.ones(self.dim) if self.signs is None else np.asarray(self.signs, dtype=np.float64)

    def matrix(self) -> np.ndarray:
        """The dense d x d orthonormal matrix (for tests and small widths)."""
        return np.kron(self.left, self.right) * self._sign_vector()[None, :]

    def rotate_rows(self, x: np.ndarray) -> np.ndarray:
        """x @ matrix().T for x of shape [..., d], without forming the d x d matrix."""
        k, m = self.left.shape[0], self.right.shape[0]
        xs = np.asarray(x, dtype=np.float64) * self._sign_vector()
        blocks = xs.reshape(*xs.shape[:-1], k, m)
        return (self.left @ blocks @ self.right.T).reshape(xs.shape)

    def rotate_weight_rows(self, w: np.ndarray) -> np.ndarray:
        """matrix() @ w for w of shape [d, out], without forming the d x d matrix."""
        k, m = self.left.shape[0], self.right.shape[0]
        ws = np.asarray(w, dtype=np.float64) * self._sign_vector()[:, None]
        out = np.einsum("ak,bm,kmo->abo", self.left, self.right, ws.reshape(k, m, -1), optimize=True)
        return out.reshape(ws.shape)

    def unrotate_weight_rows(self, w: np.ndarray) -> np.ndarray:
        """matrix().T @ w for w of shape [d, out] (the inverse rotation), without forming the d x d matrix."""
        k, m = self.left.shape[0], self.right.shape[0]
        w = np.asarray(w, dtype=np.float64)
        out = np.einsum("ka,mb,kmo->abo", self.left, self.right, w.reshape(k, m, -1), optimize=True)
        return out.reshape(w.shape) * self._sign_vector()[:, None]


# A power-of-two width is split as Sylvester(d / M) (x) Sylvester(M) with M at most this (the same matrix: Sylvester
# orders multiply under the Kronecker product), so no factor is a large dense matrix in the graph (4096: 16 x 256,
# 256 KiB, instead of one 4096 x 4096 factor, 64 MiB).
MAX_POWER_OF_TWO_FACTOR = 256


def full_factor_orders(d: int) -> tuple[int, int] | None:
    """(K, M) with d = K * M, M = 2^n as large as possible and K constructible; None if none. A power of two d
    above MAX_POWER_OF_TWO_FACTOR gives (d / MAX_POWER_OF_TWO_FACTOR, MAX_POWER_OF_TWO_FACTOR)."""
    if d < 1:
        return None
    if _is_power_of_two(d) and d > MAX_POWER_OF_TWO_FACTOR:
        return d // MAX_POWER_OF_TWO_FACTOR, MAX_POWER_OF_TWO_FACTOR
    n = (d & -d).bit_length() - 1  # 2-adic valuation of d
    for shift in range(n, -1, -1):
        if is_constructible(d >> shift):
            return d >> shift, 1 << shift
    return None


def _random_signs(d: int, seed: int | None) -> np.ndarray | None:
    if seed is None:
        return None
    return np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=d)


def hadamard_factors(
    d: int, mode: HadamardMode, *, block_size: int = 128, seed: int | None = None
) -> KroneckerHadamard:
    """The Kronecker-factored orthonormal Hadamard rotation of width d (random signs if seeded)."""
    if d < 1:
        raise GraphInputError(f"hidden width must be positive, got {d}")
    if mode is HadamardMode.FULL:
        orders = full_factor_orders(d)
        if orders is None:
            raise GraphInputError(
                f"no Hadamard matrix of order {d} can be built "
                "(d = K * 2^n needs K constructible by Sylvester/Paley); use --hadamard block"
            )
        k, m = orders
        return KroneckerHadamard(_normalised(k), _normalised(m), _random_signs(d, seed))
    if not _is_power_of_two(block_size):
        raise GraphInputError(f"Hadamard block size must be a power of two, got {block_size}; "
                              "use --hadamard-block 32, 64 or 128")
    if d % block_size:
        raise GraphInputError(
            f"width {d} is not a multiple of the Hadamard block size {block_size}; "
            "use --hadamard full or another block size"
        )
    return KroneckerHadamard(np.eye(d // block_size), _normalised(block_size), _random_signs(d, seed))
