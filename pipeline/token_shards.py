"""Token shards: the writer and the reader of the format, side by side, with one spec.

Layout (one tar member per sample, so the tar overhead is paid once):
    KEY.sgt       or  KEY.sgt.zst   (whole member zstd-compressed, the frame with its content checksum)
    bytes = b"SGT1" | uint32le header_len | header (JSON, utf-8) | codes (raw, C order) | text ids (raw int32 LE)
    header = {"meta": {...the sample's json fields...},
              "codes": {"dtype": "uint16", "shape": [n_images, n_groups, fh*fw]},
              "text":  {"n": N}}
One-line decoder with plain webdataset:
    wds.WebDataset(url).map(lambda s: decode_token_sample(s.get("sgt") or s["sgt.zst"]))
`codes` are already in fold order (`model.folding.fold_codes`): rows are fold groups in raster order.
The layout (one member per sample, zstd on by default in `synergen tokenize`) was chosen with the figures of
tests/benchmarks/bench_shard_layout.py, recorded in README "Token shard layout".

Its catalog (one row per shard) is `pipeline.catalog`. Shards are written whole to a temporary name and renamed
on publish, so a reader never sees a partial shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import struct
import tarfile
import threading
import uuid
from dataclasses import dataclass, field
from typing import Iterator

import fsspec
import numpy as np
import xxhash
import zstandard

from synergen.errors import ShardError

MAGIC = b"SGT1"
MEMBER = "sgt"
MEMBER_ZST = "sgt.zst"
FORMAT_VERSION = 1


@dataclass
class TokenSample:
    """One image-text pair in token form."""

    key: str
    codes: np.ndarray  # [n_images, n_groups, fh*fw] uint16|uint32, fold order
    text_ids: np.ndarray  # [n_text] int32
    meta: dict = field(default_factory=dict)  # source, task, caption, size, tiles, grid, fold, sha256, url, ...

    @property
    def n_image_tokens(self) -> int:
        """LLM positions the images take (fold groups), without <boi>/<eoi>."""
        return int(self.codes.shape[0] * self.codes.shape[1])


def codes_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.uint16) if codebook_size <= 65536 else np.dtype(np.uint32)


def encode_token_sample(sample: TokenSample, compress: bool = False, level: int = 3) -> tuple[str, bytes]:
    """TokenSample -> (member extension, bytes)."""
    codes = np.ascontiguousarray(sample.codes)
    text = np.ascontiguousarray(sample.text_ids, dtype="<i4")
    header = json.dumps(
        {"meta": sample.meta, "codes": {"dtype": codes.dtype.str, "shape": list(codes.shape)}, "text": {"n": int(text.size)}},
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
    raw = b"".join([MAGIC, struct.pack("<I", len(header)), header, codes.tobytes(), text.tobytes()])
    if compress:  # the frame carries its own checksum, so a bad decode cannot pass as a sample
        return MEMBER_ZST, zstandard.ZstdCompressor(level=level, write_checksum=True).compress(raw)
    return MEMBER, raw


MAX_SAMPLE_BYTES = 1 << 28  # a sample decodes to at most this (a 4,096-code image is 8 KiB; tiles add little)
CODE_DTYPES = {"<u2", "<u4"}  # codes_dtype's


def decode_token_sample(data: bytes, key: str = "") -> TokenSample:
    """Bytes of a `.sgt` or `.sgt.zst` member -> TokenSample (raises ShardError on garbage, whatever its kind: a zstd
    frame that would decode past MAX_SAMPLE_BYTES, a short or malformed header, codes of another dtype)."""
    if data[:4] != MAGIC:
        try:
            declared = zstandard.frame_content_size(data)
            if declared > MAX_SAMPLE_BYTES:
                raise ShardError(f"sample {key!r}: a zstd frame declaring {declared} bytes, more than a sample holds "
                                 f"({MAX_SAMPLE_BYTES}); re-tokenize its shard")
            data = zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_SAMPLE_BYTES)
        except zstandard.ZstdError as e:
            raise ShardError(f"sample {key!r}: neither a token sample nor zstd ({e}); re-tokenize its shard") from e
        if data[:4] != MAGIC:
            raise ShardError(f"sample {key!r}: bad magic {data[:4]!r}; re-tokenize its shard")
    try:
        (hlen,) = struct.unpack_from("<I", data, 4)
        header = json.loads(data[8 : 8 + hlen])
        if header["codes"]["dtype"] not in CODE_DTYPES:
            raise ValueError(f"codes of dtype {header['codes']['dtype']!r}, not one of {sorted(CODE_DTYPES)}")
        dt = np.dtype(header["codes"]["dtype"])
        shape = tuple(int(d) for d in header["codes"]["shape"])
        if any(d < 0 for d in shape) or not isinstance(header["meta"], dict):
            raise ValueError(f"codes of shape {list(shape)} and meta {type(header['meta']).__name__}")
        n_codes = math.prod(shape) if shape else 0
        off = 8 + hlen
        codes = np.frombuffer(data, dtype=dt, count=n_codes, offset=off).reshape(shape)
        off += n_codes * dt.itemsize
        n_text = int(header["text"]["n"])
        if n_text < 0:
            raise ValueError(f"text of {n_text} ids")
        text = np.frombuffer(data, dtype="<i4", count=n_text, offset=off)
        if off + text.nbytes != len(data):
            raise ValueError(f"{len(data) - off - text.nbytes} trailing bytes")
    except (ValueError, KeyError, TypeError, struct.error, RecursionError, OverflowError, MemoryError) as e:
        # json.JSONDecodeError is a ValueError; TypeError: a header of the wrong shape (a list for a dict, ...)
        raise ShardError(f"sample {key!r}: corrupt token sample ({type(e).__name__}: {str(e)[:200]}); re-tokenize its "
                         "shard") from None
    return TokenSample(key=key, codes=codes, text_ids=text, meta=header["meta"])


class TokenShardWriter:
    """Writes one token shard in memory and publishes it atomically (temp name, then rename).

    Use as a context manager; `publish()` returns the shard's size and sha256 for the catalog.
    """

    def __init__(self, url: str, compress: bool = False, storage_options: dict | None = None):
        self.url = url
        self.compress = compress
        self.storage_options = storage_options or {}
        self._buf = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._buf, mode="w", format=tarfile.USTAR_FORMAT)
        self.n_samples = 0
        self.n_image_tokens = 0
        self.n_codes = 0
        self.n_text_tokens = 0

    def write(self, sample: TokenSample) -> None:
        if "." in sample.key:
            raise ShardError(f"sample key {sample.key!r} contains '.', which webdataset splits on; use [A-Za-z0-9_-]")
        ext, data = encode_token_sample(sample, self.compress)
        info = tarfile.TarInfo(f"{sample.key}.{ext}")
        info.size = len(data)
        info.mode = 0o444
        self._tar.addfile(info, io.BytesIO(data))
        self.n_samples += 1
        self.n_image_tokens += sample.n_image_tokens
        self.n_codes += int(sample.codes.size)
        self.n_text_tokens += int(sample.text_ids.size)

    def publish(self) -> dict:
        """Close the tar, write it under a temporary name, rename into place; return size and sha256 (the whole
        shard's, for audits) and the sha256 of its per-sample index (which the loader checks the sidecar against)."""
        self._tar.close()
        data = self._buf.getvalue()
        fs, path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        parent = path.rsplit("/", 1)[0]
        fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/_tmp.{uuid.uuid4().hex}.{path.rsplit('/', 1)[-1]}"
        # the per-sample index goes first, so a published tar always has one (read_shard_index)
        index_sha256 = write_shard_index(self.url, build_shard_index(data, self.url), self.storage_options)
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
        return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "index_sha256": index_sha256}

    def __enter__(self) -> "TokenShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        if not self._tar.closed:
            self._tar.close()


