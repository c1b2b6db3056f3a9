"""Where data may come from: the source mirror, dataset paths inside it, and locations shown without secrets.

``source`` and dataset paths are user input (deployment parameters, datasets files). A source is a
directory, a ``file://`` URL or an ``http(s)://`` URL. A dataset path is relative to the source and must
stay inside it: no ``..`` segment (also percent-encoded), no absolute path, no ``/``-leading path, no
backslashes. A dataset path may instead be a full URL only with a scheme in ``URL_SCHEMES`` (http and
https; ``file://`` URLs are not allowed there, since they would read any local file). Every location
that is logged, raised, or recorded (lineage, model cards) goes through ``redact``.

Credentials in a URL (``user:password@host``) are found the way a person typing one means them: they run
up to the last ``@`` that a host follows, so a password holding an unencoded ``/``, ``?``, ``#`` or ``@`` is
still hidden whole. Where that reading and the standard one (RFC 3986, which ends the authority at the
first ``/``, ``?`` or ``#``) disagree, the URL is ambiguous: ``checked_url`` refuses it, saying to
percent-encode the reserved characters, and ``redact`` hides everything up to that ``@``.
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

from tasks.vocabulary import Stage, StageFailure

URL_SCHEMES = ("http", "https")  # full URLs allowed as a dataset path, and as redirect targets
SOURCE_SCHEMES = (*URL_SCHEMES, "file")
# A source is an allowed URL, or a path with no scheme (no colon before its first slash).
SOURCE_PATTERN = r"^((https?|file)://.+|[^:]*|[^:]*/.*)$"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
REDACTED = "***"
# What may follow the userinfo's "@": a host name or IP literal, an optional port, then the end or / ? #.
_HOST_AFTER_AT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%!$&'()*+,;=-]*)(:[0-9]*)?(?=[/?#]|$)")


class LocationError(StageFailure, ValueError):
    """A source or dataset path that would leave the source, or uses a scheme that is not allowed."""
    stage = Stage.DOWNLOAD


def scheme_of(location: str) -> str:
    found = _SCHEME.match(location)
    return found.group(1).lower() if found and "/" not in location[: found.end() - 1] else ""


def typed_userinfo(location: str) -> tuple[str, str | None, str]:
    """(``scheme://``, the userinfo as a person typed it or None, the rest after its ``@``): the userinfo runs
    to the last ``@`` that a host follows, whatever the password holds."""
    scheme = scheme_of(location)
    head = f"{location[:len(scheme)]}://"
    if not scheme or not location[len(scheme):].startswith("://"):
        return "", None, location
    rest = location[len(head):]
    for at in reversed([i for i, c in enumerate(rest) if c == "@"]):
        if _HOST_AFTER_AT.match(rest[at + 1:]):
            return head, rest[:at], rest[at + 1:]
    return head, None, rest


def standard_userinfo(location: str) -> str | None:
    """The userinfo as RFC 3986 reads it: the authority ends at the first ``/``, ``?`` or ``#``."""
    netloc = urllib.parse.urlsplit(location).netloc
    return netloc.rsplit("@", 1)[0] if "@" in netloc else None


def redact(location: str) -> str:
    """``location`` with credentials (``user:password@``, however typed) and the query string (pre-signed
    tokens) hidden."""
    if not scheme_of(location):
        return location
    head, userinfo, rest = typed_userinfo(location)
    parts = urllib.parse.urlsplit(head + rest)
    netloc = f"{REDACTED}@{parts.netloc}" if userinfo is not None else parts.netloc
    query = REDACTED if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def checked_url(location: str, what: str) -> str:
    """``location`` itself, if its credentials (if any) read the same to a person and to RFC 3986; else a
    ``LocationError`` naming the (redacted) URL and saying to percent-encode."""
    if scheme_of(location) and typed_userinfo(location)[1] != standard_userinfo(location):
        raise LocationError(f"{what} {redact(location)!r}: cannot tell where its user name and password end (they "
                            "hold an unencoded / ? # or @); percent-encode those characters (/ %2F, ? %3F, # %23, "
                            "@ %40), e.g. with urllib.parse.quote(password, safe='')")
    return location


def credentials_of(location: str) -> tuple[str, tuple[str, str] | None]:
    """(``location`` without its userinfo, (user, password) decoded) for a checked URL; None when it has none."""
    parts = urllib.parse.urlsplit(checked_url(location, "location"))
    if parts.username is None:
        return location, None
    netloc = parts.netloc.rsplit("@", 1)[1]
    bare = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return bare, (urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))


