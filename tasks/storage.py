"""The one file layer every stage writes and hashes through: atomic writes and SHA-256.

Every write goes to a temporary name in the destination's folder, is flushed and fsynced, renamed over
the destination, and the folder is fsynced, so a crash leaves either the old file or the new one, never
half of each, and the rename survives a power cut.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHUNK_BYTES = 1 << 20  # read and copy in 1 MiB pieces
TMP_SUFFIX = ".tmp"


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def temporary_sibling(dest: Path) -> Path:
    """A hidden, unique name beside ``dest``: same file system, so the final rename is atomic."""
    return dest.with_name(f".{dest.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path to write ``dest``'s new content to; on success it replaces ``dest`` durably.

    If the block raises, the temporary file is removed and ``dest`` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(dest)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(dest: Path, data: bytes) -> Path:
    """Replace ``dest`` with ``data`` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return dest


def write_text(dest: Path, text: str) -> Path:
    return write_bytes(dest, text.encode())


def write_json(dest: Path, value: Any) -> Path:
    return write_text(dest, json.dumps(value, indent=2) + "\n")


def copy_file(src: Path, dest: Path) -> Path:
    """Copy ``src`` to ``dest`` atomically."""
    with atomic_path(dest) as tmp, open(src, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, CHUNK_BYTES)
    return dest


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete temporary files that a killed writer left in ``folder`` (they are never final names)."""
    removed = []
    if folder.is_dir():
        for stale in folder.glob(f".*{TMP_SUFFIX}"):
            if stale.is_file():
                stale.unlink(missing_ok=True)
                removed.append(stale)
    return removed
