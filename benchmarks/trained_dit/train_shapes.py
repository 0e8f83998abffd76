"""Train a small PixArt-architecture DiT on generated shapes, here, in minutes: a model whose statistics come from
training, not planted (`--init dit-stats` plants DiT-like statistics into random weights; this does not).

    python benchmarks/trained_dit/train_shapes.py --out /tmp/shapes-dit [--minutes 10] [--seed 0]
    hn-export export --checkpoint /tmp/shapes-dit -o /tmp/shapes-dit.onnx

What it trains (everything seeded; the data is drawn from numpy, no download):

- Data: 16 x 16 "latents" with 4 channels, [-1, 1]: one shape (disc, square, triangle, ring) of one of 6 colours on a
  dark background with a soft vertical gradient; channels 0-2 the colour, channel 3 the shape's mask. Position and size
  are random per sample (64 image tokens with patch 2: small enough to train on 2 CPU cores in minutes).
- Caption: "a <size> <colour> <shape>" as 4 token ids, embedded by a fixed seeded table (vocabulary 16, width 64) and
  padded to `CAPTION_LENGTH` with a padding embedding: the T5 stand-in, fixed during training.
- Model: diffusers' `PixArtTransformer2DModel`, PixArt-Sigma's block (adaLN-single, self- and cross-attention, GELU
  tanh FFN), 4 heads x 72 = 288 wide (the Hadamard construction of the real 1152: H_36 (x) H_8), FFN 1152, `--layers`
  blocks (default 6), caption_channels 64, sample_size 16, learned sigma (out_channels 8; only the epsilon half is
  trained, as the pipelines drop the other half).
- Objective: DDPM epsilon prediction with PixArt's scheduler betas (linear 1e-4..0.02, 1000 steps), MSE on the
  epsilon half; classifier-free guidance dropout 10% (the caption replaced by all-padding); AdamW lr 3e-4, batch 32,
  bf16 autocast off (float32), as many steps as `--minutes` allow.

Writes ``OUT/transformer/`` (config.json + safetensors), ``OUT/scheduler/scheduler_config.json``
(DPMSolverMultistepScheduler with PixArt's settings), ``OUT/captions.npz`` (embeddings of a few fixed captions: the
denoising inputs of an evaluation) and ``OUT/training.json`` (steps, loss curve, wall time, machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np

CAPTION_LENGTH = 8
CAPTION_WIDTH = 64
VOCAB = ["<pad>", "a", "small", "large", "red", "green", "blue", "yellow", "cyan", "magenta", "disc", "square",
         "triangle", "ring", "</s>", "<unk>"]
COLOURS = {"red": (1.0, -0.6, -0.6), "green": (-0.6, 1.0, -0.6), "blue": (-0.6, -0.6, 1.0), "yellow": (1.0, 1.0, -0.6),
           "cyan": (-0.6, 1.0, 1.0), "magenta": (1.0, -0.6, 1.0)}
SHAPES = ("disc", "square", "triangle", "ring")
SIZE = 16  # latent height and width (patch 2: 64 image tokens)


def caption_ids(size: str, colour: str, shape: str) -> list[int]:
    words = ["a", size, colour, shape, "</s>"]
    ids = [VOCAB.index(w) for w in words]
    return ids + [0] * (CAPTION_LENGTH - len(ids))


def embedding_table(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 7)
    table = rng.standard_normal((len(VOCAB), CAPTION_WIDTH)).astype(np.float32) * 0.5
    table[0] = 0.0  # padding
    return table


def draw(rng: np.random.Generator, batch: int):
    """`batch` samples: latents [B, 4, 32, 32] float32 and caption ids [B, CAPTION_LENGTH]."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    latents = np.empty((batch, 4, SIZE, SIZE), np.float32)
    ids = np.empty((batch, CAPTION_LENGTH), np.int64)
    names = list(COLOURS)
    for b in range(batch):
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = names[rng.integers(len(names))]
        large = bool(rng.integers(2))
        r = SIZE * (rng.uniform(0.25, 0.37) if large else rng.uniform(0.13, 0.2))
        cx, cy = rng.uniform(r + 1, SIZE - r - 1, size=2)
        dx, dy = xx - cx, yy - cy
        if shape == "disc":
            mask = np.hypot(dx, dy) <= r
        elif shape == "ring":
            d = np.hypot(dx, dy)
            mask = (d <= r) & (d >= 0.55 * r)
        elif shape == "square":
            mask = (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
        else:  # triangle pointing up
            mask = (dy <= 0.8 * r) & (dy >= -r + 2.0 * np.abs(dx) * 0.9)
        background = -0.8 + 0.3 * (yy / SIZE)
        img = np.stack([np.where(mask, COLOURS[colour][c], background) for c in range(3)])
        latents[b, :3] = img
        latents[b, 3] = np.where(mask, 1.0, -1.0)
        ids[b] = caption_ids("large" if large else "small", colour, shape)
    return latents, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--max-steps", type=int, default=100000)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=4, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=args.layers,
        cross_attention_dim=288, sample_size=SIZE, patch_size=2, caption_channels=CAPTION_WIDTH,
        norm_type="ada_norm_single", activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        attention_bias=True, norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None,
        use_additional_conditions=False)
    table = torch.from_numpy(embedding_table(args.seed))
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas_bar = torch.cumprod(1.0 - betas, 0).float()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
    start = time.time()
    losses, step = [], 0
    model.train()
    while step < args.max_steps and time.time() - start < args.minutes * 60:
        x0, ids = draw(rng, args.batch)
        x0, ids = torch.from_numpy(x0), torch.from_numpy(ids)
        drop = torch.from_numpy(rng.random(args.batch) < 0.1)
        ids = torch.where(drop[:, None], torch.zeros_like(ids), ids)
        captions = table[ids]
        mask = (ids != 0).float()
        mask[:, 0] = 1.0  # at least one key (the all-padding caption of guidance)
        t = torch.from_numpy(rng.integers(0, 1000, args.batch))
        noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
        ab = alphas_bar[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        out = model(xt, encoder_hidden_states=captions, encoder_attention_mask=mask, timestep=t,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        loss = torch.nn.functional.mse_loss(out[:, :4], noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 50 == 0:
            print(f"step {step}  loss {np.mean(losses[-50:]):.4f}  {time.time() - start:.0f} s", flush=True)
    wall = time.time() - start

    out = args.out
    model.eval()
    model.save_pretrained(out / "transformer")
    scheduler = DPMSolverMultistepScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                            prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2,
                                            lower_order_final=True)
    scheduler.save_pretrained(out / "scheduler")
    names = list(COLOURS)
    fixed = [("large", names[i % 6], SHAPES[i % 4]) for i in range(8)]
    ids = np.array([caption_ids(*c) for c in fixed])
    np.savez(out / "captions.npz", captions=embedding_table(args.seed)[ids], mask=(ids != 0).astype(np.float32),
             text=np.array([" ".join(c) for c in fixed]))
    curve = [round(float(np.mean(losses[i:i + 50])), 5) for i in range(0, len(losses), 50)]
    (out / "training.json").write_text(json.dumps({
        "command": "python benchmarks/trained_dit/train_shapes.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "steps": step, "wall_s": round(wall, 1), "batch": args.batch, "layers": args.layers,
        "final_loss_50": curve[-1] if curve else None, "loss_every_50_steps": curve,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or
        platform.machine(), "cpus": os.cpu_count(), "statistics": "trained from scratch here; nothing planted"},
        indent=1) + "\n")
    print(f"trained {step} steps in {wall:.0f} s, loss {curve[-1] if curve else math.nan}; wrote {out}")


if __name__ == "__main__":
    main()
