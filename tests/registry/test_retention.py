"""Retention: which versions go, and a SIGKILL at random points never leaves a partial version."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tasks.artifacts import VERSION_FILES
from tasks.registry.folder import POINTER, is_complete_version, list_versions, read_production
from tasks.registry.retention import (
    KEEP_DAYS,
    KEEP_LAST,
    TRASH_PREFIX,
    RetentionPolicy,
    prune_versions,
    versions_to_delete,
)
from tasks.settings import PROJECT_ROOT

DATASET = "retention-test"
NOW = datetime(2026, 6, 30, 12, 0, tzinfo=UTC)


def name(days_ago: float, suffix: str = "abcdef") -> str:
    return f"{NOW - timedelta(days=days_ago):%Y%m%dT%H%M%SZ}-{suffix}"


def test_defaults_are_the_documented_ones():
    assert (RetentionPolicy().keep_last, RetentionPolicy().keep_days) == (KEEP_LAST, KEEP_DAYS) == (10, 30)


def test_keeps_the_newest_n_the_young_and_the_protected():
    versions = [name(d, f"{d:06d}") for d in (400, 300, 200, 100, 50, 40, 20, 10, 5, 1)]
    policy = RetentionPolicy(keep_last=3, keep_days=30)
    doomed = versions_to_delete(versions, policy, protected={versions[1]}, now=NOW)
    # newest 3: 5, 1, 10 days; younger than 30 days: 20; protected: 300 days.
    assert doomed == [versions[0], versions[2], versions[3], versions[4], versions[5]]
    assert versions_to_delete(versions, RetentionPolicy(keep_last=20), set(), now=NOW) == []
    assert versions_to_delete(["not-a-dated-name"], RetentionPolicy(keep_last=1, keep_days=0), set(), now=NOW) == []


def build_registry(root: Path, versions: list[str], production: str, files_per_version: int = 150) -> Path:
    """Complete dummy versions (the published files plus many small ones, so deleting one takes a while)."""
    for version in versions:
        folder = root / DATASET / version
        (folder / "tensorboard").mkdir(parents=True)
        for file in VERSION_FILES:
            (folder / file).write_bytes(b"x" * 1024)
        for i in range(files_per_version):
            (folder / "tensorboard" / f"events.{i}").write_bytes(b"y" * 512)
    (root / DATASET / POINTER).write_text(production + "\n")
    return root


def test_prune_removes_old_versions_but_never_production(tmp_path):
    versions = [name(d, f"{d:06d}") for d in (90, 80, 70, 60, 3, 2, 1)]
    registry = build_registry(tmp_path, versions, production=versions[0], files_per_version=1)
    pruned = prune_versions(registry, DATASET, versions, {versions[0], versions[1]},
                            RetentionPolicy(keep_last=2, keep_days=30), now=NOW)
    assert pruned.deleted == versions[2:4]
    assert list_versions(registry, DATASET) == [versions[0], versions[1], *versions[4:]]
    assert read_production(registry, DATASET) == versions[0]
    assert not list((registry / DATASET).glob(f"{TRASH_PREFIX}*"))


def test_sigkill_at_random_points_leaves_only_complete_versions(tmp_path):
    """A real prune (versions dated 2024, so older than 30 days) killed at a random moment, 12 times."""
    versions = [f"2024{m:02d}01T000000Z-{m:06d}" for m in range(1, 13)]
    production = versions[3]
    template = build_registry(tmp_path / "template", versions, production)
    rng = random.Random(10)
    outcomes = []
    for attempt in range(12):
        registry = tmp_path / f"r{attempt}"
        shutil.copytree(template, registry)
        proc = subprocess.Popen([sys.executable, "-m", "tests.support.prune_worker", str(registry), DATASET, "2"],
                                cwd=PROJECT_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        # Kill at a random step of the prune: after k versions were renamed to the trash, within the next one.
        for _ in range(rng.randrange(0, 9)):
            assert proc.stdout.readline().strip() == "removing"
        time.sleep(rng.uniform(0.0, 0.01))
        proc.kill()
        proc.wait(timeout=30)
        visible = list_versions(registry, DATASET)
        for version in visible:
            assert is_complete_version(registry / DATASET / version), f"attempt {attempt}: {version} is partial"
            assert len(list((registry / DATASET / version / "tensorboard").iterdir())) == 150
        assert production in visible and read_production(registry, DATASET) == production
        assert set(versions[-2:]) <= set(visible)
        outcomes.append(len(versions) - len(visible))
        # The next prune finishes the job and empties the trash.
        prune_versions(registry, DATASET, visible, {production}, RetentionPolicy(keep_last=2))
        assert list_versions(registry, DATASET) == sorted([production, *versions[-2:]])
        assert not list((registry / DATASET).glob(f"{TRASH_PREFIX}*"))
    assert len(set(outcomes)) > 1, f"every kill landed at the same point ({outcomes}); the test proves little"
    print(f"\nretention kills: versions deleted before each kill {outcomes}")
