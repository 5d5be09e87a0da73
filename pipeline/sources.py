"""Source manifests (`manifests/sources/*.yaml`) and the URL lists they point at.

`load_source_manifest(path)` validates a manifest (pydantic; unknown keys refused) and raises
ManifestError naming the file, the key and the fix. `read_url_list(manifest)` reads every URL-list file
(parquet, csv or jsonl; a glob or a list; local or s3://) into one table with the columns `url`,
`caption`, the manifest's extra columns and a stable `row_id`, and checks the columns first, so a
list without its url or caption column fails before anything is downloaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import fsspec
import pyarrow as pa
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from synergen.errors import ManifestError, SynergenError


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
    filters: FilterConfig = Field(default_factory=FilterConfig)

    @field_validator("url_lists", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _metadata_columns_are_carried(self):
        for col in self.filters.metadata:
            if col not in self.extra_columns:
                raise ValueError(f"filters.metadata names column {col!r}, which is not in extra_columns; add it there")
        if self.filters.language_column and self.filters.language_column not in self.extra_columns:
            raise ValueError(f"filters.language_column {self.filters.language_column!r} must be listed in extra_columns")
        return self


_FIXES = {
    "extra_forbidden": "remove it, or fix its spelling (see the fields of pipeline/sources.py:SourceManifest)",
    "missing": "add it",
    "literal_error": "use one of the allowed values",
}


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
        lines = []
        for e in err.errors():
            key = ".".join(str(x) for x in e["loc"]) or "(manifest)"
            fix = _FIXES.get(e["type"], "fix the value")
            lines.append(f"  key {key!r}: {e['msg']} (got {e.get('input')!r}); fix: {fix}")
        raise ManifestError(f"{path}: invalid source manifest\n" + "\n".join(lines)) from None


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


def _read_one(path: str, fmt: str, m: SourceManifest) -> pa.Table:
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    wanted = [m.url_column, m.caption_column, *m.extra_columns]
    with fsspec.open(path, "rb", compression="infer") as f:
        if fmt == "parquet":
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            _check_columns(path, names, m)
            return pf.read(columns=wanted)
        if fmt == "csv":
            # captions read as bytes, so a non-UTF-8 caption is counted by a filter instead of failing the file
            head = pcsv.open_csv(f, convert_options=pcsv.ConvertOptions(column_types={m.caption_column: pa.binary()}))
            _check_columns(path, head.schema.names, m)
            return head.read_all().select(wanted)
        table = pjson.read_json(f)
        _check_columns(path, table.schema.names, m)
        return table.select(wanted)


def _check_columns(path: str, names: list[str], m: SourceManifest) -> None:
    for role, col in (("url_column", m.url_column), ("caption_column", m.caption_column)):
        if col not in names:
            raise UrlListError(f"{path}: URL list has no column {col!r} (the manifest's {role}); its columns are "
                               f"{names}; set {role} in the manifest to the right one")
    missing = [c for c in m.extra_columns if c not in names]
    if missing:
        raise UrlListError(f"{path}: URL list lacks extra_columns {missing}; its columns are {names}; "
                           f"drop them from extra_columns in the manifest")


def row_ids(urls: list[str]) -> list[str]:
    """Stable row ids: hash of the URL plus its occurrence number, so appending rows keeps earlier ids."""
    seen: dict[str, int] = {}
    out = []
    for u in urls:
        n = seen.get(u, 0)
        seen[u] = n + 1
        out.append(f"{hashlib.sha1(str(u).encode('utf-8', 'surrogatepass')).hexdigest()[:20]}-{n}")
    return out


def read_url_list(m: SourceManifest) -> pa.Table:
    """All rows of the manifest's URL lists: row_id, url, caption (str or None), caption_utf8 (bool), extras."""
    parts = []
    for path in expand_url_lists(m.url_lists):
        t = _read_one(path, _format_of(path, m.format), m)
        parts.append(t)
    urls, captions, utf8 = [], [], []
    extras: dict[str, list] = {c: [] for c in m.extra_columns}
    for t in parts:
        urls.extend(t.column(m.url_column).to_pylist())
        for cap in t.column(m.caption_column).to_pylist():
            if isinstance(cap, bytes):
                try:
                    cap, ok = cap.decode("utf-8"), True
                except UnicodeDecodeError:
                    cap, ok = None, False
            else:
                ok = True
            captions.append(None if cap is None else str(cap))
            utf8.append(ok)
        for c in m.extra_columns:
            extras[c].extend(t.column(c).to_pylist())
    urls = [None if u is None else str(u) for u in urls]
    cols = {"row_id": row_ids([u or "" for u in urls]), "url": urls, "caption": captions, "caption_utf8": utf8}
    for c, vals in extras.items():
        cols[c] = vals
    return pa.table(cols)


def manifest_dir() -> Path:
    """The shipped manifests folder of this checkout."""
    return Path(__file__).resolve().parents[1] / "manifests" / "sources"
