"""Prefect's temporary server per command against Kiln's kept local server (flows/local_server.py).

    .venv/bin/python bench/prefect_server.py

A trivial flow in a fresh process, three times each way, alternating: what every `kiln export`
pays for Prefect before its first step. The kept server is started by the first "kept" run if
none is up in the bench's cache folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FLOW = """
from prefect import flow
@flow
def trivial(): return 1
trivial()
"""
KEPT = "from flows.local_server import prefect_api\nwith prefect_api():\n" + "".join(
    "    " + line + "\n" for line in FLOW.strip().splitlines())


def main() -> None:
    env = {**os.environ, "KILN_CACHE_DIR": str(Path(tempfile.gettempdir()) / "kiln-bench-prefect-server"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    for label, code in (("temporary server", FLOW), ("kept server", KEPT)) * 3:
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
        outcome = "ok" if run.returncode == 0 else "FAILED: " + run.stderr.strip().splitlines()[-1][:160]
        print(f"{label}: {time.perf_counter() - t0:.1f} s, load {os.getloadavg()[0]:.1f}, {outcome}", flush=True)


if __name__ == "__main__":
    main()
