"""`hn-export bundle`: a local diffusers PixArt-Sigma or Stable Diffusion 3 pipeline folder (or a pipeline preset) ->
the folder a device needs to make images with onnxruntime, numpy and ``tokenizers`` only
(`runtime.pipeline.TextToImage`). SD3's three text encoders and tokenizers: `hn_export.bundle_sd3`; the layout below
is PixArt-Sigma's.

Bundle layout (`runtime.bundle_manifest` describes ``bundle.json``)::

    BUNDLE/bundle.json                  roles, bits, methods, sha256 and size of every file; versions; sizes; defaults
    BUNDLE/tokenizer.json               the checkpoint's spiece.model converted on the host (transformers)
    BUNDLE/text_encoder.onnx            T5 encoder, weight-only int8 (default) or int4 MatMulNBits, or float
    BUNDLE/transformer_WxH.onnx         one per --sizes entry: W4A4 (`fused` by default) or float (--no-quantize)
    BUNDLE/transformer_WxH.prompt.onnx  its prompt graph: what depends on the prompt alone, run once per prompt
                                        (`hn-export split-prompt`; --no-split-prompt: one whole graph per size)
    BUNDLE/vae_decoder.onnx             latents / scaling_factor -> post_quant_conv -> decoder (dynamic size)
    BUNDLE/scheduler_config.json        the checkpoint's scheduler/scheduler_config.json, byte for byte

Sizes (``--sizes``): PixArt's positional embedding is a constant of the exported graph (computed at trace time from
the latent height and width), so the bundle holds one transformer per requested size, square or not (``WxH``, W and
H multiples of VAE factor x patch = 16 px, at most 4096 px, diffusers' largest bin). Each is traced from the
checkpoint's model with its own config (base size and interpolation scale) at latent (H / 8, W / 8)
(`hn_export.export.export_transformer`'s ``latent_hw``): the embedding diffusers' pipeline computes when it runs the
same model at that size. ``--sizes bins`` bundles diffusers' aspect-ratio table for the checkpoint's sample size, the
table `PixArtSigmaPipeline` bins to (`aspect_ratio_bins`: sample size 32 / 64 / 128 / 256 -> ASPECT_RATIO_256_BIN /
512 / 1024 / 2048, 33 to 40 sizes). Each size entry of ``bundle.json`` carries its ``aspect_ratio``: the table's key
(a string such as ``"0.57"``, read as a number) when the size is an entry of that table, else height / width; the
runtime's resolution binning compares requested aspect ratios with these, as diffusers compares them with the
table's keys. The bundle's default size is the checkpoint's own square size when it is bundled, else the first.

Atomic: everything is written into a temporary folder beside ``-o`` and renamed into place at the end (an existing
bundle at ``-o`` is replaced only then); a failure, Ctrl-C or SIGTERM leaves nothing behind. The transformers are
quantized by the quantize job (`hn_export.quantize_job.run_quantize`) with the options given.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from hn_export import bundle_sd3
from hn_export.bundle_components import (DEFAULT_ENCODER_BITS, DEFAULT_ENCODER_BLOCK, check_encoder_options,
                                         convert_tokenizer, load_component, quantize_weights, read_json,
                                         text_encoder_graph, vae_decoder_graph)
from hn_export.errors import UserError
from hn_export.metadata_keys import BITS_KEY, FORMAT_KEY, METHOD_KEY, SIZE_KEY, SOURCE_KEY
from hn_export.model_files import save_model
from hn_export.quantize_job import QuantizeJob, run_quantize
from runtime.bundle_manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, BundleFile, sha256_file

logger = logging.getLogger(__name__)

# diffusers pipeline class -> family bundled
PIPELINES = {"PixArtSigmaPipeline": "pixart-sigma", "StableDiffusion3Pipeline": "sd3"}
COMPONENTS = ("text_encoder", "tokenizer", "transformer", "vae", "scheduler")  # PixArt-Sigma's
FAMILY_COMPONENTS = {"pixart-sigma": COMPONENTS, "sd3": bundle_sd3.COMPONENTS}
DEFAULT_MAX_SEQUENCE_LENGTH = 300  # PixArtSigmaPipeline's default
FAMILY_MAX_SEQUENCE_LENGTH = {"pixart-sigma": DEFAULT_MAX_SEQUENCE_LENGTH,
                              "sd3": bundle_sd3.DEFAULT_MAX_SEQUENCE_LENGTH}
DEFAULT_STEPS = 20
FAMILY_STEPS = {"pixart-sigma": DEFAULT_STEPS, "sd3": bundle_sd3.DEFAULT_STEPS}  # each pipeline's default


@dataclasses.dataclass(frozen=True)
class BundleJob:
    output: Path
    checkpoint: Path | None = None  # a local diffusers pipeline folder ...
    preset: str | None = None  # ... or a pipeline preset of models.pipelines (seeded weights)
    preset_seed: int = 0
    sizes: tuple[tuple[int, int], ...] = ()  # (width, height) in pixels; empty: the transformer's own size
    bins: bool = False  # --sizes bins: diffusers' aspect-ratio table of the checkpoint's sample size (sizes empty)
    quantize: QuantizeJob | None = None  # the transformer's quantize job (model_path/output are set per size)
    encoder_bits: int | None = DEFAULT_ENCODER_BITS  # None: float32
    encoder_block: int = DEFAULT_ENCODER_BLOCK
    max_sequence_length: int | None = None  # T5's tokens; None: the pipeline's default (PixArt 300, SD3 256)
    progress: bool = True
    split_prompt: bool = True  # each transformer as a step graph + prompt graph (`split_transformer`)


@dataclasses.dataclass
class BundleReport:
    output: Path
    files: list[BundleFile]
    sizes: list[tuple[int, int]]
    quantize_summaries: list[str]


SIZES_BINS = "bins"  # --sizes bins: diffusers' aspect-ratio table of the checkpoint's sample size
# PixArtSigmaPipeline.__call__'s choice: transformer sample size -> (module, table) of diffusers' aspect-ratio bins
BIN_TABLES = {256: ("pipeline_pixart_sigma", "ASPECT_RATIO_2048_BIN"),
              128: ("pipeline_pixart_alpha", "ASPECT_RATIO_1024_BIN"),
              64: ("pipeline_pixart_alpha", "ASPECT_RATIO_512_BIN"),
              32: ("pipeline_pixart_alpha", "ASPECT_RATIO_256_BIN")}


def parse_sizes(text: str | None) -> tuple[tuple[int, int], ...]:
    """``--sizes 512x512,1024`` -> ((512, 512), (1024, 1024)): WxH in pixels, or one number for a square
    (``--sizes bins`` is read by the CLI: `BundleJob.bins`)."""
    if text is None:
        return ()
    sizes = []
    for item in (part.strip() for part in text.split(",")):
        if item.lower() == SIZES_BINS:
            raise UserError(f"--sizes {text!r} mixes bins with sizes", "write --sizes bins alone, or list the sizes")
        w, sep, h = item.lower().partition("x")
        try:
            size = (int(w), int(h) if sep else int(w))
        except ValueError:
            raise UserError(f"--sizes entry {item!r} is not WIDTHxHEIGHT", "write e.g. --sizes 512x512,1024x1024") \
                from None
        if min(size) < 1:
            raise UserError(f"--sizes entry {item!r} is not positive", "write e.g. --sizes 512x512")
        if size not in sizes:
            sizes.append(size)
    if not sizes:
        raise UserError(f"--sizes {text!r} names no size", "write e.g. --sizes 512x512")
    return tuple(sizes)


# ------------------------------------------------------------------------------------------------- input checks
def check_pipeline_folder(folder: Path) -> dict[str, Any]:
    """A local diffusers pipeline folder of a bundled pipeline class; returns its model_index.json."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"checkpoint folder {folder} does not exist", "check the path")
    if not folder.is_dir():
        raise UserError(f"checkpoint {folder} is not a folder", "pass the diffusers pipeline folder (model_index.json, "
                        "text_encoder/, tokenizer/, transformer/, vae/, scheduler/)")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        hint = " (it is a transformer folder: bundle needs the whole pipeline)" if (folder / "config.json").is_file() \
            else ""
        raise UserError(f"checkpoint folder {folder} has no model_index.json{hint}",
                        "pass a diffusers pipeline folder (PixArtSigmaPipeline.save_pretrained writes one)")
    index = read_json(index_path, "pipeline index")
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise UserError(f"checkpoint {folder} is a {name or 'pipeline of unknown class'}; hn-export bundle supports "
                        f"{', '.join(PIPELINES)}", "pass a PixArt-Sigma or Stable Diffusion 3 pipeline folder")
    components = FAMILY_COMPONENTS[PIPELINES[name]]
    for component in components:
        if not (folder / component).is_dir():
            missing = "" if component != "text_encoder_3" else " (SD3 without T5 is not bundled)"
            raise UserError(f"checkpoint folder {folder} has no {component}/ folder{missing}",
                            f"copy the whole pipeline ({', '.join(c + '/' for c in components)})")
    scheduler = read_json(folder / "scheduler" / "scheduler_config.json", "scheduler config") \
        if (folder / "scheduler" / "scheduler_config.json").is_file() else None
    if scheduler is None:
        raise UserError(f"checkpoint folder {folder} has no scheduler/scheduler_config.json",
                        "copy it from the pipeline")
    from runtime.schedulers import SchedulerConfigError, scheduler_from_config

    try:
        scheduler_from_config(scheduler)
    except SchedulerConfigError as exc:
        raise UserError(f"scheduler in {folder}: {exc}", "the device runs runtime.schedulers' numpy schedulers: use "
                        "the pipeline's released scheduler settings") from None
    return index


