"""Raw shards in img2dataset's webdataset layout, written directly (for tests of the tokenize stage).

`write_raw_shards` renders demo-corpus images (plus optional broken ones) into `NNNNN.tar` with
`KEY.jpg/.txt/.json`, `NNNNN.parquet` (one row per input, `status`) and `NNNNN_stats.json`, exactly the
files the ingest stage leaves (see ../shared/research/stack.md section 2).
"""

from __future__ import annotations

import io
import json
import random
import tarfile

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from synergen.demo.corpus import caption, render, sample_scene

REPO_VQ = "model/assets/demo_vq"
REPO_TOKENIZER = "model/assets/demo_tokenizer"


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def write_raw_shards(out: str, n_shards: int, per_shard: int, seed: int = 0, size: int = 256,
                     broken: dict[int, list[str]] | None = None, failed_rows: int = 1) -> dict:
    """Write raw shards; `broken[shard]` lists extra bad samples ("too_small", "decode_error").

    Each shard also records `failed_rows` failed downloads in its parquet (not in the tar), like
    img2dataset does. Returns {"successes": n, "bad": {reason: n}, "captions": {key: caption}}.
    """
    rng = random.Random(seed)
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    total, bad, captions = 0, {}, {}
    for s in range(n_shards):
        buf = io.BytesIO()
        rows = []
        with tarfile.open(fileobj=buf, mode="w") as tar:
            items = []
            for i in range(per_shard):
                scene = sample_scene(rng)
                items.append((_jpeg(render(scene, size)), caption(scene), None))
            for reason in (broken or {}).get(s, []):
                if reason == "too_small":
                    items.append((_jpeg(render(sample_scene(rng), 12)), "a tiny image", reason))
                else:
                    items.append((b"\xff\xd8 not really a jpeg", "a broken image", reason))
            for i, (data, cap, reason) in enumerate(items):
                key = f"{s:05d}{i:04d}"
                meta = {"url": f"http://127.0.0.1/files/{key}.jpg", "key": key, "status": "success", "caption": cap}
                for ext, payload in (("jpg", data), ("txt", cap.encode()), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                rows.append({"key": key, "url": meta["url"], "caption": cap, "status": "success", "error_message": None})
                captions[key] = cap
                total += 1
                if reason:
                    bad[reason] = bad.get(reason, 0) + 1
            for j in range(failed_rows):
                rows.append({"key": f"{s:05d}9{j:03d}", "url": "http://127.0.0.1/404.jpg", "caption": "x",
                             "status": "failed_to_download", "error_message": "HTTP Error 404: Not Found"})
        with fs.open(f"{root}/{s:05d}.tar", "wb") as f:
            f.write(buf.getvalue())
        with fs.open(f"{root}/{s:05d}.parquet", "wb") as f:
            pq.write_table(pa.Table.from_pylist(rows), f)
        with fs.open(f"{root}/{s:05d}_stats.json", "w") as f:
            json.dump({"count": len(rows), "successes": len(rows) - failed_rows, "failed_to_download": failed_rows}, f)
    return {"successes": total, "bad": bad, "captions": captions}
