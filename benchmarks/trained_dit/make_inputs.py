"""Calibration and evaluation inputs for the shapes DiT (train_shapes.py) in its own caption vocabulary, for a graph
exported with ``--with-mask`` (static batch 2 = the guidance pair, caption length 120):

    python benchmarks/trained_dit/make_inputs.py --model-dir /tmp/shapes-dit --out /tmp/shapes-inputs

- ``calib.npz``: `--calib-pairs` (unconditional, conditional) pairs of training-distribution noisy latents
  x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps (x0 drawn as in training, t uniform over the 1000 training steps), the
  caption of x0 and the all-padding caption, padded to 120 with masks: the activations the model saw in training.
- ``eval.npz``: `--eval-pairs` pairs with fixed captions (other draws than calibration) and pure-noise latents at
  t = 999: the single call runs them as stored, the denoising loop takes each pair's captions for one sample.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from train_shapes import CAPTION_LENGTH, COLOURS, SHAPES, caption_ids, draw, embedding_table

GRAPH_CAPTION_LENGTH = 120  # hn-export export --with-mask


def pairs(ids: np.ndarray, latents: np.ndarray, timesteps: np.ndarray, table: np.ndarray) -> dict[str, np.ndarray]:
    n = ids.shape[0]
    rows = np.zeros((2 * n, GRAPH_CAPTION_LENGTH), np.int64)
    rows[1::2, :CAPTION_LENGTH] = ids
    mask = (rows != 0).astype(np.float32)
    mask[:, 0] = 1.0  # the all-padding caption keeps one key, as in training
    return {"hidden_states": np.repeat(latents, 2, axis=0).astype(np.float32),
            "timestep": np.repeat(timesteps, 2).astype(np.float32),
            "encoder_hidden_states": table[rows].astype(np.float32),
            "encoder_attention_mask": mask}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0, help="the training seed (the caption embedding table)")
    parser.add_argument("--calib-pairs", type=int, default=64)
    parser.add_argument("--eval-pairs", type=int, default=4)
    args = parser.parse_args()
    table = embedding_table(args.seed)
    rng = np.random.default_rng(1000 + args.seed)
    x0, ids = draw(rng, args.calib_pairs)
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    alphas_bar = np.cumprod(1.0 - betas)
    t = rng.integers(0, 1000, args.calib_pairs)
    ab = alphas_bar[t][:, None, None, None]
    xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * rng.standard_normal(x0.shape)
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / "calib.npz", **pairs(ids, xt, t, table))
    colours = list(COLOURS)
    fixed = np.array([caption_ids("large" if i % 2 else "small", colours[(i * 5 + 1) % 6], SHAPES[(i + 2) % 4])
                      for i in range(args.eval_pairs)])
    noise = rng.standard_normal((args.eval_pairs, *x0.shape[1:]))
    np.savez(args.out / "eval.npz", **pairs(fixed, noise, np.full(args.eval_pairs, 999), table))
    print(f"wrote {args.out}/calib.npz ({2 * args.calib_pairs} rows), {args.out}/eval.npz ({2 * args.eval_pairs} rows)")


if __name__ == "__main__":
    main()