def check_bundle_output(output: Path, *inputs: Path | None) -> None:
    """-o: a new folder, an empty one, or an existing bundle (replaced at the end); never an input, never inside
    one, never holding one."""
    output = Path(output)
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise UserError(f"-o {output} exists and is not a folder", "choose a new folder name for the bundle")
    if output.is_dir() and any(output.iterdir()) and not (output / MANIFEST_NAME).is_file():
        raise UserError(f"-o {output} is a folder that is not empty and holds no {MANIFEST_NAME}",
                        "choose a new folder name (an existing bundle is replaced, other folders are not)")
    target = output.resolve()
    for source in (Path(p).resolve() for p in inputs if p is not None):
        if target == source or target.is_relative_to(source) or source.is_relative_to(target):
            raise UserError(f"-o {output} overlaps the input {source}", "write the bundle to a folder of its own")
    parent = target.parent
    if not parent.is_dir():
        raise UserError(f"output folder {parent} does not exist", "create it or choose another path")
    if not os.access(parent, os.W_OK):
        raise UserError(f"output folder {parent} is not writable", "choose another path")


# ------------------------------------------------------------------------------------------------- loading
def _load_text_encoder(folder: Path, subfolder: str = "text_encoder"):
    try:
        from transformers import T5EncoderModel
    except ImportError:
        raise UserError("bundling the text encoder needs the transformers package",
                        "pip install 'hn-export[pipeline]'") from None
    import torch

    model = load_component("text encoder", folder, lambda: T5EncoderModel.from_pretrained(
        folder / subfolder, local_files_only=True, torch_dtype=torch.float32))
    return model.float().eval()


