"""Where published models live: one interface, two implementations (a folder, an MLflow server).

``open_registry(location)`` picks the implementation: an ``http(s)://`` URL is an MLflow tracking server
(``mlflow``, over ``mlflow_client``, ``mlflow_inputs`` and ``mlflow_operations``), anything else a folder
(``folder``). Beside them: the publish lock (``lock``), the folder registry's run log and trend plot
(``run_log``) and the pruning of old versions (``retention``). ``tasks.publishing`` holds the decisions
both registries carry out. May import the top level, ``download.locations`` (redaction),
``conversion.parquet``, ``publishing.promote``, ``publishing.canary`` and ``orchestration.versions``.
"""

from __future__ import annotations

from pathlib import Path

from tasks.registry.folder import FolderRegistry
from tasks.registry.interface import Candidate, ChampionUnreadable, Pin, Published, Registry
from tasks.registry.mlflow import MlflowRegistry, is_mlflow_uri

__all__ = ["Candidate", "ChampionUnreadable", "FolderRegistry", "MlflowRegistry", "Pin", "Published", "Registry",
           "open_registry"]


def open_registry(location: str | Path) -> Registry:
    """The registry at ``location``: an MLflow tracking server for an http(s) URL, else a folder."""
    location = str(location)
    if is_mlflow_uri(location):
        return MlflowRegistry(location)
    return FolderRegistry(Path(location))
