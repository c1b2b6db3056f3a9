"""Where data may come from: the source mirror, dataset paths inside it, and locations shown without secrets.

``source`` and dataset paths are user input (deployment parameters, datasets files). A source is a
directory, a ``file://`` URL or an ``http(s)://`` URL. A dataset path is relative to the source and must
stay inside it: no ``..`` segment (also percent-encoded), no absolute path, no ``/``-leading path, no
backslashes. A dataset path may instead be a full URL only with a scheme in ``URL_SCHEMES`` (http and
https; ``file://`` URLs are not allowed there, since they would read any local file). Every location
that is logged, raised, or recorded (lineage, model cards) goes through ``redact``.
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


class LocationError(StageFailure, ValueError):
    """A source or dataset path that would leave the source, or uses a scheme that is not allowed."""
    stage = Stage.DOWNLOAD


def scheme_of(location: str) -> str:
    found = _SCHEME.match(location)
    return found.group(1).lower() if found and "/" not in location[: found.end() - 1] else ""


def redact(location: str) -> str:
    """``location`` with credentials (``user:password@``) and the query string (pre-signed tokens) hidden."""
    if not scheme_of(location):
        return location
    parts = urllib.parse.urlsplit(location)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = REDACTED if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def check_source(source: str) -> str:
    """``source`` itself: a directory, ``file://`` or ``http(s)://``; raises naming the (redacted) value."""
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
