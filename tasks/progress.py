"""Progress of long steps, and what a step has to say, shown where the user is looking.

Inside a Prefect run a step's progress becomes a Prefect progress artifact (the
UI shows a bar) and a log line every quarter (the terminal shows it), and
`log_in_run` adds a line to the run's log; outside a run, as when tests call the
plain functions, both do nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

Report = Callable[[float], None]


def _ignore(fraction: float) -> None:
    return None


def _in_run() -> bool:
    if "prefect" not in sys.modules:  # not imported, so certainly not inside a run
        return False
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def log_in_run(message: str, *args: object) -> None:
    """An info line in the current Prefect run's log (the terminal and the UI); nothing outside a run."""
    if _in_run():
        from prefect import get_run_logger

        get_run_logger().info(message, *args)


def progress_reporter(description: str, key: str | None = None) -> Report:
    """A callback taking the fraction done (0..1) of the step described; `key` names the artifact."""
    if not _in_run():
        return _ignore
    from prefect import get_run_logger
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    artifact_id = create_progress_artifact(progress=0.0, key=key, description=description)
    logger = get_run_logger()
    shown = {"artifact": 0, "log": 0}

    def report(fraction: float) -> None:
        percent = max(0, min(100, int(fraction * 100)))
        if percent >= shown["artifact"] + 5 or (percent == 100 and shown["artifact"] < 100):
            update_progress_artifact(artifact_id=artifact_id, progress=float(percent))
            shown["artifact"] = percent
        if percent >= shown["log"] + 25:
            logger.info("%s: %d%%", description, percent)
            shown["log"] = percent - percent % 25

    return report
