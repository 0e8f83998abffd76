"""What hn-export needs to know about one model family, in one object.

A `ModelFamily` describes a diffusers transformer class end to end:

- building: the diffusers class, presets (`Preset`: constructor keyword arguments at the real architecture), how
  ``--layers N`` and ``--sample-size S`` change a config, the ``--init dit-stats`` recipe (`plant_stats`);
- export: the graph inputs (`InputSpec`: name, dynamic axes), seeded example inputs, and how the forward is called
  with them (`forward`); the output is always ``sample``. The latent height and width are traced from the example
  inputs: the model's own square `latent_size` by default, or any (height, width) a family with `any_latent_hw`
  accepts (`example_inputs_at`);
- sites: the block lists and the role rules (`role_rules`) that name the activation sites of the linears inside a
  block (plain tuples: `graph_passes.site_roles.RoleTable` is built from them by `hn_export`);
- denoising (numpy in, numpy out, on the ONNX graph): the scheduler and its settings, seeded starting latents and
  conditioning (`conditions`), the feeds of one classifier-free-guidance call (`feeds`), and how the two halves of
  the output become the scheduler's model output (`guide`).

A family module (``models/families/<name>.py``) subclasses `ModelFamily`; `models.families.FAMILIES` is the registry.
Everything else in hn-export is family-agnostic. This module imports torch and diffusers lazily.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np

from models.errors import ModelInputError

# Names of dynamic axes (the same symbol in every input that has that axis).
BATCH = "batch"
CAPTION_LENGTH = "caption_length"


@dataclasses.dataclass(frozen=True)
class Preset:
    """Constructor keyword arguments of one architecture (seeded random weights)."""

    config: Mapping[str, Any]
    description: str

    def kwargs(self) -> dict[str, Any]:
        return dict(self.config)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One graph input: its name (the diffusers forward argument) and its dynamic axes {axis: symbol}. Inputs whose
    axis 0 is the ``batch`` symbol are the batched ones (the runtime reads that from the graph)."""

    name: str
    dynamic: Mapping[int, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Signature:
    """The inputs of an exported graph: name -> (shape with None for dynamic dims), and the float dtype."""

    family: str
    shapes: Mapping[str, tuple[int | None, ...]]
    dtypes: Mapping[str, np.dtype]
    batched: frozenset[str] = frozenset()  # inputs whose axis 0 is the batch (the runtime's rule)

    @property
    def dtype(self) -> np.dtype:
        if "hidden_states" in self.dtypes:
            return self.dtypes["hidden_states"]
        return next((d for d in self.dtypes.values() if np.issubdtype(d, np.floating)), np.dtype(np.float32))

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's ``hidden_states`` (without the batch axis)."""
        return tuple(int(d) for d in self.shapes["hidden_states"][1:])  # type: ignore[arg-type]

    @property
    def fixed_batch(self) -> int | None:
        return self.shapes["hidden_states"][0]

    @property
    def has_mask(self) -> bool:
        return "encoder_attention_mask" in self.shapes

    @property
    def caption_channels(self) -> int | None:
        shape = self.shapes.get("encoder_hidden_states")
        return None if shape is None else shape[-1]

    @property
    def fixed_caption_length(self) -> int | None:
        shape = self.shapes.get("encoder_hidden_states")
        return None if shape is None else shape[1]

    def dim(self, name: str, axis: int) -> int | None:
        return self.shapes[name][axis]


@dataclasses.dataclass(frozen=True)
class DenoiseSettings:
    """What one denoising run uses; `guidance_scale` None means the family's default."""

    steps: int = 20
    samples: int = 1
    guidance_scale: float | None = None
    seed: int = 0
    caption_length: int = 64


class ModelFamily:
    """Base class; see the module docstring. Subclasses set the class attributes and override what differs."""

    name: str = ""
    class_name: str = ""  # the diffusers model class, e.g. "PixArtTransformer2DModel"
    pipeline_class: str = ""  # the diffusers pipeline it drops into, e.g. "PixArtSigmaPipeline"
    description: str = ""
    demo_preset: str = ""  # what `hn-export demo --family NAME` builds (at reduced depth)
    presets: Mapping[str, Preset] = {}
    block_lists: tuple[str, ...] = ("transformer_blocks",)
    # (path inside a block, site group, role[, block list]); linears of one group that read one tensor are one site
    role_rules: tuple[tuple[str, ...], ...] = ()
    hadamard_widths: tuple[int, ...] = ()  # input widths of its sites at the real architecture (documentation/tests)
    layers_key: str = "num_layers"
    max_sample_size: int = 256
    # whether `example_inputs` takes ``latent_hw`` (traces any latent height and width the diffusers model runs at);
    # the other families export at their own square `latent_size` only
    any_latent_hw: bool = False
    max_latent_side: int | None = None  # the largest traced latent side (None: `max_sample_size`)
    guidance_scale: float = 4.5
    single_call_timestep: float = 500.0  # the timestep of one-call comparisons (`diff`, latency)
    scheduler_class: str = ""  # a diffusers scheduler, built from `scheduler_settings` by the default `scheduler`
    scheduler_settings: Mapping[str, Any] = {}
    graph_inputs: frozenset[str] = frozenset()  # the default `matches_inputs`: exactly these input names
    supports_mask: bool = False  # whether `--with-mask` (an encoder_attention_mask input) is offered
    attention_note: str = ""  # attention the fused-attention pass leaves alone (`hn-export layers` says so)
    # module-path patterns inside the blocks that stay in float unless --include names them (e.g. 1x1 skip convs)
    default_exclude: tuple[str, ...] = ()
    timestep_input: str = "timestep"  # the graph input that carries the timestep (per-timestep activation scales)

    # ---------------------------------------------------------------- building
    def accepts_config(self, class_name: str | None, cfg: Mapping[str, Any]) -> bool:
        """Whether a diffusers config (its ``_class_name`` and values) describes a model of this family."""
        return class_name == self.class_name

    def model_class(self):
        import diffusers

        return getattr(diffusers, self.class_name)

    def config_kwargs(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """The constructor keyword arguments found in a config dict."""
        params = set(inspect.signature(self.model_class().__init__).parameters) - {"self"}
        return {k: v for k, v in cfg.items() if k in params}

    def prepare_config(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Fill in or fix config values before building (e.g. explicit defaults)."""
        return kwargs

    def checkpoint_overrides(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """Keyword overrides for `from_pretrained` of a checkpoint with config `cfg`."""
        return {}

    def num_layers(self, cfg: Mapping[str, Any]) -> int:
        return int(cfg.get(self.layers_key, 1))

    def set_layers(self, kwargs: dict[str, Any], layers: int) -> None:
        kwargs[self.layers_key] = layers

    def truncate(self, model, layers: int) -> None:
        """Keep the first `layers` blocks of a loaded model (checkpoints)."""
        import torch

        blocks = getattr(model, self.block_lists[0])
        if layers < len(blocks):
            setattr(model, self.block_lists[0], torch.nn.ModuleList(list(blocks)[:layers]))
            model.register_to_config(**{self.layers_key: layers})

    def patch_size(self, cfg: Mapping[str, Any]) -> int:
        return int(cfg.get("patch_size", 2) or 1)

    def set_sample_size(self, kwargs: dict[str, Any], sample_size: int) -> None:
        kwargs["sample_size"] = sample_size

    def latent_size(self, model) -> int:
        """The latent height and width the model is exported at by default (its own square size)."""
        return int(model.config.sample_size)

    def check_latent_hw(self, model, latent_hw: tuple[int, int] | None) -> tuple[int, int]:
        """The latent (height, width) an export traces: `latent_hw`, or the model's own square `latent_size` when
        None. Raise `ModelInputError` for sides that are not positive multiples of the patch size or exceed
        `max_latent_side`, and for any size other than the own square one in a family without `any_latent_hw`."""
        own = self.latent_size(model)
        if latent_hw is None:
            return own, own
        height, width = (int(v) for v in latent_hw)
        if (height, width) == (own, own):
            return own, own
        if not self.any_latent_hw:
            raise ModelInputError(f"the {self.name} family exports at the model's own latent size {own}x{own}, not "
                                  f"{height}x{width} (height x width)",
                                  "export at the model's own size (set its sample size instead)")
        patch = self.patch_size(dict(model.config))
        limit = self.max_latent_side or self.max_sample_size
        if min(height, width) < patch or height % patch or width % patch or max(height, width) > limit:
            raise ModelInputError(f"latent size {height}x{width} (height x width) is not made of multiples of the "
                                  f"patch size {patch} between {patch} and {limit}",
                                  f"use latent sides that are multiples of {patch}, e.g. {own}x{own}")
        return height, width

    def check_model(self, model) -> None:
        """Raise `ModelInputError` for a built model the export cannot handle."""

    def plant_stats(self, model, seed: int, offsets: bool) -> None:
        """``--init dit-stats`` (offsets=True) / ``outliers`` (False): plant DiT-like activation statistics."""
        raise ModelInputError(f"--init dit-stats is not available for {self.name}", "pass --init plain")

    def block_linear_roles(self, model, convs: bool = False):
        """(module path, role, module) of every nn.Linear inside the blocks (with `convs`, also every ungrouped
        nn.Conv2d); role None where no rule names it. A block list that is one module (a UNet's ``mid_block``) has
        no index in its paths."""
        from torch import nn

        kinds = (nn.Linear, nn.Conv2d) if convs else (nn.Linear,)
        rules = {(r[0], r[3] if len(r) > 3 else None): r[2] for r in self.role_rules}
        for list_name in self.block_lists:
            container = getattr(model, list_name, None)
            if container is None:
                continue
            indexed = isinstance(container, nn.ModuleList)
            for index, block in enumerate(container if indexed else [container]):
                prefix = f"{list_name}.{index}" if indexed else list_name
                for inner, module in block.named_modules():
                    if isinstance(module, kinds) and getattr(module, "groups", 1) == 1:
                        role = rules.get((inner, list_name), rules.get((inner, None)))
                        yield f"{prefix}.{inner}", role, module

    # ---------------------------------------------------------------- export
    def input_specs(self, model, with_mask: bool) -> tuple[InputSpec, ...]:
        raise NotImplementedError

    def example_inputs(self, model, batch: int, caption_length: int, seed: int, dtype, with_mask: bool) -> dict:
        """Seeded random forward inputs (torch tensors) named as `input_specs`, at the model's own latent size. A
        family with `any_latent_hw` also takes ``latent_hw=(height, width)`` (checked by `check_latent_hw`)."""
        raise NotImplementedError

    def example_inputs_at(self, model, batch: int, caption_length: int, seed: int, dtype, with_mask: bool,
                          latent_hw: tuple[int, int] | None = None) -> dict:
        """`example_inputs` at latent (height, width) `latent_hw` (None: the model's own square size); what the
        export traces. Raises `ModelInputError` for a size the family cannot trace (`check_latent_hw`)."""
        height, width = self.check_latent_hw(model, latent_hw)
        if not self.any_latent_hw:
            return self.example_inputs(model, batch, caption_length, seed, dtype, with_mask)
        return self.example_inputs(model, batch, caption_length, seed, dtype, with_mask, latent_hw=(height, width))

    def forward(self, model, inputs: Mapping[str, Any]):
        """Call the diffusers model with graph-named inputs; returns the sample tensor."""
        return model(**inputs, return_dict=False)[0]

    def matches_inputs(self, names: set[str]) -> bool:
        """Whether an ONNX graph with these input names is a model of this family (graphs without metadata)."""
        return bool(self.graph_inputs) and names == self.graph_inputs

    # ---------------------------------------------------------------- denoising (numpy)
    def scheduler(self, steps: int, sig: Signature):
        """A diffusers scheduler with `set_timesteps(steps)` done (default: `scheduler_class(**scheduler_settings)`)."""
        import torch  # noqa: F401  (diffusers schedulers work on torch tensors)
        import diffusers

        scheduler = getattr(diffusers, self.scheduler_class)(**self.scheduler_settings)
        scheduler.set_timesteps(steps)
        return scheduler

    def conditions(self, sig: Signature, settings: DenoiseSettings, index: int) -> dict[str, np.ndarray]:
        """Seeded starting ``latents`` [1, ...] and the conditioning of one sample (unconditional + conditional)."""
        raise NotImplementedError

    def feeds(self, sig: Signature, latents: np.ndarray, timestep: float, cond: Mapping[str, np.ndarray]) -> dict:
        """Graph feeds of one call: the classifier-free-guidance pair (unconditional first)."""
        raise NotImplementedError

    def guide(self, out: np.ndarray, scale: float, sig: Signature) -> np.ndarray:
        """The scheduler's model output [1, ...] from the graph output of the pair (float64)."""
        channels = sig.latent_shape[0]
        out = out[:, :channels]  # a learned-sigma half is dropped, as the diffusers pipelines do
        uncond, text = out[0:1], out[1:2]
        return uncond + scale * (text - uncond)

    def check_input_arrays(self, sig: Signature, arrays: Mapping[str, np.ndarray]) -> None:
        """Check a ``--calib`` / ``--inputs`` file's values beyond shapes (raise `ModelInputError`); default: none."""

