"""Source manifests (`manifests/sources/*.yaml`) and the URL lists they point at.

`load_source_manifest(path)` validates a manifest (pydantic; unknown keys refused) and raises
ManifestError naming the file, the key and the fix. `read_url_list(manifest)` reads every URL-list file
(parquet, csv or jsonl; a glob or a list; local or s3://) into one table with the columns `url`,
`caption`, the manifest's extra columns and a stable `row_id`, and checks the columns first, so a
list without its url or caption column fails before anything is downloaded. A column may have other
names in other releases of a corpus (`column_aliases`). Real-world lists are read robustly: CSV captions
may hold quoted newlines; a row that cannot be read (a malformed JSON line, a lone surrogate, invalid
UTF-8 in a URL or text column, a CSV line with the wrong number of fields) becomes a `bad_row` counted as
`url_list_bad_row` while the rest of the file is read; a file that cannot be read at all is a
UrlListError naming the file, the line or row group, and the fix.
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import fsspec
import pyarrow as pa
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.netguard import url_hash
from synergen.errors import ManifestError, SynergenError, explain_validation

log = logging.getLogger(__name__)


class UrlListError(SynergenError):
    """A URL-list file is missing, unreadable or lacks a column the manifest names."""


class Threshold(BaseModel):
    """Keep rows whose column value lies in [min, max] (either bound optional)."""

    model_config = ConfigDict(extra="forbid")
    min: float | None = None
    max: float | None = None


class FilterConfig(BaseModel):
    """Ingest filters; every drop is counted by reason in the shard stats and the job summary."""

    model_config = ConfigDict(extra="forbid")
    min_side: int = Field(0, ge=0, description="drop images whose shorter side is below this")
    max_side: int | None = Field(None, gt=0)
    min_pixels: int = Field(0, ge=0)
    max_aspect_ratio: float | None = Field(None, ge=1.0)
    caption_min_chars: int = Field(1, ge=0)
    caption_max_chars: int | None = Field(None, gt=0)
    dedup_exact: bool = True
    dedup_near: bool = True
    near_max_distance: int = Field(4, ge=0, le=15, description="dHash Hamming distance counted as a near duplicate")
    metadata: dict[str, Threshold] = Field(default_factory=dict, description="column -> {min, max}")
    languages: list[str] | None = None
    language_column: str | None = None


class SourceManifest(BaseModel):
    """One corpus: where its URL lists are, which columns hold url/caption/metadata, and how to filter it."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    task: Literal["und", "gen"]
    stages: list[Literal["S.1", "S.2", "SFT"]] = Field(default_factory=list)
    description: str = ""
    url_lists: list[str] = Field(min_length=1, description="globs or paths, local or s3://")
    format: Literal["auto", "parquet", "csv", "jsonl"] = "auto"
    url_column: str = "url"
    caption_column: str = "caption"
    extra_columns: list[str] = Field(default_factory=list)
    column_aliases: dict[str, list[str]] = Field(
        default_factory=dict, description="column -> other names it has in other releases of the corpus; the first "
        "one a file has is read under the column's name (e.g. aesthetic: [AESTHETIC_SCORE])")
    filters: FilterConfig = Field(default_factory=FilterConfig)

    @field_validator("url_lists", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v

    def wanted_columns(self) -> list[str]:
        return [self.url_column, self.caption_column, *self.extra_columns]

    @model_validator(mode="after")
    def _metadata_columns_are_carried(self):
        for col in self.filters.metadata:
            if col not in self.extra_columns:
                raise ValueError(f"filters.metadata names column {col!r}, which is not in extra_columns; add it there")
        if self.filters.language_column and self.filters.language_column not in self.extra_columns:
            raise ValueError(f"filters.language_column {self.filters.language_column!r} must be listed in extra_columns")
        return self




def load_source_manifest(path: str) -> SourceManifest:
    """Parse and validate a manifest; ManifestError names the file, the key and the fix."""
    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError as err:
        raise ManifestError(f"{path}: manifest not found; give the path of a manifests/sources/*.yaml file") from err
    except yaml.YAMLError as err:
        raise ManifestError(f"{path}: not valid YAML ({err}); fix the syntax") from err
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: a source manifest is a YAML mapping (name: ..., task: ..., url_lists: ...)")
    try:
        return SourceManifest.model_validate(raw)
    except ValidationError as err:
        raise ManifestError(explain_validation(err, SourceManifest, path, "source manifest")) from None


def expand_url_lists(patterns: list[str]) -> list[str]:
    """Every file the globs/paths name, in sorted order per pattern (fsspec URLs kept as given)."""
    files: list[str] = []
    for pattern in patterns:
        fs, _, paths = fsspec.get_fs_token_paths(pattern)
        if not paths:
            raise UrlListError(f"URL list {pattern!r} matches no file; put the list there or fix url_lists in the manifest")
        proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        files.extend(sorted(p if proto in ("file", "local") else f"{proto}://{p}" for p in paths))
    return files


def _format_of(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.lower().removesuffix(".gz")
    for ext, kind in ((".parquet", "parquet"), (".csv", "csv"), (".jsonl", "jsonl"), (".json", "jsonl")):
        if name.endswith(ext):
            return kind
    raise UrlListError(f"{path}: cannot tell the format from the extension; set format: parquet|csv|jsonl in the manifest")


BAD_ROW = "url_list_bad_row"  # the reason a row that could not be read is counted under


@dataclass
class _Part:
    """One file's rows as Python lists (text decoded here, so one bad value spoils one row, not the file)."""

    path: str
    columns: dict[str, list]  # manifest column name -> values
    bad: list[str | None]  # per row: None, or why the row is unreadable (it is counted, never downloaded)
    caption_utf8: list[bool]


def _resolve(path: str, names: list[str], m: SourceManifest) -> dict[str, str]:
    """Manifest column -> the file's column (itself or its first alias present); a clear error for what lacks."""
    got, missing = {}, []
    for col in m.wanted_columns():
        found = next((c for c in (col, *m.column_aliases.get(col, [])) if c in names), None)
        if found is None:
            missing.append(col)
        else:
            got[col] = found
    for role, col in (("url_column", m.url_column), ("caption_column", m.caption_column)):
        if col in missing:
            raise UrlListError(f"{path}: URL list has no column {col!r} (the manifest's {role}); its columns are "
                               f"{names}; set {role} in the manifest to the right one{_alias_hint(col, names)}")
    if missing:
        used = {c for c in missing if c in m.filters.metadata or c == m.filters.language_column}
        fixes = [f"{c!r}{_alias_hint(c, names)}" for c in missing]
        hint = (" or, where a column has another name in this release, map it in the manifest with "
                "column_aliases: {NAME: [NAME_IN_FILE]}")
        if used:
            raise UrlListError(f"{path}: URL list lacks {fixes}, which filters use; its columns are {names}; "
                               f"remove the filters on {sorted(used)} and these names from extra_columns," + hint)
        raise UrlListError(f"{path}: URL list lacks extra_columns {fixes}; its columns are {names}; drop them from "
                           "extra_columns in the manifest," + hint)
    return got


def _alias_hint(col: str, names: list[str]) -> str:
    close = difflib.get_close_matches(col.lower(), [n.lower() for n in names], n=1, cutoff=0.5)
    if not close:
        close = [n for n in names if col.lower() in n.lower()][:1]
    if not close:
        return ""
    actual = next(n for n in names if n.lower() == close[0].lower())
    return f" (this file has {actual!r}: column_aliases: {{{col}: [{actual}]}} in the manifest reads it as {col!r})"


def _decode(path: str, table: pa.Table, cols: dict[str, str], m: SourceManifest, where) -> _Part:
    """Python values of the wanted columns; text is decoded per value: a bad URL or extra value makes a bad row,
    a bad caption is kept as not-UTF-8 (the caption filter counts it)."""
    n = table.num_rows
    bad: list[str | None] = [None] * n
    out: dict[str, list] = {}
    utf8 = [True] * n
    for col, src in cols.items():
        if src not in table.schema.names:  # a JSON-lines chunk none of whose lines has this key
            out[col] = [None] * n
            continue
        arr = table.column(src)
        if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) or pa.types.is_binary(arr.type):
            raw = arr.cast(pa.binary() if not pa.types.is_large_string(arr.type) else pa.large_binary()).to_pylist()
            vals = []
            for i, v in enumerate(raw):
                try:
                    vals.append(None if v is None else v.decode("utf-8"))
                except UnicodeDecodeError as err:
                    vals.append(None)
                    if col == m.caption_column:
                        utf8[i] = False
                    elif bad[i] is None:
                        bad[i] = f"{where(i)}: column {src!r} is not UTF-8 ({err.reason} at byte {err.start})"
            out[col] = vals
        else:
            out[col] = arr.to_pylist()
    return _Part(path, out, bad, utf8)


BATCH_ROWS = 16_384  # rows per part a reader yields: a planner's memory is bounded by this, not by a file or row group


def _parquet_parts(path: str, f, m: SourceManifest, batch_rows: int) -> Iterator[_Part]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as err:
        raise UrlListError(f"{path}: not a readable parquet file ({err}); re-download or re-export it, or remove it "
                           "from url_lists") from None
    cols = _resolve(path, pf.schema_arrow.names, m)
    first = 0
    try:
        for group in range(pf.num_row_groups):
            # one reader per row group: a reader over the whole file keeps every pre-buffered row group until it
            # ends (RSS grew by the file's size: 116 MB over a 10^7-row list)
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[group], columns=sorted(set(cols.values()))):
                yield _decode(path, pa.Table.from_batches([batch]), cols, m, lambda i, o=first: f"{path}: row {o + i}")
                first += batch.num_rows
    except (pa.ArrowException, OSError) as err:
        raise UrlListError(f"{path}: rows after {first} cannot be read ({err}); re-download or re-export the file, "
                           "or remove it from url_lists") from None


