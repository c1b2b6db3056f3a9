"""Failure alerts for the nightly deployment: ``python deployments/alerts.py --webhook-url URL``.

One command sets everything up on a (fresh) Prefect server, and running it again replaces what it
made, so it can be rerun after changing the URL or the deadline:

* a webhook notification block (``CustomWebhookNotificationBlock``, named ``train-mnist-alerts``)
  that POSTs ``{"subject": ..., "body": ...}`` as JSON to the URL;
* automation ``train-mnist nightly failed``: a ``train-mnist/nightly`` flow run entering Failed or
  Crashed sends one notification naming each dataset that was not published, the stage it stopped
  at and why, and a link to the run. Only the deployment's own run matches (its per-dataset subflow
  runs carry no deployment), so a failed night sends exactly one message. A failed stage, a failed
  gate, a refused challenger or canary, failed validation or drift all fail the run; a crash (the
  process killed) is reported by the runner or worker as Crashed;
* automation ``train-mnist nightly overdue``: a nightly run that has been Running for the deadline
  (``--deadline-minutes``, default ``DEADLINE_MINUTES``) without reaching a final state.

Which datasets failed, where and why is data, not words: before a run ends Failed it labels itself with each
unpublished dataset's stage and reason (``tasks.reporting.outcomes.failure_labels``), and the notification lists those
labels. A run that ended without them (a crash, or a bug before the outcomes were known) is reported as such,
with its state message.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta

from prefect.automations import Automation, EventTrigger, Posture, SendNotification
from prefect.blocks.notifications import CustomWebhookNotificationBlock

from tasks.reporting.outcomes import FAILED_LABEL

BLOCK_NAME = "train-mnist-alerts"
FLOW_NAME = "train-mnist"
DEPLOYMENT_NAME = "nightly"
FAILED_AUTOMATION = "train-mnist nightly failed"
OVERDUE_AUTOMATION = "train-mnist nightly overdue"
# The nightly run of both datasets takes about 25 minutes on the reference machine (README); two hours
# leaves room for a slow night and still alerts before the next morning.
DEADLINE_MINUTES = 120
# A failed run is reported at once, then its key (the flow run) stays quiet this long. On SQLite a
# "database is locked" while another automation handles the same event makes Prefect redeliver the
# event; without a window the redelivered copy would send the same alert twice.
FAILED_QUIET_WINDOW = timedelta(hours=1)
FAILED_EVENTS = {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
FINAL_EVENTS = {"prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Crashed",
                "prefect.flow-run.Cancelled"}

def _label(name: str) -> str:
    """Jinja for one of the run's labels (``name`` is Jinja text that evaluates to the label's key)."""
    return f"flow_run.labels.get({name}, '')"


FAILED_DATASETS = "{% set failed = (" + _label(repr(FAILED_LABEL)) + " or '').split(',') | select | list %}"
FAILED_SUBJECT = (FAILED_DATASETS + "train-mnist nightly {{ flow_run.state.name }}: "
                  "{{ failed | join(', ') if failed else flow_run.parameters.get('dataset', 'all') }}")
FAILED_BODY = (
    FAILED_DATASETS +
    "train-mnist nightly run {{ flow_run.name }} ended {{ flow_run.state.name }}.\n"
    "{% for name in failed %}\n"
    "dataset: {{ name }}\n"
    "stage: {{ " + _label("'train-mnist.' ~ name ~ '.stage'") + " }}\n"
    "reason: {{ " + _label("'train-mnist.' ~ name ~ '.reason'") + " }}\n"
    "{% else %}\n"
    "dataset: {{ flow_run.parameters.get('dataset', 'all') }}\n"
    "stage: {{ 'crashed (the process died; see the logs of the run)' if flow_run.state.type.value == 'CRASHED' "
    "else 'unknown (stopped before the outcome of any dataset was known; see the logs of the run)' }}\n"
    "reason: {{ flow_run.state.message }}\n"
    "{% endfor %}\n"
    "flow run: {{ flow_run|ui_url }}\n"
)


OVERDUE_SUBJECT = "train-mnist nightly overdue: {{ labels['prefect.resource.name'] }}"
OVERDUE_BODY = (
    "train-mnist nightly run {{ labels['prefect.resource.name'] }} has been running for more than {minutes} "
    "minutes without finishing.\n"
    "dataset: {{ labels['prefect.resource.name'] | replace('train-mnist-', '') }}\n"
    "stage: unknown (still running; see the run's task runs)\n"
    "reason: no final state within the {minutes}-minute deadline\n"
    "flow run: {ui}/runs/flow-run/{{ labels['prefect.resource.id'] | replace('prefect.flow-run.', '') }}\n"
)


def nightly_runs() -> dict:
    """Events of flow runs of the nightly deployment: the deployment is a related resource of those only."""
    return {"prefect.resource.role": "deployment", "prefect.resource.name": DEPLOYMENT_NAME}


def failed_automation(block_id) -> Automation:
    return Automation(
        name=FAILED_AUTOMATION,
        description="One notification when a train-mnist/nightly run fails or crashes.",
        trigger=EventTrigger(
            expect=FAILED_EVENTS,
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related=[nightly_runs(), {"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAME}],
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive,
            threshold=1,
            within=FAILED_QUIET_WINDOW,
        ),
        actions=[SendNotification(block_document_id=block_id, subject=FAILED_SUBJECT, body=FAILED_BODY)],
    )


def overdue_automation(block_id, deadline: timedelta, ui_url: str) -> Automation:
    minutes = f"{deadline.total_seconds() / 60:g}"
    return Automation(
        name=OVERDUE_AUTOMATION,
        description=f"A train-mnist/nightly run still running after {minutes} minutes.",
        trigger=EventTrigger(
            after={"prefect.flow-run.Running"},
            expect=FINAL_EVENTS,
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related=[nightly_runs(), {"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAME}],
            for_each={"prefect.resource.id", "prefect.resource.name"},
            posture=Posture.Proactive,
            threshold=1,
            within=deadline,
        ),
        actions=[SendNotification(block_document_id=block_id, subject=OVERDUE_SUBJECT,
                                  body=OVERDUE_BODY.replace("{minutes}", minutes).replace("{ui}", ui_url))],
    )


def ui_base_url() -> str:
    """The server's UI address (PREFECT_UI_URL, else derived from PREFECT_API_URL)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    ui = PREFECT_UI_URL.value()
    if ui:
        return ui.rstrip("/")
    api = PREFECT_API_URL.value() or "http://127.0.0.1:4200/api"
    return api.rstrip("/").removesuffix("/api")


