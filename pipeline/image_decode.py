"""Decoding a downloaded image into what a raw shard stores: upright 8-bit RGB JPEG, memory bounded.

`Normaliser` takes the place of img2dataset's `Resizer` in the shard task's `Downloader` (same call
contract). img2dataset's resizer decodes with OpenCV's IMREAD_UNCHANGED, which stores 16-bit PNGs pure
white (its JPEG encoder saturates uint16), ignores EXIF orientation (photos stored sideways, sizes
unrotated), and mattes alpha in float64 (8 bytes per channel: 5.4 GiB RSS for one 8192x8192 16-bit RGBA
PNG). Here Pillow reads the header first and checks it against a cap on DECODED bytes (width x height
x bytes per pixel, source bit depth included). Plain images (8-bit RGB or grey, opaque, upright: most of
the web) are then decoded and encoded by OpenCV exactly as img2dataset does (faster than Pillow); all
others by Pillow:
- EXIF orientation is applied (`original_width/height` are the upright size);
- 16-bit samples are scaled to 8 bits (65535 -> 255), never clipped;
- transparency is composited on white (as img2dataset does), palette and CMYK images become RGB.
The resizer runs one image at a time in the downloader's loop, so a worker's decode memory is bounded
by a small multiple of the cap (measured: tests/benchmarks/bench_decode_memory.py, README "Ingest").
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image, ImageOps

from pipeline import netguard

# Bytes per pixel of Pillow's own storage, by mode (RGB is stored in 4 bytes).
_STORAGE = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "I": 4, "F": 4}
_BITS_16 = (";16", "I;16")
ORIENTATION = 0x0112  # the EXIF tag


def _sixteen_bit(im: Image.Image) -> bool:
    rawmode = next((str(t.args) for t in getattr(im, "tile", []) if isinstance(t.args, str)), "")
    return any(b in rawmode or b in im.mode for b in _BITS_16)


def decoded_bytes(im: Image.Image) -> int:
    """Bytes the decoded image needs: pixels x max(Pillow's storage, the source's bytes per pixel)."""
    w, h = im.size
    source = len(im.getbands()) * (2 if _sixteen_bit(im) else 1)
    return w * h * max(_STORAGE.get(im.mode, 4), source)


def _plain(im: Image.Image) -> bool:
    """8-bit RGB or grey, opaque, upright: what OpenCV decodes right (and faster than Pillow)."""
    return (im.mode in ("RGB", "L") and not _sixteen_bit(im) and "transparency" not in im.info
            and im.getexif().get(ORIENTATION, 1) == 1)


def to_rgb8(im: Image.Image) -> Image.Image:
    """8-bit RGB (or L for grayscale) of `im`: 16-bit scaled down, alpha composited on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im)
        if arr.dtype != np.uint16:  # mode I: 32-bit ints holding 16-bit PNG samples
            arr = arr.clip(0, 65535)
        return Image.fromarray((arr.astype(np.uint32) >> 8).astype(np.uint8), "L")
    if im.mode == "F":
        return Image.fromarray(np.asarray(im).clip(0, 255).astype(np.uint8), "L")
    keyed = "transparency" in im.info  # a colour key (PNG tRNS) or a transparent palette entry
    if im.mode in ("1", "L", "RGB") and not keyed:
        return im if im.mode != "1" else im.convert("L")
    if im.mode == "P" and not keyed:
        return im.convert("RGB")
    if keyed or im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        del rgba
        return background.convert("RGB")
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV


class Normaliser:
    """img2dataset's resizer contract: `(img_stream) -> (jpeg, width, height, original_width, original_height, err)`.

    Errors are `netguard.error_text` strings: `decoded_cap` (over the decoded-bytes cap) and `undecodable`,
    both permanent.
    """

    def __init__(self, encode_quality: int = 95, max_decoded_bytes: int = netguard.DEFAULT_MAX_DECODED_BYTES):
        self.encode_quality = encode_quality
        self.max_decoded_bytes = max_decoded_bytes
        cv2.setNumThreads(1)  # a shard task holds one CPU (img2dataset's resizer does the same)

    def __call__(self, img_stream, blurring_bbox_list=None):
        try:
            img_stream.seek(0)
            im = Image.open(img_stream)  # lazy: only the header is parsed here
            need = decoded_bytes(im)
            if need > self.max_decoded_bytes:
                raise netguard.FetchError(
                    "decoded_cap", f"{im.size[0]}x{im.size[1]} {im.mode} decodes to {need} bytes, over the cap of "
                    f"{self.max_decoded_bytes}", retryable=False)
            if _plain(im):  # the common case: OpenCV, as img2dataset does, ~20% faster than Pillow on JPEG
                img_stream.seek(0)
                arr = cv2.imdecode(np.frombuffer(img_stream.read(), np.uint8), cv2.IMREAD_UNCHANGED)
                if arr is not None and arr.dtype == np.uint8 and (arr.ndim == 2 or arr.shape[2] == 3):
                    h, w = arr.shape[:2]
                    jpeg = cv2.imencode(".jpg", arr, [cv2.IMWRITE_JPEG_QUALITY, self.encode_quality])[1].tobytes()
                    return jpeg, w, h, w, h, None
            im.load()
            if im.getexif().get(ORIENTATION, 1) != 1:  # transposing copies: only when there is something to turn
                im = ImageOps.exif_transpose(im)
            out = to_rgb8(im)
            del im
            buf = io.BytesIO()
            out.save(buf, "JPEG", quality=self.encode_quality)
            w, h = out.size
            return buf.getvalue(), w, h, w, h, None
        except netguard.FetchError as err:
            return None, None, None, None, None, netguard.error_text(err)
        except Image.UnidentifiedImageError:
            return None, None, None, None, None, netguard.error_text(
                netguard.FetchError("undecodable", "not an image format Pillow can read", retryable=False))
        except Exception as err:  # noqa: BLE001 - any decode failure is this image's, counted with its reason
            return None, None, None, None, None, netguard.error_text(
                netguard.FetchError("undecodable", f"cannot decode: {type(err).__name__}: {err}", retryable=False))