def _text_encoder(folder: Path, subfolder: str, bits: int | None, block: int) -> ir.Model:
    """The T5 text encoder's graph (``FOLDER/SUBFOLDER``), weight-only quantized when `bits` is set. A safetensors
    checkpoint is streamed a tensor at a time (`hn_export.encoder_stream`: the graph's weights are read, and
    quantized, only when it is saved; the same graph and weights as the loaded path, tested); any other is loaded
    whole into torch."""
    source = folder / subfolder
    if (source / "model.safetensors").is_file() or (source / "model.safetensors.index.json").is_file():
        from hn_export.encoder_stream import nbits_weights, stream_text_encoder_graph

        graph = stream_text_encoder_graph(folder, subfolder)
        return graph if bits is None else nbits_weights(graph, bits, block)
    encoder = _load_text_encoder(folder, subfolder)
    graph = text_encoder_graph(encoder)
    del encoder
    return graph if bits is None else quantize_weights(graph, bits, block)


def _load_vae(folder: Path):
    import torch
    from diffusers import AutoencoderKL

    return load_component("VAE", folder, lambda: AutoencoderKL.from_pretrained(
        folder / "vae", local_files_only=True, torch_dtype=torch.float32, low_cpu_mem_usage=False)).float().eval()


def _load_transformer(folder: Path, expected: str = "pixart-sigma"):
    from models.build import ModelSource, build_transformer
    from models.errors import ModelInputError

    try:
        model = build_transformer(ModelSource(checkpoint=folder))
    except ModelInputError as exc:
        raise UserError(exc.problem, exc.fix) from None
    from models.build import family_of_model

    family = family_of_model(model)
    if family.name != expected:
        raise UserError(f"the transformer in {folder} is a {family.name} model, not the {expected} model its "
                        "pipeline names", "pass a consistent pipeline folder")
    return model


