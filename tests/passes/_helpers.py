"""Small builders and checks shared by the per-pass tests (`tests/passes/`): graphs from `onnx.parser` text,
onnxruntime runs, site statistics and plans, a numpy per-token quantizer and the SQNR a quantized linear should have.

No torch, no model export: every graph is a few nodes, every run a few milliseconds.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
from onnx import numpy_helper

from graph_passes.linears import SiteSelection, find_activation_sites
from graph_passes.methods import BiasCorrection, Method, TransformOptions
from graph_passes.quantization import QuantConfig
from graph_passes.site_plan import SitePlan, plan_sites
from graph_passes.site_roles import RoleRule, RoleTable
from graph_passes.site_transforms import SiteStats
from runtime.session import create_session

EVERY_LINEAR = SiteSelection(include=("",))  # every MatMul / ungrouped Conv is a site; generic role, no family
# two module groups of one block: ``blocks.0.a.*`` and ``blocks.0.b.*`` are two sites even when they read one tensor
TWO_GROUPS = SiteSelection(include=("",), roles=RoleTable("test", ("blocks",), (
    RoleRule("a.q", "a.in", "a in"), RoleRule("a.k", "a.in", "a in"), RoleRule("b.q", "b.in", "b in"))))


# -- graphs -----------------------------------------------------------------------------------------------------

def parse_model(text: str, initializers: dict[str, np.ndarray] | None = None, infer: bool = False,
                checked: bool = True) -> ir.Model:
    """An onnx-ir model from `onnx.parser` text, with `initializers` (numpy arrays) added by name; `infer`: with
    the shapes of the intermediate values recorded (onnx shape inference), as exporters record them; `checked`:
    onnx's checker accepts it (False for the malformed inputs of refusal tests)."""
    proto = onnx.parser.parse_model(text)
    for name, array in (initializers or {}).items():
        proto.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
    if checked:
        onnx.checker.check_model(proto)
    if infer:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    return ir.serde.deserialize_model(proto)


