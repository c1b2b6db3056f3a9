"""The publish lock holds in every mode: a server limit that would let two publishers in is refused, and a
publisher whose lock lapsed cannot move production past another run's publish (the fence)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks import storage
from tasks.publishing import publish
from tasks.registry.folder import list_versions, read_production, set_production
from tasks.registry.interface import PublishConflict
from tasks.registry.lock import PublishLockUnsafe, folder_identity, limit_name, url_identity
from tests.support.publish_worker import (
    leftovers,
    publish_candidate,
)

DATASET = "lock-test"


def set_limit(server, name: str, *, active: bool, limit: int) -> None:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    with server.client() as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit, active=active))
        else:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=limit, active=active))


@pytest.mark.parametrize(("active", "limit", "said"), [(False, 1, "is inactive"), (True, 2, "is set to 2 slots")])
def test_a_server_limit_that_would_admit_two_publishers_is_refused_naming_it(prefect_api, tmp_path, candidate,
                                                                            active, limit, said):
    """Before: an inactive limit, or one of 2 slots, held nothing while the log said the lock was taken."""
    registry = tmp_path / "registry"
    name = limit_name(folder_identity(registry), DATASET)
    set_limit(prefect_api, name, active=active, limit=limit)
    with pytest.raises(PublishLockUnsafe) as info:
        publish_candidate(registry, DATASET, candidate)
    message = str(info.value)
    assert name in message and said in message and "active with limit 1" in message
    assert list_versions(registry, DATASET) == [] and read_production(registry, DATASET) is None

    set_limit(prefect_api, name, active=True, limit=1)  # repaired: publishing works again
    published = publish_candidate(registry, DATASET, candidate)
    assert read_production(registry, DATASET) == published.version


def moving_production_to(registry: Path, version: str):
    """Stands in for another run that publishes while this one is paused past its lease: it moves the pointer
    (once)."""
    moved: list[str] = []

    def move(*args, **kwargs):
        if not moved:
            moved.append(version)
            set_production(registry, DATASET, version)
    return move


@pytest.mark.parametrize("when", ["before-the-version-is-written", "after-the-version-became-visible"])
def test_production_moved_by_another_run_meanwhile_is_never_moved_again(tmp_path, candidate, monkeypatch, when):
    """The pointer only moves if it still names the champion this run compared against (compare-and-swap)."""
    registry = tmp_path / "registry"
    older = publish_candidate(registry, DATASET, candidate, "20260101T000000Z-older0").version
    champion = publish_candidate(registry, DATASET, candidate, "20260102T000000Z-champ0").version
    move = moving_production_to(registry, older)
    if when == "before-the-version-is-written":
        check_canary = publish.check_canary
        monkeypatch.setattr(publish, "check_canary", lambda *a, **k: (move(), check_canary(*a, **k))[1])
    else:
        fsync_dir = storage.fsync_dir
        monkeypatch.setattr(storage, "fsync_dir", lambda path: (fsync_dir(path), path == registry / DATASET
                                                                and move()))
    with pytest.raises(PublishConflict) as info:
        publish_candidate(registry, DATASET, candidate, "20260103T000000Z-late00")
    message = str(info.value)
    assert f"moved from {champion} to {older}" in message and "20260103T000000Z-late00 not published" in message
    assert read_production(registry, DATASET) == older  # what the other run set stays
    assert list_versions(registry, DATASET) == [older, champion]
    assert leftovers(registry, DATASET) == []


def test_the_publish_limit_is_named_after_the_registry_not_its_spelling(tmp_path):
    """Before: the name hashed the path or URL as spelt, so two machines spelling one registry differently
    (a symlink, another mount point, a trailing slash, an explicit port) took different locks."""
    registry = tmp_path / "registry"
    registry.mkdir()
    (tmp_path / "mounted-elsewhere").symlink_to(registry)
    spellings = [registry, tmp_path / "mounted-elsewhere", Path(f"{registry}/"), tmp_path / "x" / ".." / "registry"]
    assert len({limit_name(folder_identity(path), DATASET) for path in spellings}) == 1
    copy = tmp_path / "a copy, another registry"
    copy.mkdir()
    assert limit_name(folder_identity(copy), DATASET) != limit_name(folder_identity(registry), DATASET)
    urls = ["http://mlflow.internal:80/", "http://MLflow.Internal", "http://alice:s3cret@mlflow.internal:80"]
    assert len({limit_name(url_identity(url), DATASET) for url in urls}) == 1
    assert limit_name(url_identity("http://mlflow.internal:5000"), DATASET) != \
        limit_name(url_identity("http://mlflow.internal:5001"), DATASET)