def aspect_ratio_bins(sample_size: int) -> dict[str, tuple[int, int]]:
    """diffusers' aspect-ratio table that `PixArtSigmaPipeline` bins to for a transformer of this sample size
    (read from the installed diffusers): {ratio key (height / width to 2 decimals, a string): (height, width)} in the
    table's order (ascending ratio)."""
    if sample_size not in BIN_TABLES:
        raise UserError(f"--sizes bins: diffusers has no aspect-ratio table for sample size {sample_size} (it has "
                        f"{', '.join(str(s) for s in sorted(BIN_TABLES))}: 256 to 2048 px checkpoints)",
                        "list the sizes instead, e.g. --sizes 1024x768,768x1024")
    import importlib

    module, name = BIN_TABLES[sample_size]
    table = getattr(importlib.import_module(f"diffusers.pipelines.pixart_alpha.{module}"), name)
    return {str(key): (int(hw[0]), int(hw[1])) for key, hw in table.items()}


def _check_sizes(sizes: Sequence[tuple[int, int]], model, vae_scale: int) -> list[tuple[int, int]]:
    """(width, height) pixels: positive multiples of VAE factor x patch, latent sides at most the family's
    `max_latent_side` (PixArt: 512, 4096 px)."""
    from models.build import family_of_model

    patch = int(model.config.patch_size)
    own = int(model.config.sample_size) * vae_scale
    sizes = list(sizes) or [(own, own)]
    step = vae_scale * patch
    family = family_of_model(model)
    limit = (family.max_latent_side or family.max_sample_size) * vae_scale
    for width, height in sizes:
        if not family.any_latent_hw and (width, height) != (own, own):
            raise UserError(f"size {width}x{height}: the {family.name} transformer is exported at its own size only "
                            f"({own}x{own})", f"use --sizes {own}x{own} (or leave --sizes out)")
        if width % step or height % step:
            raise UserError(f"size {width}x{height} is not a multiple of {step} pixels (VAE factor {vae_scale} x "
                            f"patch {patch})", f"use multiples of {step}, e.g. {own}x{own}")
        if max(width, height) > limit:
            raise UserError(f"size {width}x{height} is larger than {limit} pixels on a side (latent "
                            f"{limit // vae_scale}, diffusers' largest aspect-ratio bin)",
                            f"use sides of at most {limit} pixels")
    return sizes


def _bin_sizes(model) -> list[tuple[int, int]]:
    """--sizes bins: the (width, height) of every entry of the checkpoint's aspect-ratio table, in its order."""
    return [(w, h) for h, w in aspect_ratio_bins(int(model.config.sample_size)).values()]


