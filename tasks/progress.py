"""Progress of long steps, and what a step has to say, shown where the user is looking.

One place feeds both displays. Inside a Prefect run a step's progress becomes a Prefect
progress artifact (the UI shows a bar, on the run's Artifacts tab) and a log line every
quarter (the run's log); where a terminal display is installed (`show_in_terminal`: the
`kiln` command does, cli/), every change of a whole percent goes to it as well, in
or out of a run. `log_in_run` adds a line to the run's log. Outside a run with no terminal
display, both do nothing, as when tests call the plain functions.

The steps that report: the conversion (the converter's `Writing: NN%` lines, tasks/convert.py),
each quantization (libllama's `[ 12/ 272] blk.0.attn_k.weight ...` line per tensor,
tasks/quantize.py), the quantizations of an export together (flows/convert_quantize.py),
verify, and a batch's items.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Report = Callable[[float], None]
# A terminal display: (description, percent 0..100); called from any thread, once a whole percent.
TerminalSink = Callable[[str, int], None]

_terminal: TerminalSink | None = None
_terminal_lock = threading.Lock()


def _ignore(fraction: float) -> None:
    return None


def _in_run() -> bool:
    if "prefect" not in sys.modules:  # not imported, so certainly not inside a run
        return False
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


@contextmanager
def show_in_terminal(sink: TerminalSink) -> Iterator[None]:
    """Every step's progress also goes to `sink` while this is open (process-wide: steps run in threads)."""
    global _terminal
    previous, _terminal = _terminal, sink
    try:
        yield
    finally:
        _terminal = previous


def log_in_run(message: str, *args: object) -> None:
    """An info line in the current Prefect run's log (the terminal and the UI); nothing outside a run."""
    if _in_run():
        from prefect import get_run_logger

        get_run_logger().info(message, *args)


def progress_reporter(description: str, key: str | None = None) -> Report:
    """A callback taking the fraction done (0..1) of the step described; `key` names the artifact.

    Call it as often as you like: the artifact is updated every 5 %, the run's log every 25 %,
    the terminal every whole percent.
    """
    terminal = _terminal
    in_run = _in_run()
    if not in_run and terminal is None:
        return _ignore
    shown = {"artifact": 0, "log": 0, "terminal": -1}
    lock = threading.Lock()  # libllama's log lines and the converter's reader call from their own threads
    artifact_id = logger = update = None
    if in_run:
        from prefect import get_run_logger
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        artifact_id = create_progress_artifact(progress=0.0, key=key, description=description)
        logger, update = get_run_logger(), update_progress_artifact

    def report(fraction: float) -> None:
        percent = max(0, min(100, int(fraction * 100)))
        with lock:
            if terminal is not None and percent > shown["terminal"]:
                shown["terminal"] = percent
                with _terminal_lock:
                    terminal(description, percent)
            if update is None:
                return
            if percent >= shown["artifact"] + 5 or (percent == 100 and shown["artifact"] < 100):
                update(artifact_id=artifact_id, progress=float(percent))
                shown["artifact"] = percent
            if percent >= shown["log"] + 25:
                logger.info("%s: %d%%", description, percent)
                shown["log"] = percent - percent % 25

    return report
