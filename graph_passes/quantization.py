"""Quantization maths in numpy: weights in blocks along the input dimension, activations per token.

Weights ``W^T`` ``[in, out]``, blocks of ``B`` rows (the last block may be shorter):

* symmetric (default): ``scale = max|w| / (2^(b-1) - 1)``, ``q = clip(round(w / scale), -(2^(b-1) - 1), 2^(b-1) - 1)``
* asymmetric: ``scale = (max(w, 0) - min(w, 0)) / (2^b - 1)``, ``zp = clip(round(-min / scale), 0, 2^b - 1)``,
  ``q = clip(round(w / scale) + zp, 0, 2^b - 1)``

Activations (built as graph nodes in `graph_passes.emit_qdq.activation_qdq`), per token (last axis), dynamic
asymmetric min/max with zero in the range, computed in the activation dtype:
``scale = max((max(x, 0) - min(x, 0)) / (2^b - 1), tiny)``, ``zp = clip(round(-min / scale), 0, 2^b - 1)``,
``q = saturate(round(x / scale) + zp)`` in the container, ``x^ = (q - zp) * scale``.

Containers: INT4/UINT4 for up to 4 bits, INT8/UINT8 (narrower range) for 5 to 8 bits. Rounding is half-to-even.

Weight range (`WeightRange`, ``QuantConfig.weight_range``): which range each weight group (one block of ``B``
rows of one output column; ``B >= in`` is per output channel) is quantized over.

* ``minmax`` (default): the full range above.
* ``mse``: a clipping ratio ``r`` per group, chosen on the fixed grid `MSE_RATIOS` to minimise the group's
  squared error ``E(r) = sum (w - dequant(quant(w; r)))^2``, where ``quant(.; r)`` is the formula above on the
  clipped range (the per-channel MSE range search of HQ-DM / BRECQ-style weight quantizers):

  - symmetric: ``scale = r max|w| / (2^(b-1) - 1)``;
  - asymmetric: the range ``[r min(w, 0), r max(w, 0)]``, i.e. ``scale = r (max(w, 0) - min(w, 0)) / (2^b - 1)``
    and the zero point recomputed from it, ``zp = clip(round(-r min(w, 0) / scale), 0, 2^b - 1)``.

  Values outside the range saturate at the end codes, so ``r < 1`` trades clipping error on the few large
  weights for a finer step on all the others. Each candidate scale is rounded to the scale dtype before the
  integers are set, by the same expressions as the final quantization, so the error searched is the error
  obtained; the search evaluates it as ``scale^2 sum (clip(round(w s')) - w s')^2`` with ``s' = 1 / scale``, equal
  to ``E(r)`` up to float rounding. The grid contains ``r = 1`` (which is ``minmax``); a smaller ``r`` replaces the
  best so far only when it lowers the error by more than a relative ``1e-9`` (far above that rounding), so the
  chosen error is never larger than the ``minmax`` error of its group, ties go to the largest ``r``, and a group
  that ``minmax`` quantizes exactly keeps ``r = 1``. The search runs in float64 over all groups at once, one
  ratio at a time on chunks of groups that stay in cache (memory: a copy of ``W^T`` and two chunks, never
  grid x weights); the same inputs give byte-identical outputs.

  Grid (52 ratios): 1.000 to 0.950 in steps of 0.005, 0.94 to 0.80 in 0.01, 0.78 to 0.50 in 0.02, 0.45 to 0.20
  in 0.05, 0.18 to 0.10 in 0.02. ``E(r)`` is flat (quadratic) around its minimum, over a width that grows as the
  optimum moves away from 1, so the steps grow with the distance from 1: at 8 bits the optimum lies within 1% of
  the range and a uniform 0.01 step loses up to 0.08 dB of weight SQNR there (0.005: none); at 3 and 4 bits
  (optima from about 0.15 to 0.99: lower with fewer bits, heavier tails and larger groups) this grid is within
  0.03 dB of a uniform 0.005 grid on Gaussian and Student-t weights, at about a third of its cost. The floor 0.1
  lies below the 3- and 4-bit optima of Student-t(4) per-channel groups of 4608 weights (a few percent of the
  symmetric 3-bit ones sit at it); 2-bit heavy-tailed per-channel groups often want less (it costs them 0.1 to
  0.25 dB).

* ``gptq`` / ``gptq-act-order``: GPTQ (`graph_passes.gptq`): the same grid as ``minmax`` (each group's min/max scale
  and zero point), but each group's range is taken from the weights as GPTQ's error feedback left them when the group
  is reached, and the rounding errors are spread over the input rows not yet quantized so as to minimise the output
  error on the calibration data (the Hessian of the activation the weight multiplies, damping ``gptq_damp`` times
  the mean of its diagonal). ``gptq-act-order`` quantizes the rows in decreasing Hessian diagonal, with the groups'
  min/max parameters of the unquantized weight. Same integer layout as the other ranges; needs the calibration run's
  Hessian (`quantize_weight`'s ``gptq``).

Weight scales (`WeightScales`, ``QuantConfig.weight_scales``): ``block`` (default) keeps each group's scale;
``two-level`` puts a symmetric weight's block scales (at most 4 bits) on ``c r``, one unit per output column and
an integer ratio in 1..16 per block (`graph_passes.weight_grid`; per block the floor or ceil ratio with the smaller
error, a weight whose blocks would lose too much keeps its block scales: `_two_level_scales`), after the range is
chosen (GPTQ: each group's scale as it is set, the ceil ratio, with the column's unit from the unquantized weight),
so that the CPU kernels run it without a per-block fold. The file's layout is the same.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np
import onnx_ir as ir

from graph_passes.weight_grid import asym_scale_zp, sym_scale, two_level_grid, two_level_unit

if TYPE_CHECKING:
    from graph_passes.gptq import GptqFactor


class OutputFormat(enum.Enum):
    """How the quantized linears are written (the same integers and scales in every format)."""

    QDQ = "qdq"  # QuantizeLinear/DequantizeLinear around float MatMuls: portable, simulates the integer maths
    NBITS = "nbits"  # com.microsoft::MatMulNBits (int4/int8 weights in memory, int8 dot products): stock onnxruntime
    FUSED = "fused"  # hadanorm::*Quantize + IntMatMul ops: integer kernels of the hadanorm library


class WeightRange(enum.Enum):
    """The range each weight group is quantized over (see the module docstring)."""

    MINMAX = "minmax"  # the group's full range
    MSE = "mse"  # the clipping ratio of `MSE_RATIOS` with the smallest squared error per group
    GPTQ = "gptq"  # GPTQ error feedback over the calibration Hessian, min/max grid per group (`graph_passes.gptq`)
    GPTQ_ACT_ORDER = "gptq-act-order"  # the same, rows in decreasing Hessian diagonal (static group parameters)

    @property
    def needs_hessian(self) -> bool:
        return self in (WeightRange.GPTQ, WeightRange.GPTQ_ACT_ORDER)


# 1.000, 0.995, ..., 0.950, 0.94, ..., 0.80, 0.78, ..., 0.50, 0.45, ..., 0.20, 0.18, ..., 0.10: 52 ratios,
# descending (why: module docstring); k / 1000 so that each ratio is the double nearest to its decimal
MSE_RATIOS: tuple[float, ...] = tuple(k / 1000 for k in (*range(1000, 949, -5), *range(940, 799, -10),
                                                         *range(780, 499, -20), *range(450, 199, -50),
                                                         *range(180, 99, -20)))
_MSE_REL_MARGIN = 1e-9  # a smaller ratio must lower the error by more than this (relative) to replace the best
_MSE_CHUNK = 1 << 15  # weights per chunk of groups in the search (256 KiB of float64: stays in L2)


# A weight block at least as long as any input: one block per output channel (quantize_weight takes
# min(block, inputs)).
WHOLE_INPUT = 1 << 62
# The largest weight block the fused integer kernels take (runtime/kernels/int_kernels.h, kMaxBlock): a per-channel
# block of a wider input is this long in the fused format.
FUSED_MAX_BLOCK = 32768


class WeightScales(enum.Enum):
    """How the block scales of a weight are stored (module docstring)."""

    BLOCK = "block"  # one float scale per group
    TWO_LEVEL = "two-level"  # c[out] * r[block, out], r in 1..16 (symmetric weights of at most 4 bits)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    weight_bits: int = 4
    act_bits: int = 4
    weight_block: int = 128
    weight_symmetric: bool = True
    format: OutputFormat = OutputFormat.QDQ
    weight_range: WeightRange = WeightRange.MINMAX
    # weights and activations of the sites outside the model's blocks (caption projection, timestep embedder,
    # adaLN-single, final projection, ...): the sensitive layers, 8-bit by default (they run on the same integer ops)
    outer_bits: int = 8
    # weight block of the outer sites: None = weight_block; 0 = one block per output channel (the whole input, up to
    # FUSED_MAX_BLOCK in the fused format: at 8 bits the integer kernels then accumulate the whole dot product in
    # int32, with no per-block fold)
    outer_weight_block: int | None = None
    gptq_damp: float = 0.01  # GPTQ's percdamp: lambda = gptq_damp * mean(diag H)
    low_rank: int = 0  # rank of the float branch beside each quantized MatMul weight (graph_passes.low_rank); 0: none
    weight_scales: WeightScales = WeightScales.BLOCK

    def __post_init__(self) -> None:
        for bits in (self.weight_bits, self.act_bits, self.outer_bits):
            if not 2 <= bits <= 8:
                raise ValueError(f"bit width {bits} is outside 2..8")
        if not 0.0 < self.gptq_damp < 1e3:
            raise ValueError(f"gptq_damp {self.gptq_damp} is outside (0, 1000)")
        if self.outer_weight_block is not None and self.outer_weight_block < 0:
            raise ValueError(f"outer_weight_block {self.outer_weight_block} is negative")
        if self.low_rank < 0:
            raise ValueError(f"low_rank {self.low_rank} is negative")
        if self.weight_scales is WeightScales.TWO_LEVEL and not self.weight_symmetric:
            raise ValueError("two-level weight scales need symmetric weights")

    @property
    def two_level(self) -> bool:
        """Whether this configuration's weights get two-level scales (symmetric, at most 4 bits)."""
        return self.weight_scales is WeightScales.TWO_LEVEL and self.weight_symmetric and self.weight_bits <= 4

    def for_site(self, outer: bool) -> "QuantConfig":
        """The configuration of one site: this one, or with `outer_bits` weights and activations (and
        `outer_weight_block`) outside the blocks."""
        if not outer:
            return self
        whole = FUSED_MAX_BLOCK if self.format is OutputFormat.FUSED else WHOLE_INPUT
        block = self.weight_block if self.outer_weight_block is None else self.outer_weight_block or whole
        if (self.weight_bits, self.act_bits, self.weight_block) == (self.outer_bits, self.outer_bits, block):
            return self
        return dataclasses.replace(self, weight_bits=self.outer_bits, act_bits=self.outer_bits, weight_block=block)

    @property
    def label(self) -> str:
        return f"w{self.weight_bits}a{self.act_bits}"