def _aspect_ratio(width: int, height: int, sample_size: int) -> float:
    """The ratio key resolution binning compares with: diffusers' table key when (width, height) is an entry of
    the checkpoint's table, else height / width."""
    if sample_size in BIN_TABLES:
        for key, hw in aspect_ratio_bins(sample_size).items():
            if hw == (height, width):
                return float(key)
    return height / width


# ------------------------------------------------------------------------------------------------- the job
def _entry(folder: Path, name: str, role: str, **fields) -> BundleFile:
    path = folder / name
    return BundleFile(name, role, sha256_file(path), path.stat().st_size, **fields)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    from hn_export import __version__

    versions = {"hn_export": __version__}
    for package in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "tokenizers"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return versions


def _graph_entries(folder: Path, written: list[Path], role: str, **fields) -> list[BundleFile]:
    """The entry of a graph and of its external data file, if it has one."""
    graph = written[0]
    entries = [_entry(folder, graph.name, role, **fields)]
    entries += [_entry(folder, p.name, "external_data", of=graph.name) for p in written[1:]]
    return entries


def split_transformer(staging: Path, name: str, written: list[Path], work: Path) -> tuple[list[Path], list[Path]]:
    """Cut the transformer `staging/name` into a step graph (same name) and a prompt graph (``*.prompt.onnx``) by
    `graph_passes.prompt_split` (PixArt: the caption projection and cross-attention K/V then run once per prompt, not
    once per step). A graph with nothing that depends on the prompt alone stays whole. Returns the files of the step
    graph and of the prompt graph (none when whole)."""
    from graph_passes.errors import GraphInputError
    from graph_passes.prompt_split import split_prompt_graph
    from hn_export.model_files import load_model
    from hn_export.split_files import save_split

    whole = work / "whole"
    whole.mkdir(exist_ok=True)
    moved = [whole / path.name for path in written]
    for path, target in zip(written, moved):
        os.replace(path, target)
    model = load_model(moved[0])
    try:
        split = split_prompt_graph(model)
    except GraphInputError as exc:
        logger.info("%s stays whole: %s", name, exc)
        for path, target in zip(written, moved):
            os.replace(target, path)
        return written, []
    step_files, prompt_files = save_split(split, staging / name)
    for target in moved:
        target.unlink()
    return step_files, prompt_files


def _transformer_method(path: Path) -> dict[str, Any]:
    import onnx

    meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    bits = meta.get(BITS_KEY, "float")
    if bits == "float":
        return {"bits": 32, "method": "float32"}
    return {"bits": bits, "method": meta.get(METHOD_KEY), "format": meta.get(FORMAT_KEY)}


def run_bundle(job: BundleJob) -> BundleReport:
    from tqdm import tqdm

    if (job.checkpoint is None) == (job.preset is None):
        raise UserError("give exactly one of --checkpoint DIR and --preset NAME", "pass one of them")
    if job.encoder_bits is not None:
        check_encoder_options(job.encoder_bits, job.encoder_block)
    if job.max_sequence_length is not None and job.max_sequence_length < 1:
        raise UserError(f"--max-sequence-length {job.max_sequence_length} must be positive", "use e.g. 300")
    if job.preset is not None:
        from models.pipeline_presets import check_pipeline_preset
        from models.errors import ModelInputError

        try:
            check_pipeline_preset(job.preset)
        except ModelInputError as exc:
            raise UserError(exc.problem, exc.fix) from None
    else:
        check_pipeline_folder(job.checkpoint)
    output = Path(job.output)
    check_bundle_output(output, job.checkpoint)
    sizes_n = max(len(job.sizes), 1)
    stages = 7 + sizes_n * (2 if job.quantize is not None else 1)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.hn-bundle-", dir=output.resolve().parent))
    try:
        staging = work / "bundle"
        staging.mkdir()
        with tqdm(total=stages, desc=f"bundle {output.name}", unit="stage", disable=not job.progress,
                  file=sys.stderr, bar_format="{desc}: {n_fmt}/{total_fmt} {postfix} [{elapsed}]") as bar:
            def stage(name: str) -> None:
                bar.set_postfix_str(name, refresh=True)

            report = _build(job, work, staging, stage, bar)
            stage("rename")
            _replace_folder(staging, output, work)
            bar.update(1)
            stage("done")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.output = output
    return report


