"""Text to image on the device from a bundle folder (`hn-export bundle`): onnxruntime, numpy, ``tokenizers`` and
Pillow only (no torch, diffusers or transformers: tests/test_runtime_no_torch.py blocks them).

    from runtime.pipeline import TextToImage
    pipe = TextToImage("bundle/")                      # reads bundle.json, checks every file's size and sha256
    result = pipe("a red fox in the snow", seed=0)     # steps, guidance, size: the bundle's defaults
    result.image.save("fox.png")

What a call does (PixArtSigmaPipeline's steps, in numpy; a Stable Diffusion 3 bundle encodes the prompt with its
two CLIP encoders and T5 instead, `runtime.pipeline_sd3_text`, feeds ``pooled_projections`` too, and its VAE graph
adds the latents' ``shift_factor``: StableDiffusion3Pipeline's steps):

1. tokenize (``tokenizers.Tokenizer`` from ``tokenizer.json``): the prompt ``.lower().strip()`` as diffusers does
   with ``clean_caption=False``, at most ``max_sequence_length`` tokens with ``</s>`` kept last; a longer prompt is
   truncated with a warning naming what was cut, as diffusers warns.
2. encode prompt and negative prompt with the text encoder session, then free it (the encoder is never held
   together with the transformer). Only the real tokens are encoded and passed on: diffusers pads to
   ``max_sequence_length`` and masks the padding (T5's mask adds the float minimum, the transformer's cross-attention
   mask -10000: the padded keys' softmax weights are exactly 0 in float32), so the unpadded tokens give the same
   numbers without the padding's cost (``pad=True`` runs the padded encoder, for checks).
3. denoise: starting latents ``torch_randn(shape, seed)`` (torch's CPU generator, bit for bit: the same seed gives
   diffusers' starting latents) times the scheduler's ``init_noise_sigma``, or ``latents=`` given; per step one
   transformer call on the pair (negative, prompt) as batch 2 when both have the same token count, else two batch-1
   calls; guidance ``u + g (c - u)``; the learned-sigma half dropped; the numpy scheduler of
   ``scheduler_config.json`` (`runtime.schedulers.scheduler_from_config`). A callback per step may stop the run.
4. decode with the VAE decoder session (tiled like diffusers' ``enable_tiling`` when the latent is larger than the
   bundle's tile), to uint8 and a PIL image.

Sizes (`plan_size`): ``width`` x ``height`` (default: the bundle's default size) runs the bundled transformer of
that size. A size the bundle does not hold is, with ``resolution_binning=True`` (the default, as diffusers'
``use_resolution_binning``), generated at the bundled size of the closest aspect ratio (diffusers'
``classify_height_width_bin`` over the bundle's sizes) and the decoded image resized bilinearly and center-cropped
to the requested size (diffusers' ``resize_and_crop_tensor``), both in `runtime.pipeline_sizes`; the run logs it
and `Generation.settings` says so (``generated_width``/``generated_height``, ``resolution_binning``). With
``resolution_binning=False`` it is an error naming the bundled sizes.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.bundle_manifest import Manifest, load_manifest, verify_files
from runtime.errors import RuntimeInputError
from runtime.pipeline_decode import tile_count, tiled_decode, to_uint8
from runtime.pipeline_sizes import closest_size, resize_and_crop
from runtime.pipeline_stats import StageStat, StageTimer

logger = logging.getLogger(__name__)

# bundles whose loop this module runs: PixArt-Sigma (T5 text, learned sigma dropped) and Stable Diffusion 3 (two CLIP
# encoders and T5, pooled projections; runtime.pipeline_sd3_text); both with the CFG pair
FAMILIES = ("pixart-sigma", "sd3")
MAX_IMAGE_SIDE = 16384  # the largest requested width or height (resolution binning resizes to it)
# Sizes of the 1024 px class and up (about 1 M pixels and more: PixArt-Sigma's and SD3's 4096 latent tokens) run the
# denoiser with onnxruntime's arena shrunk after every call (Denoiser(shrink_arena=True)) unless TextToImage is told
# otherwise: there a kept arena grows on the second call, past what a device has to spare (PixArt-Sigma's 28 blocks
# at 1024 px: peak 1068 MB the first call, 1620 MB from the second; shrunk 1075 MB, calls 9.2 s against 9.6), and
# faulting the arena in again every call is small against a call that long (2 of the 28 blocks: 751 -> 886 ms for
# 913 -> 602 MB). Smaller sizes keep it (256 px, 4 blocks: 56-58 -> 74-75 ms a call shrunk, for 15-16 MB).
# Measured with `python benchmarks/call_memory.py MODEL --arena keep|shrink` (benchmarks/peers/README.md).
SHRINK_ARENA_MIN_PIXELS = 768 * 1024
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32}


def shrinks_arena(width: int, height: int) -> bool:
    """Whether a width x height generation runs its denoiser with the arena shrunk after every call."""
    return width * height >= SHRINK_ARENA_MIN_PIXELS


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What a step callback sees: step index (0-based), step count, the timestep and the latents after the step."""

    index: int
    total: int
    timestep: int | float
    latents: np.ndarray


