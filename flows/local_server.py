"""A local Prefect server that Kiln starts once and keeps for a while, reused by later commands.

Without `PREFECT_API_URL`, every Prefect run starts a temporary API server of its own and stops
it at exit: 5.6 s in one command and 13.6 s in another on the 2-CPU machine (TOOLCHAIN.md), paid
by every `kiln export`. Here the first command starts the same server (Prefect's own uvicorn
command, as its temporary server runs it) under a small keeper process, and later commands find
it through a state file in Kiln's cache and use it by setting `PREFECT_API_URL`: a health check
instead of a start-up.

- Every command that uses the server holds a shared lock on `users.lock` for its whole life (the
  kernel drops it when the process ends, however it ends). The keeper stops the server only after
  `KILN_PREFECT_SERVER_KEEP` seconds (default 600) in which it could take that lock exclusively,
  so the server never stops under a running export.
- `start.lock` serialises start-ups: two commands at once start one server.
- Its database lives under the cache (`prefect-server/home`), apart from the user's own Prefect
  home; `KILN_PREFECT_SERVER_KEEP=0` turns this off (a temporary server per command, as before),
  and a user's own `PREFECT_API_URL` always wins.

    python -m flows.local_server keep STATE_DIR PORT KEEP_SECONDS   (the keeper; started by Kiln)
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_STARTUP_TIMEOUT = 60.0
_POLL = 2.0


def server_dir() -> Path:
    from tasks import settings

    return settings.cache_root() / "prefect-server"


def _healthy(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _read_state(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "server.json").read_text())
    except (OSError, ValueError):
        return None


def stop_kept_server(folder: Path) -> None:
    """Stop the server kept under `folder` (`server_dir()` of a cache), if one runs: its keeper ends it.

    For a cache about to be deleted (a test session's, a bench's), rather than left idling for
    KILN_PREFECT_SERVER_KEEP seconds.
    """
    state = _read_state(folder)
    try:
        if state is not None:
            os.kill(int(state["keeper_pid"]), signal.SIGTERM)
    except (OSError, ValueError, KeyError, TypeError):
        pass


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def prefect_api(meanwhile: Callable[[], object] | None = None) -> Iterator[str | None]:
    """Run the enclosed Prefect work against the kept local server (see `use_local_server`).

    `meanwhile` runs once, while a server that has to be started boots (seconds of imports on
    another core), or first thing where none has to be.
    """
    url = use_local_server(meanwhile)
    if url is None:
        yield None
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield url


_held: list = []  # the open users.lock of this process: held until the process ends


def use_local_server(meanwhile: Callable[[], object] | None = None) -> str | None:
    """Point this process's Prefect client at the kept server, starting it if need be; its API URL.

    None (and nothing changed) where the user set `PREFECT_API_URL`, or `KILN_PREFECT_SERVER_KEEP=0`.
    `meanwhile`, if given, runs exactly once: during the server's start-up when there is one.
    """
    from tasks import settings

    ran = False

    def run_meanwhile() -> None:
        nonlocal ran
        if meanwhile is not None and not ran:
            ran = True
            meanwhile()

    keep = settings.prefect_server_keep_seconds()
    if os.environ.get("PREFECT_API_URL") or keep <= 0:
        run_meanwhile()
        return None
    folder = server_dir()
    folder.mkdir(parents=True, exist_ok=True)
    users = open(folder / "users.lock", "a+")
    fcntl.flock(users, fcntl.LOCK_SH)  # waits while a keeper is stopping its server
    _held.append(users)
    state = _read_state(folder)
    if not (state and _healthy(state["port"])):
        with open(folder / "start.lock", "a+") as start:
            fcntl.flock(start, fcntl.LOCK_EX)
            state = _read_state(folder)
            if not (state and _healthy(state["port"])):
                port = _launch_keeper(folder, keep)
                run_meanwhile()
                state = _wait_for_keeper(folder, port)
                print(f"started Kiln's local Prefect server on port {state['port']}; commands within "
                      f"{keep:g} s of each other reuse it (KILN_PREFECT_SERVER_KEEP)", file=sys.stderr)
    run_meanwhile()
    url = f"http://127.0.0.1:{state['port']}/api"
    os.environ["PREFECT_API_URL"] = url
    return url


def _launch_keeper(folder: Path, keep: float) -> int:
    """Start the keeper (which starts the server) without waiting for it; the port it will serve."""
    port = _free_port()
    with open(folder / "server.log", "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "flows.local_server", "keep", str(folder), str(port), str(keep)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            cwd=str(Path(__file__).resolve().parent.parent),
        )
    return port


def _wait_for_keeper(folder: Path, port: int) -> dict:
    deadline = time.monotonic() + _STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        state = _read_state(folder)
        if state and state.get("port") == port and _healthy(port):
            return state
        time.sleep(0.1)
    from tasks.errors import KilnError

    raise KilnError(f"Kiln's local Prefect server did not start within {_STARTUP_TIMEOUT:.0f} s (log: "
                    f"{folder / 'server.log'}); set KILN_PREFECT_SERVER_KEEP=0 to use a temporary server instead")


def _keep(folder: Path, port: int, keep: float) -> None:
    """The keeper: run the server; stop it once nobody has used it for `keep` seconds."""
    import prefect

    home = folder / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "error", "--lifespan", "on"],
        env=env, stdin=subprocess.DEVNULL,
    )
    signal.signal(signal.SIGTERM, lambda *_: (server.terminate(), sys.exit(0)))
    deadline = time.monotonic() + _STARTUP_TIMEOUT
    while not _healthy(port):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            return
        time.sleep(0.1)
    state_file = folder / "server.json"
    tmp = folder / f".server.json.{os.getpid()}"
    tmp.write_text(json.dumps({"port": port, "keeper_pid": os.getpid(), "server_pid": server.pid}))
    tmp.replace(state_file)
    last_used = time.monotonic()
    with open(folder / "users.lock", "a+") as users:
        while server.poll() is None:
            time.sleep(_POLL)
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                last_used = time.monotonic()  # a command holds it: in use
                continue
            if time.monotonic() - last_used < keep:
                fcntl.flock(users, fcntl.LOCK_UN)
                continue
            # Idle long enough; the exclusive lock keeps new commands waiting until the state is gone.
            state = _read_state(folder)
            if state and state.get("keeper_pid") == os.getpid():
                state_file.unlink(missing_ok=True)
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
            fcntl.flock(users, fcntl.LOCK_UN)
            return


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "keep":
    _keep(Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