def container(bits: int, signed: bool) -> tuple[ir.DataType, type]:
    if bits <= 4:
        return (ir.DataType.INT4, ml_dtypes.int4) if signed else (ir.DataType.UINT4, ml_dtypes.uint4)
    return (ir.DataType.INT8, np.int8) if signed else (ir.DataType.UINT8, np.uint8)


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """``W^T`` [in, out] as ``scale * (q - zero_point)`` per block of `block` rows (``block >= in``: per output
    channel); what every output format stores, each in its own layout."""

    q: np.ndarray  # [in, out] in the container dtype (`container(bits, signed=zero_point is None)`)
    scale: np.ndarray  # [ceil(in / block), out] in the weight's float dtype
    zero_point: np.ndarray | None  # same shape as scale, container dtype (asymmetric only)
    block: int
    bits: int  # the grid: 2..8 (symmetric -(2^(b-1) - 1)..2^(b-1) - 1, asymmetric 0..2^b - 1)

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    def dequantize(self) -> np.ndarray:
        rows = self.q.shape[0]
        scale = np.repeat(self.scale.astype(np.float64), self.block, axis=0)[:rows]
        q = self.q.astype(np.float64)
        if self.zero_point is not None:
            q = q - np.repeat(self.zero_point.astype(np.float64), self.block, axis=0)[:rows]
        return q * scale