StepCallback = Callable[[StepInfo], Any]  # a truthy return value stops the run


@dataclasses.dataclass
class Generation:
    image: Any  # PIL.Image.Image, or None when stopped early or output_type="latent"/"np"
    array: np.ndarray | None  # [H, W, 3] uint8 (None when stopped early or output_type="latent")
    latents: np.ndarray  # [1, C, h, w] after the last step run
    settings: dict[str, Any]
    stopped: bool = False
    stages: list[StageStat] = dataclasses.field(default_factory=list)
    truncated: list[str] = dataclasses.field(default_factory=list)  # text cut from over-long prompts


@dataclasses.dataclass(frozen=True)
class SizePlan:
    """The image size asked for and the bundled size generated at (equal unless resolution binning chose a bin)."""

    width: int
    height: int
    generate_width: int
    generate_height: int

    @property
    def binned(self) -> bool:
        return (self.width, self.height) != (self.generate_width, self.generate_height)

    def describe(self) -> str:
        """One line saying what resolution binning did (empty when it did nothing)."""
        if not self.binned:
            return ""
        return (f"generated at {self.generate_width}x{self.generate_height} (the bundled size of the closest aspect "
                f"ratio), resized bilinearly and center-cropped to {self.width}x{self.height}")


@dataclasses.dataclass(frozen=True)
class EncodedText:
    ids: np.ndarray  # [n] int64, </s> last
    embeddings: np.ndarray  # [1, n, width] float32 (the real tokens only)
    truncated: str | None  # the text cut off, or None