def iter_token_shard(url: str, data: bytes | None = None, storage_options: dict | None = None) -> Iterator[TokenSample]:
    """Yield the samples of one token shard (raises ShardError naming the shard on a truncated/corrupt tar)."""
    if data is None:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            data = f.read()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, _, ext = m.name.partition(".")
                if ext not in (MEMBER, MEMBER_ZST):
                    continue
                yield decode_token_sample(tar.extractfile(m).read(), key=key)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(f"token shard {url}: truncated or corrupt ({e}); re-tokenize it or skip it") from e


# ---- per-sample index: where each sample lies in the tar and what its sequence needs -------------------
# `NNNNN.tar.idx.npy` beside each shard (written by TokenShardWriter.publish before the tar is renamed into
# place, so a published tar always has its index; its sha256 goes in the catalog): one row per sample, in tar
# order, with the xxh3 of the sample's bytes. A loader plans whole global batches from these rows without
# reading any shard, then reads only its own samples by byte range and checks each against its row's xxh3.

INDEX_SUFFIX = ".idx.npy"
INDEX_FIELDS = {  # name -> dtype (the key's width varies with the shard's longest key)
    "offset": "<i8",  # byte offset of the member's data in the tar (its 512-byte tar header precedes it)
    "size": "<i8",  # member data bytes
    "xxh3": "<u8",  # xxh3_64 of the member's data bytes: a reader checks every sample it reads against it
    "n_images": "<i4",  # codes.shape[0]
    "groups": "<i4",  # fold groups per image (LLM positions), codes.shape[1]
    "fold_size": "<i4",  # codes.shape[2] (fh*fw), -1 when codes are not 3-d
    "text": "<i4",  # caption tokens
    "tiles": "<i4",  # meta tiles rows*cols
    "thumbnail": "?",  # meta thumbnail
}


