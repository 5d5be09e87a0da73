"""Filters: each drops by its own counted reason; dedup is job-wide, idempotent and catches near copies."""

import io

from PIL import Image, ImageDraw

from pipeline import filters as F


def test_size_and_aspect_filters_count_by_reason():
    size, aspect = F.ImageSizeFilter(min_side=64, max_side=1000, min_pixels=10_000), F.AspectRatioFilter(3.0)
    assert size({"width": 32, "height": 500}) == "image_too_small"
    assert size({"width": 2000, "height": 500}) == "image_too_large"
    assert size({"width": 64, "height": 100}) == "too_few_pixels"
    assert size({"width": 200, "height": 200}) is None
    assert aspect({"width": 400, "height": 100}) == "aspect_ratio" and aspect({"width": 300, "height": 100}) is None
    assert size.counts == {"image_too_small": 1, "image_too_large": 1, "too_few_pixels": 1}


def test_caption_filter_handles_empty_short_long_and_non_utf8():
    f = F.CaptionFilter(min_chars=3, max_chars=10)
    assert [f({"caption": c}) for c in (None, "  ", "ab", "x" * 11, b"\xff\xfe", "a cat", "ü cat".encode())] == [
        "caption_empty", "caption_empty", "caption_too_short", "caption_too_long", "caption_not_utf8", None, None]
    assert sum(f.counts.values()) == 5


def test_metadata_filter_thresholds_and_missing():
    f = F.MetadataFilter("punsafe", max=0.5)
    assert f({"punsafe": 0.9}) == "punsafe_above_max" and f({"punsafe": None}) == "punsafe_missing"
    assert f({"punsafe": 0.1}) is None
    assert F.MetadataFilter("aesthetic", min=5)({"aesthetic": 4.9}) == "aesthetic_below_min"


def test_language_filter_by_column_and_by_script():
    assert F.LanguageFilter(["en"])({"caption": "a red circle"}) is None
    assert F.LanguageFilter(["en"])({"caption": "红色的圆形"}) == "language"
    assert F.LanguageFilter(["zh"], column="LANGUAGE")({"LANGUAGE": "zh", "caption": "x"}) is None


def _jpeg(img):
    b = io.BytesIO()
    img.save(b, "JPEG", quality=90)
    return b.getvalue()


def _scene(shift=0, colour="red"):
    img = Image.new("RGB", (128, 128), "white")
    ImageDraw.Draw(img).ellipse([20 + shift, 30, 90 + shift, 100], fill=colour)
    return img


def test_dhash_is_close_for_a_reencoded_copy_and_far_for_another_image():
    a = F.dhash_bytes(_jpeg(_scene()))
    b = F.dhash(_scene().resize((100, 100)))
    c = F.dhash_bytes(_jpeg(_scene(shift=30)))
    assert bin(a ^ b).count("1") <= 4 < bin(a ^ c).count("1")


def test_dedup_index_exact_near_and_idempotent_claims():
    idx = F.DedupIndex(max_distance=4)
    h = F.dhash(_scene())
    assert idx.claim("r1", "sha-a", h) is None
    assert idx.claim("r2", "sha-a", F.dhash(_scene(shift=30))) == ("duplicate_exact", "r1")
    assert idx.claim("r3", "sha-b", h ^ 0b101) == ("duplicate_near", "r1")
    assert idx.claim("r1", "sha-a", h) is None  # a retried attempt of the keeper stays the keeper
    assert idx.claim("r3", "sha-b", h ^ 0b101) == ("duplicate_near", "r1")
    assert idx.claim("r4", "sha-c", h ^ 0b111111) is None  # 6 bits away: distinct
