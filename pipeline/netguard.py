"""Address policy and the guarded fetch that every ingest download goes through.

`fetch(url, policy)` resolves the host, refuses private / loopback / link-local / multicast / reserved
addresses BEFORE any socket connects, then connects to the vetted IP itself (so a second DNS answer
cannot swap the address: no rebinding window). Every redirect hop passes through the same check.
Only http and https are opened (no file:, ftp:, data:), URLs with `user:password@` are refused (policy:
credentials are never sent), bodies are capped in bytes, and image headers are checked against a
decoded-pixel cap before anything decodes them (decompression bombs). Cloud metadata addresses
(`METADATA_NETWORKS`, in every IPv4-in-IPv6 form) are refused always, whatever the policy allows.

Every download has a TOTAL deadline (`AddressPolicy.total_timeout`: connect + status line + headers +
body, redirects included) besides the per-socket-operation timeout: a server trickling one byte at a
time is cut off when the deadline passes (a watchdog shuts its socket down) and the download fails as
`timeout` (retryable). `install(..., deadline=...)` also bounds a whole shard's download phase: past that
moment, running downloads are cut and queued ones fail at once as `shard_deadline` (retryable).

What is stored about a URL is `redact_url(url)` (userinfo, fragment and secret-looking query values
removed) plus `url_hash(url)` of the full URL for identity; nothing else of a URL reaches a file or a log.

`install(policy)` puts this fetch into img2dataset's downloader inside the current process (a Ray
worker): img2dataset looks `download_image` up as a module global on every call.

Errors carry a stable reason code (`FetchError.reason`) and whether a later retry can succeed;
`error_text` / `parse_error_text` carry both through img2dataset's string error column.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import ipaddress
import logging
import math
import os
import re
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from PIL import Image

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # 8k x 8k; a 20000x20000 PNG bomb (400M pixels) is refused
DEFAULT_TOTAL_TIMEOUT = 60.0  # seconds for one download, all of it (a 32 MiB body needs ~4.5 Mbit/s)
# Decoded size limit of pipeline.image_decode (here with the other limits, light to import for the CLI):
# 8192 x 8192 x 4 bytes, an 8k RGBA image at 8 bits per sample; the same at 16 bits is refused.
DEFAULT_MAX_DECODED_BYTES = 256 * 1024 * 1024
# Cloud metadata / instance services: refused always, whatever allow_private_network or allow_networks say.
METADATA_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "169.254.0.0/16",      # link-local v4: AWS/GCP/Azure/OpenStack/DigitalOcean metadata, ECS task metadata
    "fe80::/10",           # link-local v6
    "fd00:ec2::254/128",   # AWS IMDS over IPv6
    "100.100.100.200/32",  # Alibaba Cloud metadata
    "168.63.129.16/32",    # Azure WireServer (a public address that answers only inside Azure)
    "192.0.0.192/32",      # Oracle Cloud metadata (legacy address)
))
# The four directives img2dataset treats as opt-outs by default.
OPT_OUT_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
USER_AGENT = "Mozilla/5.0 (compatible; synergen-ingest; +https://github.com/rom1504/img2dataset)"


@dataclass(frozen=True)
class AddressPolicy:
    """Which resolved addresses a download may connect to; link-local (cloud metadata) never."""

    allow_private_network: bool = False
    # Extra networks (CIDR) allowed even when private, e.g. ("127.0.0.0/8",) for a local mirror; link-local never.
    allow_networks: tuple[str, ...] = ()
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_redirects: int = 5
    total_timeout: float = DEFAULT_TOTAL_TIMEOUT  # connect + headers + body of one download, redirects included


class FetchError(Exception):
    """A download that did not give an image: `reason` is a stable code, `retryable` says if a re-run may succeed."""

    def __init__(self, reason: str, message: str, retryable: bool):
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable


class BlockedAddress(FetchError):
    def __init__(self, message: str):
        super().__init__("blocked_address", message, retryable=False)


# Query parameters whose values are credentials: presigned S3/GCS/Azure/CloudFront URLs, OAuth, API keys.
_SECRET_KEY = re.compile(r"sig|signature|token|secret|passw|pwd|credential|auth|key|session|sid|code|policy", re.I)
_TOKEN_LIKE = re.compile(r"[A-Za-z0-9+/=_%.~-]{24,}")  # a long opaque value is treated as a secret whatever its name


def redact_url(url: str) -> str:
    """What is stored and logged of a URL: scheme, host, port, path, and the query with every value that may
    be a credential replaced by `REDACTED` (a secret-looking parameter name, or a value of 24+ opaque
    characters); user:password and the fragment are dropped. Deterministic, so equal URLs redact equally."""
    try:
        p = urllib.parse.urlsplit(url)
        host = p.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if p.port:
            host = f"{host}:{p.port}"
        query = "&".join(
            f"{k}={'REDACTED' if _SECRET_KEY.search(k) or _TOKEN_LIKE.fullmatch(v) else v}" if sep else k
            for k, sep, v in (part.partition("=") for part in p.query.split("&") if part))
        return urllib.parse.urlunsplit((p.scheme, host, p.path, query, ""))
    except (ValueError, TypeError):
        return "<unparseable url>"


def mask_userinfo(url: str) -> str:
    """`url` with its userinfo replaced by `REDACTED@`: still refused as `userinfo` by the guard, and the password
    is never stored (the planner keeps URLs this way in a job's `_inputs/`)."""
    head, sep, rest = url.partition("://") if isinstance(url, str) else ("", "", "")
    netloc, slash, tail = rest.partition("/")
    if not sep or "@" not in netloc:
        return url
    return f"{head}://REDACTED@{netloc.rsplit('@', 1)[1]}{slash}{tail}"


def redact_options(options):
    """A copy of a (nested) options mapping, e.g. fsspec `storage_options`, with the whole value under every
    secret-looking key (`secret`, `token`, `key`, `password`, ...) replaced by `REDACTED` and URLs redacted as
    `redact_url` does: what a saved config or a log may show of it."""
    if isinstance(options, dict):
        return {k: "REDACTED" if isinstance(k, str) and _SECRET_KEY.search(k) else redact_options(v)
                for k, v in options.items()}  # all of a secret's value, whatever its type (a token dict, a key list)
    if isinstance(options, list):
        return [redact_options(v) for v in options]
    if isinstance(options, str) and "://" in options:
        return redact_url(options)  # an endpoint with a password or a signed query
    return options


def drop_redacted(options):
    """`redact_options`' output made usable again: every `REDACTED` value left out, so the reader falls back to its
    own credentials (environment, instance role) for those keys."""
    if isinstance(options, dict):
        return {k: drop_redacted(v) for k, v in options.items() if v != "REDACTED"}
    if isinstance(options, list):
        return [drop_redacted(v) for v in options]
    return options


def url_hash(url: str | None) -> str:
    """A stable identity of the full URL (secrets included, never revealed): 20 hex digits of its SHA-1. The one
    URL identity of the project: row ids are `<url_hash>-<occurrence>`, the ledger's `url_hash` column is this."""
    return hashlib.sha1((url or "").encode("utf-8", "surrogatepass")).hexdigest()[:20]


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries (mapped, compatible, 6to4, Teredo, NAT64): each is checked too."""
    out = []
    if addr.ipv4_mapped:
        out.append(addr.ipv4_mapped)
    if addr.sixtofour:
        out.append(addr.sixtofour)
    if addr.teredo:
        out.extend(addr.teredo)
    packed = addr.packed
    if packed[:12] == bytes(12) and packed[12:] != bytes(4):  # ::a.b.c.d (deprecated IPv4-compatible)
        out.append(ipaddress.IPv4Address(packed[12:]))
    if packed[:12] == bytes.fromhex("0064ff9b0000000000000000") or packed[:6] == bytes.fromhex("0064ff9b0001"):
        out.append(ipaddress.IPv4Address(packed[12:]))  # NAT64 64:ff9b::/96 and 64:ff9b:1::/48
    return out


def check_ip(ip: str, policy: AddressPolicy) -> None:
    """Raise BlockedAddress unless `ip` is a public unicast address (or private/loopback when allowed).
    Metadata addresses (`METADATA_NETWORKS`, also inside any IPv4-in-IPv6 form) are refused whatever the policy."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    candidates = [addr]
    if isinstance(addr, ipaddress.IPv6Address):
        candidates += _embedded_ipv4(addr)
    for a in candidates:
        if any(a in net for net in METADATA_NETWORKS if net.version == a.version):
            raise BlockedAddress(f"{a} is a cloud metadata / link-local address; always refused")
    for a in candidates[1:]:
        check_ip(str(a), policy)  # an embedded IPv4 is checked as if it were the address
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return
    if addr.is_multicast:
        raise BlockedAddress(f"{addr} is multicast")
    if addr.is_unspecified:
        raise BlockedAddress(f"{addr} is unspecified")
    if addr.is_loopback or addr.is_private:
        if policy.allow_private_network or any(addr in ipaddress.ip_network(n) for n in policy.allow_networks):
            return
        kind = "loopback" if addr.is_loopback else "private"
        raise BlockedAddress(f"{addr} is a {kind} address; pass --allow-private-network for local mirrors")
    if addr.is_reserved or not addr.is_global:
        raise BlockedAddress(f"{addr} is a reserved / non-global address")


def resolve_checked(host: str, port: int, policy: AddressPolicy) -> list[tuple]:
    """getaddrinfo results for host, all of them checked; refuses if any answer is disallowed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise FetchError("dns", f"cannot resolve {host}: {err}", retryable=True) from err
    if not infos:
        raise FetchError("dns", f"no address for {host}", retryable=True)
    for info in infos:
        check_ip(info[4][0], policy)
    return infos


class _Deadline:
    """The moment one download must be over. At that moment the process's watchdog (`_Watchdog`) shuts down every
    socket the download opened, so a blocked read returns at once however slowly the server trickles; `expired`
    then says why."""

    def __init__(self, seconds: float):
        self.at = time.monotonic() + max(seconds, 0.0)
        self.expired = False
        self.closed = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        _watchdog.add(self)

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock)
            if not self.expired:
                return
        self._shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.expired = True
            socks = list(self._socks)
        for sock in socks:
            self._shutdown(sock)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed

    def close(self) -> None:
        with self._lock:
            self.closed = True


class _Watchdog:
    """One thread per process that expires downloads' deadlines at their moment, in deadline order (a timer thread
    per download cost a shard task ~3% of its CPU in thread starts). Closed deadlines are dropped when they come
    up; the thread starts on first use (and again in a forked child, where it does not exist)."""

    def __init__(self):
        self._heap: list[tuple[float, int, _Deadline]] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._n = 0

    def add(self, deadline: _Deadline) -> None:
        import heapq

        with self._cv:
            self._n += 1
            heapq.heappush(self._heap, (deadline.at, self._n, deadline))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="netguard-deadlines", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is deadline:
                self._cv.notify()  # earlier than what the thread waits for

    def _run(self) -> None:
        import heapq

        while True:
            with self._cv:
                while True:
                    while self._heap and self._heap[0][2].closed:
                        heapq.heappop(self._heap)
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        due = heapq.heappop(self._heap)[2]
                        break
                    self._cv.wait(self._heap[0][0] - now if self._heap else None)
            due._expire()


_watchdog = _Watchdog()
if hasattr(os, "register_at_fork"):  # a forked child gets its own (the parent's lock may be held, its thread is gone)
    os.register_at_fork(after_in_child=_watchdog.__init__)


_SSL_CONTEXT: ssl.SSLContext | None = None
_SSL_LOCK = threading.Lock()


def _ssl_context() -> ssl.SSLContext:
    """The process's one default TLS context (loading the CA bundle per opener cost a shard task ~4% of its CPU:
    every thread of every shard built its own). An SSLContext is safe to share between threads."""
    global _SSL_CONTEXT
    with _SSL_LOCK:
        if _SSL_CONTEXT is None:
            _SSL_CONTEXT = ssl.create_default_context()
        return _SSL_CONTEXT


_current = threading.local()  # the _Deadline of the download this thread is running


def _connect_vetted(host: str, port: int, timeout, policy: AddressPolicy) -> socket.socket:
    err: OSError | None = None
    deadline: _Deadline | None = getattr(_current, "deadline", None)
    for family, type_, proto, _, sockaddr in resolve_checked(host, port, policy):
        sock = socket.socket(family, type_, proto)
        try:
            if timeout is not None and timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout if deadline is None else max(0.001, min(timeout, deadline.remaining())))
            sock.connect(sockaddr)
            if deadline is not None:
                deadline.watch(sock)
            return sock
        except OSError as e:
            sock.close()
            err = e
    raise err if err else OSError(f"cannot connect to {host}")


class _GuardedHTTPConnection(http.client.HTTPConnection):
    policy: AddressPolicy

    def connect(self):
        self.sock = _connect_vetted(self.host, self.port, self.timeout, self.policy)


class _GuardedHTTPSConnection(http.client.HTTPSConnection):
    policy: AddressPolicy

    def connect(self):
        sock = _connect_vetted(self.host, self.port, self.timeout, self.policy)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: AddressPolicy):
        super().__init__()
        self._conn = type("Conn", (_GuardedHTTPConnection,), {"policy": policy})

    def http_open(self, req):
        return self.do_open(self._conn, req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: AddressPolicy):
        super().__init__(context=_ssl_context())
        self._conn = type("Conn", (_GuardedHTTPSConnection,), {"policy": policy})

    def https_open(self, req):
        return self.do_open(self._conn, req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows http(s) redirects only; the target's address is checked when its connection opens."""

    def __init__(self, policy: AddressPolicy):
        super().__init__()
        self.max_redirections = policy.max_redirects

    def http_error_302(self, req, fp, code, msg, headers):
        target = headers.get("location") or headers.get("uri") or ""
        _check_url(urllib.parse.urljoin(req.full_url, target), "redirect to ")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def build_opener(policy: AddressPolicy) -> urllib.request.OpenerDirector:
    """An opener with only guarded http/https handlers: no file/ftp/data handler, no proxy from the environment."""
    opener = urllib.request.OpenerDirector()
    for handler in (_GuardedHTTPHandler(policy), _GuardedHTTPSHandler(policy), _RedirectHandler(policy),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def _opted_out(headers, directives) -> bool:
    for value in headers.get_all("X-Robots-Tag") or []:
        parts = value.split(":", 1)
        token = parts[0].strip().lower() if len(parts) == 2 else None
        found = {d.strip().lower() for d in parts[-1].split(",")}
        if token in (None, "synergen", "img2dataset", "*") and found & set(directives):
            return True
    return False


def check_pixels(data: bytes, policy: AddressPolicy) -> None:
    """Read only the image header; refuse when width x height exceeds the pixel cap (before any full decode)."""
    try:
        with Image.open(io.BytesIO(data)) as im:  # lazy: parses the header, decodes nothing
            w, h = im.size
    except Image.DecompressionBombError as err:
        raise FetchError("pixel_cap", str(err), retryable=False) from err
    except Exception as err:  # noqa: BLE001 - any parse failure means "not an image we can read"
        raise FetchError("undecodable", f"cannot read image header: {err}", retryable=False) from err
    if w * h > policy.max_pixels:
        raise FetchError("pixel_cap", f"{w}x{h} = {w * h} pixels exceeds the cap of {policy.max_pixels}", retryable=False)


def _classify(err: BaseException) -> FetchError:
    if isinstance(err, FetchError):
        return err
    if isinstance(err, urllib.error.HTTPError):
        wait = err.headers.get("Retry-After") if err.headers else None  # read by pipeline.politeness
        return FetchError(f"http_{err.code}", f"HTTP {err.code}" + (f"; Retry-After {wait}" if wait else ""),
                          retryable=err.code >= 500 or err.code in (408, 429))
    if isinstance(err, urllib.error.URLError):
        if isinstance(err.reason, FetchError):
            return err.reason
        return _classify(err.reason) if isinstance(err.reason, BaseException) else FetchError("network", str(err.reason), True)
    if isinstance(err, (TimeoutError, socket.timeout)):
        return FetchError("timeout", "timed out", retryable=True)
    if isinstance(err, http.client.IncompleteRead):
        return FetchError("truncated", f"body ended early ({len(err.partial)} bytes read)", retryable=True)
    if isinstance(err, (ConnectionResetError, http.client.RemoteDisconnected, ConnectionAbortedError, BrokenPipeError)):
        return FetchError("connection_reset", str(err) or type(err).__name__, retryable=True)
    if isinstance(err, ConnectionRefusedError):
        return FetchError("connection_refused", str(err), retryable=True)
    if isinstance(err, ValueError):
        return FetchError("bad_url", str(err), retryable=False)
    if isinstance(err, OSError):
        return FetchError("network", str(err) or type(err).__name__, retryable=True)
    return FetchError("error", f"{type(err).__name__}: {err}", retryable=False)


_openers = threading.local()


def _check_url(url, what: str = "") -> None:
    """Refuse what no policy allows: schemes other than http(s), and credentials in the URL."""
    try:
        parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
    except ValueError as err:
        raise FetchError("bad_url", f"{what}unparseable URL: {err}", retryable=False) from err
    scheme = parts.scheme.lower() if parts else ""
    if scheme not in ("http", "https"):
        raise FetchError("blocked_scheme", f"{what}a {scheme or 'non-http'}: URL refused; only http and https are fetched",
                         retryable=False)
    if "@" in parts.netloc:
        raise FetchError("userinfo", f"{what}a URL with user:password@ refused: credentials are never sent to an image "
                         "host; give a URL without them (a presigned URL works)", retryable=False)


def fetch(url: str, policy: AddressPolicy, timeout: float = 10.0, opt_out_directives=OPT_OUT_DIRECTIVES,
          user_agent: str = USER_AGENT, deadline_at: float | None = None) -> bytes:
    """The image bytes at `url`, or FetchError with a reason. No socket opens to a refused address.

    `timeout` bounds each socket operation; `policy.total_timeout` the whole download; `deadline_at`
    (time.monotonic()) an outer bound, e.g. the end of the shard's download phase.
    """
    _check_url(url)
    cache = getattr(_openers, "by_policy", None)  # one opener per thread and policy (openers hold handler state)
    if cache is None:
        cache = _openers.by_policy = {}
    opener = cache.get(policy) or cache.setdefault(policy, build_opener(policy))
    budget = policy.total_timeout if deadline_at is None else min(policy.total_timeout, deadline_at - time.monotonic())
    if budget <= 0:
        raise FetchError("shard_deadline", "the shard's download phase ended before this URL's turn", retryable=True)
    deadline = _current.deadline = _Deadline(budget)
    try:
        req = urllib.request.Request(url, headers={"User-Agent": user_agent})
        with opener.open(req, timeout=timeout) as resp:
            if opt_out_directives and _opted_out(resp.headers, opt_out_directives):
                raise FetchError("opted_out", "X-Robots-Tag opts this image out", retryable=False)
            ctype = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype and not (ctype.startswith("image/") or ctype in ("application/octet-stream", "binary/octet-stream")):
                raise FetchError("not_image", f"content type {ctype}", retryable=False)
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                raise FetchError("byte_cap", f"{length} bytes announced, cap {policy.max_bytes}", retryable=False)
            data = resp.read(policy.max_bytes + 1)
            if deadline.expired:
                raise TimeoutError
            if len(data) > policy.max_bytes:
                raise FetchError("byte_cap", f"body exceeds the cap of {policy.max_bytes} bytes", retryable=False)
            if length and length.isdigit() and len(data) < int(length):
                raise FetchError("truncated", f"body ended after {len(data)} of {length} bytes", retryable=True)
    except BaseException as err:  # noqa: BLE001 - every failure becomes a classified FetchError
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        if deadline.expired:  # whatever the cut-off socket raised, the cause is the deadline
            raise FetchError("timeout", f"no complete response within {budget:.1f} s (total deadline)",
                             retryable=True) from err
        raise _classify(err) from err
    finally:
        deadline.close()
        _current.deadline = None
    check_pixels(data, policy)
    return data


def shard_download_deadline(n_downloads: int, threads: int, download_deadline_s: float,
                            override_s: float | None = None) -> float:
    """Seconds a shard's download phase may take: `override_s`, else room for every download to use its whole
    deadline twice over (so only a host that stalls DNS or a bug, never a slow-but-working web, hits it)."""
    if override_s is not None:
        return override_s
    return download_deadline_s * 2 * (1 + math.ceil(n_downloads / max(threads, 1)))


# img2dataset passes errors through as strings: "reason|r|message" (r = retryable flag 0/1).
def error_text(err: FetchError) -> str:
    return f"{err.reason}|{int(err.retryable)}|{err}"


def parse_error_text(text: str) -> tuple[str, bool, str]:
    """(reason, retryable, message) from `error_text`, or a best guess for img2dataset's own error strings."""
    parts = text.split("|", 2)
    if len(parts) == 3 and parts[1] in ("0", "1"):
        return parts[0], parts[1] == "1", parts[2]
    low = text.lower()
    if "decod" in low:
        return "undecodable", False, text
    if "too small" in low or "too large" in low:
        return "geometry", False, text
    return "error", False, text


def download_image(row, timeout, user_agent_token, disallowed_header_directives, policy: AddressPolicy | None = None):
    """img2dataset's `download_image` contract: (key, BytesIO | None, error | None), guarded by `policy`."""
    key, url = row
    try:
        data = fetch(url, policy or _installed_policy, timeout, tuple(disallowed_header_directives or ()),
                     deadline_at=_installed_deadline)
        return key, io.BytesIO(data), None
    except FetchError as err:
        log.debug("download refused or failed: %s (%s)", redact_url(url), err.reason)
        return key, None, error_text(err)


_installed_policy = AddressPolicy()
_installed_deadline: float | None = None
_audit_path: str | None = None
_audit_installed = False


def _audit(event: str, args) -> None:
    # Records every outbound connect this process makes, so a test can prove no packet left for a refused address.
    if event == "socket.connect" and _audit_path:
        addr = args[1]
        if isinstance(addr, tuple):
            with open(_audit_path, "a", encoding="utf-8") as f:
                f.write(f"{addr[0]}\n")


def install(policy: AddressPolicy, connect_audit: str | None = None, deadline_s: float | None = None) -> None:
    """Route img2dataset's downloads in this process through `fetch` under `policy` (and urllib's default opener).

    `connect_audit`: a file to which every socket connect of this process appends its address (proof for tests).
    `deadline_s`: from now, how long downloads may go on (a shard's download phase); None: no outer bound.
    """
    global _installed_policy, _installed_deadline, _audit_path, _audit_installed
    from synergen.imports import submodule_alone

    dl = submodule_alone("img2dataset.downloader")

    _installed_policy = policy
    _installed_deadline = None if deadline_s is None else time.monotonic() + deadline_s
    dl.download_image = download_image
    urllib.request.install_opener(build_opener(policy))
    _audit_path = connect_audit
    if connect_audit and not _audit_installed:
        sys.addaudithook(_audit)  # audit hooks cannot be removed; the path is cleared instead
        _audit_installed = True
