"""VAE decoding on the device: whole, or tiled as diffusers' ``AutoencoderKL.tiled_decode`` (the same tiles, overlap
and linear blending, so a tiled image equals diffusers' with ``vae.enable_tiling()``), and the float image to uint8
as diffusers' image processor does it (``(x / 2 + 0.5).clip(0, 1)``, ``* 255``, round)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

DecodeFn = Callable[[np.ndarray], np.ndarray]  # latents [B, C, h, w] -> image [B, 3, f*h, f*w]


def _blend_v(a: np.ndarray, b: np.ndarray, extent: int) -> np.ndarray:
    extent = min(a.shape[2], b.shape[2], extent)
    for y in range(extent):
        w = np.float32(y / extent)
        b[:, :, y, :] = a[:, :, -extent + y, :] * (np.float32(1) - w) + b[:, :, y, :] * w
    return b


def _blend_h(a: np.ndarray, b: np.ndarray, extent: int) -> np.ndarray:
    extent = min(a.shape[3], b.shape[3], extent)
    for x in range(extent):
        w = np.float32(x / extent)
        b[:, :, :, x] = a[:, :, :, -extent + x] * (np.float32(1) - w) + b[:, :, :, x] * w
    return b


def tiled_decode(decode: DecodeFn, latents: np.ndarray, tile_latent: int, tile_sample: int,
                 overlap_factor: float = 0.25, on_tile: Callable[[], None] | None = None) -> np.ndarray:
    """diffusers' ``tiled_decode``: tiles of `tile_latent` latent pixels every ``tile_latent * (1 - overlap)``,
    each decoded alone; neighbours blended linearly over ``tile_sample * overlap`` image pixels. Only one tile is
    decoded at a time (peak memory of a `tile_latent` decode plus the image)."""
    stride = int(tile_latent * (1 - overlap_factor))
    extent = int(tile_sample * overlap_factor)
    limit = tile_sample - extent
    rows = []
    for i in range(0, latents.shape[2], stride):
        row = []
        for j in range(0, latents.shape[3], stride):
            row.append(np.array(decode(np.ascontiguousarray(latents[:, :, i:i + tile_latent, j:j + tile_latent])),
                                dtype=np.float32))
            if on_tile is not None:
                on_tile()
        rows.append(row)
    out_rows = []
    for i, row in enumerate(rows):
        out_row = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = _blend_v(rows[i - 1][j], tile, extent)
            if j > 0:
                tile = _blend_h(row[j - 1], tile, extent)
            out_row.append(tile[:, :, :limit, :limit])
        out_rows.append(np.concatenate(out_row, axis=3))
    return np.concatenate(out_rows, axis=2)


def tile_count(height: int, width: int, tile_latent: int, overlap_factor: float = 0.25) -> int:
    stride = int(tile_latent * (1 - overlap_factor))
    return len(range(0, height, stride)) * len(range(0, width, stride))


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8, as diffusers' ``postprocess(output_type="pil")``."""
    image = np.clip(image.astype(np.float32) / np.float32(2) + np.float32(0.5), 0, 1)
    return (image.transpose(0, 2, 3, 1) * np.float32(255)).round().astype(np.uint8)
