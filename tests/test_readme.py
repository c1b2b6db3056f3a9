"""README's runnable shell blocks run as written, so an example that drifts from the code fails CI.

A block is runnable when the line before its ```` ```bash ```` fence is ``<!-- runnable -->``, with
options after a colon: ``server`` (run against a real Prefect server started here, with
``deployments/serve_deployments.py`` serving the deployments), ``short="ARGS"`` (ARGS appended to every
``python flows/train.py`` line, to keep a long example short). Blocks run with ``bash -e`` in a
scratch copy of the repository (code, the bundled mirror and a link to this virtual environment),
one Prefect home and result storage for all of them, so later blocks reuse the data stages.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.registry.folder import list_versions, read_production
from tasks.settings import BUNDLED_MIRROR, PROJECT_ROOT
from tests.support.prefect_server import prefect_server
from tests.support.processes import clean_env, free_port, http_ok, spawn, stop, tail, wait_for

README = PROJECT_ROOT / "README.md"
MARKER = re.compile(r"^<!-- runnable(?::\s*(?P<options>.*?))?\s*-->$")
FLOW_LINE = re.compile(r"^(\s*python flows/train\.py\b[^\\]*?)(\s*\\)?$")
BLOCK_TIMEOUT_S = 600
MIN_RUNNABLE_BLOCKS = 3  # the quickstart runs and the deployment runs; fewer means a marker was lost


@dataclass(frozen=True)
class Block:
    line: int  # README line of the fence
    script: str
    server: bool
    short: str | None

    @property
    def name(self) -> str:
        first = next(cmd for cmd in self.script.splitlines() if cmd.strip() and not cmd.startswith(". "))
        return f"line{self.line}:{first[:50]}"


def runnable_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        match = MARKER.match(line.strip())
        if not match:
            continue
        assert i + 1 < len(lines) and lines[i + 1].strip() == "```bash", \
            f"README line {i + 1}: a runnable marker must be followed directly by a ```bash fence"
        end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
        options = shlex.split(match.group("options") or "")
        unknown = [o for o in options if o != "server" and not o.startswith("short=")]
        assert not unknown, f"README line {i + 1}: unknown runnable option(s) {unknown}"
        short = next((o.removeprefix("short=") for o in options if o.startswith("short=")), None)
        blocks.append(Block(i + 2, "\n".join(lines[i + 2:end]), "server" in options, short))
    return blocks


def with_short_parameters(script: str, short: str | None) -> str:
    """Append ``short`` to each ``python flows/train.py`` command (before a trailing line continuation)."""
    if not short:
        return script
    out = []
    for line in script.splitlines():
        match = FLOW_LINE.match(line)
        out.append(f"{match.group(1)} {short}{match.group(2) or ''}" if match else line)
    return "\n".join(out)


BLOCKS = runnable_blocks(README.read_text())


def test_readme_marks_its_examples_runnable():
    assert len(BLOCKS) >= MIN_RUNNABLE_BLOCKS, [b.name for b in BLOCKS]
    assert any(b.server for b in BLOCKS) and any(b.short for b in BLOCKS)
    for block in BLOCKS:
        if "python flows/train.py" in block.script or "python " in block.script or "prefect " in block.script:
            assert block.script.lstrip().startswith(". .venv/bin/activate"), \
                f"README line {block.line}: activate the virtual environment before bare python/prefect"


def test_short_parameters_are_appended_to_flow_commands():
    script = "python flows/train.py --dataset mnist \\\n  --epochs 3\npython flows/train.py"
    assert with_short_parameters(script, "--x 1").splitlines() == [
        "python flows/train.py --dataset mnist --x 1 \\", "  --epochs 3", "python flows/train.py --x 1"]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A copy of the repository as a user has it after the quickstart's install."""
    root = tmp_path_factory.mktemp("readme") / "train-mnist"
    for part in ("flows", "tasks", "deployments"):
        shutil.copytree(PROJECT_ROOT / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT_ROOT / "pyproject.toml", root)
    (root / "data").mkdir()
    (root / "data" / "mirror").symlink_to(BUNDLED_MIRROR)
    (root / ".venv").symlink_to(Path(sys.prefix))
    return root


