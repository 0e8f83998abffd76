"""Tests for graph_passes.hadamard: exact Hadamard construction, Kronecker factors, fast rotations."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from graph_passes.errors import GraphInputError
from graph_passes.hadamard import (
    HadamardMode,
    KroneckerHadamard,
    full_factor_orders,
    hadamard_factors,
    hadamard_matrix,
    is_constructible,
)

MAX_D = 8192
EXACT_LIMIT = 512  # H H^T is checked with a dense O(n^3) product up to this order
PROBE_LIMIT = 1024  # used orders above EXACT_LIMIT and up to here get the O(n^2) Freivalds probe


def _primes_up_to(n: int) -> list[int]:
    sieve = np.ones(n + 1, dtype=bool)
    sieve[:2] = False
    for p in range(2, int(n**0.5) + 1):
        if sieve[p]:
            sieve[p * p :: p] = False
    return [int(p) for p in np.flatnonzero(sieve)]


def _reference_orders(limit: int) -> set[int]:
    """Orders <= limit closed under products of {1, 2, Paley I q + 1, Paley II 2 (q + 1)}."""
    primes = _primes_up_to(limit)
    base = {2} | {q + 1 for q in primes if q % 4 == 3} | {2 * (q + 1) for q in primes if q % 4 == 1}
    orders = {1}
    frontier = {1}
    while frontier:
        new = {a * b for a in frontier for b in base if a * b <= limit} - orders
        orders |= new
        frontier = new
    return orders


REFERENCE = _reference_orders(MAX_D)


def _reference_full(d: int) -> tuple[int, int] | None:
    if d > 256 and d & (d - 1) == 0:  # powers of two: Sylvester(d / 256) (x) Sylvester(256), the same matrix
        return d // 256, 256
    m = 1 << ((d & -d).bit_length() - 1)
    while m >= 1:
        if d // m in REFERENCE:
            return d // m, m
        m //= 2
    return None


USED_K = sorted({kn[0] for d in range(1, MAX_D + 1) if (kn := _reference_full(d)) is not None})
SMALL_ORDERS = sorted(
    {k for k in USED_K if k <= EXACT_LIMIT}
    | {1 << i for i in range(10)}
    | {12, 20, 28, 36, 44, 60, 72, 108, 144}  # Paley I, Paley II (20, 36, 108), products (72, 144)
)


def _is_exact_hadamard(h: np.ndarray, n: int) -> bool:
    return h.shape == (n, n) and h.dtype == np.float64 and bool(np.all((h == 1.0) | (h == -1.0)))


def _freivalds_ok(h: np.ndarray, n: int, seed: int = 0) -> bool:
    """H (H^T X) == n X for a random integer X (Freivalds): exact in float64, O(n^2) not O(n^3)."""
    x = np.random.default_rng(seed).integers(-3, 4, size=(n, 4)).astype(np.float64)
    return bool(np.array_equal(h @ (h.T @ x), n * x))


def _identity_error(a: np.ndarray) -> float:
    """max |A A^T - I|, computed in place to keep large products cheap."""
    p = a @ a.T
    p[np.diag_indices_from(p)] -= 1.0
    return float(np.abs(p, out=p).max())


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --- construction -------------------------------------------------------------------------------


def test_is_constructible_matches_independent_closure() -> None:
    got = {n for n in range(1, MAX_D + 1) if is_constructible(n)}
    assert got == REFERENCE
    assert {1, 2, 4, 12, 20, 36, 72, 8192} <= got
    assert not {3, 6, 52, 92, 100} & got  # 52 and 100 need Paley with prime powers (25, 49)


@pytest.mark.parametrize("n", SMALL_ORDERS)
def test_hadamard_matrix_exact(n: int) -> None:
    h = hadamard_matrix(n)
    assert _is_exact_hadamard(h, n)
    assert np.array_equal(h @ h.T, n * np.eye(n))


PRIMES = set(_primes_up_to(MAX_D))
PALEY_I = {q + 1 for q in PRIMES if q % 4 == 3}
PALEY_II = {2 * (q + 1) for q in PRIMES if q % 4 == 1}
LARGE_LIMIT = 4096  # the largest factor of each kind up to here; 8192^2 matrices cost 512 MiB each
LARGE_ORDERS = [
    max(k for k in USED_K if k <= LARGE_LIMIT and k in PALEY_I),
    max(k for k in USED_K if k <= LARGE_LIMIT and k in PALEY_II),
    max(k for k in USED_K if k <= LARGE_LIMIT and k not in PALEY_I | PALEY_II),  # Kronecker products only
    LARGE_LIMIT,  # Sylvester
]


def test_hadamard_matrix_used_orders_probed() -> None:
    """Every factor K that FULL mode uses with EXACT_LIMIT < K <= PROBE_LIMIT."""
    orders = [k for k in USED_K if EXACT_LIMIT < k <= PROBE_LIMIT]
    assert len(orders) == 42
    for n in orders:
        h = hadamard_matrix(n)
        assert _is_exact_hadamard(h, n) and _freivalds_ok(h, n, seed=n), n


@pytest.mark.parametrize("n", LARGE_ORDERS)
def test_hadamard_matrix_large_orders(n: int) -> None:
    assert n > EXACT_LIMIT
    h = hadamard_matrix(n)
    assert _is_exact_hadamard(h, n)
    assert _freivalds_ok(h, n)


@pytest.mark.parametrize("n", [-4, 0, 3, 6, 52, 92])
def test_hadamard_matrix_unsupported_order(n: int) -> None:
    with pytest.raises(GraphInputError, match=str(n)):
        hadamard_matrix(n)


# --- factors ------------------------------------------------------------------------------------


# powers of two above 256: Sylvester(d / 256) (x) Sylvester(256), the same matrix as Sylvester(d) with small factors
@pytest.mark.parametrize("d, k, m", [(72, 36, 2), (1152, 36, 32), (4608, 36, 128), (256, 1, 256), (4096, 16, 256),
                                     (8192, 32, 256)])
def test_full_factors_of_pixart_widths(d: int, k: int, m: int) -> None:
    f = hadamard_factors(d, HadamardMode.FULL)
    assert (f.left.shape, f.right.shape, f.dim, f.signs) == ((k, k), (m, m), d, None)
    if d <= 4608:
        assert _identity_error(f.matrix()) < 1e-12
    else:  # a dense 8192^3 product is too slow for the suite: probe R^T (R x) == x instead
        x = np.random.default_rng(1).standard_normal((d, 4))
        y = f.rotate_rows(x.T)
        assert _rel_err(np.linalg.norm(y, axis=1), np.linalg.norm(x.T, axis=1)) < 1e-12


def test_full_decomposition_sweep_matches_reference() -> None:
    supported = 0
    for d in range(1, MAX_D + 1):
        got = full_factor_orders(d)
        assert got == _reference_full(d), d
        if got is not None:
            k, m = got
            assert k * m == d and m & (m - 1) == 0 and is_constructible(k)
            supported += 1
    assert supported == 1262  # pinned: every width that FULL mode accepts up to 8192


def test_full_factors_orthonormal_sweep() -> None:
    """Every supported width whose factors are small enough for a dense O(n^3) check."""
    widths = [d for d in range(1, MAX_D + 1) if (km := _reference_full(d)) and km[0] <= 256 and km[1] <= 1024]
    assert len(widths) == 180  # 177, plus 2048, 4096 and 8192 since powers of two split into factors <= 256
    for d in widths:
        f = hadamard_factors(d, HadamardMode.FULL)
        assert f.dim == d and (len(f.left), len(f.right)) == full_factor_orders(d)
        for factor in (f.left, f.right):
            assert factor.dtype == np.float64
            assert _identity_error(factor) < 1e-12, d


@pytest.mark.parametrize("d", [3, 6, 7, 92, 100, 156, 1001, 8191])
def test_full_unsupported_width_suggests_block(d: int) -> None:
    with pytest.raises(GraphInputError) as err:
        hadamard_factors(d, HadamardMode.FULL)
    message = str(err.value)
    assert str(d) in message and "--hadamard block" in message and "\n" not in message


def test_block_factors() -> None:
    f = hadamard_factors(1152, HadamardMode.BLOCK)
    assert f.left.shape == (9, 9) and f.right.shape == (128, 128) and f.dim == 1152
    assert np.array_equal(f.left, np.eye(9))
    assert np.array_equal(f.right * np.sqrt(128), hadamard_matrix(128))
    mat = f.matrix()
    assert _identity_error(mat) < 1e-12
    assert np.all(mat[:128, 128:] == 0)  # block diagonal


def test_block_mode_width_not_multiple_of_block() -> None:
    with pytest.raises(GraphInputError) as err:
        hadamard_factors(72, HadamardMode.BLOCK, block_size=128)
    message = str(err.value)
    assert "72" in message and "128" in message and "--hadamard full" in message


def test_block_size_must_be_power_of_two() -> None:
    with pytest.raises(GraphInputError, match="96"):
        hadamard_factors(1152, HadamardMode.BLOCK, block_size=96)


@pytest.mark.parametrize("d, k, m", [(1152, 36, 32), (4608, 36, 128)])
def test_factors_never_form_the_dense_matrix(d: int, k: int, m: int) -> None:
    """Building the rotation allocates the two factors, not the d x d matrix (4608^2 float64 = 170 MB). Measured
    peak: 0.34 MB for 4608 (factors 10 KB + 131 KB, signs 37 KB); the bound is 4 MB, far below one dense d x d
    float64 (10.6 MB for 1152)."""
    tracemalloc.start()
    try:
        f = hadamard_factors(d, HadamardMode.FULL, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert f.left.shape == (k, k) and f.right.shape == (m, m)
    assert peak < 4 * 2**20, peak


# --- signs and rotations ------------------------------------------------------------------------


def test_seeded_signs_are_deterministic() -> None:
    a = hadamard_factors(1152, HadamardMode.FULL, seed=7).signs
    b = hadamard_factors(1152, HadamardMode.FULL, seed=7).signs
    c = hadamard_factors(1152, HadamardMode.FULL, seed=8).signs
    assert a is not None and a.shape == (1152,) and a.dtype == np.float64
    assert set(np.unique(a)) == {-1.0, 1.0}
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


ROTATION_CASES = [
    (72, HadamardMode.FULL, 128),
    (1152, HadamardMode.FULL, 128),
    (1152, HadamardMode.BLOCK, 128),
    (72, HadamardMode.BLOCK, 8),
]


@pytest.mark.parametrize("seed", [None, 3])
@pytest.mark.parametrize("d, mode, block", ROTATION_CASES)
def test_rotations_match_dense(d: int, mode: HadamardMode, block: int, seed: int | None) -> None:
    f = hadamard_factors(d, mode, block_size=block, seed=seed)
    mat = f.matrix()
    assert _identity_error(mat) < 1e-12
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, d))
    w = rng.standard_normal((d, 5))
    assert _rel_err(f.rotate_rows(x), x @ mat.T) < 1e-12
    assert _rel_err(f.rotate_weight_rows(w), mat @ w) < 1e-12
    assert f.rotate_rows(x).shape == x.shape and f.rotate_weight_rows(w).shape == w.shape


@pytest.mark.parametrize("d, mode, block", ROTATION_CASES)
def test_round_trip(d: int, mode: HadamardMode, block: int) -> None:
    f = hadamard_factors(d, mode, block_size=block, seed=11)
    x = np.random.default_rng(2).standard_normal((4, d))
    y = f.rotate_rows(x)  # each row is H x
    assert _rel_err(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1)) < 1e-12
    assert _rel_err(y @ f.matrix(), x) < 1e-12  # H^T (H x) == x
    assert _rel_err(f.rotate_rows(x[0]), y[0]) < 1e-12  # a single vector works too


def test_signs_none_equals_all_ones() -> None:
    f = hadamard_factors(72, HadamardMode.FULL)
    g = KroneckerHadamard(f.left, f.right, np.ones(72))
    assert np.array_equal(f.matrix(), g.matrix())


@pytest.mark.parametrize("d", [512, 4096])
def test_power_of_two_factors_are_sylvester(d: int) -> None:
    """The small factors of a power-of-two width multiply to the one Sylvester matrix of that order (the rotation
    did not change when the factor sizes did)."""
    f = hadamard_factors(d, HadamardMode.FULL)
    np.testing.assert_array_equal(np.kron(f.left, f.right), hadamard_matrix(d) / np.sqrt(d))
