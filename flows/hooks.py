"""Flow state hooks: when a run fails, leave one clear summary on it in the Prefect UI."""

from __future__ import annotations

import logging
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactCreate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

LOGGER = logging.getLogger("kiln")
FAILURE_ARTIFACT_KEY = "kiln-failure"


def publish_failure_summary(flow: Any, flow_run: Any, state: Any) -> None:
    """on_failure hook: a markdown artifact naming the failed stage(s) and the error, which says what to do.

    Never raises: a broken hook must not hide the failure it reports.
    """
    try:
        with get_client(sync_client=True) as client:
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
            failed = [run for run in task_runs if run.state is not None and run.state.is_failed()]
            client.create_artifact(
                artifact=ArtifactCreate(
                    type="markdown",
                    key=FAILURE_ARTIFACT_KEY,
                    description=f"Why {flow_run.name} failed",
                    flow_run_id=flow_run.id,
                    data=failure_markdown(flow_run.name, state.message, [(run.name, run.state.message) for run in failed]),
                )
            )
    except Exception as error:  # noqa: BLE001 - see the docstring
        LOGGER.warning("could not publish the failure summary: %s: %s", error.__class__.__name__, error)


def failure_markdown(run_name: str, message: str | None, failed_tasks: list[tuple[str, str | None]]) -> str:
    lines = [f"## {run_name} failed", "", f"**{message or 'no message'}**", ""]
    if failed_tasks:
        lines += ["| failed stage | message |", "|---|---|"]
        lines += [f"| {name.rsplit('-', 1)[0]} | {(text or '').replace('|', '/')} |" for name, text in failed_tasks]
    else:
        lines.append("No stage failed: the flow itself did (see its log).")
    lines += ["", "Stages that finished are kept in the artifact store; re-running reuses them."]
    return "\n".join(lines)
