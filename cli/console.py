"""What the `kiln` command prints: one-line errors, the export summary, progress, Prefect's log lines.

Every string that did not come from Kiln's own code is escaped before rich sees it.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tasks.errors import KilnError

console = Console(stderr=True)
# rich reads `[...]` in a printed string as markup: every string that did not come from Kiln's own
# code (an error naming a path, a template's `[/INST]`, a model name) goes through `escape`, or is
# printed with markup=False.


def fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a `KilnError` as one line and exit non-zero; anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KilnError as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)

    return wrapper


def print_summary(manifest, status: str) -> None:
    table = Table(title=escape(f"{manifest.source.kind} {manifest.source.id} → {manifest.request.out_dir}"))
    for col in ("file", "quant", "size (MB)", "sha256"):
        table.add_column(col, justify="right" if col == "size (MB)" else "left")
    for out in manifest.outputs:
        table.add_row(escape(out.path), escape(out.quant), f"{out.size / 1e6:.1f}", out.sha256[:16] + "…")
    console.print(table)
    checks = Table(title="checks")
    for col in ("check", "target", "result", "detail"):
        checks.add_column(col)
    for check in manifest.checks:
        checks.add_row(escape(check.name), escape(check.target), "[green]pass[/]" if check.passed else "[red]FAIL[/]",
                       escape(check.detail or ""))
    console.print(checks)
    if manifest.report is not None:
        from tasks.report import rich_table

        console.print(rich_table(manifest.report, manifest.choice))
        if manifest.choice is not None:
            console.print(f"--quant auto chose [bold]{escape(manifest.choice.quant)}[/]: {escape(manifest.choice.reason)}")
    if manifest.timings:
        console.print("times (s): " + ", ".join(f"{k} {v:g}" for k, v in manifest.timings.items()))
    console.print(f"[bold green]{escape(status)}[/]")


class _NoTracebackForKilnErrors(logging.Filter):
    """A `KilnError` already says what to do: the terminal gets its message, not Prefect's traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KilnError):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_kiln_tracebacks() -> None:
    """Strip tracebacks of `KilnError`s from Prefect's console output (the UI keeps them)."""
    from prefect.logging.configuration import setup_logging

    setup_logging()  # idempotent; Prefect would do it on the first run, after we looked
    # Records reach the console through the root logger's handler, after the API handlers
    # further down have sent them (with their tracebacks) to the server.
    for logger in [logging.root, *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]:
        for handler in logger.handlers:
            if type(handler).__name__ == "PrefectConsoleHandler":
                handler.addFilter(_NoTracebackForKilnErrors())


@contextmanager
def terminal_progress() -> Iterator[None]:
    """Long steps' progress on stderr, from the place that feeds the UI's progress artifacts (tasks/progress.py):
    a bar a step on a terminal; elsewhere (a pipe, a CI log) a plain `progress:` line every 10 %."""
    from tasks.progress import show_in_terminal

    if console.is_terminal:
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        bars = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                        console=console)
        ids: dict[str, Any] = {}

        def show_bar(description: str, percent: int) -> None:
            if description not in ids:
                ids[description] = bars.add_task(escape(description), total=100)
            bars.update(ids[description], completed=percent)

        with bars, show_in_terminal(show_bar):
            yield
        return
    printed: dict[str, int] = {}

    def show_line(description: str, percent: int) -> None:
        if percent // 10 > printed.get(description, 0) // 10:
            printed[description] = percent
            console.print(f"progress: {description}: {percent}%", markup=False, highlight=False, soft_wrap=True)

    with show_in_terminal(show_line):
        yield
