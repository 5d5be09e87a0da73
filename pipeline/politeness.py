"""Per-host politeness for ingest downloads: concurrent connections, requests per second, Retry-After.

The job-wide limits are split evenly over the shard attempts that may run at once (`share`), so the whole job
never exceeds them without any coordination between tasks (a host found in every shard gets its full budget;
one found in few shards gets less, never more). Inside a task a `HostLimiter` enforces its share for every
download thread. A host that answers 429 or 503 with `Retry-After` is paused until then. No thread waits longer
than `max_wait` for a host: past that the row fails at once as retryable (`throttled`), a re-run retries it,
and the task's threads go on with other hosts' rows (the task also interleaves its rows by host).
"""

from __future__ import annotations

import re
import threading
import time
import urllib.parse

RETRY_AFTER = re.compile(r"Retry-After (.+?)\s*$")
MAX_RETRY_AFTER_S = 3600.0  # a longer pause than this is the re-run's business


def retry_after_s(text: str) -> float:
    """Seconds to pause a host from an error text's `Retry-After VALUE`: delay-seconds or an HTTP-date (RFC 9110),
    1 s when absent or unreadable, at most MAX_RETRY_AFTER_S."""
    import email.utils

    m = RETRY_AFTER.search(text)
    if not m:
        return 1.0
    value = m.group(1).strip()
    try:
        wait = float(value)
    except ValueError:
        try:
            wait = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError):
            return 1.0
    return min(MAX_RETRY_AFTER_S, max(0.0, wait))


def host_of(url: str | None) -> str:
    """The politeness key of a URL: scheme-less `host:port` (lower case)."""
    try:
        return (urllib.parse.urlsplit(url or "").netloc.rsplit("@", 1)[-1]).lower()
    except ValueError:
        return ""


def interleave_by_host(indices: list[int], urls: list[str]) -> list[int]:
    """`indices` reordered round-robin over hosts (stable within a host), so a host's block of rows never holds
    every download thread."""
    seen: dict[str, int] = {}
    rank = []
    for i in indices:
        h = host_of(urls[i])
        rank.append((seen.get(h, 0), i))
        seen[h] = seen.get(h, 0) + 1
    return [i for _, i in sorted(rank)]


class HostLimiter:
    """At most `connections` fetches in flight and `rps` fetch starts per second per host (None: unlimited)."""

    def __init__(self, connections: int | None, rps: float | None, max_wait: float):
        self.connections, self.rps, self.max_wait = connections, rps, max_wait
        self._cv = threading.Condition()
        self._in_flight: dict[str, int] = {}
        self._next_start: dict[str, float] = {}
        self._paused_until: dict[str, float] = {}

    def acquire(self, host: str) -> bool:
        """Wait for a slot to fetch from `host`; False (without a slot) when that would take over `max_wait`."""
        deadline = time.monotonic() + self.max_wait
        with self._cv:
            while True:
                now = time.monotonic()
                paused = self._paused_until.get(host, 0.0)
                if paused > deadline:
                    return False
                busy = self.connections is not None and self._in_flight.get(host, 0) >= self.connections
                if not busy and paused <= now:
                    start = max(now, self._next_start.get(host, 0.0))
                    if start > deadline:
                        return False
                    if start <= now:
                        if self.rps:
                            self._next_start[host] = now + 1.0 / self.rps
                        self._in_flight[host] = self._in_flight.get(host, 0) + 1
                        return True
                    wake = start
                else:
                    wake = paused if not busy else deadline
                if now >= deadline:
                    return False
                self._cv.wait(max(0.0, min(wake, deadline) - now))

    def release(self, host: str, retry_after: float | None = None) -> None:
        with self._cv:
            self._in_flight[host] -= 1
            if retry_after:
                self._paused_until[host] = max(self._paused_until.get(host, 0.0), time.monotonic() + retry_after)
            self._cv.notify_all()


def install(limiter: HostLimiter) -> None:
    """Wrap the download function img2dataset calls in this process (netguard's, installed first) with `limiter`."""
    from synergen.imports import submodule_alone

    dl = submodule_alone("img2dataset.downloader")

    from pipeline import netguard

    inner = getattr(dl.download_image, "__wrapped_by_politeness__", dl.download_image)

    def polite_download(row, timeout, *args, **kwargs):
        key, url = row
        host = host_of(url)
        if not limiter.acquire(host):
            err = netguard.FetchError("throttled", f"host {host} over its politeness budget; a re-run retries it", True)
            return key, None, netguard.error_text(err)
        retry_after = None
        try:
            result = inner(row, timeout, *args, **kwargs)
            text = result[2] or ""
            if text.startswith(("http_429|", "http_503|")):
                retry_after = retry_after_s(text)
            return result
        finally:
            limiter.release(host, retry_after)

    polite_download.__wrapped_by_politeness__ = inner
    dl.download_image = polite_download