def _csv_parts(path: str, f, m: SourceManifest, batch_rows: int) -> Iterator[_Part]:
    import pyarrow.csv as pcsv

    skipped: list[str] = []

    def skip(row):  # a row with the wrong number of fields: counted, the rest of the file is read
        skipped.append(f"{path}: line {row.number if row.number is not None else '?'}: {row.text[:80]!r} has "
                       f"{row.actual_columns} fields, the header {row.expected_columns}")
        return "skip"

    def part(batches: list[pa.RecordBatch], first: int) -> _Part:
        got = _decode(path, pa.Table.from_batches(batches, reader.schema), cols, m, lambda i: f"{path}: data row {first + i + 1}")
        bad = _with_bad_rows(got, list(skipped))
        skipped.clear()
        return bad

    try:
        # quoted captions may hold newlines; text read as bytes and decoded per value (a bad one spoils one row)
        reader = pcsv.open_csv(f, parse_options=pcsv.ParseOptions(newlines_in_values=True, invalid_row_handler=skip),
                               convert_options=pcsv.ConvertOptions(check_utf8=False, column_types={
                                   c: pa.binary() for c in (m.url_column, m.caption_column)}))
        cols = _resolve(path, reader.schema.names, m)
        batches, n, first = [], 0, 0
        for block in reader:  # a block of ~1 MB of text, cut into parts of batch_rows
            for at in range(0, block.num_rows, batch_rows):
                batch = block.slice(at, batch_rows)
                take = min(batch.num_rows, batch_rows - n)
                batches.append(batch.slice(0, take))
                n += take
                if n == batch_rows:
                    yield part(batches, first)
                    batches, first, n = [], first + n, 0
                if take < batch.num_rows:
                    batches.append(batch.slice(take))
                    n += batch.num_rows - take
        if batches or skipped or not first:
            yield part(batches, first)
    except pa.ArrowInvalid as err:
        raise UrlListError(f"{path}: not a readable CSV file ({err}); fix the named line (quote fields that hold "
                           "commas, quotes or newlines) or remove the file from url_lists") from None


