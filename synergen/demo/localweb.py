"""A local web server that plays "the web" for the demo and the tests: real HTTP on loopback.

Serves files from a folder and a few misbehaving endpoints, so downloads exercise real sockets:
    /files/NAME                 the file (content type from the extension)
    /status/CODE                an empty response with that status
    /slow/SECONDS/NAME          sleeps, then serves NAME (timeouts; `/slow/` answers fast after `unslow()`)
    /held/NAME                  waits until `release()` (at most `held_max_s`), then serves NAME: a test decides
                                when a job's downloads may finish, instead of racing a clock
    /reset                      closes the connection without a response (connection reset)
    /truncated/NAME             announces the full length, sends half the body, closes
    /redirect?to=URL            302 to URL
    /as/CONTENT_TYPE/NAME       serves NAME with another content type (e.g. text/html)
    /robots/DIRECTIVE/NAME      serves NAME with `X-Robots-Tag: DIRECTIVE`
    /trickle/PART/NAME          one byte every `trickle_interval` s, forever, in PART: status (the status line),
                                headers (an endless header) or body (NAME's bytes, then padding); never completes
Every request is counted by path (`server.hits`), so tests can prove what was (not) asked for again.
"""

from __future__ import annotations

import collections
import itertools
import mimetypes
import socket
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr access log
        pass

    def _send_file(self, name: str, content_type: str | None = None, extra: dict | None = None, truncate: bool = False):
        path = (self.server.root / urllib.parse.unquote(name)).resolve()
        if self.server.root not in path.parents or not path.is_file():
            return self._status(404)
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", content_type or mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if truncate else data)
        if truncate:
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def _status(self, code: int):
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):  # noqa: N802 - http.server's naming
        parsed = urllib.parse.urlparse(self.path)
        self.server.hits[parsed.path] += 1
        parts = parsed.path.lstrip("/").split("/", 2)
        kind = parts[0]
        if kind == "files":
            return self._send_file("/".join(parts[1:]))
        if kind == "status":
            return self._status(int(parts[1]))
        if kind == "slow":
            if not self.server.unslowed:
                time.sleep(float(parts[1]))
            return self._send_file(parts[2])
        if kind == "held":
            self.server.released.wait(self.server.held_max_s)
            return self._send_file("/".join(parts[1:]))
        if kind == "reset":
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.connection.close()
            return
        if kind == "truncated":
            return self._send_file("/".join(parts[1:]), truncate=True)
        if kind == "redirect":
            to = urllib.parse.parse_qs(parsed.query)["to"][0]
            self.send_response(302)
            self.send_header("Location", to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if kind == "as":
            ctype, name = urllib.parse.unquote(parts[1]), parts[2]
            return self._send_file(name, content_type=ctype)
        if kind == "robots":
            return self._send_file(parts[2], extra={"X-Robots-Tag": urllib.parse.unquote(parts[1])})
        if kind == "trickle":
            return self._trickle(parts[1], parts[2] if len(parts) > 2 else "")
        return self._status(404)

    def _trickle(self, part: str, name: str):
        self.close_connection = True
        path = self.server.root / urllib.parse.unquote(name)
        body = path.read_bytes() if path.is_file() else b""
        head = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"
        if part == "status":
            sent, stream = b"", itertools.chain(b"HTTP/1.1 200 ", itertools.repeat(ord("O")))
        elif part == "headers":
            sent, stream = head, itertools.chain(b"X-Pad: ", itertools.repeat(ord("a")))
        else:  # body: the announced length is never reached
            sent = head + f"Content-Length: {len(body) + 1000}\r\n\r\n".encode()
            stream = itertools.chain(body, itertools.repeat(0))
        try:
            self.wfile.write(sent)
            for byte in stream:
                if self.server.stopping.wait(self.server.trickle_interval):
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
        except OSError:
            return  # the client gave up: what a trickling host sees when a deadline works


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # a real server's accept backlog (nginx: 511), not socketserver's 5: with 64 clients connecting at once a
    # backlog of 5 drops SYNs, and the retransmits (1 s, 3 s, 7 s...) turn into client timeouts
    request_queue_size = 512

    def __init__(self, root: Path, host: str, port: int):
        super().__init__((host, port), _Handler)
        self.root = root.resolve()
        self.hits: collections.Counter[str] = collections.Counter()
        self.unslowed = False
        self.trickle_interval = 0.2
        self.released = threading.Event()
        self.held_max_s = 120.0
        self.stopping = threading.Event()

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return  # a client that gave up (a killed worker, a deadline): what a real server sees, not an error here
        super().handle_error(request, client_address)


class LocalWeb:
    """Start with `LocalWeb(folder).start()`; `url("files/x.jpg")` gives a loopback URL; `stop()` ends it."""

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0):
        self._server = _Server(Path(root), host, port)
        self._thread = threading.Thread(target=self._server.serve_forever, name="localweb", daemon=True)

    @property
    def base(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def hits(self) -> collections.Counter:
        return self._server.hits

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"

    def unslow(self) -> None:
        """From now on `/slow/...` answers at once (a server that timed out before recovers)."""
        self._server.unslowed = True

    def hold_for(self, seconds: float) -> None:
        """`/held/...` requests wait at most this long for `release()` (default 120 s)."""
        self._server.held_max_s = seconds

    def release(self) -> None:
        """`/held/...` requests waiting now, and all later ones, are served."""
        self._server.released.set()

    def start(self) -> "LocalWeb":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.stopping.set()  # ends trickling responses
        self._server.released.set()  # and held ones
        self._server.shutdown()
        self._server.server_close()
