"""Shared fixtures: small slices cut from the real datasets, a real HTTP mirror on 127.0.0.1, and the one
Prefect server of the test run.

Before anything imports Prefect, the whole run gets a Prefect home and a result store of its own, so no
test run reads another's cache records or the developer's ``~/.prefect``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

_RUN_HOME = tempfile.mkdtemp(prefix="train-mnist-tests-")
atexit.register(shutil.rmtree, _RUN_HOME, ignore_errors=True)  # xdist's workers end in os._exit: see pytest_unconfigure
os.environ["PREFECT_HOME"] = os.path.join(_RUN_HOME, "prefect-home")
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = os.path.join(_RUN_HOME, "prefect-storage")
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

import functools  # noqa: E402 - after the environment above
import hashlib  # noqa: E402
import http.server  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from deployments.team_servers import Postgres  # noqa: E402
from tasks.datasets import DatasetSpec, SplitFile, load_catalog  # noqa: E402
from tasks.settings import BUNDLED_MIRROR  # noqa: E402
from tests.support.mlflow_server import MlflowServer  # noqa: E402
from tests.support.mlflow_server import mlflow_server as start_mlflow_server  # noqa: E402
from tests.support.postgres import fresh_database, postgres_cluster  # noqa: E402
from tests.support.prefect_server import Server  # noqa: E402
from tests.support.prefect_server import prefect_server as start_prefect_server  # noqa: E402
from tests.support.processes import stop_all  # noqa: E402
from tests.support.publish_worker import dummy_candidate, fake_champion_scoring, stand_in_canary  # noqa: E402
from tests.support.slices import SLICE_ROWS, TINY_ROWS, TINY_TRAIN, build_slice_mirror, cut_slice, slice_spec  # noqa: E402
from tests.support.trained import trained_models  # noqa: E402, F401 - a fixture for every test module


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """The real PostgreSQL server of the test run (of each xdist worker), set up as a team's server host is."""
    with postgres_cluster() as running:
        yield running


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory, postgres) -> Iterator[Server]:
    """The one real Prefect server of the test run (of each xdist worker), started on first use, with its state
    in PostgreSQL as in a team's setup (the fan-out, the publish lock and the deployments run against it; the
    README's walkthrough and the alert tests start servers of their own on the SQLite default)."""
    with start_prefect_server(tmp_path_factory.mktemp("prefect-server"), postgres,
                              fresh_database(postgres, "prefect")) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow(tmp_path_factory, postgres) -> Iterator[MlflowServer]:
    """The one real ``mlflow server`` of the test run (of each xdist worker), started on first use, its backend
    store in PostgreSQL; tests keep apart by registering models and experiments of their own names."""
    with start_mlflow_server(tmp_path_factory.mktemp("mlflow"), postgres, fresh_database(postgres, "mlflow")) as running:
        yield running


@pytest.fixture(scope="module")
def prefect_api(prefect_server) -> Iterator[Server]:
    """In-process flows of this module report to the session's Prefect server (only this module's tests)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server.url}):
        yield prefect_server


@pytest.fixture(scope="module")
def started() -> Iterator[list[subprocess.Popen]]:
    """Every process the module's fixtures start (they append it); whatever they did not stop is stopped here,
    all at once."""
    procs: list[subprocess.Popen] = []
    try:
        yield procs
    finally:
        stop_all(procs)


@pytest.fixture(scope="session")
def catalog() -> dict[str, DatasetSpec]:
    return load_catalog()


@pytest.fixture(scope="session")
def slice_mirror(tmp_path_factory, catalog) -> Path:
    return build_slice_mirror(tmp_path_factory.mktemp("slice-mirror"), catalog.values(), SLICE_ROWS)


@pytest.fixture(scope="session")
def mnist_slice(catalog, slice_mirror) -> DatasetSpec:
    return slice_spec(catalog["mnist"], slice_mirror)


@pytest.fixture(scope="session")
def fashion_slice(catalog, slice_mirror) -> DatasetSpec:
    return slice_spec(catalog["fashion-mnist"], slice_mirror)


@pytest.fixture(scope="session")
def tiny_mirror(tmp_path_factory) -> Path:
    """A mirror with the MNIST layout whose train file is the first ``TINY_ROWS`` rows of the real one (~10 KB of
    gzip: enough to cut in half, small enough to fetch many times)."""
    root = tmp_path_factory.mktemp("tiny-mirror")
    cut_slice(BUNDLED_MIRROR / TINY_TRAIN, root / TINY_TRAIN, TINY_ROWS, keep_header=False)
    return root


@pytest.fixture(scope="session")
def tiny_spec(catalog, tiny_mirror) -> DatasetSpec:
    """mnist, with its train split pinned to the tiny mirror's file."""
    sha = hashlib.sha256((tiny_mirror / TINY_TRAIN).read_bytes()).hexdigest()
    return catalog["mnist"].model_copy(update={"train": SplitFile(path=TINY_TRAIN, rows=TINY_ROWS, sha256=sha)})


@pytest.fixture
def candidate(tmp_path, monkeypatch):
    """A consistent dummy candidate (dummy model bytes): the champion is scored as predicting what it predicts
    (a tie), and a stand-in passes its canary."""
    from tasks.publishing import publish
    from tasks.registry import folder

    cand = dummy_candidate(tmp_path / "candidate")
    monkeypatch.setattr(folder, "predict_classes", fake_champion_scoring(cand))
    monkeypatch.setattr(publish, "run_canary", stand_in_canary)
    return cand


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass


def _http_mirrors() -> Iterator[callable]:
    """Start real HTTP servers on 127.0.0.1 serving a directory; returns the base URL. Stopped at the end."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def serve(directory: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def http_mirror() -> Iterator[callable]:
    """Real HTTP mirrors on 127.0.0.1 for one test (see ``_http_mirrors``)."""
    yield from _http_mirrors()


@pytest.fixture(scope="module")
def http_mirror_module() -> Iterator[callable]:
    """Real HTTP mirrors on 127.0.0.1 for a whole test module (see ``_http_mirrors``)."""
    yield from _http_mirrors()


def pytest_unconfigure(config) -> None:
    """The run's Prefect home and result storage go with it (an xdist worker never reaches its atexit handlers)."""
    shutil.rmtree(_RUN_HOME, ignore_errors=True)
