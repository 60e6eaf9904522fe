"""The monitor flow served on a schedule by this process (`cvops monitor --serve`).

Without a Prefect server, `Flow.serve` registers the deployment in Prefect's ephemeral mode and
runs its flow runs, but the ephemeral server runs no scheduler service (Prefect itself warns
"Cannot schedule flows on an ephemeral server"): a cron schedule would never produce a run.
So in ephemeral mode this process keeps the next cron run of its deployment queued itself,
with Prefect's own cron semantics, and Prefect's runner executes it like any scheduled run
(visible in the Prefect UI of the same PREFECT_HOME). With a Prefect server its scheduler does
that and this is plain `Flow.serve`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
from typing import Any
from uuid import UUID

log = logging.getLogger(__name__)

REGISTERED = "Monitor scheduler: serving deployment"


def next_cron_time(cron: str, after: dt.datetime | None = None) -> dt.datetime:
    """The first time at or after `after` (default now, UTC) matching `cron`."""
    from prefect.server.schemas.schedules import CronSchedule

    start = after or dt.datetime.now(dt.UTC)
    (when,) = asyncio.run(CronSchedule(cron=cron).get_dates(1, start=start))
    return when


def queue_next_run(deployment_id: UUID, cron: str) -> dt.datetime | None:
    """Create the deployment's next scheduled run unless one is already queued; returns its
    time when one was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Scheduled

    with get_client(sync_client=True) as client:
        queued = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.SCHEDULED, StateType.PENDING])
                )
            ),
            limit=1,
        )
        if queued:
            return None
        when = next_cron_time(cron, dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1))
        client.create_flow_run_from_deployment(deployment_id, state=Scheduled(scheduled_time=when))
    log.info("Monitor scheduler: next run at %s", when.isoformat())
    return when


def _keep_queued(deployment_id: UUID, cron: str, stop: threading.Event, poll_s: float) -> None:
    while not stop.is_set():
        try:
            queue_next_run(deployment_id, cron)
        except Exception as err:  # a hiccup of the local API must not end scheduling
            if stop.is_set():
                return
            log.warning("Monitor scheduler: could not queue the next run (%s); retrying", err)
        stop.wait(poll_s)


def serve_monitor(
    deployment_name: str, cron: str, parameters: dict[str, Any], poll_s: float = 20
) -> None:
    """Register `drift_detection_evidently/<deployment_name>` and run it on `cron` (blocks)."""
    from prefect.runner import Runner

    from cvops.deploy import MONITOR_FLOW_NAME, prefect_server_configured
    from cvops.flows.monitor_flow import drift_detection_evidently

    runner = Runner(name=f"cvops-monitor-{deployment_name}", pause_on_shutdown=False)
    deployment_id = runner.add_flow(
        drift_detection_evidently, name=deployment_name, cron=cron, parameters=parameters
    )
    server = prefect_server_configured()
    log.info(
        "%s %s/%s (id %s), cron %r, %s",
        REGISTERED,
        MONITOR_FLOW_NAME,
        deployment_name,
        deployment_id,
        cron,
        "scheduled by the Prefect server" if server else "scheduled by this process",
    )
    stop = threading.Event()
    if not server:
        threading.Thread(
            target=_keep_queued,
            args=(UUID(str(deployment_id)), cron, stop, poll_s),
            name="monitor-cron",
            daemon=True,
        ).start()
    try:
        asyncio.run(runner.start())
    finally:
        stop.set()
