"""Publishing cannot be torn: SIGKILL a publisher at random points; two publishers at once are serialised."""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from tasks.publishing import publish
from tasks.registry import folder as registry_module
from tasks.registry.folder import read_production
from tests.support.publish_worker import (
    assert_registry_consistent,
    dummy_candidate,
    fake_champion_scoring,
    fast_png,
    forkserver_context,
    leftovers,
    publish_candidate,
    publish_loop,
    stand_in_canary,
)

DATASET = "kill-test"
TRIALS = 24
SEED = 20240607
STEP_DELAY = 0.05  # seconds slept before each of the 12 publish steps, widening the windows a kill lands in
MAX_KILL_DELAY = 0.8  # a little more than one publish cycle


def _wait_for_file(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size):
        assert time.monotonic() < deadline, f"the worker wrote nothing to {path} in {timeout} s"
        time.sleep(0.002)


def _steps(log: Path) -> list[tuple[int, str, str]]:
    """(pid, step, version) per logged line."""
    return [(int(pid), step, version) for pid, step, version in (line.split() for line in log.read_text().splitlines())]


def test_sigkill_at_random_points_never_tears_the_registry(tmp_path, monkeypatch):
    rng = random.Random(SEED)
    candidate = dummy_candidate(tmp_path / "candidate")
    monkeypatch.setattr(registry_module, "predict_classes", fake_champion_scoring(candidate))
    monkeypatch.setattr(publish, "confusion_matrix_png", fast_png)
    monkeypatch.setattr(publish, "run_canary", stand_in_canary)
    registry = tmp_path / "registry"
    ctx = forkserver_context()
    killed_in: Counter[str] = Counter()
    trials_with_leftovers = 0
    for trial in range(TRIALS):
        log = tmp_path / f"steps-{trial}.log"
        worker = ctx.Process(target=publish_loop, args=(str(registry), DATASET, candidate, str(log), STEP_DELAY))
        worker.start()
        _wait_for_file(log)  # measure the delay from the first publish step, not from process start-up
        time.sleep(rng.uniform(0.0, MAX_KILL_DELAY))
        worker.kill()
        worker.join(10)
        assert worker.exitcode == -signal.SIGKILL, f"trial {trial}: worker ended with {worker.exitcode}, not killed"
        killed_in[_steps(log)[-1][1]] += 1

        before = assert_registry_consistent(registry, DATASET)
        trials_with_leftovers += bool(leftovers(registry, DATASET))
        # The lock died with the worker: the next publish goes through and clears what the kill left.
        published = publish_candidate(registry, DATASET, candidate)
        assert leftovers(registry, DATASET) == []
        assert read_production(registry, DATASET) == published.version
        assert assert_registry_consistent(registry, DATASET) == sorted([*before, published.version])

    # The kills landed across the publish sequence, including mid-assembly (a staging folder left behind).
    assert trials_with_leftovers >= 1, f"no kill landed while a version was being assembled: {killed_in}"
    assert len(killed_in) >= 4, f"kills landed in too few distinct steps: {killed_in}"


@pytest.mark.parametrize("modes", [("local", "local"), ("server", "local")], ids=["two-local", "server-and-local"])
def test_two_publishers_at_once_are_serialised_and_the_last_one_wins(tmp_path, request, modes):
    """With a Prefect server one publisher takes the server's limit, without one another takes only the file
    lock: on a folder registry they still never overlap (before: both were inside at once)."""
    api_url = request.getfixturevalue("prefect_server").url if "server" in modes else None
    rounds = 4
    candidate = dummy_candidate(tmp_path / "candidate")
    registry, log = tmp_path / "registry", tmp_path / "steps.log"
    ctx = forkserver_context()
    start = ctx.Event()
    workers = [ctx.Process(target=publish_loop, args=(str(registry), DATASET, candidate, str(log), 0.02, rounds,
                                                      start, api_url if mode == "server" else None))
               for mode in modes]
    for worker in workers:
        worker.start()
    start.set()  # both were waiting: they start publishing together
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0, f"publisher {worker.pid} ended with {worker.exitcode}"

    published = assert_serialised(_steps(log))
    assert len(published) == 2 * rounds and len(set(published)) == 2 * rounds, "versions collided"
    assert {pid for pid, step, _ in _steps(log) if step == "exit"} == {w.pid for w in workers}
    assert assert_registry_consistent(registry, DATASET) == sorted(published)
    assert read_production(registry, DATASET) == published[-1], "the pointer is not the last publisher's version"
    assert leftovers(registry, DATASET) == []


def assert_serialised(steps: list[tuple[int, str, str]]) -> list[str]:
    """Replay the step log (real time order: one O_APPEND write per line): no two holders at once, and the two
    publishers did contend. The published versions, in order."""
    holder: tuple[int, str] | None = None
    contended = False
    for pid, step, version in steps:
        if step == "want":
            contended |= holder is not None and holder[0] != pid
        elif step == "enter":
            assert holder is None, f"{pid} entered the locked section while {holder} held it"
            holder = (pid, version)
        else:
            assert holder == (pid, version), f"{pid} ran {step} for {version} while {holder} held the lock"
            holder = None if step == "release" else holder
    assert holder is None
    assert contended, "the two publishers never asked for the lock at the same time; the test proved nothing"
    return [version for _, step, version in steps if step == "exit"]