def copy_model(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def to_bytes(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def check(model: ir.Model) -> None:
    """onnx's full checker (with shape inference) on the serialized model, as the pipeline's `CheckerPass` does."""
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def op_counts(graph: ir.Graph) -> collections.Counter:
    """``(domain, op_type)`` -> count over the top-level nodes; the default domain is written ``""``."""
    return collections.Counter((n.domain, n.op_type) for n in graph)


def ops(graph: ir.Graph, op_type: str, domain: str = "") -> list[ir.Node]:
    return [n for n in graph if n.op_type == op_type and n.domain == domain]


def linear_text(width: int, out: int, bias: bool = True) -> str:
    """``y = x @ wt (+ b)``: one MatMul linear named ``lin`` on the graph input ``x [B, N, width]``."""
    body = "[lin] mm = MatMul(x, wt)\n  [lin_bias] y = Add(mm, b)" if bias else "[lin] y = MatMul(x, wt)"
    return f"""
    <ir_version: 10, opset_import: ["" : 21]>
    linear (float[B, N, {width}] x) => (float[B, N, {out}] y) {{
      {body}
    }}"""


def linear(width: int, out: int, seed: int = 0, bias: bool = True) -> tuple[ir.Model, np.ndarray, np.ndarray]:
    """The one-linear graph of `linear_text`, its ``wt`` [width, out] and ``b`` [out] (float32)."""
    rng = np.random.default_rng(seed)
    wt = (rng.standard_normal((width, out)) / np.sqrt(width)).astype(np.float32)
    b = (rng.standard_normal(out) * 0.1).astype(np.float32)
    inits = {"wt": wt, "b": b} if bias else {"wt": wt}
    return parse_model(linear_text(width, out, bias), inits), wt, b


def two_sites_on_x(width: int = 72, out: int = 64, seed: int = 0) -> ir.Model:
    """``x`` read by ``blocks.0.a.q`` and ``blocks.0.a.k`` (one site of `TWO_GROUPS`) and by ``blocks.0.b.q``
    (another site on the same tensor); three outputs."""
    rng = np.random.default_rng(seed)
    inits = {name: (rng.standard_normal((width, out)) / np.sqrt(width)).astype(np.float32)
             for name in ("wq", "wk", "wb")}
    model = parse_model(f"""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[B, N, {width}] x) => (float[B, N, {out}] q, float[B, N, {out}] k, float[B, N, {out}] p) {{
          [aq] q = MatMul(x, wq)
          [ak] k = MatMul(x, wk)
          [bq] p = MatMul(x, wb)
        }}""", inits)
    for node in model.graph:  # module paths (the parser takes no dots in node names)
        node.name = f"blocks.0.{node.name[0]}.{node.name[1]}"
    return model


def tokens(width: int, batch: int = 2, n: int = 32, seed: int = 1, outliers: bool = True) -> np.ndarray:
    """Activations ``[batch, n, width]`` as diffusion transformers have them: per-channel offsets of varied size, a
    spread per channel and (`outliers`) a few channels 20x wider."""
    rng = np.random.default_rng(seed)
    offsets = rng.standard_normal(width) * 2.0
    spread = np.exp(rng.standard_normal(width) * 0.5)
    if outliers:
        spread[rng.choice(width, size=max(1, width // 64), replace=False)] *= 20.0
    return (rng.standard_normal((batch, n, width)) * spread + offsets).astype(np.float32)


# -- running ----------------------------------------------------------------------------------------------------

def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Every graph output, from onnxruntime with hn-export's session options (Q/DQ nodes run as written)."""
    return create_session(to_bytes(model)).run(None, feeds)


def rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    want = np.asarray(want, np.float64)
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


def sqnr_db(got: np.ndarray, want: np.ndarray) -> float:
    want = np.asarray(want, np.float64)
    noise = np.sum((np.asarray(got, np.float64) - want) ** 2)
    return float(10 * np.log10(np.sum(want**2) / noise))


# -- statistics and plans ---------------------------------------------------------------------------------------

def stats_of(a: np.ndarray, conv: bool = False) -> SiteStats:
    """Exact calibration statistics of one activation tensor ``[..., N, d]`` (`conv`: ``[B, C, H, W]``, its pixels
    as tokens), as calibration computes them."""
    a = np.asarray(a, np.float64)
    if conv:
        a = a.transpose(0, 2, 3, 1).reshape(a.shape[0], -1, a.shape[1])
    centered = a - a.mean(axis=-2, keepdims=True)
    axes = tuple(range(a.ndim - 1))
    return SiteStats(np.abs(a).max(axes), np.abs(centered).max(axes))


def site_stats(model: ir.Model, feeds: dict[str, np.ndarray],
               selection: SiteSelection = EVERY_LINEAR) -> dict[str, SiteStats]:
    """Statistics of every site's activation (graph inputs directly, other values read from a copy of the graph
    with them as extra outputs), keyed by activation name as `plan_sites` wants them."""
    sites = find_activation_sites(model, selection)
    names = [site.activation.name for site in sites]
    values = dict(feeds)
    inner = [name for name in names if name not in values]
    if inner:
        probe = copy_model(model)
        produced = {out.name: out for node in probe.graph for out in node.outputs}
        extra = [produced[name] for name in inner if not produced[name].is_graph_output()]
        probe.graph.outputs.extend(extra)
        outs = run(probe, feeds)
        values.update(zip([o.name for o in probe.graph.outputs], outs))
    return {site.activation.name: stats_of(values[site.activation.name], site.is_conv) for site in sites}


def plans(model: ir.Model, feeds: dict[str, np.ndarray], quant: QuantConfig | None,
          method: Method = Method.HADANORM, bias: BiasCorrection = BiasCorrection.FLOAT_TOKEN,
          hadamard_block: int | None = 8, selection: SiteSelection = EVERY_LINEAR, **kwargs) -> tuple[SitePlan, ...]:
    """`plan_sites` for every site of `model` (what an emitter requires), statistics from `feeds`."""
    options = TransformOptions(method=method, bias_correction=bias, hadamard_block=hadamard_block)
    sites = find_activation_sites(model, selection)
    return plan_sites(sites, site_stats(model, feeds, selection), options, quant, **kwargs)


# -- numpy references -------------------------------------------------------------------------------------------

def quantizer_input(x: np.ndarray, plan: SitePlan) -> tuple[np.ndarray, np.ndarray]:
    """``(a, m)`` in float64 for a site reading `x`: ``a`` is what its activation quantizer reads (``x~``, for a
    single-Hadamard site the rotated ``x R^T`` before the back rotation) and ``m`` what the site's stored weight
    ``W~^T`` multiplies in float (``x~ + mu~`` for a centered float-token site, ``x S^-1`` for a single Hadamard)."""
    t = plan.transform
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=-2, keepdims=True) if t.center else np.zeros_like(x[..., :1, :])
    scaled, mean = (x - mean) * t.channel_mul(), mean * t.channel_mul()
    if t.hadamard is None:
        return scaled, scaled + mean
    rotation = np.kron(t.hadamard.left, t.hadamard.right)  # the signs are in channel_mul already
    if t.rotate_back:
        return scaled @ rotation.T, scaled
    return scaled @ rotation.T, (scaled + mean) @ rotation.T


def per_token_qdq(x: np.ndarray, bits: int) -> np.ndarray:
    """The ``qdq`` format's per-token dynamic asymmetric quantizer (`graph_passes.emit_qdq.activation_qdq`) in
    float32 numpy: ``scale = max((max(x, 0) - min(x, 0)) / qmax, tiny)``, ``zp = clip(round(-min / scale))``,
    ``(clip(round(x / scale) + zp, 0, qmax) - zp) * scale``."""
    x = np.asarray(x, np.float32)
    qmax = np.float32(2**bits - 1)
    hi = np.maximum(x.max(-1, keepdims=True), 0)
    lo = np.minimum(x.min(-1, keepdims=True), 0)
    scale = np.maximum((hi - lo) / qmax, np.finfo(np.float32).tiny)
    zp = np.clip(np.round(-lo / scale), 0, qmax)
    return (np.clip(np.round(x / scale) + zp, 0, qmax) - zp) * scale


def predicted_sqnr_db(x: np.ndarray, plan: SitePlan, reference: np.ndarray, linear: int = 0) -> float:
    """The SQNR of linear `linear` of a quantized site with per-token activation quantizers, against its float
    output `reference`, from the additive-noise model of uniform quantizers (rounding errors uniform on
    ``[-D/2, D/2]``, variance ``D^2 / 12``, independent of each other and of the signal):

    * activations: per token ``t`` the step is ``D_t = (max(a_t, 0) - min(a_t, 0)) / (2^b - 1)`` (``b`` the
      activation bits, ``a`` what the quantizer reads: `quantizer_input`); the ``d`` rounding errors of the token
      reach output channel ``j`` through the stored weight column ``W_j``: variance ``D_t^2 / 12 ||W_j||^2``, in all
      ``sum_t D_t^2 / 12 ||W||_F^2``. A ``quantized-token`` site quantizes its mean token as one more row whose
      error is added to each of the ``N`` tokens: ``N D_mu^2 / 12 ||W||_F^2`` per batch element;
    * weights: the plan's own integers, so their error ``E = dequant(q) - W~^T`` is known exactly and contributes
      ``||m E||^2`` (``m`` from `quantizer_input`: the mean token reads the same stored weight), or, for ``exact``
      bias correction, ``||x~ E + mu~ E8||^2`` with ``E8`` the error of the int8 per-channel copy.

    The activation errors have zero mean and do not depend on ``E``: the powers add. The expectation over the
    ``T d`` rounding errors has a relative spread of about ``1 / sqrt(T d)`` (0.1 dB for 64 tokens of 72).
    """
    a, m = quantizer_input(x, plan)
    lp = plan.linears[linear]
    qw = lp.weight.quantized
    fused = plan.transform.fuse_weight(_matmul_weight(lp))
    w_dq = qw.dequantize()
    bits = plan.act.bits

    def step(v: np.ndarray) -> np.ndarray:
        return (np.maximum(v.max(-1), 0) - np.minimum(v.min(-1), 0)) / (2**bits - 1)

    act_noise = np.sum(step(a) ** 2 / 12.0) * np.sum(w_dq**2)
    mode = plan.bias_correction
    if mode is BiasCorrection.QUANTIZED_TOKEN:
        mean_t = (m - a)[..., :1, :]  # mu~, one row per batch element
        act_noise += a.shape[-2] * np.sum(step(mean_t) ** 2 / 12.0) * np.sum(w_dq**2)
    if mode is BiasCorrection.EXACT:
        mean_t = m - a
        weight_noise = np.sum((a @ (w_dq - fused) + mean_t @ (lp.weight.correction.dequantize() - fused)) ** 2)
    else:
        weight_noise = np.sum((m @ (w_dq - fused)) ** 2)
    signal = np.sum(np.asarray(reference, np.float64) ** 2)
    return float(10 * np.log10(signal / (act_noise + weight_noise)))


def _matmul_weight(lp) -> np.ndarray:
    w = lp.layer.weight.const_value.numpy()
    return w[:, :, 0, 0].T if lp.layer.is_pointwise else w


CONV3X3_TEXT = """
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[2, 8, 4, 4] x) => (float[2, 16, 4, 4] y) {
      [k3] y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w, b)
    }"""


def conv3x3(seed: int = 0) -> tuple[ir.Model, np.ndarray, np.ndarray, np.ndarray]:
    """A padded 3x3 conv (8 -> 16 channels, 4x4 pixels, batch 2): the model, its weight, bias and an input."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((16, 8, 3, 3)) / 8).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    x = rng.standard_normal((2, 8, 4, 4)).astype(np.float32)
    return parse_model(CONV3X3_TEXT, {"w": w, "b": b}), w, b, x