class TextToImage:
    """A bundle folder ready to generate; sessions are created per stage and freed after it."""

    def __init__(self, bundle: str | os.PathLike, *, verify: bool = True, provider: str | None = None,
                 threads: int | None = None, kernel_library: bool | str | os.PathLike | None = True,
                 progress: bool = True, shrink_arena: bool | None = None):
        """`verify`: check every file's sha256 (sizes are always checked). `kernel_library`: the hadanorm kernels
        for ``fused`` transformers (True: the built library when there is one, else their function bodies).
        `shrink_arena`: return onnxruntime's arena after every denoiser call (`Denoiser(shrink_arena=True)`); None:
        from about 1 M pixels (shrinks_arena)."""
        self.manifest: Manifest = load_manifest(bundle)
        if self.manifest.data.get("family") not in FAMILIES:
            raise RuntimeInputError(f"bundle {self.manifest.folder} is of family {self.manifest.data.get('family')!r}; "
                                    f"this runtime runs {', '.join(FAMILIES)} bundles")
        verify_files(self.manifest, hashes=verify)
        self.folder = self.manifest.folder
        self.provider, self.threads, self.kernel_library = provider, threads, kernel_library
        self.progress = progress
        self.shrink_arena = shrink_arena
        self.family = self.manifest.data["family"]
        self.max_length = int(self.manifest.text["max_sequence_length"])
        self._load_scheduler()
        if self.family == "sd3":  # three tokenizers, read by runtime.pipeline_sd3_text when encoding
            self.tokenizer = None
            return
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(self.manifest.path("tokenizer")))
        except Exception as exc:  # tokenizers raises a plain Exception for a bad file
            raise RuntimeInputError(f"bundle {self.folder}: tokenizer.json cannot be read ({str(exc)[:200]}); "
                                    "rebuild the bundle with `hn-export bundle`") from None
        self.tokenizer.no_padding()
        self._untruncated = Tokenizer.from_str(self.tokenizer.to_str())  # for the truncation warning's text
        self._untruncated.no_truncation()
        self.tokenizer.enable_truncation(self.max_length)

    def _load_scheduler(self) -> None:
        self.scheduler_config = json.loads(self.manifest.path("scheduler").read_text())
        from runtime.schedulers import SchedulerConfigError, scheduler_from_config

        try:
            scheduler_from_config(self.scheduler_config)
        except SchedulerConfigError as exc:
            raise RuntimeInputError(f"bundle {self.folder}: {exc}") from None

    # ------------------------------------------------------------------------------------------------ pieces
    @property
    def sizes(self) -> list[tuple[int, int]]:
        return self.manifest.sizes

    def _session(self, path: Path):
        from runtime.denoiser import choose_providers
        from runtime.session import create_session

        try:
            return create_session(path, providers=choose_providers(self.provider), threads=self.threads)
        except RuntimeInputError:
            raise
        except Exception as exc:  # onnxruntime's pybind error types
            first = (str(exc).strip().splitlines() or ["unknown error"])[0][:300]
            raise RuntimeInputError(f"onnxruntime cannot load {path}: {first}; rebuild the bundle") from None

    def tokenize(self, text: str) -> tuple[np.ndarray, str | None]:
        """Token ids (``</s>`` last, at most max_sequence_length) and the text truncation cut off (None if none)."""
        if self.manifest.text.get("preprocess") == "lower_strip":
            text = text.lower().strip()
        encoding = self.tokenizer.encode(text)
        removed = None
        if encoding.overflowing:  # diffusers' warning: the untruncated tokens from max_length - 1, less the last
            full = self._untruncated.encode(text).ids
            removed = self._untruncated.decode(full[self.max_length - 1:-1])
            logger.warning("The following part of your input was truncated because T5 can only handle sequences up "
                           "to %d tokens: %s", self.max_length, removed)
        return np.asarray(encoding.ids, dtype=np.int64), removed

    def conditioning(self, texts: Sequence[str]) -> tuple[list[dict[str, np.ndarray]], list[str]]:
        """The transformer's text inputs for `texts` (negative prompt first when guided), as groups of batched
        feeds (one group when every text has the same token count, else one per text), and the text truncation cut
        off. PixArt-Sigma: ``encoder_hidden_states`` of the real T5 tokens; SD3: ``encoder_hidden_states`` (CLIP +
        T5) and ``pooled_projections``."""
        if self.family == "sd3":
            from runtime.pipeline_sd3_text import encode_sd3

            encoded = encode_sd3(self.manifest, self._session, texts)
            group = {"encoder_hidden_states": np.concatenate([e.embeddings for e in encoded], axis=0),
                     "pooled_projections": np.concatenate([e.pooled for e in encoded], axis=0)}
            return [group], [e.truncated for e in encoded if e.truncated]
        encoded = self.encode(texts)
        states = [e.embeddings for e in encoded]
        groups = [states] if len({t.shape[1] for t in states}) == 1 else [[t] for t in states]
        return ([{"encoder_hidden_states": np.concatenate(g, axis=0)} for g in groups],
                [e.truncated for e in encoded if e.truncated])

    def encode(self, texts: Sequence[str], pad: bool = False) -> list[EncodedText]:
        """Run the text encoder on each text (one session, freed on return). `pad`: feed max_sequence_length tokens
        with the attention mask, as diffusers does (the real tokens' outputs are the same), and return the real
        tokens' rows. PixArt-Sigma bundles (SD3's: `conditioning`)."""
        if self.tokenizer is None:
            raise RuntimeInputError(f"encode() runs PixArt-Sigma's T5 text encoder; this is a {self.family} bundle "
                                    "(use conditioning())")
        session = self._session(self.manifest.path("text_encoder"))
        types = {i.name: _NP_TYPES.get(i.type, np.int64) for i in session.get_inputs()}
        out = []
        try:
            for text in texts:
                ids, removed = self.tokenize(text)
                n = len(ids)
                length = self.max_length if pad else n
                feed_ids = np.full((1, length), int(self.manifest.text.get("pad_token_id", 0)), dtype=np.int64)
                feed_ids[0, :n] = ids
                mask = np.zeros((1, length), dtype=np.int64)
                mask[0, :n] = 1
                feeds = {"input_ids": feed_ids.astype(types["input_ids"]),
                         "attention_mask": mask.astype(types["attention_mask"])}
                hidden = session.run(None, feeds)[0][:, :n].astype(np.float32)
                out.append(EncodedText(ids, hidden, removed))
        finally:
            del session
            gc.collect()
        return out

    def initial_latents(self, width: int, height: int, seed: int) -> np.ndarray:
        from runtime.seeded_noise import torch_randn

        factor = int(self.manifest.latent["vae_scale_factor"])
        shape = (1, int(self.manifest.latent["channels"]), height // factor, width // factor)
        return torch_randn(shape, seed).astype(np.float32)

    def decode(self, latents: np.ndarray, tile_latent_size: int | None = None,
               progress: bool | None = None) -> np.ndarray:
        """VAE decode [1, C, h, w] -> [1, 3, H, W] float in [-1, 1]; tiled when h or w exceeds the tile size (the
        bundle's, or `tile_latent_size`; 0 = never tile)."""
        tiling = self.manifest.data.get("vae_tiling") or {}
        tile = int(tiling.get("tile_latent_size", 0)) if tile_latent_size is None else int(tile_latent_size)
        session = self._session(self.manifest.path("vae_decoder"))
        name = session.get_inputs()[0].name

        def run(z: np.ndarray) -> np.ndarray:
            return session.run(None, {name: np.ascontiguousarray(z, dtype=np.float32)})[0]

        try:
            if tile and (latents.shape[2] > tile or latents.shape[3] > tile):
                factor = int(self.manifest.latent["vae_scale_factor"])
                overlap = float(tiling.get("overlap_factor", 0.25))
                sample = int(tiling.get("tile_sample_size", tile * factor)) if tile_latent_size is None \
                    else tile * factor
                from tqdm import tqdm

                with tqdm(total=tile_count(latents.shape[2], latents.shape[3], tile, overlap), desc="decode",
                          unit="tile", disable=not (self.progress if progress is None else progress),
                          file=sys.stderr, leave=False) as bar:
                    return tiled_decode(run, latents, tile, sample, overlap, on_tile=lambda: bar.update(1))
            return run(latents)
        finally:
            session = None  # freed (run() holds the name, not the session)
            gc.collect()

    def plan_size(self, width: int | None = None, height: int | None = None,
                  resolution_binning: bool = True) -> SizePlan:
        """The size a call generates at (module docstring): `width` x `height` (default: the bundle's default size)
        when bundled; else, with `resolution_binning`, the bundled size of the closest aspect ratio
        (`runtime.pipeline_sizes.closest_size`); else a `RuntimeInputError` naming the bundled sizes."""
        defaults = self.manifest.defaults
        width = width if width is not None else defaults.get("width", self.sizes[0][0])
        height = height if height is not None else defaults.get("height", self.sizes[0][1])
        for name, value in (("width", width), ("height", height)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_IMAGE_SIDE:
                raise RuntimeInputError(f"image {name} {value!r} is not a whole number of pixels from 1 to "
                                        f"{MAX_IMAGE_SIDE}; pass e.g. width={self.sizes[0][0]}")
        width, height = int(width), int(height)
        if self.manifest.has_size(width, height) or not resolution_binning:
            self.manifest.transformer_path(width, height)  # a size not in the bundle: one line naming those it has
            return SizePlan(width, height, width, height)
        gen_w, gen_h = closest_size(width, height, self.sizes, self.manifest.aspect_ratios)
        return SizePlan(width, height, gen_w, gen_h)

    # ------------------------------------------------------------------------------------------------ the run
    def __call__(self, prompt: str, negative_prompt: str | None = None, *, steps: int | None = None,
                 guidance_scale: float | None = None, seed: int = 0, width: int | None = None,
                 height: int | None = None, latents: np.ndarray | None = None,
                 callback: StepCallback | None = None, output_type: str = "pil",
                 tile_latent_size: int | None = None, resolution_binning: bool = True) -> Generation:
        """Generate one image. `latents`: starting noise [1, C, h, w] instead of the seed's (before
        ``init_noise_sigma``), at the size generated at (`plan_size`). `callback(StepInfo)` after every step; a
        truthy return stops the run (no image is decoded). `output_type`: ``pil`` (image and array), ``np`` (array
        only) or ``latent`` (no decode; the latents of the size generated at). `resolution_binning`: a size the
        bundle does not hold is generated at the closest aspect ratio's bundled size and resized (module
        docstring); False makes it an error."""
        from tqdm import tqdm

        from runtime.denoiser import Denoiser
        from runtime.schedulers import scheduler_from_config

        defaults = self.manifest.defaults
        negative_prompt = defaults.get("negative_prompt", "") if negative_prompt is None else negative_prompt
        steps = int(defaults["steps"] if steps is None else steps)
        guidance = float(defaults["guidance_scale"] if guidance_scale is None else guidance_scale)
        if steps < 1:
            raise RuntimeInputError(f"steps {steps} must be at least 1")
        if not np.isfinite(guidance):
            raise RuntimeInputError(f"guidance scale {guidance} is not a finite number")
        if output_type not in ("pil", "np", "latent"):
            raise RuntimeInputError(f"output_type {output_type!r} is not one of pil, np, latent")
        plan = self.plan_size(width, height, resolution_binning)
        width, height = plan.generate_width, plan.generate_height  # the transformer's size
        factor = int(self.manifest.latent["vae_scale_factor"])
        channels = int(self.manifest.latent["channels"])
        shape = (1, channels, height // factor, width // factor)
        if latents is not None:
            latents = np.asarray(latents, dtype=np.float32)
            if latents.shape != shape:
                raise RuntimeInputError(f"latents have shape {list(latents.shape)}; {width}x{height} takes "
                                        f"{list(shape)}")
        settings = {"prompt": prompt, "negative_prompt": negative_prompt, "steps": steps, "guidance_scale": guidance,
                    "seed": None if latents is not None else seed, "width": plan.width, "height": plan.height,
                    "generated_width": width, "generated_height": height,
                    "resolution_binning": plan.describe() or None,
                    "scheduler": self.scheduler_config.get("_class_name")}
        if plan.binned:
            logger.info("resolution binning: %dx%d is not in the bundle; %s", plan.width, plan.height,
                        plan.describe())
        timer = StageTimer()
        cfg = guidance > 1.0
        with timer.stage("text encoder"):
            groups, truncated = self.conditioning([negative_prompt, prompt] if cfg else [prompt])
        shrink = self.shrink_arena if self.shrink_arena is not None else shrinks_arena(width, height)
        if shrink:
            logger.info("denoiser: onnxruntime's arena returned after every call (%dx%d)", width, height)
        with timer.stage("denoise"):
            denoiser = Denoiser(self.manifest.transformer_path(width, height), provider=self.provider,
                                threads=self.threads, kernel_library=self.kernel_library,
                                shrink_arena=shrink)
            dtypes = {name: _NP_TYPES.get(spec.type, np.float32) for name, spec in denoiser.inputs.items()}
            scheduler = scheduler_from_config(self.scheduler_config)
            scheduler.set_timesteps(steps)
            if latents is None:
                latents = self.initial_latents(width, height, seed)
            x = (latents * np.float32(getattr(scheduler, "init_noise_sigma", 1.0))).astype(np.float32)
            stopped = False
            timesteps = list(scheduler.timesteps)
            with tqdm(total=len(timesteps), desc="denoise", unit="step", disable=not self.progress,
                      file=sys.stderr, leave=False) as bar:
                for index, t in enumerate(timesteps):
                    model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
                    outs = []
                    for key, group in enumerate(groups):
                        batch = len(group["encoder_hidden_states"])
                        feeds = {"hidden_states": np.repeat(model_input, batch, axis=0),
                                 "timestep": np.full((batch,), t), **group}
                        feeds = {k: v.astype(dtypes.get(k, np.float32)) for k, v in feeds.items()}
                        # the group's prompt feeds are the same at every step: a split transformer's prompt graph
                        # runs once per group, found by the key without comparing the caption (runtime.denoiser)
                        outs.append(np.asarray(denoiser(feeds, prompt_key=key), dtype=np.float32))
                    out = np.concatenate(outs, axis=0)
                    if cfg:
                        out = out[:1] + np.float32(guidance) * (out[1:] - out[:1])
                    if out.shape[1] == 2 * channels:  # learned sigma: the variance half is dropped
                        out = out[:, :channels]
                    x = scheduler.step(out, t, x).astype(np.float32)
                    bar.update(1)
                    if callback is not None and callback(StepInfo(index, len(timesteps), t, x)):
                        stopped = True
                        break
            del denoiser
            gc.collect()
        if stopped or output_type == "latent":
            return Generation(None, None, x, settings, stopped, timer.stages, truncated)
        with timer.stage("vae decoder"):
            image = self.decode(x, tile_latent_size)
        if plan.binned:
            image = resize_and_crop(image, plan.width, plan.height)
        array = to_uint8(image)[0]
        pil = None
        if output_type == "pil":
            from PIL import Image

            pil = Image.fromarray(array)
        return Generation(pil, array, x, settings, False, timer.stages, truncated)
