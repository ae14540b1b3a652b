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
