"""The one file layer every stage writes and hashes through: atomic writes, SHA-256 (and its records), leftover cleanup.

Every write goes to a temporary name in the destination's folder, is flushed and fsynced, renamed over
the destination, and the folder is fsynced, so a crash leaves either the old file or the new one, never
half of each, and the rename survives a power cut. The temporary file is ``flock``ed while its writer
lives, so ``remove_stale_temporaries`` deletes only what a killed writer left.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHUNK_BYTES = 1 << 20  # read and copy in 1 MiB pieces
TMP_SUFFIX = ".tmp"
SHA256_RECORD_SUFFIX = ".sha256"


# (path, device, inode, size, mtime_ns, ctime_ns) -> sha256: only spares re-reading a file within a
# process; ctime changes on every write and cannot be set back, so a changed file is always read again.
_DIGESTS: dict[tuple[str, int, int, int, int, int], str] = {}


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks; memoized per process while the file is unchanged."""
    st = os.stat(path)
    memo = (str(Path(path).resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if memo not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
                digest.update(chunk)
        _DIGESTS[memo] = digest.hexdigest()
    return _DIGESTS[memo]


def forget_digests() -> None:
    """Drop the memo, so the next ``sha256_file`` reads every file again (for cold-cache benchmarks)."""
    _DIGESTS.clear()


def _sha256_record(path: Path) -> Path:
    return path.with_name(f".{path.name}{SHA256_RECORD_SUFFIX}")


def record_sha256(path: Path) -> str:
    """Record the SHA-256 of a file just written, beside it (atomically), for later readers to check."""
    digest = sha256_file(path)
    write_text(_sha256_record(path), digest + "\n")
    return digest


def recorded_sha256(path: Path) -> str | None:
    """The SHA-256 recorded by ``record_sha256`` for ``path`` (None when there is no record)."""
    try:
        return _sha256_record(path).read_text().strip() or None
    except OSError:
        return None


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


def temporary_sibling(dest: Path, suffix: str = TMP_SUFFIX) -> Path:
    """A hidden, unique name beside ``dest``: same file system, so the final rename is atomic."""
    return dest.with_name(f".{dest.name}.{uuid.uuid4().hex}{suffix}")


@contextlib.contextmanager
def atomic_path(dest: Path, suffix: str = TMP_SUFFIX) -> Iterator[Path]:
    """Yield a temporary path to write ``dest``'s new content to; on success it replaces ``dest`` durably.

    The temporary file exists (empty) and is locked while the block runs; writers may open it again or
    replace it (Keras does). If the block raises, it is removed and ``dest`` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(dest, suffix)
    try:
        with open(tmp, "wb") as held:
            fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
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
    """Strict JSON (NaN and infinities as strings, NumPy scalars as numbers), written atomically."""
    return write_text(dest, json.dumps(finite(value), indent=2, default=_json_default) + "\n")


def finite(value: Any) -> Any:
    """NaN and infinities as strings, so a JSON document stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    item = getattr(value, "item", None)  # NumPy scalars
    if callable(item) and getattr(value, "shape", None) == ():
        return finite(item())
    return str(value)


def copy_file(src: Path, dest: Path) -> Path:
    """Copy ``src`` to ``dest`` atomically."""
    with atomic_path(dest) as tmp, open(src, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, CHUNK_BYTES)
    return dest


def hold_lock(fh) -> None:
    """Mark an open temporary file as in use: ``remove_stale_temporaries`` leaves it alone while this process lives."""
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def remove_stale_temporaries(folder: Path, prefix: str = ".", suffix: str = TMP_SUFFIX) -> list[Path]:
    """Delete the temporary files (``prefix*suffix``) that killed writers left in ``folder``.

    A file whose writer still runs is locked by it and left alone.
    """
    removed: list[Path] = []
    if not Path(folder).is_dir():
        return removed
    for path in Path(folder).iterdir():
        if not (path.name.startswith(prefix) and path.name.endswith(suffix)) or not path.is_file():
            continue
        try:
            with open(path, "rb") as fh:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a live writer holds it
                path.unlink()
                removed.append(path)
        except OSError:  # in use by a running writer, or already gone
            continue
    return removed