def set_up_alerts(webhook_url: str, deadline: timedelta = timedelta(minutes=DEADLINE_MINUTES)) -> list[Automation]:
    """Create (or replace) the webhook block and both automations on the current Prefect server."""
    block = CustomWebhookNotificationBlock(name=BLOCK_NAME, url=webhook_url, method="POST",
                                           json_data={"subject": "{{subject}}", "body": "{{body}}"})
    block_id = block.save(BLOCK_NAME, overwrite=True)
    created = []
    for automation in (failed_automation(block_id), overdue_automation(block_id, deadline, ui_base_url())):
        _delete_named(automation.name)
        created.append(automation.create())
    return created


def _delete_named(name: str) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for existing in client.read_automations_by_name(name):
            client.delete_automation(existing.id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python deployments/alerts.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--webhook-url", required=True, help="where notifications are POSTed (JSON: subject, body)")
    parser.add_argument("--deadline-minutes", type=float, default=DEADLINE_MINUTES,
                        help=f"alert when a nightly run is still running after this long (default {DEADLINE_MINUTES})")
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    for automation in set_up_alerts(args.webhook_url, timedelta(minutes=args.deadline_minutes)):
        print(f"automation {automation.name!r} ({automation.id}) -> webhook block {BLOCK_NAME!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