def _block_reduce(w: np.ndarray, block: int, reduce) -> np.ndarray:
    rows = w.shape[0]
    block = min(block, rows)  # one block per output channel: no padding rows (a huge block would allocate them)
    blocks = -(-rows // block)
    padded = np.zeros((blocks * block, w.shape[1]), dtype=w.dtype)
    padded[:rows] = w
    return reduce(padded.reshape(blocks, block, w.shape[1]), axis=1)


def _groups(w: np.ndarray, block: int) -> np.ndarray:
    """``W^T`` [in, out] (float64) -> [blocks * out, B] contiguous, group ``g = block_index * out + column``;
    the last block is padded with zeros (which quantize exactly to zero: no error, no change of range)."""
    rows, cols = w.shape
    block = min(block, rows)
    blocks = -(-rows // block)
    padded = np.zeros((blocks * block, cols), dtype=np.float64)
    padded[:rows] = w
    return np.ascontiguousarray(padded.reshape(blocks, block, cols).transpose(0, 2, 1)).reshape(blocks * cols, block)


def mse_clip_ratios(weight_t: np.ndarray, config: QuantConfig, scale_dtype: np.dtype) -> np.ndarray:
    """The clipping ratio of `MSE_RATIOS` that minimises each group's squared quantization error, [blocks, out]
    float64 (a smaller ratio wins only by more than a relative 1e-9: ties go to the larger one)."""
    w = np.asarray(weight_t, dtype=np.float64)
    block, bits, sym = min(config.weight_block, w.shape[0]), config.weight_bits, config.weight_symmetric
    blocks, cols = -(-w.shape[0] // block), w.shape[1]
    ratios = np.asarray(MSE_RATIOS, dtype=np.float64)[:, None]
    groups = _groups(np.abs(w) if sym else w, block)  # symmetric: the error only depends on |w|
    if sym:
        qmax = 2 ** (bits - 1) - 1
        amax = _block_reduce(np.abs(w), block, np.max).reshape(-1)
    else:
        qmax = 2**bits - 1
        wmin = np.minimum(_block_reduce(w, block, np.min), 0.0).reshape(-1)
        wmax = np.maximum(_block_reduce(w, block, np.max), 0.0).reshape(-1)
    n_groups, size = groups.shape
    best_r = np.ones(n_groups)
    best_err = np.full(n_groups, np.inf)
    step = max(1, _MSE_CHUNK // size)
    t = np.empty((min(step, n_groups), size))
    q = np.empty_like(t)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # scales that underflow the scale dtype
        for g0 in range(0, n_groups, step):
            g1 = min(g0 + step, n_groups)
            chunk, tc, qc = groups[g0:g1], t[: g1 - g0], q[: g1 - g0]
            # the scales (and zero points) of every ratio, by the same expressions as `quantize_weight`
            if sym:
                scales = sym_scale(ratios * amax[g0:g1], qmax, scale_dtype).astype(np.float64)
            else:
                scales, zps = asym_scale_zp(ratios * wmin[g0:g1], ratios * wmax[g0:g1], qmax, scale_dtype)
                scales = scales.astype(np.float64)
                lows, highs = -zps[:, :, None], (qmax - zps)[:, :, None]
            inverse = (1.0 / scales)[:, :, None]
            errs = np.empty((len(MSE_RATIOS), g1 - g0))
            for i in range(len(MSE_RATIOS)):
                # error / scale^2 = sum (clip(round(w / scale)) - w / scale)^2 (w / scale as w * (1 / scale))
                np.multiply(chunk, inverse[i], out=tc)
                np.rint(tc, out=qc)
                if not sym:
                    np.maximum(qc, lows[i], out=qc)
                    np.minimum(qc, highs[i], out=qc)
                else:
                    np.minimum(qc, qmax, out=qc)
                np.subtract(qc, tc, out=qc)
                errs[i] = _rowdot(qc) * (scales[i] * scales[i])
            for i, r in enumerate(MSE_RATIOS):  # descending ratios: strict improvement keeps the larger on ties
                better = errs[i] < best_err[g0:g1] * (1.0 - _MSE_REL_MARGIN)
                best_err[g0:g1] = np.where(better, errs[i], best_err[g0:g1])
                best_r[g0:g1] = np.where(better, r, best_r[g0:g1])
    return best_r.reshape(blocks, cols)


def _rowdot(x: np.ndarray) -> np.ndarray:
    return np.vecdot(x, x) if hasattr(np, "vecdot") else np.einsum("ij,ij->i", x, x)


TWO_LEVEL_TOLERANCE = 0.122  # a weight keeps its block scales when two-level ones add more error than this (0.5 dB)


def _two_level_scales(w: np.ndarray, scale: np.ndarray, amax: np.ndarray, block: int, qmax: int,
                      scale_dtype: np.dtype) -> np.ndarray:
    """Symmetric block scales [blocks, out] on the two-level grid (`graph_passes.weight_grid`): per block the one of
    the two ratios around ``scale / c`` (floor and ceil, in 1..16) with the smaller squared error of the block; the
    block scales unchanged when the blocks' errors grow by more than `TWO_LEVEL_TOLERANCE` on average, each block's
    growth relative to its own block-scale error (the kernels then run that weight by the block route). Relative,
    not summed: after smoothing, a block of small weights multiplies large activations, so its error counts as much
    as a large block's although it is smaller."""
    groups = _groups(w, block)  # [blocks * out, B], group blk * out + column

    def errors(candidate: np.ndarray) -> np.ndarray:
        s = candidate.astype(np.float64).reshape(-1, 1)
        q = np.clip(np.round(groups / s), -qmax, qmax)
        return np.sum((q * s - groups) ** 2, axis=1).reshape(candidate.shape)

    unit = two_level_unit(scale, amax, scale_dtype)
    exact = scale.astype(np.float64) / unit
    low = two_level_grid(np.floor(exact), amax, unit, scale_dtype)
    high = two_level_grid(np.ceil(exact), amax, unit, scale_dtype)
    err_low, err_high = errors(low), errors(high)
    best = np.where(err_low < err_high, low, high)
    base = errors(scale)
    counted = base > 0  # blocks min/max quantizes exactly (zeros) cannot grow relative to themselves
    if counted.any():
        growth = np.minimum(err_low, err_high)[counted] / base[counted]
        if float(np.mean(growth)) > 1.0 + TWO_LEVEL_TOLERANCE:
            return scale
    return best


def quantize_weight(weight_t: np.ndarray, config: QuantConfig, scale_dtype: np.dtype,
                    gptq: "GptqFactor | None" = None) -> QuantizedWeight:
    """Quantize ``W^T`` [in, out] (float64 maths; scales rounded to `scale_dtype` before the integers are set).
    `gptq`: the factored Hessian of what the weight multiplies (``[in, in]``; required by the GPTQ ranges)."""
    w = np.asarray(weight_t, dtype=np.float64)
    block, bits = min(config.weight_block, w.shape[0]), config.weight_bits  # block >= in: per output channel
    _, np_type = container(bits, signed=config.weight_symmetric)
    if config.weight_range.needs_hessian:
        from graph_passes.gptq import gptq_codes

        if gptq is None or gptq.upper.shape != (w.shape[0], w.shape[0]):
            raise ValueError(f"--weight-range {config.weight_range.value} needs the [{w.shape[0]}, {w.shape[0]}] "
                             "Hessian of the weight's input")
        unit = None
        if config.two_level:
            amax = _block_reduce(np.abs(w), block, np.max)
            unit = two_level_unit(sym_scale(amax, 2 ** (bits - 1) - 1, scale_dtype), amax, scale_dtype)
        q, scale, zp = gptq_codes(w, gptq, block, bits, config.weight_symmetric, scale_dtype, unit)
        return QuantizedWeight(q.astype(np_type), scale, None if zp is None else zp.astype(np_type), block, bits)
    ratio = mse_clip_ratios(w, config, scale_dtype) if config.weight_range is WeightRange.MSE else None
    if config.weight_symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = _block_reduce(np.abs(w), block, np.max)
        scale = sym_scale(amax if ratio is None else ratio * amax, qmax, scale_dtype)
        if config.two_level:
            scale = _two_level_scales(w, scale, amax, block, qmax, scale_dtype)
        full = np.repeat(scale.astype(np.float64), block, axis=0)[: w.shape[0]]
        q = np.clip(np.round(w / full), -qmax, qmax)
        return QuantizedWeight(q.astype(np_type), scale, None, block, bits)
    qmax = 2**bits - 1
    wmin = np.minimum(_block_reduce(w, block, np.min), 0.0)
    wmax = np.maximum(_block_reduce(w, block, np.max), 0.0)
    if ratio is not None:
        wmin, wmax = ratio * wmin, ratio * wmax
    scale, zp = asym_scale_zp(wmin, wmax, qmax, scale_dtype)
    full = np.repeat(scale.astype(np.float64), block, axis=0)[: w.shape[0]]
    full_zp = np.repeat(zp, block, axis=0)[: w.shape[0]]
    q = np.clip(np.round(w / full) + full_zp, 0, qmax)
    return QuantizedWeight(q.astype(np_type), scale, zp.astype(np_type), block, bits)


def quantize_weight_per_channel_int8(weight_t: np.ndarray, scale_dtype: np.dtype) -> QuantizedWeight:
    """Symmetric int8 per output channel (axis 1 of ``W^T``; one block of all rows): the ``exact``
    bias-correction copy."""
    w = np.asarray(weight_t, dtype=np.float64)
    scale = np.abs(w).max(axis=0) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(scale_dtype)
    q = np.clip(np.round(w / scale.astype(np.float64)[None, :]), -127, 127).astype(np.int8)
    return QuantizedWeight(q, scale[None, :], None, w.shape[0], 8)
