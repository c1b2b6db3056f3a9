"""A real PostgreSQL server for a test run, set up exactly as ``deployments/team_servers.py`` sets up a team's.

One cluster per test process (each xdist worker), on a free port of 127.0.0.1, in a folder of its own under
the system's temporary folder (PostgreSQL runs as the ``postgres`` user when the tests run as root, and that
user cannot enter pytest's root-only temporary folders).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deployments.team_servers import Postgres, create_database, start_postgres, stop
from tests.support.processes import free_port


@contextmanager
def postgres_cluster() -> Iterator[Postgres]:
    root = Path(tempfile.mkdtemp(prefix="train-mnist-postgres-"))
    root.chmod(0o711)  # the postgres user may pass through to its data folder, and read nothing else
    proc, pg = start_postgres(root, free_port(), root / "postgres.log")
    try:
        yield pg
    finally:
        stop(proc)
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(pg: Postgres, name: str) -> str:
    """Create database ``name`` (it must not exist yet) and return its name."""
    if not create_database(pg, name):
        raise AssertionError(f"database {name} already existed: tests must not share one")
    return name
