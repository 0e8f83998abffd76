"""Image sizes on the device: resolution binning as diffusers' PixArt pipelines do it (``use_resolution_binning``),
in numpy (no torch).

diffusers (``PixArtSigmaPipeline.__call__`` with ``use_resolution_binning=True``):

1. ``PixArtImageProcessor.classify_height_width_bin(height, width, ratios)``: ``ar = height / width``; the bin is the
   table entry whose ratio key is closest, ``min(ratios, key=lambda r: abs(float(r) - ar))`` (the first in table
   order on a tie);
2. generate at the bin's (height, width);
3. ``PixArtImageProcessor.resize_and_crop_tensor(image, width, height)`` on the decoded float image (in [-1, 1],
   before the uint8 conversion): ``ratio = max(height / H, width / W)``, resize to ``(int(H * ratio),
   int(W * ratio))`` with ``F.interpolate(mode="bilinear", align_corners=False)`` (no antialiasing), then center crop
   from ``((H' - height) // 2, (W' - width) // 2)``.

Here the table is the bundle's sizes, each with its ratio key (``aspect_ratio`` in ``bundle.json``: diffusers' key
for a size of its table, else height / width). `closest_size` is rule 1 plus two cases diffusers' tables never
have: a requested size the bundle holds is used as is (every entry of diffusers' tables bins to itself), and among
bundled sizes with the same ratio key the one whose pixel count is closest to the request wins (the first listed on a
tie). `resize_and_crop` is rule 3 in float32 numpy (torch's bilinear rule: source coordinate
``max(scale * (dst + 0.5) - 0.5, 0)`` with ``scale = in / out`` in float32 and the coordinate rounded to float32
once, neighbours ``floor`` and ``min(floor + 1, in - 1)``, weights ``1 - frac`` and ``frac``: torch's weights bit for
bit; the sums differ from torch's in float rounding only).
Pillow's bilinear resize is not used: it antialiases when shrinking, torch's does not. Where float rounding would
make ``int(W * ratio)`` one pixel short of the requested side (diffusers would then return a smaller image), the
side is the requested one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def closest_size(width: int, height: int, sizes: Sequence[tuple[int, int]],
                 ratios: Sequence[float] | None = None) -> tuple[int, int]:
    """The (width, height) of `sizes` that resolution binning generates a `width` x `height` image at (module
    docstring); `ratios`: each size's ratio key (default height / width)."""
    sizes = [(int(w), int(h)) for w, h in sizes]
    if not sizes:
        raise ValueError("no sizes to choose from")
    if (width, height) in sizes:
        return width, height
    keys = [h / w for w, h in sizes] if ratios is None else [float(r) for r in ratios]
    ar = float(height / width)
    best = min(keys, key=lambda key: abs(key - ar))
    same = [size for size, key in zip(sizes, keys) if key == best]
    return min(same, key=lambda size: abs(size[0] * size[1] - width * height))


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torch's bilinear (align_corners=False) source indices and weights along one axis, float32."""
    scale = np.float64(np.float32(n_in) / np.float32(n_out))  # float32, as torch's; the source index is rounded
    src = (scale * (np.arange(n_out) + 0.5) - 0.5).astype(np.float32)  # once (torch's fused multiply-add): its
    src = np.maximum(src, np.float32(0))  # weights bit for bit
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, (np.float32(1) - w1).astype(np.float32), w1


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """[N, C, H, W] float -> [N, C, height, width] float32: ``F.interpolate(mode="bilinear", align_corners=False)``."""
    x = np.asarray(image, dtype=np.float32)
    if x.shape[2] != height:
        i0, i1, w0, w1 = _linear_taps(x.shape[2], height)
        x = x[:, :, i0, :] * w0[:, None] + x[:, :, i1, :] * w1[:, None]
    if x.shape[3] != width:
        i0, i1, w0, w1 = _linear_taps(x.shape[3], width)
        x = x[:, :, :, i0] * w0 + x[:, :, :, i1] * w1
    return x


def resize_and_crop(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """diffusers' ``resize_and_crop_tensor(image, width, height)`` on [N, C, H, W] (module docstring): scale by
    ``max(height / H, width / W)`` (bilinear), then center crop to `height` x `width`."""
    orig_height, orig_width = image.shape[2], image.shape[3]
    if (orig_height, orig_width) == (height, width):
        return image
    ratio = max(height / orig_height, width / orig_width)
    resized_width = max(int(orig_width * ratio), width)
    resized_height = max(int(orig_height * ratio), height)
    x = resize_bilinear(image, resized_height, resized_width)
    top = (resized_height - height) // 2
    left = (resized_width - width) // 2
    return x[:, :, top:top + height, left:left + width]
