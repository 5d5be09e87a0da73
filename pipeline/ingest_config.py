"""What one ingest job takes besides its manifest and output (`pipeline.ingest.run_ingest`, `synergen ingest`):
validated options (pydantic), light to import, so the CLI derives its flags from these fields and never restates a
default. Shipped to each Ray shard task as `model_dump()` and validated again there."""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline import netguard


class IngestOptions(BaseModel):
    """Knobs of one ingest job; defaults suit a single machine."""

    model_config = ConfigDict(extra="forbid")

    shard_size: int = Field(1000, ge=1, description="Input rows per shard")
    allow_private_network: bool = Field(False, description="Allow loopback and private addresses (local mirrors); "
                                                           "cloud metadata addresses stay refused")
    allow_networks: tuple[str, ...] = Field((), description="A network (CIDR, e.g. 127.0.0.0/8) allowed although "
                                                            "private (repeatable); link-local/metadata never")
    timeout: float = Field(10.0, gt=0, description="Seconds per socket operation of a download")
    download_deadline_s: float = Field(netguard.DEFAULT_TOTAL_TIMEOUT, gt=0,
                                       description="Seconds one download may take in all (connect, headers, body); "
                                                   "slower hosts fail as timeout and are retried by a re-run")
    shard_download_deadline_s: float | None = Field(None, gt=0, description="Seconds a shard's whole download phase may "
                                                    "take (default: from the thread count and the download deadline)")
    thread_count: int = Field(32, ge=1, description="Download threads per shard task")
    max_attempts: int = Field(3, ge=1, description="Downloads per URL across re-runs before a retryable failure is final")
    task_retries: int = Field(3, ge=0, description="Further attempts of a shard whose attempt died or hung "
                                                   "(worker or node died, or img2dataset returned ok=False)")
    shard_deadline_s: float | None = Field(None, gt=0, description="Start a second attempt of a shard running longer "
                                                                   "(default: 3x the median shard time so far, at least 60 s)")
    shard_wall_s: float | None = Field(None, gt=0, description="Abandon a shard attempt running longer "
                                                               "(default: 4x the straggler deadline)")
    max_in_flight: int | None = Field(None, ge=1, description="Shard attempts running at once (default: 2x the cluster's CPUs)")
    dedup_actors: int | None = Field(None, ge=1, description="Dedup index shards (default: one per 16 cluster CPUs)")
    row_index_actors: int | None = Field(None, ge=0, description="Actors holding the job's row index (URL occurrences, "
                                                                 "planned rows), partitioned by URL hash; 0: in the driver "
                                                                 "(default: one per 16 cluster CPUs; in the driver below 16)")
    per_host_connections: int | None = Field(None, ge=1, description="Job-wide concurrent downloads per host "
                                                                     "(default: unlimited)")
    per_host_rps: float | None = Field(None, gt=0, description="Job-wide download starts per second per host "
                                                               "(default: unlimited)")
    max_bytes: int = Field(netguard.DEFAULT_MAX_BYTES, ge=1, description="Largest image body in bytes")
    max_pixels: int = Field(netguard.DEFAULT_MAX_PIXELS, ge=1, description="Largest image in pixels (width x height)")
    max_decoded_bytes: int = Field(netguard.DEFAULT_MAX_DECODED_BYTES, ge=1,
                                   description="Largest decoded image in bytes (width x height x bytes per pixel)")
    encode_quality: int = Field(95, ge=1, le=100, description="JPEG quality of the stored images")
    connect_audit: str | None = Field(None, description="File where workers record every connect address "
                                                        "(tests prove the guard with it)")

    @field_validator("allow_networks")
    @classmethod
    def _networks(cls, nets: tuple[str, ...]) -> tuple[str, ...]:
        for n in nets:
            try:
                ipaddress.ip_network(n)
            except ValueError as e:
                raise ValueError(f"{n!r} is not a network ({e}); write it like 127.0.0.0/8 or 10.1.2.3/32") from None
        return nets
