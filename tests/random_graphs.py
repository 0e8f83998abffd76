"""Random small graphs for the property tests (`tests/test_properties.py`), built and evaluated without the passes.

A `GraphSpec` is a list of ops over named values of shape [B, N, width]: linears (``MatMul`` with a constant
``[in, out]`` weight and an optional bias ``Add``), elementwise activations (Relu, Gelu exact or tanh) and one
attention-like block (``softmax(q k^T / sqrt(d)) v`` with q/k/v/out linears). From the spec come

* the ONNX model (`GraphSpec.model`, built with onnx.helper and read with ``ir.serde.deserialize_model`` as
  `tests/graphs.py` does),
* a float64 numpy evaluation of the same graph (`GraphSpec.evaluate`), in which every linear can be replaced by a
  reference quantized linear and any value can be overridden (used to feed the reference onnxruntime's own values
  of the graph outputs, see `tests/test_properties.py`),
* exact calibration statistics (`site_stats`),
* an independent dense numpy reference of a quantized site linear (`transformed_tokens`, `quantized_linear`): dense
  H from ``transform.hadamard.matrix()``, fused weight ``H S W^T`` by plain products, its own block weight
  quantizers (symmetric and asymmetric), per-token activation quantizer and bias correction per mode.

Widths come from `WIDTHS`, all of which have a Hadamard construction (checked at import).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from models.families.pixart import ROLE_RULES as PIXART_ROLE_RULES
import onnx_ir as ir
from onnx import helper, numpy_helper

from graph_passes.hadamard import is_constructible
from graph_passes.methods import BiasCorrection
from graph_passes.quantization import QuantConfig
from graph_passes.site_transforms import SiteStats, SiteTransform

WIDTHS = (8, 12, 16, 20, 24, 36, 72, 144)
assert all(is_constructible(w) for w in WIDTHS)
ELEMENTWISE = ("Relu", "Gelu", "GeluTanh")
MAX_ATTENTION_LOGIT = 6.0


@dataclasses.dataclass(frozen=True)
class Linear:
    name: str  # the MatMul node name, i.e. the module path the passes see
    input: str
    weight: str  # initializer [in, out]
    bias: str | None  # initializer [out]
    mm: str  # the MatMul output
    output: str  # after the bias Add (== mm without bias)


@dataclasses.dataclass(frozen=True)
class Elementwise:
    op: str  # one of ELEMENTWISE
    input: str
    output: str


@dataclasses.dataclass(frozen=True)
class Attention:
    """``softmax(q k^T * scale) v``; q, k, v are values produced by linears."""

    q: str
    k: str
    v: str
    scale: str  # scalar initializer 1 / sqrt(d)
    output: str


Op = Linear | Elementwise | Attention


@dataclasses.dataclass
class GraphSpec:
    width: int  # of the input x
    ops: list[Op] = dataclasses.field(default_factory=list)
    widths: dict[str, int] = dataclasses.field(default_factory=dict)
    inits: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # float32
    outputs: list[str] = dataclasses.field(default_factory=list)

    @property
    def linears(self) -> list[Linear]:
        return [op for op in self.ops if isinstance(op, Linear)]

    def site_groups(self) -> dict[tuple[str, str], list[Linear]]:
        """The activation sites the passes should find, in graph order: linears grouped by (the value they read,
        their PixArt module group). Linears without a PixArt block path group by the value alone (group "")."""
        groups: dict[tuple[str, str], list[Linear]] = {}
        for lin in self.linears:
            groups.setdefault((lin.input, pixart_group(lin.name)), []).append(lin)
        return groups

    def linear(self, name: str) -> Linear:
        return next(lin for lin in self.linears if lin.name == name)

    def site_inputs(self) -> list[str]:
        return list(dict.fromkeys(src for src, _ in self.site_groups()))

    def consumed(self) -> set[str]:
        names: set[str] = set()
        for op in self.ops:
            if isinstance(op, Linear):
                names.add(op.input)
                if op.bias is not None:
                    names.add(op.mm)
            elif isinstance(op, Elementwise):
                names.add(op.input)
            else:
                names.update((op.q, op.k, op.v))
        return names

    def model(self, dtype: type = np.float32) -> ir.Model:
        """The ONNX model; `dtype` float16 casts the initializers, the input and the outputs."""
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        nodes = []
        for op in self.ops:
            if isinstance(op, Linear):
                nodes.append(helper.make_node("MatMul", [op.input, op.weight], [op.mm], name=op.name))
                if op.bias is not None:
                    nodes.append(helper.make_node("Add", [op.mm, op.bias], [op.output], name=f"{op.name}.bias"))
            elif isinstance(op, Elementwise):
                if op.op == "Relu":
                    nodes.append(helper.make_node("Relu", [op.input], [op.output], name=op.output))
                else:
                    approximate = "tanh" if op.op == "GeluTanh" else "none"
                    nodes.append(helper.make_node("Gelu", [op.input], [op.output], name=op.output,
                                                  approximate=approximate))
            else:
                p = op.output
                nodes += [
                    helper.make_node("Transpose", [op.k], [f"{p}.kt"], name=f"{p}.kt", perm=[0, 2, 1]),
                    helper.make_node("MatMul", [op.q, f"{p}.kt"], [f"{p}.scores"], name=f"{p}.scores"),
                    helper.make_node("Mul", [f"{p}.scores", op.scale], [f"{p}.scaled"], name=f"{p}.scaled"),
                    helper.make_node("Softmax", [f"{p}.scaled"], [f"{p}.probs"], name=f"{p}.probs", axis=-1),
                    helper.make_node("MatMul", [f"{p}.probs", op.v], [p], name=p),
                ]

        def info(name: str):
            return helper.make_tensor_value_info(name, elem, ["B", "N", self.widths[name]])

        graph = helper.make_graph(
            nodes, "random", [info("x")], [info(o) for o in self.outputs],
            [numpy_helper.from_array(v.astype(dtype), k) for k, v in self.inits.items()],
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
        return ir.serde.deserialize_model(proto)

    def evaluate(self, x: np.ndarray, linear=None, override: dict[str, np.ndarray] | None = None
                 ) -> dict[str, np.ndarray]:
        """Every value of the graph in float64.

        ``linear(lin, a)`` replaces the MatMul of a linear (default ``a @ W^T``; the bias is added here either way);
        a value named in `override` is still computed and returned, but the ops after it read the override.
        """
        override = override or {}
        env: dict[str, np.ndarray] = {"x": np.asarray(x, dtype=np.float64)}
        computed: dict[str, np.ndarray] = {}

        def put(name: str, value: np.ndarray) -> None:
            computed[name] = value
            env[name] = np.asarray(override[name], dtype=np.float64) if name in override else value

        for op in self.ops:
            if isinstance(op, Linear):
                a = env[op.input]
                put(op.mm, linear(op, a) if linear is not None else a @ self.inits[op.weight].astype(np.float64))
                if op.bias is not None:
                    put(op.output, env[op.mm] + self.inits[op.bias].astype(np.float64))
            elif isinstance(op, Elementwise):
                put(op.output, elementwise(op.op, env[op.input]))
            else:
                scores = env[op.q] @ env[op.k].transpose(0, 2, 1) * float(self.inits[op.scale])
                put(op.output, softmax(scores) @ env[op.v])
        return computed

    def magnitudes(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every value evaluated on absolute values (``|a| @ |W| + |b|``; Relu/Gelu pass magnitudes through since
        ``|f(z)| <= |z|``; attention ``P @ |v|`` with the float probabilities P): the scale float rounding errors are
        relative to. A value much smaller than its magnitude is the result of cancellation (ill-conditioned)."""
        values = self.evaluate(x)
        env: dict[str, np.ndarray] = {"x": np.abs(np.asarray(x, dtype=np.float64))}
        for op in self.ops:
            if isinstance(op, Linear):
                env[op.mm] = env[op.input] @ np.abs(self.inits[op.weight].astype(np.float64))
                if op.bias is not None:
                    env[op.output] = env[op.mm] + np.abs(self.inits[op.bias].astype(np.float64))
            elif isinstance(op, Elementwise):
                env[op.output] = env[op.input]
            else:
                scores = values[op.q] @ values[op.k].transpose(0, 2, 1) * float(self.inits[op.scale])
                env[op.output] = softmax(scores) @ env[op.v]
        return env

    def describe(self) -> str:
        """One line per op (for failure messages)."""
        lines = [f"x: [B, N, {self.width}]"]
        for op in self.ops:
            if isinstance(op, Linear):
                lines.append(f"{op.output} = {op.name}({op.input}) [{self.widths[op.input]} -> "
                             f"{self.widths[op.mm]}]{' + bias' if op.bias else ''} weight {op.weight}")
            elif isinstance(op, Elementwise):
                lines.append(f"{op.output} = {op.op}({op.input})")
            else:
                lines.append(f"{op.output} = attention({op.q}, {op.k}, {op.v})")
        lines.append(f"outputs: {self.outputs}")
        return "\n".join(lines)