def _replace_folder(staging: Path, output: Path, work: Path) -> None:
    try:
        if output.is_dir() and any(output.iterdir()):  # an older bundle (checked before the work started)
            old = work / "previous"
            os.replace(output, old)
            try:
                os.replace(staging, output)
            except OSError:
                os.replace(old, output)  # put the old bundle back
                raise
        else:
            os.replace(staging, output)
    except OSError as exc:
        raise UserError(f"could not write {output}: {exc.strerror}", "check free disk space and permissions") \
            from None


def _build(job: BundleJob, work: Path, staging: Path, stage, bar) -> BundleReport:
    if job.preset is not None:
        from models.pipeline_presets import write_preset_folder

        stage(f"build preset {job.preset}")
        folder = write_preset_folder(job.preset, work / "pipeline", seed=job.preset_seed)
        index = check_pipeline_folder(folder)
        source = f"pipeline preset {job.preset} (seed {job.preset_seed})"
    else:
        folder = Path(job.checkpoint)
        index = check_pipeline_folder(folder)
        source = f"checkpoint {folder.resolve().name}"
    bar.update(1)
    entries: list[BundleFile] = []
    family_name = PIPELINES[index["_class_name"]]
    sd3 = family_name == "sd3"
    max_length = job.max_sequence_length or FAMILY_MAX_SEQUENCE_LENGTH[family_name]

    stage("tokenizer")
    if sd3:
        token_entries, tokens = bundle_sd3.convert_tokenizers(folder, staging, _entry)
        entries += token_entries
    else:
        tokens = convert_tokenizer(folder / "tokenizer", staging / "tokenizer.json")
        entries.append(_entry(staging, "tokenizer.json", "tokenizer", method=f"converted from {tokens['class']}"))
    shutil.copyfile(folder / "scheduler" / "scheduler_config.json", staging / "scheduler_config.json")
    scheduler = json.loads((staging / "scheduler_config.json").read_text())
    entries.append(_entry(staging, "scheduler_config.json", "scheduler", method=scheduler["_class_name"]))
    bar.update(1)

    stage("load transformer")
    vae = _load_vae(folder)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    model = _load_transformer(folder, family_name)
    if job.bins and job.sizes:
        raise UserError("give --sizes bins or a list of sizes, not both", "write --sizes bins alone")
    sizes = _check_sizes(_bin_sizes(model) if job.bins else job.sizes, model, vae_scale)
    bar.total += (len(sizes) - max(len(job.sizes), 1)) * (2 if job.quantize is not None else 1)
    bar.refresh()
    if sd3:
        bundle_sd3.check_text_encoders(folder, model.config)
    elif int(model.config.caption_channels) != int(read_json(folder / "text_encoder" / "config.json",
                                                               "text encoder config").get("d_model", -1)):
        raise UserError(f"the text encoder's width in {folder} is not the transformer's caption_channels "
                        f"{model.config.caption_channels}", "pass a consistent pipeline folder")
    bar.update(1)
    summaries = []
    size_entries = []
    from hn_export.export import export_transformer

    own = int(model.config.sample_size)
    for width, height in sizes:
        name = f"transformer_{width}x{height}.onnx"
        stage(f"export {name}")
        fp_path = (work / name) if job.quantize is not None else (staging / name)
        written = export_transformer(model, fp_path, progress=False,
                                     latent_hw=(height // vae_scale, width // vae_scale),
                                     metadata={SOURCE_KEY: source, SIZE_KEY: f"{width}x{height}"})
        bar.update(1)
        if job.quantize is not None:
            stage(f"quantize {name}")
            qjob = dataclasses.replace(job.quantize, model_path=fp_path, output=staging / name,
                                       progress=job.progress)
            qreport = run_quantize(qjob)
            written = qreport.files
            summaries.append(f"{name}: {qreport.sites} activation sites, {qreport.linears} linears, "
                             f"calibration {qreport.calibration}, attention {qreport.attention}")
            for path in (fp_path, fp_path.with_name(fp_path.name + ".data")):
                path.unlink(missing_ok=True)
            bar.update(1)
        info = _transformer_method(staging / name)
        prompt_written: list[Path] = []
        if job.split_prompt:
            written, prompt_written = split_transformer(staging, name, written, work)
        entries += _graph_entries(staging, written, "transformer", width=width, height=height, **info)
        if prompt_written:
            entries += _graph_entries(staging, prompt_written, "transformer_prompt", of=name)
        size_entries.append({"width": width, "height": height, "latent_height": height // vae_scale,
                             "latent_width": width // vae_scale, "aspect_ratio": _aspect_ratio(width, height, own),
                             "transformer": name})
    transformer_cfg = dict(model.config)
    del model

    stage("text encoder")
    if sd3:
        entries += bundle_sd3.export_text_encoders(folder, staging, job.encoder_bits, job.encoder_block,
                                                   _text_encoder, save_model, _graph_entries)
    else:
        graph = _text_encoder(folder, "text_encoder", job.encoder_bits, job.encoder_block)
        method = "float32" if job.encoder_bits is None else \
            f"weight-only int{job.encoder_bits} (MatMulNBits, block {job.encoder_block}, symmetric)"
        written = save_model(graph, staging / "text_encoder.onnx")
        del graph
        entries += _graph_entries(staging, written, "text_encoder", bits=job.encoder_bits or 32, method=method)
    bar.update(1)

    stage("VAE decoder")
    written = save_model(vae_decoder_graph(vae), staging / "vae_decoder.onnx")
    entries += _graph_entries(staging, written, "vae_decoder", bits=32, method="float32")
    bar.update(1)

    stage(MANIFEST_NAME)
    from models.families import FAMILIES

    family = FAMILIES[family_name]
    latent_channels = int(transformer_cfg["in_channels"])
    default = (own * vae_scale,) * 2 if (own * vae_scale,) * 2 in sizes else sizes[0]
    text = {"max_sequence_length": max_length, "pad_token_id": tokens["pad_token_id"],
            "eos_token_id": tokens["eos_token_id"]}
    if sd3:
        text.update(preprocess="none", width=int(transformer_cfg["joint_attention_dim"]),
                    pooled_width=int(transformer_cfg["pooled_projection_dim"]), clip=tokens["clip"])
    else:
        text.update(preprocess="lower_strip", width=int(transformer_cfg["caption_channels"]))
    shift = getattr(vae.config, "shift_factor", None)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": family.name,
        "pipeline": index["_class_name"],
        "source": source,
        "versions": _versions(),
        "defaults": {"steps": FAMILY_STEPS[family_name], "guidance_scale": family.guidance_scale,
                     "negative_prompt": "", "width": default[0], "height": default[1]},
        "text": text,
        "latent": {"channels": latent_channels, "vae_scale_factor": vae_scale,
                   "scaling_factor": float(vae.config.scaling_factor),
                   **({"shift_factor": float(shift)} if shift else {}),
                   "learned_sigma": int(transformer_cfg["out_channels"]) == 2 * latent_channels},
        "vae_tiling": {"tile_latent_size": int(vae.tile_latent_min_size),
                       "tile_sample_size": int(vae.tile_sample_min_size), "overlap_factor": vae.tile_overlap_factor},
        "sizes": size_entries,
        "files": [e.to_json() for e in entries],
    }
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    bar.update(1)
    return BundleReport(Path(job.output), entries, sizes, summaries)