def _index_dtype(key_width: int) -> np.dtype:
    return np.dtype([("key", f"S{max(1, key_width)}"), *INDEX_FIELDS.items()])


def sample_checksum(member: bytes | memoryview) -> int:
    """The per-sample checksum of the index (xxh3_64 of a member's data bytes, as stored in the tar)."""
    return xxhash.xxh3_64_intdigest(member)


def index_rows(rows: list[tuple]) -> np.ndarray:
    """Index rows (key, offset, size, xxh3, n_images, groups, fold_size, text, tiles, thumbnail) -> an index array."""
    return np.array(rows, dtype=_index_dtype(max((len(r[0]) for r in rows), default=1)))


def facts_row(key: str, offset: int, size: int, checksum: int, shape: list[int], n_text: int, meta: dict) -> tuple:
    """One index row from a sample's header facts (codes shape, caption tokens, meta)."""
    rows_cols = meta.get("tiles", [1, 1])
    return (key.encode(), offset, size, checksum, shape[0] if shape else 0, shape[1] if len(shape) == 3 else 0,
            shape[2] if len(shape) == 3 else -1, int(n_text), int(rows_cols[0]) * int(rows_cols[1]), bool(meta.get("thumbnail", False)))


def _sample_header(member: memoryview, key: str) -> dict:
    """The JSON header of a `.sgt`/`.sgt.zst` member, without decoding its codes (ShardError naming the sample when
    it has none: a short member, a header longer than a sample holds, not JSON, nested past Python's recursion)."""
    try:
        if bytes(member[:4]) != MAGIC:
            try:
                with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(member)) as r:
                    head = r.read(8)
                    if head[:4] != MAGIC:
                        raise ShardError(f"sample {key!r}: bad magic {head[:4]!r}; re-tokenize its shard")
                    (hlen,) = struct.unpack_from("<I", head, 4)
                    if hlen > MAX_SAMPLE_BYTES:
                        raise ValueError(f"a header of {hlen} bytes, more than a sample holds")
                    body = r.read(hlen)
            except zstandard.ZstdError as e:
                raise ShardError(f"sample {key!r}: neither a token sample nor zstd ({e}); re-tokenize its shard") from e
        else:
            (hlen,) = struct.unpack_from("<I", member, 4)
            body = bytes(member[8:8 + hlen])
        header = json.loads(body)
        if not isinstance(header, dict) or not isinstance(header.get("codes", {}), dict) \
                or not isinstance(header.get("text", {}), dict) or not isinstance(header.get("meta", {}), dict):
            raise ValueError("a header that is not {codes: {...}, text: {...}, meta: {...}}")
        return header
    except (ValueError, struct.error, RecursionError) as e:  # json.JSONDecodeError is a ValueError
        raise ShardError(f"sample {key!r}: corrupt token sample header ({type(e).__name__}: {str(e)[:200]}); "
                         "re-tokenize its shard") from None