# PixArt module-path suffix -> module group, from the family's one role table (models/families/pixart.py): q/k/v of
# self-attention share a site, k/v of cross-attention another; each block has its own sites.
PIXART_GROUPS = {suffix: group for suffix, group, _role in PIXART_ROLE_RULES}


def pixart_group(module_path: str) -> str:
    """``transformer_blocks.<i>.<group>`` for a PixArt block linear, "" for any other path."""
    prefix, dot, suffix = module_path.partition(".")
    block, _, suffix = suffix.partition(".")
    if prefix == "transformer_blocks" and dot and block.isdigit() and suffix in PIXART_GROUPS:
        return f"transformer_blocks.{block}.{PIXART_GROUPS[suffix]}"
    return ""


_ERF = np.vectorize(math.erf, otypes=[np.float64])


def elementwise(op: str, a: np.ndarray) -> np.ndarray:
    if op == "Relu":
        return np.maximum(a, 0.0)
    if op == "Gelu":
        return 0.5 * a * (1.0 + _ERF(a / math.sqrt(2.0)))
    if op == "GeluTanh":
        return 0.5 * a * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (a + 0.044715 * a**3)))
    raise ValueError(op)


def softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class GraphBuilder:
    """Builds a `GraphSpec` op by op; weights come from a seeded numpy generator."""

    def __init__(self, width: int, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.spec = GraphSpec(width, widths={"x": width})

    def _init(self, name: str, array: np.ndarray) -> str:
        assert name not in self.spec.inits
        self.spec.inits[name] = np.asarray(array, dtype=np.float32)
        return name

    def linear(self, name: str, src: str, out: int, bias: bool = True, weight_of: str | None = None) -> str:
        """``src @ W + b``; `weight_of` = name of an earlier linear whose weight initializer this one reuses."""
        d = self.spec.widths[src]
        if weight_of is not None:
            weight = self.spec.linear(weight_of).weight
            assert self.spec.inits[weight].shape == (d, out)
        else:
            # per-input-channel magnitudes vary, so SmoothQuant's weight statistics matter
            magnitude = np.exp(0.5 * self.rng.standard_normal((d, 1)))
            weight = self._init(f"{name}.weight", self.rng.standard_normal((d, out)) * magnitude / np.sqrt(d))
        b = self._init(f"{name}.b", 0.5 * self.rng.standard_normal(out)) if bias else None
        mm = f"{name}.mm" if bias else name
        op = Linear(name, src, weight, b, mm, name)
        self.spec.ops.append(op)
        self.spec.widths[mm] = self.spec.widths[name] = out
        return name

    def elementwise(self, op: str, src: str, name: str | None = None) -> str:
        name = name or f"{src}.{op.lower()}"
        self.spec.ops.append(Elementwise(op, src, name))
        self.spec.widths[name] = self.spec.widths[src]
        return name

    def attention(self, prefix: str, src: str, inner: int, out: int, biases: tuple[bool, bool, bool, bool],
                  names: tuple[str, str, str, str] | None = None) -> tuple[str, str, str]:
        """q/k/v linears on `src` (one shared input), ``softmax(q k^T / sqrt(inner)) v``, then an output linear
        (`names`: the four linears' names, default ``<prefix>.q/k/v/o``). Returns the q, attention and output values."""
        names = names or tuple(f"{prefix}.{n}" for n in "qkvo")
        q, k, v = (self.linear(n, src, inner, b) for n, b in zip(names[:3], biases[:3]))
        scale = self._init(f"{prefix}.scale", np.array(1.0 / math.sqrt(inner)))
        attn = f"{prefix}.attn"
        self.spec.ops.append(Attention(q, k, v, scale, attn))
        self.spec.widths[attn] = inner
        return q, attn, self.linear(names[3], attn, out, biases[3])

    def limit_attention_logits(self, x: np.ndarray) -> None:
        """Scale each attention's q weight and bias so that max |q k^T / sqrt(d)| <= MAX_ATTENTION_LOGIT on `x`.

        A saturated softmax turns float32 rounding (1e-7 relative) of large logits into much larger output changes in
        the original graph and the rewritten one alike; that is conditioning, not a property of the passes."""
        for op in [o for o in self.spec.ops if isinstance(o, Attention)]:
            values = self.spec.evaluate(x)
            logits = values[op.q] @ values[op.k].transpose(0, 2, 1) * float(self.spec.inits[op.scale])
            factor = min(1.0, MAX_ATTENTION_LOGIT / max(float(np.abs(logits).max()), 1e-12))
            lin = next(lin for lin in self.spec.linears if lin.output == op.q)
            self.spec.inits[lin.weight] = (self.spec.inits[lin.weight] * factor).astype(np.float32)
            if lin.bias is not None:
                self.spec.inits[lin.bias] = (self.spec.inits[lin.bias] * factor).astype(np.float32)

    def finish(self, extra_outputs: list[str] = ()) -> GraphSpec:
        """Graph outputs: every value nothing reads (so every op matters) plus `extra_outputs`."""
        consumed = self.spec.consumed()
        produced = [n for n in self.spec.widths if n != "x"]
        leaves = [n for n in produced if n not in consumed]
        self.spec.outputs = list(dict.fromkeys([*leaves, *(n for n in produced if n in extra_outputs)]))
        return self.spec


def dit_like(width: int, batch: int, tokens: int, seed: int, offset: float = 2.0, outlier: float = 20.0,
             sample: int = 0) -> np.ndarray:
    """Tokens with per-channel mean offsets of varied size and a few outlier channels (cf. tests/graphs.dit_like_input).

    `seed` fixes the channel profile (offsets, spreads, outlier channels), `sample` the tokens drawn from it, so a
    calibration set and an evaluation input can come from one distribution."""
    rng = np.random.default_rng(seed)
    offsets = rng.standard_normal(width) * offset
    spread = np.exp(rng.standard_normal(width) * 0.5)
    spread[rng.choice(width, size=max(1, width // 32), replace=False)] *= outlier
    noise = np.random.default_rng([seed, sample]).standard_normal((batch, tokens, width))
    return (noise * spread + offsets).astype(np.float32)


def site_stats(spec: GraphSpec, x: np.ndarray) -> dict[str, SiteStats]:
    """Exact statistics of every site input on `x` from the float64 evaluation (keyed by value name)."""
    values = spec.evaluate(x)
    values["x"] = x.astype(np.float64)
    stats = {}
    for name in spec.site_inputs():
        a = values[name]
        centered = a - a.mean(axis=1, keepdims=True)
        stats[name] = SiteStats(np.abs(a).max((0, 1)), np.abs(centered).max((0, 1)))
    return stats


# ---- the reference quantizers (independent of graph_passes.quantization) ----

def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def ref_weight_symmetric(wt: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Quantize-dequantize ``W^T`` [in, out] in blocks of `block` rows: scale max|w| / (2^(b-1) - 1) in float32."""
    out = np.empty(wt.shape, dtype=np.float64)
    qmax = 2 ** (bits - 1) - 1
    for start in range(0, wt.shape[0], block):
        rows = wt[start:start + block]
        scale = _f32(np.abs(rows).max(axis=0) / qmax)
        scale[scale == 0] = 1.0
        out[start:start + block] = np.clip(np.round(rows / scale), -qmax, qmax) * scale
    return out


def ref_weight_asymmetric(wt: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Min/max with zero in the range: scale (max(w, 0) - min(w, 0)) / (2^b - 1) in float32, integer zero point."""
    out = np.empty(wt.shape, dtype=np.float64)
    qmax = 2**bits - 1
    for start in range(0, wt.shape[0], block):
        rows = wt[start:start + block]
        lo, hi = np.minimum(rows.min(axis=0), 0.0), np.maximum(rows.max(axis=0), 0.0)
        scale = _f32((hi - lo) / qmax)
        scale[scale == 0] = 1.0
        zp = np.clip(np.round(-lo / scale), 0, qmax)
        q = np.clip(np.round(rows / scale) + zp, 0, qmax)
        out[start:start + block] = (q - zp) * scale
    return out


def ref_int8_per_channel(wt: np.ndarray) -> np.ndarray:
    scale = _f32(np.abs(wt).max(axis=0) / 127)
    scale[scale == 0] = 1.0
    return np.clip(np.round(wt / scale), -127, 127) * scale


def ref_tokens(x: np.ndarray, bits: int) -> np.ndarray:
    """Per-token (last axis) asymmetric min/max quantize-dequantize with zero in the range, in float32."""
    x = x.astype(np.float32)
    hi = np.maximum(x.max(-1, keepdims=True), 0)
    lo = np.minimum(x.min(-1, keepdims=True), 0)
    scale = np.maximum((hi - lo) / np.float32(2**bits - 1), np.finfo(np.float32).tiny)
    zp = np.clip(np.round(-lo / scale), 0, 2**bits - 1)
    q = np.clip(np.round(x / scale) + zp, 0, 2**bits - 1)  # the b-bit grid, whatever the container
    return ((q - zp) * scale).astype(np.float64)


def _dense(transform: SiteTransform, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense H (identity without rotation), s, and the token mean mu of `a` (zeros without centering)."""
    d = a.shape[-1]
    h = transform.hadamard.matrix() if transform.hadamard is not None else np.eye(d)
    mu = a.mean(axis=1, keepdims=True) if transform.center else np.zeros_like(a[:, :1])
    return h, 1.0 / transform.inv_scale, mu


def transformed_tokens(a: np.ndarray, transform: SiteTransform, bias_mode: BiasCorrection) -> np.ndarray:
    """What the activation quantizer of a site reads, in float64: ``x~ = H S^-1 (a - mu)`` [B, N, d], with the
    transformed mean token ``mu~ = H S^-1 mu`` appended (N + 1 tokens) in quantized-token mode."""
    a = np.asarray(a, dtype=np.float64)
    h, s, mu = _dense(transform, a)
    xt = ((a - mu) / s) @ h.T
    if transform.center and bias_mode is BiasCorrection.QUANTIZED_TOKEN:
        return np.concatenate([xt, (mu / s) @ h.T], axis=1)
    return xt


def quantized_linear(a: np.ndarray, wt: np.ndarray, transform: SiteTransform, bias_mode: BiasCorrection,
                     config: QuantConfig, tokens: np.ndarray | None = None) -> np.ndarray:
    """The MatMul of one quantized site linear (bias excluded) on the site input `a` [B, N, d], dense float64 maths:
    ``x~ = H S^-1 (a - mu)`` quantized per token, ``W~^T = H S W^T`` (stored in float32) quantized per block, plus
    ``W mu`` per bias-correction mode; a single-Hadamard site (HQ-DM): ``Q(x~) H (S W^T quantized)``.

    `tokens` replaces the reference's own quantizer input (`transformed_tokens`) by a float32 one that agrees with it
    to float32 rounding (the test passes onnxruntime's), so that both round the very same numbers."""
    a = np.asarray(a, dtype=np.float64)
    h, s, mu = _dense(transform, a)
    if tokens is None:
        tokens = transformed_tokens(a, transform, bias_mode)
    mt = (mu / s) @ h.T
    quantizer = ref_weight_symmetric if config.weight_symmetric else ref_weight_asymmetric
    if transform.rotate_back:  # HQ-DM: Q(x~) rotated back, times the weight quantized unrotated
        wq = quantizer(_f32(np.diag(s) @ wt.astype(np.float64)), config.weight_bits, config.weight_block)
        return ref_tokens(tokens, config.act_bits) @ h @ wq
    w_fused = _f32(h @ np.diag(s) @ wt.astype(np.float64))
    wq = quantizer(w_fused, config.weight_bits, config.weight_block)
    y = ref_tokens(tokens, config.act_bits) @ wq
    if not transform.center:
        return y
    if bias_mode is BiasCorrection.QUANTIZED_TOKEN:
        return y[:, :-1] + y[:, -1:]
    w_corr = wq if bias_mode is BiasCorrection.FLOAT_TOKEN else ref_int8_per_channel(w_fused)
    return y + mt @ w_corr


def expected_inv_scale(stats: SiteStats, weights: list[np.ndarray], alpha: float, centered: bool) -> np.ndarray:
    """``1 / s`` with ``s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha)`` over every linear of the site, clipped to
    [1e-5, 1e5], 1 where a statistic is zero (module docstring of graph_passes/site_transforms.py)."""
    act = stats.centered_absmax if centered else stats.absmax
    wmax = np.max([np.abs(w.astype(np.float64)).max(axis=1) for w in weights], axis=0)
    s = np.ones_like(act)
    ok = (act > 0) & (wmax > 0)
    s[ok] = act[ok] ** alpha / wmax[ok] ** (1 - alpha)
    return 1.0 / np.clip(s, 1e-5, 1e5)
