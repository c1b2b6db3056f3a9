"""How the download stage opens a location: a local file, or HTTP(S) with safe redirects and one deadline.

- Credentials in a URL (``user:password@``) are sent as Basic auth to that origin only: a redirect that
  changes scheme, host or port drops them, and they are not sent again on that request, even if a later
  redirect comes back (what browsers and httpx do). The URL that finally answered is reported, so lineage
  names the host the bytes really came from.
- Redirects go to http(s) only, never from https down to http, at most ``MAX_REDIRECTS`` times.
- The deadline covers the whole request, from connecting through the headers to the last body byte: every
  socket read waits at most until the deadline, so a server that trickles its headers or its body one byte at
  a time cannot hold a run past it. (httpx's timeouts are per operation and would not catch a trickle; it
  exposes no per-read hook, which is why this stays on the standard library.)
"""

from __future__ import annotations

import base64
import http.client
import io
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tasks.download.locations import URL_SCHEMES, redact, scheme_of
from tasks.vocabulary import Stage, StageFailure

MAX_REDIRECTS = 5
PERMANENT_HTTP = (400, 401, 403)


class DownloadError(StageFailure):
    """A transient failure (network, short read, deadline): worth retrying."""
    stage = Stage.DOWNLOAD


class SourceNotFound(StageFailure):
    """The mirror has no such file (HTTP 404, missing path): retrying will not help."""
    stage = Stage.DOWNLOAD


class DownloadRefused(StageFailure):
    """A permanent refusal: 400/401/403, a refused or looping redirect, a bad TLS certificate, a size limit."""
    stage = Stage.DOWNLOAD


class DeadlinePassed(TimeoutError):
    """The request's deadline passed while waiting for the server."""


@dataclass(frozen=True)
class Opened:
    """An open location: its byte stream, the length it announced, and where the bytes really come from."""

    stream: BinaryIO
    length: int | None
    final_location: str  # after redirects, without credentials


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in: what credentials are bound to."""
    parts = urllib.parse.urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port or default


def without_credentials(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url
    netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class _DeadlineSocket:
    """A connected socket whose every read waits at most ``read_timeout_s`` and never past ``deadline``.

    http.client closes the connection's socket while the response still reads through its file, as
    ``socket.socket`` allows (the descriptor lives until the last file closes); this keeps that promise.
    """

    def __init__(self, sock: socket.socket, deadline: float, read_timeout_s: float):
        self._sock, self._deadline, self._read_timeout_s = sock, deadline, read_timeout_s
        self._files, self._close_asked = 0, False

    def _receive(self, receive, *args):
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlinePassed("the download's deadline passed")
        self._sock.settimeout(min(self._read_timeout_s, remaining))
        try:
            return receive(*args)
        except TimeoutError:
            if remaining <= self._read_timeout_s:
                raise DeadlinePassed("the download's deadline passed") from None
            raise

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:
        return self._receive(self._sock.recv_into, buffer, nbytes, flags)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        return self._receive(self._sock.recv, bufsize, flags)

    def makefile(self, mode: str = "rb", *args, **kwargs) -> io.BufferedReader:
        self._files += 1  # http.client only reads through its file
        return io.BufferedReader(socket.SocketIO(self, "rb"))

    def _decref_socketios(self) -> None:  # socket.SocketIO.close calls it
        self._files -= 1
        if self._close_asked and self._files <= 0:
            self._sock.close()

    def close(self) -> None:
        self._close_asked = True
        if self._files <= 0:
            self._sock.close()

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


def _deadline_connection(base: type[http.client.HTTPConnection], deadline: float, read_timeout_s: float):
    class DeadlineConnection(base):
        def connect(self) -> None:
            self.timeout = max(min(read_timeout_s, deadline - time.monotonic()), 0.001)
            super().connect()
            self.sock = _DeadlineSocket(self.sock, deadline, read_timeout_s)

    return DeadlineConnection


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: float, read_timeout_s: float):
        super().__init__()
        self._connection = _deadline_connection(http.client.HTTPConnection, deadline, read_timeout_s)

    def http_open(self, req):  # noqa: ANN001 - stdlib signature
        return self.do_open(self._connection, req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: float, read_timeout_s: float):
        super().__init__()
        self._connection = _deadline_connection(http.client.HTTPSConnection, deadline, read_timeout_s)

    def https_open(self, req):  # noqa: ANN001 - stdlib signature
        return self.do_open(self._connection, req, context=ssl.create_default_context())


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects to http(s) only, never https -> http, at most ``MAX_REDIRECTS``; credentials stay with their origin."""

    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - stdlib signature
        old, new = scheme_of(req.full_url), scheme_of(newurl)
        if new not in URL_SCHEMES:
            raise DownloadRefused(f"{redact(req.full_url)}: HTTP {code} redirect to {redact(newurl)} refused: "
                                  f"scheme {new or 'none'!r} is not {' or '.join(URL_SCHEMES)}")
        if old == "https" and new == "http":
            raise DownloadRefused(f"{redact(req.full_url)}: HTTP {code} redirect from https to plain http "
                                  f"({redact(newurl)}) refused")
        redirected = super().redirect_request(req, fp, code, msg, headers, without_credentials(newurl))
        if redirected is not None and origin(redirected.full_url) != origin(req.full_url):
            redirected.remove_header("Authorization")
        return redirected


