"""Run the real `kiln` command in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def kiln_executable() -> list[str]:
    script = Path(sys.executable).parent / "kiln"
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from cli import main; main()"]


def run_kiln(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*kiln_executable(), *args], capture_output=True, text=True, env=full_env, timeout=timeout)


# What `kiln` prints once it has gone past its own checks to Prefect: a temporary server's start,
# the kept local server's start, the CLI's own line before the flow, a flow run. A kept server
# already running prints nothing at start, so the later markers are what make this hold then.
_PREFECT_MARKERS = ("Starting temporary server", "started Kiln's local Prefect server", "exporting (",
                    "Created flow run")


def reached_prefect(stderr: str) -> bool:
    """Whether a `kiln` run's stderr shows it went as far as Prefect (a refusal must come before)."""
    return any(marker in stderr for marker in _PREFECT_MARKERS)
