"""Ingest filters: one small class each, called on one sample, returning the drop reason or None.

Row filters (caption, metadata, language) need only the URL-list row, so ingest runs them before
downloading; image filters (geometry) run on the downloaded image's size. A filter returns its reason; the
ingest shard task records it on the row (ledger `reason`), and the shard stats and the job summary count rows
by reason (`pipeline.ingest.shard_counts`), so counts and ledger always reconcile.
Duplicates across the whole job are decided by `pipeline.dedup` (exact sha256 + `dhash` perceptual hash).
"""

from __future__ import annotations

import collections
import io
import math
import unicodedata

import numpy as np
from PIL import Image


class ImageSizeFilter:
    """Drops images whose shorter side < min_side, longer side > max_side, or area < min_pixels."""

    def __init__(self, min_side: int = 0, max_side: int | None = None, min_pixels: int = 0):
        self.min_side, self.max_side, self.min_pixels = min_side, max_side, min_pixels

    def __call__(self, sample: dict) -> str | None:
        w, h = sample["width"], sample["height"]
        if min(w, h) < self.min_side:
            return "image_too_small"
        if self.max_side is not None and max(w, h) > self.max_side:
            return "image_too_large"
        if w * h < self.min_pixels:
            return "too_few_pixels"
        return None


class AspectRatioFilter:
    """Drops images whose long/short side ratio exceeds max_ratio."""

    def __init__(self, max_ratio: float):
        self.max_ratio = max_ratio

    def __call__(self, sample: dict) -> str | None:
        w, h = sample["width"], sample["height"]
        if max(w, h) > self.max_ratio * max(1, min(w, h)):
            return "aspect_ratio"
        return None


class CaptionFilter:
    """Drops rows whose caption is missing, not UTF-8, empty, or outside [min_chars, max_chars] after stripping."""

    def __init__(self, min_chars: int = 1, max_chars: int | None = None):
        self.min_chars, self.max_chars = min_chars, max_chars

    def __call__(self, sample: dict) -> str | None:
        cap = sample.get("caption")
        if isinstance(cap, bytes):
            try:
                cap = cap.decode("utf-8")
            except UnicodeDecodeError:
                return "caption_not_utf8"
        if cap is None or not str(cap).strip():
            return "caption_empty"
        n = len(str(cap).strip())
        if n < self.min_chars:
            return "caption_too_short"
        if self.max_chars is not None and n > self.max_chars:
            return "caption_too_long"
        return None


class MetadataFilter:
    """Drops rows whose numeric metadata column is missing or outside [min, max] (e.g. punsafe <= 0.5, aesthetic >= 5)."""

    def __init__(self, column: str, min: float | None = None, max: float | None = None):  # noqa: A002
        self.column, self.min, self.max = column, min, max

    def __call__(self, sample: dict) -> str | None:
        v = sample.get(self.column)
        try:
            v = float(v)
        except (TypeError, ValueError):
            return f"{self.column}_missing"
        if math.isnan(v):
            return f"{self.column}_missing"
        if self.min is not None and v < self.min:
            return f"{self.column}_below_min"
        if self.max is not None and v > self.max:
            return f"{self.column}_above_max"
        return None


# Scripts by the first letters of unicodedata names; enough to tell en/de/fr from zh/ja/ru/ar captions.
_SCRIPT_OF_LANGUAGE = {"en": "LATIN", "de": "LATIN", "fr": "LATIN", "es": "LATIN", "it": "LATIN", "pt": "LATIN",
                       "zh": "CJK", "ja": "CJK", "ko": "HANGUL", "ru": "CYRILLIC", "uk": "CYRILLIC", "ar": "ARABIC",
                       "el": "GREEK", "he": "HEBREW", "hi": "DEVANAGARI", "th": "THAI"}


def dominant_script(text: str) -> str | None:
    """The Unicode script most letters of `text` belong to (LATIN, CJK, CYRILLIC, ...), None without letters."""
    counts: collections.Counter[str] = collections.Counter()
    for ch in text:
        if not ch.isalpha():
            continue
        name = unicodedata.name(ch, "")
        script = name.split(" ")[0]
        if script in ("HIRAGANA", "KATAKANA"):
            script = "CJK"
        counts[script] += 1
    return counts.most_common(1)[0][0] if counts else None


class LanguageFilter:
    """Keeps rows in `languages`: by a language column when the URL list has one (LAION's `LANGUAGE`),
    else by the caption's dominant script (which cannot tell Latin-script languages apart)."""

    def __init__(self, languages: list[str], column: str | None = None):
        self.languages = {lang.lower() for lang in languages}
        self.column = column
        self.scripts = {_SCRIPT_OF_LANGUAGE.get(lang, lang.upper()) for lang in self.languages}

    def __call__(self, sample: dict) -> str | None:
        if self.column is not None:
            lang = sample.get(self.column)
            return None if lang is not None and str(lang).lower() in self.languages else "language"
        script = dominant_script(str(sample.get("caption") or ""))
        return None if script in self.scripts else "language"


def dhash(image: Image.Image, size: int = 8) -> int:
    """64-bit difference hash: sign of horizontal gradients on a (size+1) x size grey thumbnail."""
    g = np.asarray(image.convert("L").resize((size + 1, size), Image.Resampling.BILINEAR), dtype=np.int16)  # [8, 9]
    bits = (g[:, 1:] > g[:, :-1]).ravel()  # [64]
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def dhash_bytes(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as im:
        im.draft("L", (64, 64))  # JPEG: decode at reduced scale, the hash only needs a thumbnail
        return dhash(im)