def _request(location: str) -> urllib.request.Request:
    """The request, with credentials of the URL (``user:password@``) sent as Basic auth, not in the URL."""
    parts = urllib.parse.urlsplit(location)
    headers = {"User-Agent": "train-mnist"}
    if parts.username is not None:
        token = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(token.encode()).decode()
    return urllib.request.Request(without_credentials(location), headers=headers)


def _http_error(shown: str, exc: urllib.error.HTTPError) -> Exception:
    if exc.code in (404, 410):
        return SourceNotFound(f"{shown}: HTTP {exc.code} {exc.reason}")
    if exc.code in PERMANENT_HTTP:
        return DownloadRefused(f"{shown}: HTTP {exc.code} {exc.reason} (not retried)")
    if 300 <= exc.code < 400:  # a loop, too many hops, or a target urllib itself refuses
        return DownloadRefused(f"{shown}: HTTP {exc.code} redirect refused or looping "
                               f"(at most {MAX_REDIRECTS} redirects, to http(s) only)")
    return DownloadError(f"{shown}: HTTP {exc.code} {exc.reason}")


def _open_url(location: str, deadline: float, deadline_s: float, timeout_s: float):
    shown = redact(location)
    opener = urllib.request.build_opener(_DeadlineHTTPHandler(deadline, timeout_s),
                                         _DeadlineHTTPSHandler(deadline, timeout_s), _SafeRedirects())
    try:
        return opener.open(_request(location), timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        raise _http_error(shown, exc) from None
    except DeadlinePassed:
        raise DownloadError(f"{shown}: no complete answer within the deadline of {deadline_s:g} s") from None
    except TimeoutError as exc:
        raise DownloadError(f"{shown}: no response within {timeout_s:g} s") from exc
    except ssl.SSLCertVerificationError as exc:
        raise DownloadRefused(f"{shown}: TLS certificate not trusted: {exc.verify_message}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            raise DownloadRefused(f"{shown}: TLS certificate not trusted: {exc.reason.verify_message}") from None
        if isinstance(exc.reason, DeadlinePassed):
            raise DownloadError(f"{shown}: no complete answer within the deadline of {deadline_s:g} s") from None
        raise DownloadError(f"{shown}: {exc.reason!r}") from None
    except (OSError, http.client.HTTPException) as exc:  # refused, reset, bad reply
        raise DownloadError(f"{shown}: {exc!r}") from None


@contextmanager
def open_location(location: str, deadline: float, deadline_s: float, timeout_s: float) -> Iterator[Opened]:
    """Open ``location`` (a path, ``file://`` or ``http(s)://`` URL) for reading before ``deadline`` (monotonic)."""
    scheme = scheme_of(location)
    if scheme in URL_SCHEMES:
        with _open_url(location, deadline, deadline_s, timeout_s) as response:
            length = response.headers.get("Content-Length")
            yield Opened(response, int(length) if length is not None and length.isdigit() else None,
                         redact(response.geturl()))
        return
    path = Path(urllib.request.url2pathname(urllib.parse.urlparse(location).path)) if scheme == "file" else Path(location)
    if not path.is_file():
        raise SourceNotFound(f"{redact(location)}: no such file")
    with open(path, "rb") as fh:
        yield Opened(fh, path.stat().st_size, redact(location))