def _jsonl_parts(path: str, f, m: SourceManifest, batch_rows: int) -> Iterator[_Part]:
    """JSON lines, `batch_rows` a part. A line may lack a key (sparse extras read as None); the columns are checked
    over the keys of every line once the whole file is read (`check_url_lists` reads it through before a job)."""
    seen: dict[str, None] = {}  # every key any line had, in order
    first_bad: str | None = None
    n_rows = 0
    lines: list[bytes] = []
    first = 0  # line number (0-based) of lines[0]
    for line in itertools.chain(f, [None]):
        if line is not None:
            lines.append(line)
        if lines and (line is None or len(lines) >= batch_rows):
            part, names = _jsonl_part(path, lines, first, m)
            seen.update(dict.fromkeys(names))
            n_rows += sum(b is None for b in part.bad)
            first_bad = first_bad or next((b for b in part.bad if b), None)
            yield part
            first, lines = first + len(lines), []
    if not n_rows and first_bad:
        raise UrlListError(f"{first_bad}; no line of this file is a JSON object; give one JSON object per line "
                           "(JSON Lines) or remove the file from url_lists")
    _resolve(path, list(seen), m)  # a wanted column no line has: the error names it and the fix


def _present(names: list[str], m: SourceManifest) -> dict[str, str]:
    """Manifest column -> the name it has among `names` (itself or an alias); itself when absent (reads as None)."""
    return {col: next((c for c in (col, *m.column_aliases.get(col, [])) if c in names), col)
            for col in m.wanted_columns()}


