"""Decoding a downloaded image: img2dataset's Resizer (baseline) vs our Normaliser, peak memory and speed.

Each decode runs in a fresh process and reports its peak RSS (ru_maxrss) minus the RSS after imports, so the
figure is what the decode itself adds to a worker. Images: the issue's 8192x8192 RGBA 16-bit PNG (551 KB on
the wire) and the largest image our cap admits, 8192x8192 RGBA 8-bit. Speed: images/s on one core for
typical web images (a 1024x768 photo-like JPEG, a 512x512 RGBA PNG), baseline and ours alternating.

    PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_decode_memory.py [--speed]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import io, json, resource, sys
import numpy as np
which, path = sys.argv[1], sys.argv[2]
if which == "img2dataset":
    from img2dataset.resizer import Resizer
    r = Resizer(image_size=0, resize_mode="no", resize_only_if_bigger=False, encode_quality=95, encode_format="jpg",
                skip_reencode=False, disable_all_reencoding=False, min_image_size=0, max_image_area=float("inf"),
                max_aspect_ratio=float("inf"), blurrer=None)
else:
    from pipeline.image_decode import Normaliser
    r = Normaliser()
data = open(path, "rb").read()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = r(io.BytesIO(data))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
err = out[-1]
print(json.dumps({"added_mib": round((peak - base) / 1024), "ok": err is None, "err": (err or "")[:60]}))
"""


def _resizers():
    from img2dataset.resizer import Resizer

    from pipeline.image_decode import Normaliser

    base = Resizer(image_size=0, resize_mode="no", resize_only_if_bigger=False, encode_quality=95, encode_format="jpg",
                   skip_reencode=False, disable_all_reencoding=False, min_image_size=0, max_image_area=float("inf"),
                   max_aspect_ratio=float("inf"), blurrer=None)
    return {"img2dataset": base, "ours": Normaliser()}


def speed() -> None:
    import io
    import time

    import cv2
    import numpy as np

    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    photo = cv2.GaussianBlur(rng.integers(0, 255, (768, 1024, 3), np.uint8), (0, 0), 3)
    rgba = cv2.GaussianBlur(rng.integers(0, 255, (512, 512, 4), np.uint8), (0, 0), 3)
    images = {"1024x768 JPEG": cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes(),
              "512x512 RGBA PNG": cv2.imencode(".png", rgba)[1].tobytes()}
    resizers = _resizers()
    print("| image | img2dataset Resizer, images/s | synergen Normaliser, images/s | ratio |")
    print("|---|---|---|---|")
    for name, data in images.items():
        rates = {k: [] for k in resizers}
        for _ in range(3):  # alternate so load changes hit both alike
            for k, r in resizers.items():
                t0, n = time.perf_counter(), 0
                while time.perf_counter() - t0 < 2.0:
                    assert r(io.BytesIO(data))[-1] is None
                    n += 1
                rates[k].append(n / (time.perf_counter() - t0))
        a, b = max(rates["img2dataset"]), max(rates["ours"])
        print(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")


def main() -> None:
    import cv2
    import numpy as np

    tmp = Path(tempfile.mkdtemp(prefix="bench-decode-"))
    images = {}
    for name, dtype in (("8192x8192 RGBA 16-bit PNG", np.uint16), ("8192x8192 RGBA 8-bit PNG", np.uint8)):
        path = tmp / f"{dtype.__name__}.png"
        arr = np.zeros((8192, 8192, 4), dtype)
        arr[..., 0] = np.arange(8192, dtype=dtype)[None, :] if dtype == np.uint16 else 120
        arr[..., 3] = np.iinfo(dtype).max // 2
        cv2.imwrite(str(path), arr)
        del arr
        images[name] = path
    print("| image (bytes on the wire) | img2dataset Resizer | synergen Normaliser |")
    print("|---|---|---|")
    for name, path in images.items():
        cells = []
        for which in ("img2dataset", "ours"):
            res = json.loads(subprocess.run([sys.executable, "-c", CHILD, which, str(path)], capture_output=True,
                                            text=True, check=True).stdout.strip().splitlines()[-1])
            cells.append(f"+{res['added_mib']} MiB" + ("" if res["ok"] else f" (refused: {res['err'].split('|')[0]})"))
        print(f"| {name} ({path.stat().st_size // 1024} KB) | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    speed() if "--speed" in sys.argv else main()