def check_source(source: str) -> str:
    """``source`` itself: a directory, ``file://`` or ``http(s)://``; raises naming the (redacted) value."""
    checked_url(source, "source")
    scheme = scheme_of(source)
    if scheme and scheme not in SOURCE_SCHEMES:
        raise LocationError(f"source {redact(source)!r}: scheme {scheme!r} is not allowed; "
                            f"use a directory or one of {', '.join(s + '://' for s in SOURCE_SCHEMES)}")
    if scheme and not urllib.parse.urlsplit(source).netloc and scheme != "file":
        raise LocationError(f"source {redact(source)!r}: a URL needs a host")
    return source


def check_dataset_path(dataset: str, path: str) -> str:
    """A split's path: relative and inside the source, or a full http(s) URL; raises naming dataset and path."""
    scheme = scheme_of(path)
    if scheme:
        checked_url(path, f"dataset {dataset}: path")
        if scheme not in URL_SCHEMES:
            raise LocationError(f"dataset {dataset}: path {redact(path)!r} uses scheme {scheme!r}; only "
                                f"{' and '.join(URL_SCHEMES)} URLs are allowed as full URLs, other paths are "
                                "relative to the source")
        if not urllib.parse.urlsplit(path).netloc:
            raise LocationError(f"dataset {dataset}: path {redact(path)!r} is a URL without a host")
        return path
    decoded = urllib.parse.unquote(path)
    if "\\" in decoded or "\x00" in decoded:
        raise LocationError(f"dataset {dataset}: path {path!r} contains a backslash or NUL; use / between folders")
    if decoded.startswith("/") or decoded.startswith("~"):
        raise LocationError(f"dataset {dataset}: path {path!r} is absolute; paths are relative to the source "
                            "and must stay inside it")
    if ".." in decoded.split("/"):
        raise LocationError(f"dataset {dataset}: path {path!r} leaves the source (a '..' segment); paths are "
                            "relative to the source and must stay inside it")
    if not decoded.strip("/. "):
        raise LocationError(f"dataset {dataset}: path {path!r} names no file")
    return path


def resolve(dataset: str, source: str, path: str) -> str:
    """Join a split's path to the source, after checking both; the result is proven to lie inside the source."""
    check_dataset_path(dataset, path)
    if scheme_of(path):
        return path
    check_source(source)
    scheme = scheme_of(source)
    if scheme in URL_SCHEMES:
        base = urllib.parse.urlsplit(source)
        base_url = urllib.parse.urlunsplit((base.scheme, base.netloc, base.path.rstrip("/") + "/", "", ""))
        joined = urllib.parse.urljoin(base_url, urllib.parse.quote(path, safe="/%"))
        if not joined.startswith(base_url):
            raise LocationError(f"dataset {dataset}: path {path!r} leaves the source {redact(source)!r}")
        # The source's own query (e.g. a token) applies to every file under it.
        return joined + (f"?{base.query}" if base.query else "")
    root = Path(urllib.parse.unquote(urllib.parse.urlsplit(source).path)) if scheme == "file" else Path(source)
    target = (root / path).resolve()
    if not target.is_relative_to(root.resolve()):
        raise LocationError(f"dataset {dataset}: path {path!r} leaves the source {source!r} "
                            "(through a symbolic link)")
    return str(target) if scheme != "file" else target.as_uri()
