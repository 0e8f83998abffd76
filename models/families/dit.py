"""DiT-XL/2 (diffusers `DiTTransformer2DModel` in `DiTPipeline`): class-conditional ImageNet 256 / 512.

- Architecture (facebook/DiT-XL-2-256 and -512, converted by diffusers' ``scripts/convert_dit_to_diffusers.py``):
  28 blocks, 16 heads x 72 = 1152 wide, FFN 4608 (GELU tanh), patch 2, latent [4, S, S] (S = pixels / 8: 32 or
  64), learned sigma (8 output channels: the second half is dropped), ``norm_type="ada_norm_zero"``, 1000 classes
  (+ the null class 1000 of classifier-free guidance), ``norm_eps`` 1e-5 (the released config leaves it at the
  default). The released config's ``_class_name`` is the legacy ``Transformer2DModel``.
- Blocks (``transformer_blocks.i``, `BasicTransformerBlock` with ``ada_norm_zero``): every block holds its own
  timestep + class embedder (``norm1.emb``: sinusoid of 256 channels -> ``timestep_embedder.linear_1`` -> SiLU ->
  ``linear_2``, plus ``class_embedder.embedding_table`` [1001, D]); the released checkpoint has the same embedder
  weights in every block. ``norm1.linear`` maps SiLU(t_emb + y_emb) [B, D] to the six adaLN-Zero rows (chunk
  order shift, scale, gate of the attention, then of the FFN). The output layer reuses block 0's embedder and
  ``proj_out_1`` (rows shift, scale). 7 activation sites per block (widths at XL/2):

  | site | linears | role | width |
  |---|---|---|---|
  | norm1.emb.timestep_embedder.linear_1 | linear_1 | time-embed in | 256 |
  | norm1.emb.timestep_embedder.linear_2 | linear_2 | time-embed hidden | 1152 |
  | norm1 | norm1.linear | adaLN in | 1152 |
  | attn1.qkv | attn1.to_q, to_k, to_v | self-attn in | 1152 |
  | attn1.out | attn1.to_out.0 | self-attn out | 1152 |
  | ff.in | ff.net.0.proj | ffn in | 1152 |
  | ff.out | ff.net.2 | ffn out | 4608 |

  The three embedding/adaLN sites read [B, D] (one token per sample: the calibration and the centering of HadaNorm
  treat the batch as the token axis there). The exporter writes those linears as ``Gemm``; hn-export's graph
  import rewrites them as MatMul + Add, so they are sites like the others.
- Graph inputs: ``hidden_states`` [B, 4, S, S] float, ``timestep`` [B] int64 (what `DiTPipeline` passes: the DDIM
  timesteps are integers; the model casts them to float for the sinusoid), ``class_labels`` [B] int64 (0..999, 1000
  = null class). B is dynamic; S is fixed at export.
- Denoising (`DiTPipeline`): `DDIMScheduler` with the released scheduler config (the conversion script's:
  1000 steps, linear betas 0.0001..0.02, epsilon prediction, ``clip_sample=False``, defaults otherwise: eta 0,
  ``set_alpha_to_one``, "leading" spacing), classifier-free guidance 4.0 with the null class 1000, applied to the
  first 4 (latent) output channels only; the learned-sigma half is then dropped. `DiTPipeline` batches (class,
  null); hn-export's pair is (null, class), unconditional first as for every family: the same arithmetic.
  Conditions: seeded latents and a seeded class label in 0..999 per sample.
- Two hooks beyond `ModelFamily` (for the registry and the input-file reader to call): `DiTFamily.accepts_config`
  (the released configs' legacy ``_class_name`` ``Transformer2DModel`` with ``norm_type="ada_norm_zero"`` is a DiT;
  `DiTTransformer2DModel.from_pretrained` loads it) and `DiTFamily.check_input_arrays` (a ``--calib`` / ``--inputs``
  file's timesteps and class labels are whole numbers in range: a label outside the embedding table fails inside
  onnxruntime's Gather).

``--init dit-stats`` (`DiTFamily.plant_stats`): the `models.planting` pieces on DiT's modules (see there for the
distributions): block embedders tied to block 0's (as in the released checkpoint); residual offsets and massive
channels into ``pos_embed.proj`` bias; q/k x 3; adaLN-Zero rows (shift, scale with outlier channels, gates of order 1)
as the bias of every ``norm1.linear`` with 0.1 x its weight; FFN up-projection bias and outlier rows; the output
layer's ``proj_out_1`` (shift, scale). ``--init outliers`` zeroes every planted mean offset (patch-embedding bias,
shift rows, FFN up bias).

Measured (``python -m models.dit_stats --preset P [--layers N] --batch 4``; model seed 0, inputs seed 1; roles as
above; mean spread / kurtosis / max-over-median absmax averaged over the linears of a role; block contribution = mean
relative output change when one block is bypassed), plain / dit-stats / outliers:

dit-tiny (72 wide, 2 blocks, 16 tokens):

| role | mean spread | kurtosis | max/median absmax |
|---|---|---|---|
| time-embed in | 1.43 / 1.43 / 1.43 | 1.93 / 1.93 / 1.93 | 1.05 / 1.05 / 1.05 |
| time-embed hidden | 1.36 / 1.47 / 1.47 | 4.84 / 6.15 / 6.15 | 4.03 / 5.21 / 5.21 |
| adaLN in | 0.64 / 0.67 / 0.67 | 5.11 / 5.36 / 5.36 | 3.33 / 3.25 / 3.25 |
| self-attn in | 0.71 / 3.50 / 1.00 | 3.59 / 27.87 / 53.16 | 1.84 / 11.98 / 11.90 |
| self-attn out | 1.74 / 2.67 / 0.79 | 2.55 / 2.60 / 3.22 | 2.01 / 2.06 / 1.93 |
| ffn in | 0.76 / 2.56 / 0.95 | 4.02 / 16.43 / 45.55 | 2.36 / 9.09 / 11.15 |
| ffn out | 0.72 / 2.57 / 0.87 | 6.04 / 35.22 / 104.44 | 2.48 / 14.70 / 10.81 |
| overall | 0.97 / 2.43 / 1.02 | 3.92 / 16.81 / 36.24 | 2.31 / 7.92 / 7.68 |
| block contribution | 0.142 / 0.899 / 0.726 | | |

dit-xl-2-256 with 2 layers (1152 wide, 256 tokens):

| role | mean spread | kurtosis | max/median absmax |
|---|---|---|---|
| time-embed in | 1.02 / 1.02 / 1.02 | 1.99 / 1.99 / 1.99 | 1.04 / 1.04 / 1.04 |
| time-embed hidden | 1.14 / 1.14 / 1.14 | 4.81 / 4.80 / 4.80 | 6.05 / 6.27 / 6.27 |
| adaLN in | 0.68 / 0.66 / 0.66 | 6.11 / 6.25 / 6.25 | 4.97 / 5.10 / 5.10 |
| self-attn in | 0.69 / 2.40 / 0.89 | 3.78 / 24.28 / 66.32 | 2.16 / 12.88 / 14.68 |
| self-attn out | 1.97 / 4.54 / 1.08 | 2.92 / 3.10 / 3.26 | 3.16 / 3.06 / 2.04 |
| ffn in | 0.69 / 2.88 / 1.00 | 3.73 / 75.14 / 62.93 | 2.29 / 16.42 / 13.54 |
| ffn out | 0.65 / 3.75 / 0.99 | 6.26 / 40.63 / 142.73 | 2.16 / 20.38 / 13.83 |
| overall | 0.91 / 2.36 / 0.95 | 4.13 / 22.75 / 46.77 | 2.90 / 10.10 / 9.54 |
| block contribution | 0.152 / 0.455 / 0.649 | | |

The embedding and adaLN inputs do not depend on the recipe (only the tie of the embedders changes them: their
statistics are over the batch, 4 samples). The planted roles reach the statistics of PixArt's recipe at the same
width (`models.dit_stats`: overall mean spread 2.48, kurtosis 21.96, outlier ratio 10.51, block contribution
0.405). Plain diffusers initialisation of DiT is not adaLN-Zero's zero init (the linear keeps its default init), so
plain blocks already contribute (0.15). Float16 stays finite on these weights (the fp16 export runs in
``benchmarks/run_family_methods.sh``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from models.errors import ModelInputError
from models.families.base import BATCH, DenoiseSettings, InputSpec, ModelFamily, Preset, Signature

NUM_CLASSES = 1000
NULL_CLASS = NUM_CLASSES  # the classifier-free-guidance "no class" label (DiTPipeline's class_null)

# scheduler/scheduler_config.json of facebook/DiT-XL-2-256 (and -512): DDIMScheduler as the conversion script makes it
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
    clip_sample=False,
)

XL2 = dict(
    num_layers=28,
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    patch_size=2,
    sample_size=32,
    attention_bias=True,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=NUM_CLASSES,
    norm_type="ada_norm_zero",
    norm_elementwise_affine=False,
    upcast_attention=False,
)
TINY = dict(XL2, num_layers=2, num_attention_heads=2, attention_head_dim=36, sample_size=8)

EMB = "norm1.emb.timestep_embedder"
ROLE_RULES = (
    (f"{EMB}.linear_1", f"{EMB}.linear_1", "time-embed in"),
    (f"{EMB}.linear_2", f"{EMB}.linear_2", "time-embed hidden"),
    ("norm1.linear", "norm1", "adaLN in"),
    ("attn1.to_q", "attn1.qkv", "self-attn in"),
    ("attn1.to_k", "attn1.qkv", "self-attn in"),
    ("attn1.to_v", "attn1.qkv", "self-attn in"),
    ("attn1.to_out.0", "attn1.out", "self-attn out"),
    ("ff.net.0.proj", "ff.in", "ffn in"),
    ("ff.net.2", "ff.out", "ffn out"),
)
INPUTS = ("hidden_states", "timestep", "class_labels")
LEGACY_CLASS_NAME = "Transformer2DModel"  # the _class_name of the released facebook/DiT-XL-2-* transformer configs


class DiTFamily(ModelFamily):
    name = "dit"
    class_name = "DiTTransformer2DModel"
    pipeline_class = "DiTPipeline"
    description = "DiT-XL/2 (DiTTransformer2DModel, class-conditional ImageNet, DDIM)"
    demo_preset = "dit-xl-2-256"
    presets = {
        "dit-xl-2-256": Preset(dict(XL2, sample_size=32), "DiT-XL/2, ImageNet 256 px (32x32 latent, 256 tokens)"),
        "dit-xl-2-512": Preset(dict(XL2, sample_size=64), "DiT-XL/2, ImageNet 512 px (64x64 latent, 1024 tokens)"),
        "dit-tiny": Preset(TINY, "test model: 2 blocks, 72 wide, 8x8 latent"),
    }
    role_rules = ROLE_RULES
    hadamard_widths = (256, 1152, 4608)
    max_sample_size = 128
    guidance_scale = 4.0  # DiTPipeline's default
    scheduler_class = "DDIMScheduler"
    scheduler_settings = SCHEDULER
    graph_inputs = frozenset(INPUTS)
    legacy_class_names = (LEGACY_CLASS_NAME,)

    # ---------------------------------------------------------------- building
    def accepts_config(self, class_name: str | None, cfg: Mapping[str, Any]) -> bool:
        """Whether a config is a DiT: its own class, or the legacy ``Transformer2DModel`` with adaLN-Zero and class
        embeddings (what the released checkpoints say; diffusers maps that config to `DiTTransformer2DModel`)."""
        if class_name == self.class_name:
            return True
        return (class_name in self.legacy_class_names and cfg.get("norm_type") == "ada_norm_zero"
                and cfg.get("num_embeds_ada_norm") is not None and cfg.get("patch_size") is not None)

    def plant_stats(self, model, seed: int, offsets: bool) -> None:
        """DiT-like statistics (see the module docstring); deterministic for `seed`, global RNG untouched."""
        import torch

        from models.planting import (
            modulation_rows,
            plant_adaln_linear,
            plant_ffn_up,
            plant_residual_offsets,
            planting_generator,
            sharpen_attention,
        )

        gen = planting_generator(seed)
        keep = 1.0 if offsets else 0.0  # multiplies every planted offset (draws unchanged: the same outliers)
        d = model.config.num_attention_heads * model.config.attention_head_dim
        blocks = list(model.transformer_blocks)
        with torch.no_grad():
            # The released checkpoint copies one timestep/class embedder into every block.
            for block in blocks[1:]:
                block.norm1.emb.load_state_dict(blocks[0].norm1.emb.state_dict())
            plant_residual_offsets(gen, model.pos_embed.proj.bias, keep)
            for block in blocks:
                sharpen_attention([block.attn1.to_q, block.attn1.to_k], 3.0)
                shift_msa, scale_msa, shift_mlp, scale_mlp, gate_msa, gate_mlp = modulation_rows(gen, d, keep)
                # AdaLayerNormZero chunk order: shift, scale, gate of the attention, then of the FFN
                plant_adaln_linear(block.norm1.linear, [shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp])
                plant_ffn_up(gen, block.ff.net[0].proj, keep)
            shift, scale, _gate = modulation_rows(gen, d, keep, pairs=1)
            plant_adaln_linear(model.proj_out_1, [shift, scale])  # DiT's output layer: shift, scale = chunk(2)

    # ---------------------------------------------------------------- export
    def input_specs(self, model, with_mask: bool) -> tuple[InputSpec, ...]:
        return tuple(InputSpec(name, {0: BATCH}) for name in INPUTS)

    def example_inputs(self, model, batch: int, caption_length: int, seed: int, dtype, with_mask: bool) -> dict:
        import torch

        cfg = model.config
        gen = torch.Generator().manual_seed(seed)
        s = self.latent_size(model)
        return {
            "hidden_states": torch.randn(batch, cfg.in_channels, s, s, generator=gen).to(dtype),
            "timestep": torch.randint(0, 1000, (batch,), generator=gen, dtype=torch.int64),
            "class_labels": torch.randint(0, NUM_CLASSES, (batch,), generator=gen, dtype=torch.int64),
        }

    # ---------------------------------------------------------------- denoising
    def conditions(self, sig: Signature, settings: DenoiseSettings, index: int) -> dict[str, np.ndarray]:
        """Seeded latents and a seeded class in 0..999; the pair's labels are (null class, class)."""
        rng = np.random.default_rng([settings.seed, index])
        latents = rng.standard_normal((1, *sig.latent_shape)).astype(np.float32)
        label = int(rng.integers(0, NUM_CLASSES))
        return {"latents": latents, "class_labels": np.array([NULL_CLASS, label], dtype=np.int64)}

    def feeds(self, sig: Signature, latents: np.ndarray, timestep: float, cond: Mapping[str, np.ndarray]) -> dict:
        labels = cond["class_labels"]
        batch = labels.shape[0]
        dtype = lambda name, default: np.dtype(sig.dtypes.get(name, default))  # noqa: E731
        t_dtype = dtype("timestep", np.int64)
        t = round(timestep) if np.issubdtype(t_dtype, np.integer) else timestep
        return {
            "hidden_states": np.repeat(latents, batch, axis=0).astype(dtype("hidden_states", sig.dtype)),
            "timestep": np.full((batch,), t, dtype=t_dtype),
            "class_labels": labels.astype(dtype("class_labels", np.int64)),
        }

    def check_input_arrays(self, sig: Signature, arrays: Mapping[str, np.ndarray]) -> None:
        """A ``--calib`` / ``--inputs`` file's timesteps and class labels: whole numbers, timesteps in 0..999, labels
        in 0..1000 (the embedding table has 1001 rows: a label outside it fails inside onnxruntime's Gather)."""
        ranges = (("timestep", 0, 999, "DDIM timesteps are 0..999"),
                  ("class_labels", 0, NULL_CLASS, f"ImageNet classes are 0..999, {NULL_CLASS} = no class"))
        for name, low, high, meaning in ranges:
            values = np.asarray(arrays.get(name, []))
            if not np.issubdtype(values.dtype, np.number) or values.size == 0:
                continue
            if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
                raise ModelInputError(f"{name} holds values that are not whole numbers",
                                      f"store whole numbers as int64 ({meaning})")
            bad = values[(values < low) | (values > high)]
            if bad.size:
                raise ModelInputError(f"{name} holds {bad.flat[0]:g}, outside {low}..{high}",
                                      f"pass values in {low}..{high} ({meaning})")

    def guide(self, out: np.ndarray, scale: float, sig: Signature) -> np.ndarray:
        """`DiTPipeline`: guidance on the latent channels (eps) only, then the learned-sigma half is dropped."""
        channels = sig.latent_shape[0]
        eps = np.asarray(out, dtype=np.float64)[:, :channels]
        uncond, cond = eps[0:1], eps[1:2]
        return uncond + scale * (cond - uncond)


DIT = DiTFamily()
