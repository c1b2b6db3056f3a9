"""A fault-injecting HTTP server on 127.0.0.1 that serves a directory and misbehaves on request.

Faults are planned per URL path: ``server.plan("/mnist/x.csv.gz", Status(503), Status(503))`` answers
the first two requests with 503 and serves the real file from the third on; ``then=`` replaces that
final behaviour (``then=Status(503)``: a server that always fails). Every request is recorded, with
its time and the fault it got, so tests can count attempts and measure the delays between them.
"""

from __future__ import annotations

import functools
import http.server
import os
import socket
import struct
import sys
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Fault:
    """Base of the misbehaviours; ``kind`` names one in reports and assertions."""

    @property
    def kind(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class Serve(Fault):
    """No fault: the real file, with its Content-Length."""


@dataclass(frozen=True)
class Status(Fault):
    """Answer with this HTTP status and a short text body (500, 503, 404, ...)."""

    code: int

    @property
    def kind(self) -> str:
        return f"Status{self.code}"


@dataclass(frozen=True)
class Reset(Fault):
    """Announce the full length, send a share of the body, then reset the connection (TCP RST)."""

    share: float = 0.5


@dataclass(frozen=True)
class ShortBody(Fault):
    """Announce the full length, send a share of the body, then close the connection cleanly."""

    share: float = 0.5


@dataclass(frozen=True)
class Stall(Fault):
    """Go silent for ``seconds`` (or until the server stops): before the headers, or mid-body."""

    seconds: float = 30.0
    mid_body: bool = False

    @property
    def kind(self) -> str:
        return "StallMidBody" if self.mid_body else "StallBeforeHeaders"


@dataclass(frozen=True)
class WrongBytes(Fault):
    """Serve other bytes of the same length, complete and well-formed: only a checksum can tell."""


@dataclass(frozen=True)
class Redirect(Fault):
    """Redirect (301, 302, 307, ...) to another path of this server."""

    to: str
    code: int = 302

    @property
    def kind(self) -> str:
        return f"Redirect{self.code}"


@dataclass(frozen=True)
class ChunkedCut(Fault):
    """Send the body with chunked transfer encoding and close before the final chunk."""

    share: float = 0.5


@dataclass(frozen=True)
class UnannouncedShortBody(Fault):
    """HTTP/1.0 style: no Content-Length, a share of the body, then close (the client cannot tell)."""

    share: float = 0.5


@dataclass(frozen=True)
class Trickle(Fault):
    """Announce the full length, then send one byte every ``interval`` seconds: never silent for a whole
    socket timeout, so only a total deadline cuts it off."""

    interval: float = 0.8


@dataclass(frozen=True)
class TrickleHeaders(Fault):
    """Send the status line and headers one byte every ``interval`` seconds, then the file."""

    interval: float = 0.5


@dataclass(frozen=True)
class Hit:
    """One request as the server saw it."""

    path: str
    at: float  # time.monotonic()
    fault: str
    authorization: str | None = None  # the Authorization header it carried


@dataclass
class _Plan:
    queue: deque[Fault]
    then: Fault


@dataclass(repr=False)
class FaultServer:
    """A ``ThreadingHTTPServer`` on 127.0.0.1, port chosen by the OS, serving ``directory``."""

    directory: Path
    _plans: dict[str, _Plan] = field(default_factory=dict)
    _hits: list[Hit] = field(default_factory=list)
    _errors: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _server: http.server.ThreadingHTTPServer | None = None
    # Called in the handler thread with ("request" | "mid-body", fault): lets a test look at the
    # client's files while a request is being answered (after the previous attempt ended).
    observe: Callable[[str, Fault], None] | None = None

    # ---- lifecycle --------------------------------------------------------------------------------

    def start(self) -> FaultServer:
        handler = functools.partial(_FaultHandler, owner=self)
        self._server = _Server(("127.0.0.1", 0), handler)
        self._server.owner = self
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fault-server",
                         daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes stalled handlers
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __repr__(self) -> str:
        where = self.base_url if self._server is not None else "not started"
        return f"FaultServer({where}, serving {self.directory})"

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- configuration and observation -------------------------------------------------------------

    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    def url(self, path: str) -> str:
        return urllib.parse.urljoin(self.base_url, path.lstrip("/"))

    def plan(self, path: str, *faults: Fault, then: Fault = Serve()) -> None:
        """Answer the next requests for ``path`` with ``faults`` in order, and all later ones with ``then``."""
        with self._lock:
            self._plans[_norm(path)] = _Plan(deque(faults), then)

    def hits(self, path: str | None = None) -> list[Hit]:
        with self._lock:
            return [h for h in self._hits if path is None or h.path == _norm(path)]

    @property
    def errors(self) -> list[str]:
        """Unexpected exceptions in handlers (not the faults they were told to commit)."""
        with self._lock:
            return list(self._errors)

    def _next_fault(self, path: str, authorization: str | None = None) -> Fault:
        with self._lock:
            plan = self._plans.get(path)
            fault = (plan.queue.popleft() if plan.queue else plan.then) if plan else Serve()
            self._hits.append(Hit(path, time.monotonic(), fault.kind, authorization))
            return fault


def _norm(path: str) -> str:
    return "/" + urllib.parse.unquote(urllib.parse.urlsplit(path).path).lstrip("/")


class _Server(http.server.ThreadingHTTPServer):
    owner: FaultServer

    def handle_error(self, request, client_address) -> None:
        """Record surprises for the test; a client that went away mid-fault is the point, not an error."""
        exc = sys.exc_info()[1]
        if not isinstance(exc, (ConnectionError, BrokenPipeError, TimeoutError)):
            with self.owner._lock:
                self.owner._errors.append(repr(exc))


class _FaultHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def __init__(self, *args, owner: FaultServer, **kwargs) -> None:
        self.owner = owner
        super().__init__(*args, **kwargs)

    def log_message(self, format, *args) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        path = _norm(self.path)
        fault = self.owner._next_fault(path, self.headers.get("Authorization"))
        self._observe("request", fault)
        self.close_connection = True  # one request per connection keeps faults independent
        if isinstance(fault, Status):
            return self._send_status(fault.code)
        if isinstance(fault, Redirect):
            self.send_response(fault.code)
            self.send_header("Location", fault.to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if isinstance(fault, Stall) and not fault.mid_body:
            self.owner._stopping.wait(fault.seconds)
            return None
        if isinstance(fault, TrickleHeaders):
            return self._trickle_headers(path, fault.interval)
        body = self._file_bytes(path)
        if body is None:
            return self._send_status(404)
        if isinstance(fault, WrongBytes):
            body = bytes(b ^ 0xFF for b in body[:64]) + body[64:]
        cut = int(len(body) * getattr(fault, "share", 0.5))
        if isinstance(fault, ChunkedCut):
            self.send_response(200)
            self.send_header("Content-Type", "application/gzip")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            part = body[:cut]
            self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")  # no terminating 0-chunk
            self.wfile.flush()
            self._observe("mid-body", fault)
            return None
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        if not isinstance(fault, UnannouncedShortBody):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if isinstance(fault, (Serve, WrongBytes)):
            self.wfile.write(body)
            return None
        if isinstance(fault, Trickle):
            for i in range(len(body)):
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
                if self.owner._stopping.wait(fault.interval):
                    return None
            return None
        self.wfile.write(body[:cut])
        self.wfile.flush()
        self._observe("mid-body", fault)
        if isinstance(fault, Stall):
            self.owner._stopping.wait(fault.seconds)
        elif isinstance(fault, Reset):
            # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        # ShortBody, UnannouncedShortBody: the handler returns and the connection is closed cleanly (FIN).
        return None

    def _trickle_headers(self, path: str, interval: float) -> None:
        body = self._file_bytes(path) or b""
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/gzip\r\nContent-Length: {len(body)}\r\n"
                "X-Padding: " + "." * 64 + "\r\n\r\n").encode()
        for i in range(len(head)):
            self.wfile.write(head[i:i + 1])
            self.wfile.flush()
            if self.owner._stopping.wait(interval):
                return
        self.wfile.write(body)

    def _observe(self, moment: str, fault: Fault) -> None:
        if self.owner.observe is not None:
            self.owner.observe(moment, fault)

    def _send_status(self, code: int) -> None:
        text = f"{code} {self.responses.get(code, ('',))[0]}\n".encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    def _file_bytes(self, path: str) -> bytes | None:
        root = Path(self.owner.directory).resolve()
        target = (root / path.lstrip("/")).resolve()
        if root not in target.parents or not target.is_file():
            return None
        return target.read_bytes()


def partial_files(folder: Path) -> list[Path]:
    """Leftover temporary files of ``fetch_file`` anywhere under ``folder``."""
    return sorted(p for p in Path(folder).rglob("*") if p.name.endswith(".partial")) if os.path.isdir(folder) else []
