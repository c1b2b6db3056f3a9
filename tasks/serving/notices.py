"""The model server and the Prefect server talk both ways: drift goes out as an event (and one alert), and a
publish or a rollback comes in as an event, so the server swaps at once instead of at its next poll.

Both need ``PREFECT_API_URL``; without it the server only logs the drift and keeps polling the registry.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

import httpx

from tasks.download.locations import redact
from tasks.reporting import events
from tasks.serving.champion import Champion
from tasks.serving.monitor import Episode

logger = logging.getLogger("train_mnist.serving")
ALERT_TRIES = 3
RECONNECT_FIRST_S = 2.0
RECONNECT_MAX_S = 60.0


def drift_notice(webhook: str | None, server_url: str) -> Callable[[Episode], None]:
    """What a drift episode does: one ``train-mnist.drift.detected`` event and, with a webhook, one alert."""
    def notice(episode: Episode) -> None:
        crossed = {name: episode.scores[name] for name in episode.statistics}
        events.emit(events.DRIFT_DETECTED, episode.dataset, episode.version, {
            "statistics": episode.statistics, "scores": episode.scores, "above_since": episode.above_since,
            "server": server_url})
        if webhook:
            post_alert(webhook, f"train-mnist: {episode.dataset} {episode.version}: live input drift", "\n".join(
                [f"The model server at {server_url} sees inputs unlike {episode.dataset}'s training data:"]
                + [f"- {name}: {score['value']:.4g} (threshold {score['threshold']:.4g})"
                   for name, score in crossed.items()]))
    return notice


def post_alert(url: str, subject: str, body: str) -> bool:
    """POST ``{"subject", "body"}`` as JSON (the shape of ``deployments/alerts.py``'s notifications), a few
    tries; the URL is never logged whole (it often carries a token)."""
    for attempt in range(1, ALERT_TRIES + 1):
        try:
            response = httpx.post(url, json={"subject": subject, "body": body}, timeout=10)
            response.raise_for_status()
            return True
        except httpx.HTTPError as exc:
            logger.warning("alert to %s failed (try %d of %d): %s", redact(url), attempt, ALERT_TRIES,
                           type(exc).__name__)
            time.sleep(attempt)
    return False


def follow_events(champions: dict[str, Champion], stop: threading.Event) -> threading.Thread | None:
    """A daemon thread that refreshes a model as soon as a publish or rollback event names its dataset; None
    without a Prefect server. Polling stays the fallback: a lost connection is reopened with a backoff."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return None

    async def listen() -> None:
        from prefect.events.clients import get_events_subscriber
        from prefect.events.filters import EventFilter, EventNameFilter

        only = EventFilter(event=EventNameFilter(name=list(events.PRODUCTION_MOVED)))
        async with get_events_subscriber(filter=only, reconnection_attempts=0) as subscriber:
            logger.info("following %s events from the Prefect server", " and ".join(events.PRODUCTION_MOVED))
            async for event in subscriber:
                champion = champions.get(event.resource.get(events.DATASET_LABEL, ""))
                if champion is not None:
                    logger.info("%s: %s %s: looking at production now", champion.dataset, event.event,
                                event.resource.get(events.VERSION_LABEL, ""))
                    await asyncio.to_thread(champion.refresh)
                if stop.is_set():
                    return

    def loop() -> None:
        delay = RECONNECT_FIRST_S
        while not stop.is_set():
            try:
                asyncio.run(listen())
                delay = RECONNECT_FIRST_S
            except Exception as exc:  # noqa: BLE001 - the Prefect server may be away; polling goes on meanwhile
                logger.info("not following Prefect events (%s: %s); next try in %.0f s", type(exc).__name__,
                            str(exc)[:200], delay)
            if stop.wait(delay):
                return
            delay = min(delay * 2, RECONNECT_MAX_S)

    thread = threading.Thread(target=loop, name="train-mnist-follow-events", daemon=True)
    thread.start()
    return thread
