"""Dynamic-resolution tiling against InternVL-1.5's own rule, and the generation resize + centre crop."""

import numpy as np
import pytest
from PIL import Image

from pipeline.tiling import TooSmallError, closest_grid, resize_center_crop, tile_image, to_images, to_pixels


def internvl_closest(width, height, max_num, image_size):
    """InternVL-1.5's `find_closest_aspect_ratio` + target ratio list, transcribed from its README code."""
    aspect_ratio = width / height
    target_ratios = sorted({(i, j) for n in range(1, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                            if 1 <= i * j <= max_num}, key=lambda x: x[0] * x[1])
    best_ratio_diff, best_ratio, area = float("inf"), (1, 1), width * height
    for ratio in target_ratios:
        ratio_diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if ratio_diff < best_ratio_diff:
            best_ratio_diff, best_ratio = ratio_diff, ratio
        elif ratio_diff == best_ratio_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best_ratio = ratio
    return best_ratio


@pytest.mark.parametrize("max_tiles", [1, 4, 6, 12])
def test_closest_grid_matches_internvl_over_a_sweep(max_tiles):
    for w in (40, 64, 100, 256, 300, 512, 777, 1024, 2000):
        for h in (40, 64, 128, 256, 333, 512, 1024, 1500):
            assert closest_grid(w, h, max_tiles, 512) == internvl_closest(w, h, max_tiles, 512), (w, h)


def test_grid_rules_by_example():
    assert closest_grid(256, 256, 6, 64) == (2, 2)  # tie between 1x1 and 2x2: the image is big enough for 2x2
    assert closest_grid(256, 256, 6, 512) == (1, 1)  # too small for 2x2 tiles of 512
    assert closest_grid(1024, 512, 6, 512) == (2, 1)  # (cols, rows)
    assert closest_grid(512, 1536, 6, 512) == (1, 3)


def test_tiles_are_raster_order_crops_plus_thumbnail():
    arr = np.zeros((128, 256, 3), np.uint8)
    arr[:, 128:, 0] = 255  # right half red
    t = tile_image(Image.fromarray(arr), 64, 8, thumbnail=True)  # 2:1 -> 4 cols x 2 rows (8 tiles)
    assert (t.rows, t.cols, t.thumbnail) == (2, 4, True)
    assert len(t.images) == 9 and all(im.size == (64, 64) for im in t.images)
    reds = [np.asarray(im)[..., 0].mean() > 200 for im in t.images[:8]]
    assert reds == [False, False, True, True, False, False, True, True]
    single = tile_image(Image.fromarray(arr[:64, :64]), 64, 6, thumbnail=True)
    assert (single.rows, single.cols, single.thumbnail, len(single.images)) == (1, 1, False, 1)


def test_resize_center_crop_keeps_the_centre():
    arr = np.zeros((200, 400, 3), np.uint8)
    arr[:, 100:300, 1] = 255  # green centre band, half the width
    out = resize_center_crop(Image.fromarray(arr), 64)
    assert out.size == (64, 64)
    assert np.asarray(out)[..., 1].mean() > 240  # the crop is the centre
    with pytest.raises(TooSmallError):
        resize_center_crop(Image.fromarray(arr[:20, :20]), 64, min_side=32)
    with pytest.raises(TooSmallError):
        tile_image(Image.fromarray(arr[:20]), 64, 6, False, min_side=32)


def test_pixel_range_round_trip():
    img = Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3))
    px = to_pixels([img])
    assert px.shape == (1, 3, 64, 64) and px.min() >= -1 and px.max() <= 1
    assert np.array_equal(np.asarray(to_images(px)[0]), np.asarray(img))
