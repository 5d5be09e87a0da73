"""Image preprocessing before the VQ: InternVL-1.5 dynamic-resolution tiling (understanding) and
short-side resize + centre crop (generation). Pure functions over PIL images, defined once.

Tiling rule (InternVL-1.5 `dynamic_preprocess`): list the grids (cols, rows) with 1 <= cols*rows <= N,
take the one whose aspect ratio is closest to the image's; on a tie take the later (larger) grid when
the image area exceeds half of that grid's pixel area. Resize to (cols*S, rows*S), cut S x S tiles in
raster order, and append a whole-image S x S thumbnail when there is more than one tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

RESAMPLE = Image.BICUBIC


class TooSmallError(ValueError):
    """The image is smaller than the stage accepts (counted as a filter reason, never a crash)."""


@dataclass(frozen=True)
class Tiling:
    """The result of tiling one image: tiles in raster order, then the thumbnail when present."""

    images: list  # list[PIL.Image], each S x S
    rows: int
    cols: int
    thumbnail: bool


def candidate_grids(max_tiles: int, min_tiles: int = 1) -> list[tuple[int, int]]:
    """(cols, rows) grids with min_tiles <= cols*rows <= max_tiles, sorted by tile count (InternVL order)."""
    grids = {(i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
             if min_tiles <= i * j <= max_tiles}
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_grid(width: int, height: int, max_tiles: int, tile_size: int) -> tuple[int, int]:
    """InternVL-1.5's `find_closest_aspect_ratio`: the (cols, rows) grid for an image of this size."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    area = width * height
    for cols, rows in candidate_grids(max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def check_size(image: Image.Image, min_side: int) -> None:
    if min(image.size) < min_side:
        raise TooSmallError(f"image {image.size[0]}x{image.size[1]} has a side below {min_side} px")


def tile_image(image: Image.Image, tile_size: int, max_tiles: int, thumbnail: bool, min_side: int = 0) -> Tiling:
    """Dynamic-resolution tiling of one RGB image (understanding)."""
    check_size(image, min_side)
    w, h = image.size
    cols, rows = closest_grid(w, h, max_tiles, tile_size)
    resized = image.resize((cols * tile_size, rows * tile_size), RESAMPLE)
    tiles = [resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
             for r in range(rows) for c in range(cols)]
    thumb = thumbnail and len(tiles) > 1
    if thumb:
        tiles.append(image.resize((tile_size, tile_size), RESAMPLE))
    return Tiling(tiles, rows, cols, thumb)


def resize_center_crop(image: Image.Image, size: int, min_side: int = 0) -> Image.Image:
    """Generation: short side resized to `size`, long side centre-cropped to `size`."""
    check_size(image, min_side)
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    resized = image.resize((nw, nh), RESAMPLE if scale > 1 else Image.BOX)
    left, top = (nw - size) // 2, (nh - size) // 2
    return resized.crop((left, top, left + size, top + size))


def to_pixels(images: list):
    """PIL RGB images of one size -> [B, 3, H, W] float32 tensor in [-1, 1] (the VQ's input range)."""
    import torch  # lazily: decode/tile workers never need torch

    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])  # [B, H, W, 3]
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def to_images(pixels) -> list:
    """[B, 3, H, W] in [-1, 1] -> PIL RGB images."""
    arr = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, 3]
    return [Image.fromarray(a) for a in arr]


def psnr(a, b) -> float:
    """PSNR in dB between two pixel tensors in [-1, 1] (peak-to-peak 2)."""
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * float(np.log10(4.0 / mse))