@pytest.fixture(scope="module")
def local_env(scratch, tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("readme-prefect")
    # PYTHONPATH: the scratch copy, not the installed (editable) checkout, is the code under test.
    return clean_env(PREFECT_HOME=str(home / "home"), PREFECT_LOCAL_STORAGE_PATH=str(home / "storage"),
                     PYTHONPATH=str(scratch), COLUMNS="200")


@pytest.fixture(scope="module")
def served(scratch, local_env, tmp_path_factory) -> Iterator[tuple[dict[str, str], Path]]:
    """A Prefect server and ``python deployments/serve_deployments.py`` (from the scratch copy); the env to reach them, its log."""
    with prefect_server(tmp_path_factory.mktemp("readme-server"), scheduler=False) as server:
        yield from _serve(scratch, local_env, server)


def _serve(scratch, local_env, server) -> Iterator[tuple[dict[str, str], Path]]:
    env = {**local_env, **{k: v for k, v in server.env.items() if k.startswith("PREFECT_")},
           "PREFECT_LOCAL_STORAGE_PATH": local_env["PREFECT_LOCAL_STORAGE_PATH"], "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    log = server.root / "serve.log"
    serve = spawn([sys.executable, "deployments/serve_deployments.py"], env, scratch, log)
    try:
        from prefect.client.orchestration import SyncPrefectClient

        def polled() -> bool:
            try:
                with SyncPrefectClient(server.url) as client:
                    return all(client.read_deployment_by_name(f"train-mnist/{name}").last_polled
                               for name in ("nightly", "smoke"))
            except Exception:  # noqa: BLE001 - not registered yet
                return False
        wait_for(polled, 120, "serve.py registering the deployments", log=log, proc=serve)
        yield env, log
    finally:
        stop(serve)


@pytest.mark.slow
@pytest.mark.parametrize("block", sorted(BLOCKS, key=lambda b: b.server), ids=lambda b: b.name)
def test_runnable_block(block, scratch, local_env, request):
    env, log = request.getfixturevalue("served") if block.server else (local_env, None)
    script = with_short_parameters(block.script, block.short)
    result = subprocess.run(["bash", "-e", "-c", script], cwd=scratch, env=env, capture_output=True, text=True,
                            timeout=BLOCK_TIMEOUT_S)
    assert result.returncode == 0, (f"README line {block.line} failed ({result.returncode}):\n{script}\n"
                                    f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}\n"
                                    f"{tail(log) if log else ''}")
    # Short runs publish into the smoke registry, never into the production registry.
    assert list_versions(scratch / "data" / "smoke-registry", "mnist")
    assert read_production(scratch / "data" / "registry", "mnist") is None


@pytest.mark.slow
def test_failed_deployment_run_is_told_once_in_its_state_message(scratch, served):
    """What README says about a failed `--watch` run: exit 1, reasons in the state message, no traceback."""
    env, log = served
    result = subprocess.run(
        [str(Path(sys.prefix) / "bin" / "prefect"), "deployment", "run", "train-mnist/smoke", "--watch",
         "--param", "min_accuracy=0.999"], cwd=scratch, env=env, capture_output=True, text=True,
        timeout=BLOCK_TIMEOUT_S)
    assert result.returncode == 1 and "Flow run finished in state 'Failed'" in result.stdout, result.stdout
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", result.stdout).group(1)
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with SyncPrefectClient(env["PREFECT_API_URL"]) as client:
        run = client.read_flow_run(run_id)
        lines = run.state.message.splitlines()
        assert lines[0] == "1 of 1 dataset(s) not published: mnist", run.state.message
        assert lines[2] == "mnist: gate failed, nothing published" and lines[3].startswith("- FAIL min_accuracy")

        def all_logs():
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            return logs if any(entry.message.startswith("Finished in state Failed") for entry in logs) else None
        logs = wait_for(all_logs, 60, "the failed run's last log line reaching the API")
    noisy = [entry.message for entry in logs if "Traceback" in entry.message or "Engine execution" in entry.message]
    assert not noisy, noisy


def block_after(text: str, heading: str) -> list[str]:
    """The command lines of the first ```bash block after ``heading``."""
    rest = text.split(heading, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in rest.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.slow
def test_another_port_in_readme_order_makes_the_ui_call_that_port(tmp_path):
    """README's "Another port" commands, on a free port: the server listens there and its UI calls it too."""
    port = free_port()
    lines = [line.replace("4300", str(port)) for line in block_after(README.read_text(), "**Another port.**")]
    *setup, start = lines
    assert start.split()[-3:] == ["prefect", "server", "start"] and all("prefect config set" in s for s in setup)
    env = clean_env(PREFECT_HOME=str(tmp_path / "home"))
    prefect = str(Path(sys.prefix) / "bin" / "prefect")
    for line in setup:
        subprocess.run(["bash", "-e", "-c", line], env={**env, "PATH": f"{Path(prefect).parent}:{env['PATH']}"},
                       check=True, capture_output=True, timeout=120)
    log = tmp_path / "server.log"
    server = spawn(["bash", "-c", start], {**env, "PATH": f"{Path(prefect).parent}:{env['PATH']}"}, tmp_path, log)
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/api/health"), 120, f"the server on port {port}", log=log,
                 proc=server)
        import json
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10) as response:
            assert json.load(response)["api_url"] == f"http://127.0.0.1:{port}/api"
    finally:
        stop(server)
