"""Property-based tests of the pass pipeline on random small graphs (hypothesis; `tests/random_graphs.py`).

Graphs: x [B, N, d] with d from `WIDTHS`, 1-4 linears (some sharing an input, some chained directly or through
Relu/Gelu, biases at random) and maybe an attention-like block (q/k/v linears on one input,
``softmax(q k^T / sqrt(d)) v``, an output linear); several graph outputs. Options: all six methods, all three
bias-correction modes, FULL or BLOCK Hadamard (block 4 or 8 where it divides every site width), random signs or
none, alpha, weight/activation bits 2..8, symmetric or asymmetric weights, weight block size.

1. transform only: the rewritten graph equals the original in onnxruntime (relative L2 <= 1e-5 per output);
2. quantized: every graph output agrees with an independent numpy reference of the whole graph (relative L2
   <= 1e-3 per output), and the plan (site grouping, SmoothQuant scales, Hadamard structure) is the documented one;
3. quantized: the file passes `onnx.checker.check_model(full_check=True)`, every site weight is stored in the
   documented integer container, and no MatMul reads a float weight.

Run time is bounded (fixed example counts, no deadline) and reproducible (derandomized, no example database).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graph_passes.hadamard import HadamardMode
from graph_passes.linears import find_activation_sites
from graph_passes.methods import BiasCorrection, Method, TransformOptions
from graph_passes.pipeline import QuantizeResult, quantize_model
from graph_passes.quantization import QuantConfig
from runtime.domain import HADANORM_DOMAIN
from runtime.session import create_session
from tests.random_graphs import (
    ELEMENTWISE,
    PIXART_GROUPS,
    WIDTHS,
    GraphBuilder,
    GraphSpec,
    dit_like,
    expected_inv_scale,
    quantized_linear,
    ref_weight_asymmetric,
    ref_weight_symmetric,
    site_stats,
    transformed_tokens,
)
from tests.roles import ALL_PIXART

ALL = ALL_PIXART
TRANSFORM_TOL = 1e-5
QUANT_TOL = 1e-3

PROFILE = settings(
    deadline=None,
    derandomize=True,  # the same examples on every run and machine
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Case:
    """One drawn example (a plain class: hypothesis prints its repr, not the weights)."""

    def __init__(self, spec: GraphSpec, options: TransformOptions, quant: QuantConfig | None, x: np.ndarray,
                 x_cal: np.ndarray):
        self.spec, self.options, self.quant = spec, options, quant
        self.x = x  # evaluation input
        self.x_cal = x_cal  # calibration input: x and more batch elements of the same distribution

    def __repr__(self) -> str:  # hypothesis prints this for a failing example
        return (f"Case(\n{self.spec.describe()}\noptions={self.options}\nquant={self.quant}\n"
                f"x: {self.x.shape}, calibration: {self.x_cal.shape})")


# Weights may be tied across two sites (the fix of test_weight_tied_across_two_sites is covered by the properties).
WIDTH = st.sampled_from(WIDTHS)
PIXART_PATHS = [f"transformer_blocks.{b}.{suffix}" for b in (0, 1) for suffix in PIXART_GROUPS]


@st.composite
def cases(draw, quantized: bool) -> Case:
    width = draw(WIDTH)
    builder = GraphBuilder(width, seed=draw(st.integers(0, 2**32 - 1)))
    readable = ["x"]  # values later linears may read
    pixart_paths = draw(st.booleans(), label="PixArt module paths")
    n_linears = draw(st.integers(1, 4), label="linears")
    attention_at = draw(st.one_of(st.none(), st.integers(0, n_linears)), label="attention before linear")
    for i in range(n_linears + 1):
        if i == attention_at:
            src = draw(st.sampled_from(readable), label="attention input")
            biases = tuple(draw(st.booleans()) for _ in range(4))
            names = None
            if pixart_paths:
                block = f"transformer_blocks.{draw(st.integers(0, 1))}.attn{draw(st.integers(1, 2))}"
                names = tuple(f"{block}.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0"))
                if any(lin.name in names for lin in builder.spec.linears):
                    names = None
            readable += builder.attention("attn", src, draw(WIDTH), draw(WIDTH), biases, names)
        if i == n_linears:
            break
        name = f"lin{i}"
        if pixart_paths:  # module paths that split or merge sites by module group (and repeat group names)
            used = {lin.name for lin in builder.spec.linears}
            name = draw(st.sampled_from([name, *(p for p in PIXART_PATHS if p not in used)]), label=f"lin{i} path")
        src = draw(st.sampled_from(readable), label=f"{name} input")
        out_width = draw(WIDTH)
        # a weight tied to an earlier linear with the same shape: of the same site (same input and module group), or
        # of another site
        tied = [lin.name for lin in builder.spec.linears
                if builder.spec.inits[lin.weight].shape == (builder.spec.widths[src], out_width)]
        tie = draw(st.sampled_from(tied)) if tied and draw(st.booleans()) else None
        name = builder.linear(name, src, out_width, bias=draw(st.booleans()), weight_of=tie)
        readable.append(name)
        lin = builder.spec.linears[-1]
        if lin.mm != name and draw(st.integers(0, 4)) == 0:
            readable.append(lin.mm)  # the pre-bias MatMul output read by another linear
        act = draw(st.sampled_from((None, *ELEMENTWISE)))
        if act is not None:
            readable.append(builder.elementwise(act, name))
    batch, tokens = draw(st.integers(1, 3), label="batch"), draw(st.integers(1, 12), label="tokens")
    offset, outlier = draw(st.sampled_from((0.0, 2.0, 8.0))), draw(st.sampled_from((1.0, 20.0)))
    profile = draw(st.integers(0, 2**16), label="input channel profile")
    x = dit_like(width, batch, tokens, profile, offset, outlier, sample=1)
    # Calibration: x and two more batch elements of the same distribution. Covering x matters for test 1: a channel
    # that is ~0 in calibration (a Gelu/Relu dead there) gets 1/s up to 1e5; if x then has a real value there, that
    # channel dominates the rotated token and float32 keeps ~1e-4 of the others (relative L2 2e-5, seen with an
    # outlier token of x). That is the conditioning of SmoothQuant scales, not the exactness of the rewrite.
    x_cal = np.concatenate([x, dit_like(width, 2, tokens, profile, offset, outlier, sample=2)])
    builder.limit_attention_logits(x_cal)
    produced = [n for n in builder.spec.widths if n != "x"]
    extra = draw(st.lists(st.sampled_from(produced), max_size=3), label="extra outputs")
    if quantized:
        extra += [name for name in builder.spec.site_inputs() if name != "x"]  # see test 2
    spec = builder.finish(extra)

    site_widths = {spec.widths[name] for name in spec.site_inputs()}
    blocks = [b for b in (4, 8) if all(w % b == 0 for w in site_widths)]
    mode = draw(st.sampled_from([HadamardMode.FULL, HadamardMode.BLOCK] if blocks else [HadamardMode.FULL]))
    options = TransformOptions(
        method=draw(st.sampled_from(list(Method))),
        alpha=draw(st.floats(0.2, 0.8)),
        hadamard=mode,
        hadamard_block=draw(st.sampled_from(blocks)) if mode is HadamardMode.BLOCK else 128,
        bias_correction=draw(st.sampled_from(list(BiasCorrection))),
        seed=draw(st.one_of(st.integers(0, 1000), st.none()), label="hadamard sign seed"),
    )
    quant = None
    if quantized:
        quant = QuantConfig(
            weight_bits=draw(st.integers(2, 8), label="weight bits"),
            act_bits=draw(st.integers(2, 8), label="act bits"),
            weight_block=draw(st.sampled_from((128, 8, 16, 32))),
            weight_symmetric=draw(st.booleans()),
        )
    return Case(spec, options, quant, x, x_cal)


def serialize(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def run(model: ir.Model, x: np.ndarray) -> dict[str, np.ndarray]:
    session = create_session(serialize(model))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"x": x})))


def rel_l2(got: np.ndarray, expected: np.ndarray) -> float:
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    den = np.linalg.norm(expected)
    return float(np.linalg.norm(got - expected) / den) if den > 0 else float(np.linalg.norm(got))


def close(got: np.ndarray, expected: np.ndarray, magnitude: np.ndarray, tol: float) -> bool:
    """``|got - expected| <= tol * max(|expected|, |magnitude| / 10)`` in L2: relative L2 <= tol, except for a value
    that float32 computes with cancellation (its absolute-value evaluation `magnitude` more than 10x larger): rounding
    errors scale with the terms, not with the result. E.g. Relu(z) keeping only a few small positive z. A wrong rewrite
    is off by about |expected| and fails either way."""
    den = max(np.linalg.norm(np.asarray(expected, np.float64)), np.linalg.norm(magnitude) / 10)
    return bool(np.linalg.norm(np.asarray(got, np.float64) - expected) <= tol * den)


def transform(case: Case, model: ir.Model) -> QuantizeResult:
    return quantize_model(model, site_stats(case.spec, case.x_cal), case.options, case.quant, ALL)


@settings(PROFILE, max_examples=150)
@given(case=cases(quantized=False))
def test_transform_only_equals_original(case: Case):
    spec = case.spec
    expected = run(spec.model(), case.x)
    assert set(expected) == set(spec.outputs)
    # the numpy evaluation is the graph onnxruntime runs (test 2 builds its reference on it)
    floats, magnitudes = spec.evaluate(case.x), spec.magnitudes(case.x)
    for name in spec.outputs:
        assert close(expected[name], floats[name], magnitudes[name], TRANSFORM_TOL), name

    model = spec.model()
    result = transform(case, model)
    transform_nodes = [n for n in model.graph if n.domain == HADANORM_DOMAIN]
    per_site = 2 if case.options.method.recipe.single else 1  # HQ-DM: the rotation and the back rotation
    assert len(transform_nodes) == per_site * sum(t.op is not None for t in result.transforms.values())
    recipe = case.options.method.recipe
    if recipe.center or recipe.rotate:
        assert len(transform_nodes) == per_site * len(result.sites)  # every site was rewritten
    got = run(model, case.x)
    assert set(got) == set(spec.outputs)
    for name in spec.outputs:
        assert close(got[name], expected[name], magnitudes[name], TRANSFORM_TOL), (
            name, rel_l2(got[name], expected[name]))


def check_plan(case: Case, result: QuantizeResult) -> None:
    """Site grouping, SmoothQuant scales and Hadamard structure as documented, from the spec alone."""
    spec, options = case.spec, case.options
    # the sites as planned (the pipeline may rename values afterwards, e.g. an output moved behind its correction)
    sites = find_activation_sites(spec.model(), ALL)
    assert [s.name for s in sites] == [s.name for s in result.sites]
    assert [(s.activation.name, [lin.module_path for lin in s.linears]) for s in sites] == [
        (src, [lin.name for lin in lins]) for (src, _), lins in spec.site_groups().items()]
    stats = site_stats(spec, case.x_cal)
    recipe = options.method.recipe
    for site in sites:
        t = result.transforms[site.name]
        d = spec.widths[site.activation.name]
        assert t.center == recipe.center
        if recipe.smooth:
            weights = [spec.inits[spec.linear(lin.module_path).weight] for lin in site.linears]
            expected = expected_inv_scale(stats[site.activation.name], weights, options.alpha, recipe.center)
            np.testing.assert_allclose(t.inv_scale, expected, rtol=1e-9)
        else:
            assert np.all(t.inv_scale == 1.0)
        assert (t.hadamard is not None) == recipe.rotate
        if t.hadamard is None:
            continue
        h = t.hadamard.matrix()
        np.testing.assert_allclose(h @ h.T, np.eye(d), atol=1e-12)
        assert (t.hadamard.signs is None) == (options.seed is None or recipe.single)  # HQ-DM: no signs
        block = options.hadamard_block if options.hadamard is HadamardMode.BLOCK else d
        same_block = np.arange(d)[:, None] // block == np.arange(d)[None, :] // block
        np.testing.assert_allclose(np.abs(h), np.where(same_block, 1 / math.sqrt(block), 0.0), atol=1e-12)


def is_back_rotation(node: ir.Node | None) -> bool:
    """HQ-DM's back rotation: a hadanorm ScaleRotate that reads a DequantizeLinear (the quantized tokens)."""
    source = node.inputs[0].producer() if node is not None and node.domain == HADANORM_DOMAIN else None
    return source is not None and source.op_type == "DequantizeLinear"


