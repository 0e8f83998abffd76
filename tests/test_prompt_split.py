"""`hn-export split-prompt` and `runtime.denoiser.Denoiser` on a split graph: the same outputs as the whole graph,
the prompt graph run once per prompt (a cache of the last two, compared bitwise), clear errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from graph_passes.errors import GraphInputError
from graph_passes.prompt_split import split_prompt_graph
from hn_export.denoise import DenoiseConfig, ModelSignature, first_call_feeds
from hn_export.model_files import load_model
from runtime.denoiser import PROMPT_CACHE_SIZE, Denoiser
from runtime.errors import RuntimeInputError


@pytest.fixture(scope="module")
def fused(tiny_onnx, tmp_path_factory):
    from hn_export.cli import main

    out = tmp_path_factory.mktemp("fused") / "tiny.fused.onnx"
    try:
        main([str(tiny_onnx), "--w4a4", "--every-linear", "--format", "fused", "-o", str(out), "--calib-samples", "1",
              "--calib-steps", "2", "--no-progress"])
    except SystemExit as exc:
        assert exc.code == 0
    return out


def feeds(model, index=0):
    return first_call_feeds(ModelSignature.of(load_model(model)), DenoiseConfig(caption_length=9), index)


def test_fused_split_gives_the_whole_graphs_bits_and_caches_prompts(fused, hn_cli, tmp_path):
    out = tmp_path / "step.onnx"
    result = hn_cli("split-prompt", fused, "-o", out)
    assert result.exit_code == 0, result.err
    assert "reading encoder_hidden_states" in result.out and "IntMatMul" in result.out
    assert (tmp_path / "step.prompt.onnx").is_file()
    whole, split = Denoiser(fused), Denoiser(out)
    assert list(split.inputs) == list(whole.inputs)  # the same feeds
    assert split.implementation == whole.implementation
    base = feeds(fused)
    captions = {name: dict(base, encoder_hidden_states=base["encoder_hidden_states"] * scale)
                for name, scale in (("a", 1.0), ("b", 0.5), ("c", -1.0))}
    runs = []
    for name in ("a", "b", "a", "c", "b", "c"):  # a, b: two misses; a: cached; c: a miss (b out); b: a miss; c: cached
        np.testing.assert_array_equal(split(captions[name]), whole(captions[name]))  # measured: bit for bit
        runs.append(split.prompt_runs)
    assert PROMPT_CACHE_SIZE == 2 and runs == [1, 2, 2, 3, 4, 4]
    # a caption changed in place after a call is a new prompt: compared by value, not by identity
    again = captions["c"]
    again["encoder_hidden_states"][0, 0, 0] += 1.0
    np.testing.assert_array_equal(split(again), whole(again))
    assert split.prompt_runs == 5
    split.clear_prompt_cache()
    split(again)
    assert split.prompt_runs == 6
    # a prompt key: the cache is looked up by it, the feeds not compared (the caller's promise)
    keyed = Denoiser(out)
    np.testing.assert_array_equal(keyed(captions["a"], prompt_key="a"), whole(captions["a"]))
    np.testing.assert_array_equal(keyed(captions["b"], prompt_key="b"), whole(captions["b"]))
    np.testing.assert_array_equal(keyed(captions["b"], prompt_key="a"), whole(captions["a"]))  # a's values, as promised
    assert keyed.prompt_runs == 2


def test_step_graph_is_smaller_and_names_its_prompt_graph(fused, hn_cli, tmp_path):
    out = tmp_path / "m.onnx"
    assert hn_cli("split-prompt", fused, "-o", out).exit_code == 0
    step, prompt = onnx.load(out), onnx.load(tmp_path / "m.prompt.onnx")
    meta = {p.key: p.value for p in step.metadata_props}
    assert meta["hn_export.prompt_graph"] == "m.prompt.onnx"
    carried = [o.name for o in prompt.graph.output]
    assert carried and set(carried) <= {i.name for i in step.graph.input}
    assert "encoder_hidden_states" not in {i.name for i in step.graph.input}
    whole = onnx.load(fused)
    assert len(step.graph.node) + len(prompt.graph.node) == len(whole.graph.node)  # every node once
    weights = lambda m: {t.name for t in m.graph.initializer}  # noqa: E731
    assert weights(step) | weights(prompt) == weights(whole)


def test_prompt_session_never_spins(fused, hn_cli, tmp_path):
    """The step session spins as asked (onnxruntime's default: on); the prompt session never does: its threads
    would spin on for tens of milliseconds after the prompt graph, on the cores the step graph runs on next."""
    out = tmp_path / "m.onnx"
    assert hn_cli("split-prompt", fused, "-o", out).exit_code == 0
    key = "session.intra_op.allow_spinning"

    def spinning(session) -> bool:
        try:
            return session.get_session_options().get_session_config_entry(key) != "0"
        except RuntimeError:  # not set: onnxruntime's default, spinning
            return True

    for asked in (True, False):
        den = Denoiser(out, spinning=asked)
        assert spinning(den.session) is asked
        assert spinning(den.prompt_session) is False


@pytest.mark.parametrize("preset", ["tiny", "sd3-tiny", "flux-tiny", "pixart-alpha-tiny"])
def test_float_graphs_of_every_family_with_prompt_only_work(preset, preset_onnx, tmp_path):
    """Float graphs: the split stops onnxruntime's fusions at the cut (e.g. MatMul + Add), so the sums may round
    differently: 1e-5 of the output's scale (measured: 0 to 3.3e-7 on the five tiny presets that split)."""
    model = preset_onnx(preset)
    split = split_prompt_graph(load_model(model))
    assert split.carried and split.prompt_inputs
    from hn_export.split_files import save_split

    save_split(split, tmp_path / "m.onnx")
    whole, cut = Denoiser(model, kernel_library=False), Denoiser(tmp_path / "m.onnx", kernel_library=False)
    for index in range(2):
        x = feeds(model, index)
        want, got = whole(x), cut(x)
        assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    assert cut.prompt_runs == 2


def test_nothing_to_split(preset_onnx, hn_cli, tmp_path):
    result = hn_cli("split-prompt", preset_onnx("dit-tiny"), "-o", tmp_path / "m.onnx")
    assert result.exit_code == 2
    assert "no computing node depends on the prompt inputs alone (class_labels)" in result.err
    assert "Traceback" not in result.err and not list(tmp_path.iterdir())


def test_already_split_and_missing_prompt_graph(fused, hn_cli, tmp_path):
    out = tmp_path / "m.onnx"
    assert hn_cli("split-prompt", fused, "-o", out).exit_code == 0
    again = hn_cli("split-prompt", out, "-o", tmp_path / "n.onnx")
    assert again.exit_code == 2 and "is already a step graph (its prompt graph: m.prompt.onnx)" in again.err
    moved = tmp_path / "alone"
    moved.mkdir()
    (moved / "m.onnx").write_bytes(out.read_bytes())
    with pytest.raises(RuntimeInputError, match="needs its prompt graph m.prompt.onnx beside it"):
        Denoiser(moved / "m.onnx")


def test_output_paths_checked_before_the_work(fused, hn_cli, tmp_path):
    (tmp_path / "m.prompt.onnx").mkdir()  # the prompt graph's path is a folder
    result = hn_cli("split-prompt", fused, "-o", tmp_path / "m.onnx")
    assert result.exit_code == 2 and "m.prompt.onnx exists and is a folder" in result.err
    assert not (tmp_path / "m.onnx").exists()
    source = tmp_path / "x.prompt.onnx"  # an input whose name is the prompt graph's of -o x.onnx
    source.write_bytes(fused.read_bytes())
    same = hn_cli("split-prompt", source, "-o", tmp_path / "x.onnx")
    assert same.exit_code == 2 and "is the input file" in same.err
    assert source.read_bytes() == fused.read_bytes() and not (tmp_path / "x.onnx").exists()


def test_missing_step_input_and_nan_caption(tiny_onnx, fused, tmp_path, hn_cli):
    model = load_model(tiny_onnx)
    with pytest.raises(GraphInputError, match="has no input 'latents'"):
        split_prompt_graph(model, ("latents", "timestep"))
    out = tmp_path / "m.onnx"
    assert hn_cli("split-prompt", fused, "-o", out).exit_code == 0
    den = Denoiser(out)
    x = feeds(fused)
    x["encoder_hidden_states"][0, 1, 2] = np.nan
    with pytest.raises(RuntimeInputError, match="input encoder_hidden_states contains NaN or inf"):
        den(x)
    assert den.prompt_runs == 0


def test_diff_runs_a_step_graph_and_refuses_it_per_layer(fused, hn_cli, tmp_path):
    """`hn-export diff STEP WHOLE` runs the split graph through the Denoiser (its prompt cache over the denoising
    loop): the same outputs as the whole graph, SQNR inf; --per-layer reads intermediate values of one whole graph
    and refuses a step graph in one line."""
    out = tmp_path / "m.onnx"
    assert hn_cli("split-prompt", fused, "-o", out).exit_code == 0
    report = tmp_path / "diff.json"
    result = hn_cli("diff", out, fused, "--steps", "2", "--json", report)
    assert result.exit_code == 0, result.err
    import json

    figures = json.loads(report.read_text())["outputs"]
    assert figures["single_call"]["max_abs"] == 0.0 and figures["end_of_denoising"]["max_abs"] == 0.0
    refused = hn_cli("diff", out, fused, "--per-layer", "--steps", "0")
    assert refused.exit_code == 2 and "is a step graph (`hn-export split-prompt`)" in refused.err


def test_prompt_graph_of_another_split_is_refused(fused, tiny_onnx, hn_cli, tmp_path):
    """A step graph beside the prompt graph of another model (a file copied over): one line at load."""
    import shutil

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert hn_cli("split-prompt", fused, "-o", a / "m.onnx").exit_code == 0
    assert hn_cli("split-prompt", tiny_onnx, "-o", b / "m.onnx").exit_code == 0
    shutil.copy(b / "m.prompt.onnx", a / "m.prompt.onnx")  # the float model's prompt graph
    with pytest.raises(RuntimeInputError, match=r"m.prompt.onnx is not the prompt graph of .*m.onnx \(another "
                                                 r"split: split id [0-9a-f]{32} against [0-9a-f]{32}\); split the "
                                                 r"model again"):
        Denoiser(a / "m.onnx")


def test_same_architecture_other_weights_refused_and_splits_deterministic(fused, tiny_onnx, hn_cli, tmp_path):
    """Two splits of one model are byte-identical files; the prompt graph of the same architecture with other
    weights (another calibration seed: the same carried names, element types and ranks) is refused by the split
    id."""
    import shutil

    again = tmp_path / "again"
    again.mkdir()
    for folder in (tmp_path, again):
        assert hn_cli("split-prompt", fused, "-o", folder / "a.onnx").exit_code == 0
    for name in ("a.onnx", "a.prompt.onnx"):
        assert (tmp_path / name).read_bytes() == (again / name).read_bytes()
    other = tmp_path / "other.onnx"
    assert hn_cli(tiny_onnx, "--w4a4", "--every-linear", "--format", "fused", "--seed", "1", "-o", other,
                  "--calib-samples", "1", "--calib-steps", "2", "--no-progress").exit_code == 0
    folder = tmp_path / "o"
    folder.mkdir()
    assert hn_cli("split-prompt", other, "-o", folder / "a.onnx").exit_code == 0
    shutil.copy(folder / "a.prompt.onnx", tmp_path / "a.prompt.onnx")
    with pytest.raises(RuntimeInputError, match="is not the prompt graph of"):
        Denoiser(tmp_path / "a.onnx")


def test_carried_value_of_another_rank_is_refused(fused, hn_cli, tmp_path):
    out = tmp_path / "m.onnx"
    assert hn_cli("split-prompt", fused, "-o", out).exit_code == 0
    step = onnx.load(out)
    carried = onnx.load(tmp_path / "m.prompt.onnx").graph.output[0].name
    value = next(i for i in step.graph.input if i.name == carried)
    del value.type.tensor_type.shape.dim[-1]  # declared one rank lower than the prompt graph hands over
    onnx.save(step, out)
    with pytest.raises(RuntimeInputError, match=f"hands over {carried} as tensor\\(float\\) rank 4, step graph "
                                                ".* takes tensor\\(float\\) rank 3; the two files do not "
                                                "fit together"):
        Denoiser(out)


@pytest.mark.parametrize("fmt, bound", [("qdq", 1e-5), ("nbits", 5e-2)])
def test_qdq_and_nbits_graphs_split(fmt, bound, tiny_onnx, hn_cli, tmp_path):
    """qdq: float rounding at the cut only (measured 3.3e-7 of the output's scale); nbits: onnxruntime's extended
    fusions apply differently at the cut and the rounding flips a few 4-bit codes downstream (measured 1.2%, against
    2.5% between this model's nbits and qdq graphs); with onnxruntime's basic optimizations the same bits."""
    import onnxruntime as ort

    model = tmp_path / f"tiny.{fmt}.onnx"
    assert hn_cli(tiny_onnx, "--w4a4", "--format", fmt, "-o", model, "--calib-samples", "1", "--calib-steps", "2",
                  "--no-progress").exit_code == 0
    out = tmp_path / "m.onnx"
    assert hn_cli("split-prompt", model, "-o", out).exit_code == 0
    x = feeds(model)
    want, got = Denoiser(model)(x), Denoiser(out)(x)
    assert np.max(np.abs(got - want)) <= bound * np.max(np.abs(want))

    def basic(path):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.add_session_config_entry("session.disable_quant_qdq", "1")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    prompt = basic(tmp_path / "m.prompt.onnx")
    carried = [o.name for o in prompt.get_outputs()]
    values = dict(zip(carried, prompt.run(carried, {"encoder_hidden_states": x["encoder_hidden_states"]})))
    step = basic(out).run(None, {"hidden_states": x["hidden_states"], "timestep": x["timestep"], **values})[0]
    np.testing.assert_array_equal(step, basic(model).run(None, x)[0])