def _jsonl_part(path: str, lines: list[bytes], first: int, m: SourceManifest) -> tuple[_Part, list[str]]:
    """One chunk of JSON lines and the keys its lines have: pyarrow parses a clean chunk at once; a chunk with a
    malformed line is parsed line by line, the bad lines counted and the rest kept."""
    import pyarrow.json as pjson

    with contextlib.suppress(pa.ArrowInvalid):
        table = pjson.read_json(pa.BufferReader(b"".join(x if x.endswith(b"\n") else x + b"\n" for x in lines)))
        names = table.schema.names
        cols = _present(names, m)
        table = table.select([c for c in set(cols.values()) if c in names])
        return _decode(path, table, cols, m, lambda i: f"{path}: line {first + i + 1}"), names
    rows, skipped = [], []
    for n, line in enumerate(lines, first + 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
            json.dumps(obj, ensure_ascii=False).encode("utf-8")  # a lone surrogate (\\ud800) cannot be stored
            rows.append(obj)
        except (ValueError, UnicodeError) as err:
            skipped.append(f"{path}: line {n}: {err}")
    names = list(dict.fromkeys(k for r in rows for k in r))
    cols = _present(names, m)
    part = _Part(path, {c: [r.get(src) for r in rows] for c, src in cols.items()}, [None] * len(rows),
                 [True] * len(rows))
    return _with_bad_rows(part, skipped), names


def _with_bad_rows(part: _Part, skipped: list[str]) -> _Part:
    """Append one placeholder row per unreadable line, so it is counted (`url_list_bad_row`) and reconciles."""
    for why in skipped:
        for vals in part.columns.values():
            vals.append(None)
        part.bad.append(why)
        part.caption_utf8.append(True)
    return part


_READERS = {"parquet": _parquet_parts, "csv": _csv_parts, "jsonl": _jsonl_parts}


def _iter_parts(path: str, fmt: str, m: SourceManifest, batch_rows: int = BATCH_ROWS) -> Iterator[_Part]:
    """One URL-list file's rows, at most `batch_rows` per part (plus the part's counted bad lines), in order."""
    try:
        with fsspec.open(path, "rb", compression="infer") as f:
            for part in _READERS[fmt](path, f, m, batch_rows):
                bad = [b for b in part.bad if b]
                if bad:
                    log.warning("%s: %d unreadable rows counted as %s and skipped, e.g. %s", path, len(bad), BAD_ROW, bad[0])
                yield part
    except (OSError, EOFError, zlib.error, pa.ArrowException) as err:  # unreadable bytes, a broken .gz, a vanished object
        raise UrlListError(f"{path}: cannot read the URL list ({type(err).__name__}: {err}); check the file or remove "
                           "it from url_lists") from None


def row_ids(urls: list[str]) -> list[str]:
    """Stable row ids: hash of the URL plus its occurrence number, so appending rows keeps earlier ids."""
    seen: dict[str, int] = {}
    out = []
    for u in urls:
        n = seen.get(u, 0)
        seen[u] = n + 1
        out.append(f"{url_hash(u)}-{n}")
    return out


def read_url_list(m: SourceManifest) -> pa.Table:
    """All rows of the manifest's URL lists: row_id, url, caption (str or None), caption_utf8 (bool), bad_row
    (None, or `url_list_bad_row` for a row that could not be read: it is counted, never downloaded), extras."""
    urls, captions, utf8, bad = [], [], [], []
    extras: dict[str, list] = {c: [] for c in m.extra_columns}
    for part in (p for path in expand_url_lists(m.url_lists) for p in _iter_parts(path, _format_of(path, m.format), m)):
        urls.extend(None if u is None else str(u) for u in part.columns[m.url_column])
        captions.extend(None if c is None else str(c) for c in part.columns[m.caption_column])
        utf8.extend(part.caption_utf8)
        bad.extend(BAD_ROW if b else None for b in part.bad)
        for c in m.extra_columns:
            extras[c].extend(part.columns[c])
    cols = {"row_id": row_ids([u or "" for u in urls]), "url": urls, "caption": captions, "caption_utf8": utf8,
            "bad_row": pa.array(bad, pa.string())}
    for c, vals in extras.items():
        cols[c] = vals
    return pa.table(cols)


def manifest_dir() -> Path:
    """The shipped manifests folder of this checkout."""
    return Path(__file__).resolve().parents[1] / "manifests" / "sources"


def check_url_lists(m: SourceManifest) -> list[tuple[str, str]]:
    """(file, format) of every URL list, each checked for its columns (aliases applied) before any download."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    files = []
    for path in expand_url_lists(m.url_lists):
        fmt = _format_of(path, m.format)
        if fmt == "jsonl":
            for _ in _iter_parts(path, fmt, m):  # its columns are known only from its lines: read it through
                pass
        else:
            try:
                with fsspec.open(path, "rb", compression="infer") as f:
                    names = (pq.ParquetFile(f).schema_arrow.names if fmt == "parquet" else
                             pcsv.open_csv(f, parse_options=pcsv.ParseOptions(  # a bad line is the reader's to count
                                 newlines_in_values=True, invalid_row_handler=lambda row: "skip")).schema.names)
            except (OSError, EOFError, zlib.error, pa.ArrowException) as err:
                raise UrlListError(f"{path}: not a readable {fmt} file ({type(err).__name__}: {err}); re-download or "
                                   "re-export it, or remove it from url_lists") from None
            _resolve(path, names, m)
        files.append((path, fmt))
    return files


def iter_url_list_parts(m: SourceManifest, files: list[tuple[str, str]],
                        batch_rows: int = BATCH_ROWS) -> Iterator[pa.Table]:
    """The URL lists' rows in order, at most `batch_rows` (plus counted bad lines) at a time whatever the format,
    file or row-group size, so a planner's memory does not grow with the list: url, caption (str or None),
    caption_utf8, bad_row (None or BAD_ROW), extras."""
    for path, fmt in files:
        for part in _iter_parts(path, fmt, m, batch_rows):
            cols = {"url": pa.array([None if u is None else str(u) for u in part.columns[m.url_column]], pa.string()),
                    "caption": pa.array([None if c is None else str(c) for c in part.columns[m.caption_column]], pa.string()),
                    "caption_utf8": pa.array(part.caption_utf8, pa.bool_()),
                    "bad_row": pa.array([BAD_ROW if b else None for b in part.bad], pa.string())}
            yield pa.table(cols | {c: pa.array(part.columns[c]) for c in m.extra_columns})