def quantized_tensor(value: ir.Value) -> ir.Value | None:
    """What the per-token quantizer whose DequantizeLinear produces `value` quantizes (before the b-bit grid clip
    ``Max(Min(x, high), low)`` of narrow widths), or None."""
    dq = value.producer()
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = dq.inputs[0].producer()
    assert q is not None and q.op_type == "QuantizeLinear"
    x = q.inputs[0]
    clip = x.producer()
    inner = clip.inputs[0].producer() if clip is not None and clip.op_type == "Max" else None
    return inner.inputs[0] if inner is not None and inner.op_type == "Min" else x


def run_probed(model: ir.Model, spec: GraphSpec, x: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The graph outputs, and for each site linear the tensor its activation quantizer reads (the input of the
    ``QuantizeLinear`` behind the ``DequantizeLinear`` that feeds the MatMul), from one onnxruntime run of a copy of
    `model` with those tensors added as outputs."""
    probe = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    nodes = {n.name: n for n in probe.graph}
    names = {}
    for lin in spec.linears:
        read = nodes[lin.name].inputs[0]
        back = read.producer()
        if is_back_rotation(back):  # HQ-DM: quantized before the back rotation
            read = back.inputs[0]
        value = quantized_tensor(read)  # what is quantized (before the b-bit grid clip of narrow widths)
        assert value is not None, lin.name
        names[lin.name] = value.name
        if not (value.is_graph_input() or value.is_graph_output()):
            value.type = value.type or ir.TensorType(ir.DataType.FLOAT)
            probe.graph.outputs.append(value)
    values = run(probe, x)
    values[probe.graph.inputs[0].name] = x
    return {name: values[name] for name in spec.outputs}, {lin: values[name] for lin, name in names.items()}


@settings(PROFILE, max_examples=150)
@given(case=cases(quantized=True))
def test_quantized_matches_numpy_reference(case: Case):
    """The reference evaluates the whole graph in numpy, each site linear replaced by `quantized_linear`.

    Rounding decisions must be the same on both sides for a comparison at 1e-3 to mean something: one value that
    float32 (onnxruntime) and float64 (numpy) put on different sides of a half-way point moves by a whole step, 1/3
    of the token range at 2 bits. Half-way points are not rare: a Relu/Gelu zeroes channels, the Hadamard then makes
    tokens whose max is minus their min, and the zero point -min/scale of such a token is exactly k + 0.5. So

    * each site's quantizer input in onnxruntime (`run_probed`) is first checked against the dense reference
      ``H S^-1 (a - mu)`` (relative L2 <= 1e-5: the transform), then the reference quantizes those same float32
      numbers with its own quantizer (the quantization, the weights and the bias correction at 1e-3);
    * every site input other than x is also a graph output, and the reference reads onnxruntime's value of each
      graph output downstream (`override`), so a site compares against the input it really got.
    """
    spec, mode = case.spec, case.options.bias_correction
    model = spec.model()
    result = transform(case, model)
    check_plan(case, result)
    got, quantizer_inputs = run_probed(model, spec, case.x)
    assert set(got) == set(spec.outputs)
    transform_of = {lin.module_path: result.transforms[s.name] for s in result.sites for lin in s.linears}

    def linear(lin, a):
        t, tokens = transform_of[lin.name], quantizer_inputs[lin.name]
        # float32 rounding of a - mu is relative to a, not to the (possibly much smaller) centered tokens
        reference_tokens = transformed_tokens(a, t, mode)
        magnitude = max(np.linalg.norm(reference_tokens), np.linalg.norm(a * t.inv_scale))
        assert np.linalg.norm(tokens - reference_tokens) <= TRANSFORM_TOL * magnitude, lin.name
        return quantized_linear(a, spec.inits[lin.weight], t, mode, case.quant, tokens)

    expected = spec.evaluate(case.x, linear, override=got)
    for name in spec.outputs:
        assert rel_l2(got[name], expected[name]) <= QUANT_TOL, name


@settings(PROFILE, max_examples=100)
@given(case=cases(quantized=True))
def test_quantized_model_is_valid_with_integer_weights(case: Case):
    """The written file passes the full ONNX check; each site weight is stored once in its integer container (INT4/
    UINT4 up to 4 bits, INT8/UINT8 above; unsigned with zero points for asymmetric weights) with float32 block scales,
    and its integers are the reference quantization of H S W^T; activations go through per-token QDQ."""
    spec, quant = case.spec, case.quant
    model = spec.model()
    result = transform(case, model)
    proto = onnx.load_from_string(serialize(model))
    onnx.checker.check_model(proto, full_check=True)
    stored = ir.serde.deserialize_model(proto)
    inits = stored.graph.initializers
    nodes = {n.name: n for n in stored.graph}
    signed = quant.weight_symmetric
    if quant.weight_bits <= 4:
        container = ir.DataType.INT4 if signed else ir.DataType.UINT4
    else:
        container = ir.DataType.INT8 if signed else ir.DataType.UINT8
    act_container = ir.DataType.UINT4 if quant.act_bits <= 4 else ir.DataType.UINT8
    transform_of = {lin.module_path: result.transforms[s.name] for s in result.sites for lin in s.linears}
    for lin in spec.linears:
        matmul = nodes[lin.name]
        assert matmul.op_type == "MatMul"
        dq = matmul.inputs[1].producer()
        assert dq is not None and dq.op_type == "DequantizeLinear", lin.name
        q, scale = dq.inputs[0], dq.inputs[1]
        assert q.name in inits and q.const_value.dtype == container, (lin.name, q.const_value.dtype)
        d, out = spec.inits[lin.weight].shape
        assert scale.const_value.dtype == ir.DataType.FLOAT
        assert scale.const_value.shape == (-(-d // quant.weight_block), out)
        assert dq.attributes["axis"].as_int() == 0
        assert dq.attributes["block_size"].as_int() == min(quant.weight_block, d)
        if signed:
            assert len(dq.inputs) == 2 or dq.inputs[2] is None
        else:
            assert dq.inputs[2].const_value.dtype == container
        # the stored integers are the reference quantization of the fused weight H S W^T (HQ-DM: S W^T, unrotated)
        t = transform_of[lin.name]
        h = t.hadamard.matrix() if t.hadamard is not None and not t.rotate_back else np.eye(d)
        fused = np.asarray(h @ np.diag(1.0 / t.inv_scale) @ spec.inits[lin.weight].astype(np.float64), np.float32)
        ref = (ref_weight_symmetric if signed else ref_weight_asymmetric)(
            fused.astype(np.float64), quant.weight_bits, quant.weight_block)
        step = np.repeat(scale.const_value.numpy().astype(np.float64), quant.weight_block, axis=0)[:d]
        zp = 0.0 if signed else np.repeat(dq.inputs[2].const_value.numpy().astype(np.float64),
                                          quant.weight_block, axis=0)[:d]
        deq = (q.const_value.numpy().astype(np.float64) - zp) * step
        np.testing.assert_allclose(deq, ref, rtol=1e-6, atol=1e-6 * float(np.abs(ref).max()))
        # the activation is quantized per token in the documented container
        act_dq = matmul.inputs[0].producer()
        if is_back_rotation(act_dq):
            act_dq = act_dq.inputs[0].producer()  # HQ-DM: the quantizer is before the back rotation
        assert act_dq is not None and act_dq.op_type == "DequantizeLinear", lin.name
        assert act_dq.inputs[2].producer().attributes["to"].as_int() == act_container
    # no float weight is left for any MatMul: every weight comes through a DequantizeLinear
    for node in stored.graph:
        if node.op_type == "MatMul":
            for value in node.inputs:
                assert not (value.is_initializer() and value.dtype == ir.DataType.FLOAT), node.name
    exact = case.options.method.recipe.center and case.options.bias_correction is BiasCorrection.EXACT
    corrections = [n for n in stored.graph if n.op_type == "DequantizeLinear" and n.inputs[0].is_initializer()
                   and n.inputs[0].const_value.dtype == ir.DataType.INT8 and n.attributes["axis"].as_int() == 1]
    assert len(corrections) == (len({lin.weight for lin in spec.linears}) if exact else 0)


# ---- bugs found by the properties, as their smallest examples (regression tests) ----

def test_weight_tied_across_two_sites():
    """The same initializer W in two linears with different inputs: y = relu(x W) W (two sites, each with its own
    rotation). Transform only, so the graph must equal the original."""
    builder = GraphBuilder(8, seed=0)
    h = builder.linear("a", "x", 8, bias=False)
    builder.linear("b", builder.elementwise("Relu", h), 8, bias=False, weight_of="a")
    spec = builder.finish()
    x = dit_like(8, 1, 4, seed=1)
    case = Case(spec, TransformOptions(method=Method.QUAROT), None, x, x)
    expected = run(spec.model(), x)
    model = spec.model()
    transform(case, model)
    got = run(model, x)
    assert rel_l2(got["b"], expected["b"]) <= TRANSFORM_TOL


def test_float16_quantized_token():
    """A float16 graph (as `hn-export export --fp16` writes), one centered site, quantized-token bias correction:
    the activation quantizer of the [x~; mu~] Concat must compute in float16 like every other site's."""
    builder = GraphBuilder(8, seed=0)
    builder.linear("a", "x", 8, bias=False)
    spec = builder.finish()
    model = spec.model(np.float16)
    options = TransformOptions(method=Method.DYNCENTER, bias_correction=BiasCorrection.QUANTIZED_TOKEN)
    x = dit_like(8, 1, 4, seed=1)
    quantize_model(model, site_stats(spec, x), options, QuantConfig(4, 4), ALL)  # raises PassError (checker)
    got = run(model, x.astype(np.float16))["a"]
    assert got.dtype == np.float16


# ---- the reference can tell a wrong graph from a right one ----

def test_reference_detects_wrong_config():
    """The same comparison as test 2 on one fixed graph: it passes for the config the graph was quantized with and
    fails for a neighbouring one (one more activation bit, or the other weight quantizer)."""
    builder = GraphBuilder(72, seed=3)
    h = builder.elementwise("Gelu", builder.linear("up", "x", 144))
    builder.linear("down", h, 72)
    builder.linear("side", "x", 36, bias=False)
    spec = builder.finish(["up.gelu"])
    x = dit_like(72, 2, 8, seed=4)
    quant = QuantConfig(4, 4)
    case = Case(spec, TransformOptions(method=Method.HADANORM), quant, x, dit_like(72, 2, 8, seed=5))
    model = spec.model()
    result = transform(case, model)
    got = run(model, x)
    transform_of = {lin.module_path: result.transforms[s.name] for s in result.sites for lin in s.linears}

    def worst(config: QuantConfig) -> float:
        def linear(lin, a):
            return quantized_linear(a, spec.inits[lin.weight], transform_of[lin.name], BiasCorrection.FLOAT_TOKEN,
                                    config)
        expected = spec.evaluate(x, linear, override=got)
        return max(rel_l2(got[name], expected[name]) for name in spec.outputs)

    assert worst(quant) <= QUANT_TOL
    assert worst(QuantConfig(4, 5)) > 10 * QUANT_TOL
    assert worst(QuantConfig(4, 4, weight_symmetric=False)) > 10 * QUANT_TOL
