"""Version names: sortable, unique, and the same for every stage and registry of one run."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

VERSION_TIME_FORMAT = "%Y%m%dT%H%M%SZ"


def new_version_name(now: datetime | None = None, suffix: str | None = None) -> str:
    """Sortable and unique: UTC time plus a suffix (random unless given, e.g. from the flow run's id)."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{now:{VERSION_TIME_FORMAT}}-{suffix or uuid.uuid4().hex[:6]}"


def run_version_name(scheduled_start: datetime | None, flow_run_id: object | None) -> str:
    """A flow run's version: its scheduled start and the first hex digits of its id (random without a run)."""
    return new_version_name(scheduled_start, str(flow_run_id).replace("-", "")[:6] if flow_run_id else None)


def version_time(version: str) -> datetime | None:
    """When a version was made, from its name; None for a name not made by ``new_version_name``."""
    try:
        return datetime.strptime(version.split("-", 1)[0], VERSION_TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None