def _tar_members(url: str, data: bytes) -> Iterator[tuple[str, int, int]]:
    """(member name, data offset, data size) of a shard's regular files, tar order; truncation -> ShardError."""
    view = memoryview(data)
    off, n = 0, len(data)
    while off + 512 <= n:
        header = view[off:off + 512]
        if header[0] == 0:  # end-of-archive block
            return
        if header[156] not in (0x30, 0x00) or header[345] != 0:  # pax/long names/links: let tarfile walk it
            try:
                with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                    members = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
            except (tarfile.TarError, EOFError, OSError) as e:
                raise ShardError(f"token shard {url}: truncated or corrupt ({e}); re-tokenize it or skip it") from e
            if any(o + s > n for _, o, s in members):
                raise ShardError(f"token shard {url}: truncated; re-tokenize it or skip it")
            yield from members
            return
        name = bytes(header[0:100]).split(b"\0", 1)[0].decode()
        try:
            size = int(bytes(header[124:136]).strip(b"\0 ") or b"0", 8)
        except ValueError:
            raise ShardError(f"token shard {url}: corrupt tar header at byte {off}; re-tokenize it or skip it") from None
        start = off + 512
        if start + size > n:
            raise ShardError(f"token shard {url}: truncated (member {name} needs {start + size} bytes, shard has {n}); "
                             "re-tokenize it or skip it")
        yield name, start, size
        off = start + (size + 511) // 512 * 512
    raise ShardError(f"token shard {url}: truncated (no end-of-archive marker); re-tokenize it or skip it")


def build_shard_index(data: bytes, url: str = "") -> np.ndarray:
    """A token shard's bytes -> its per-sample index (INDEX_FIELDS + key), reading only headers, never codes."""
    rows = []
    view = memoryview(data)
    for name, off, size in _tar_members(url, data):
        key, _, ext = name.partition(".")
        if ext not in (MEMBER, MEMBER_ZST):
            continue
        member = view[off:off + size]
        try:
            h = _sample_header(member, key)
            rows.append(facts_row(key, off, size, sample_checksum(member), list(h.get("codes", {}).get("shape", [])),
                                  int(h.get("text", {}).get("n", 0)), h.get("meta", {})))
        except ShardError as e:
            raise ShardError(f"token shard {url}: {e}") from None
        except (ValueError, TypeError, KeyError, IndexError, OverflowError) as e:  # header values of the wrong kind
            raise ShardError(f"token shard {url}: sample {key!r}: corrupt token sample header ({type(e).__name__}: "
                             f"{str(e)[:200]}); re-tokenize its shard") from None
    return index_rows(rows)


def index_bytes(index: np.ndarray) -> bytes:
    """An index as the bytes of its `.npy` file."""
    buf = io.BytesIO()
    np.save(buf, index, allow_pickle=False)
    return buf.getvalue()


def write_shard_index(url: str, index: np.ndarray, storage_options: dict | None = None) -> str:
    """Write `url + INDEX_SUFFIX` atomically (temp name, then rename); return the file's sha256."""
    fs, path = fsspec.core.url_to_fs(url + INDEX_SUFFIX, **(storage_options or {}))
    parent = path.rsplit("/", 1)[0]
    tmp = f"{parent}/_tmp.{uuid.uuid4().hex}.{path.rsplit('/', 1)[-1]}"
    blob = index_bytes(index)
    with fs.open(tmp, "wb") as f:
        f.write(blob)
    fs.mv(tmp, path)
    return hashlib.sha256(blob).hexdigest()


# numpy parses a .npy header with ast.literal_eval, and CPython 3.11's compile() is not thread-safe: sidecars parsed
# by concurrent threads (a source table's build) sometimes raised SystemError "AST constructor recursion depth mismatch"
_NPY_HEADER_LOCK = threading.Lock()


def parse_shard_index(blob: bytes, name: str) -> np.ndarray:
    """Bytes of an index file -> the index (ShardError naming `name` when it is not one)."""
    try:
        with _NPY_HEADER_LOCK:
            index = np.load(io.BytesIO(blob), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ShardError(f"shard index {name}: not a .npy index ({e}); delete it (the loader rebuilds it from the tar)") from None
    fields = index.dtype.names or ()
    if index.ndim != 1 or fields != ("key", *INDEX_FIELDS) or any(index.dtype[f] != np.dtype(t) for f, t in INDEX_FIELDS.items()):
        raise ShardError(f"shard index {name}: fields {fields} are not {('key', *INDEX_FIELDS)}; delete it "
                         "(the loader rebuilds it from the tar)")
    return index


def read_shard_index(url: str, storage_options: dict | None = None) -> np.ndarray | None:
    """The sidecar index of the shard at `url` (None when it has none; ShardError when it is not an index)."""
    try:
        with fsspec.open(url + INDEX_SUFFIX, "rb", **(storage_options or {})) as f:
            blob = f.read()
    except FileNotFoundError:
        return None
    return parse_shard_index(blob, url + INDEX_SUFFIX)
