"""The short flow that ``bench/server_load.py`` runs many times at once: a few mapped tasks, no data."""

from __future__ import annotations

from prefect import flow, task


@task
def square(i: int) -> int:
    return i * i


@flow(name="load-probe")
def load_probe(tasks: int = 8) -> int:
    """``tasks`` concurrent task runs, each with its own state changes on the server."""
    return sum(future.result() for future in square.map(range(tasks)))
