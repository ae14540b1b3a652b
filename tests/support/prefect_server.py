"""A real Prefect server, work pools, process workers and deployments, for the deployment tests.

`prefect server start` on 127.0.0.1 (a free port) with SQLite in a temporary PREFECT_HOME,
the UI off and analytics off, and API authentication on, as docs/deployments.md tells a team
to run it: `PREFECT_SERVER_API_AUTH_STRING` on the server, `PREFECT_API_AUTH_STRING` (the same
`user:password`) for the CLI, workers and clients, which send it as HTTP basic auth. Workers
are started with `prefect worker start`; every process started here is stopped by its PID
(workers before the server: a worker whose server went first ignores SIGTERM). The REST API
is driven with httpx, so the test process's own Prefect settings are left alone.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prefect_command() -> list[str]:
    exe = Path(sys.executable).parent / "prefect"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "prefect"]


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def stop_process(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM to the process we started; SIGKILL to its own session if it does not leave in `grace` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session (start_new_session): only what it started
        except ProcessLookupError:
            pass
        proc.wait(10)


@dataclass
class Worker:
    pool: str
    proc: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""


@dataclass
class PrefectServer:
    home: Path
    env: dict[str, str]
    api_url: str
    proc: subprocess.Popen
    log: Path
    auth: str | None = None
    workers: list[Worker] = field(default_factory=list)

    @classmethod
    def start(cls, home: Path, extra_env: dict[str, str] | None = None, timeout: float = 120,
              auth: bool = True) -> PrefectServer:
        """Start the server; with `auth`, a fresh `kiln-tests:<random>` auth string it and every client share."""
        home.mkdir(parents=True, exist_ok=True)
        auth_string = f"kiln-tests:{secrets.token_urlsafe(16)}" if auth else None
        port = free_port()
        api_url = f"http://127.0.0.1:{port}/api"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update({
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "false",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            # Workers ask for work every 2 s instead of 10 s; runs start sooner.
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_WORKER_HEARTBEAT_SECONDS": "10",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
            **({"PREFECT_SERVER_API_AUTH_STRING": auth_string, "PREFECT_API_AUTH_STRING": auth_string}
               if auth_string else {}),
            **(extra_env or {}),
        })
        log = home / "server.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [*prefect_command(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=home,
            )
        server = cls(home=home, env=env, api_url=api_url, proc=proc, log=log, auth=auth_string)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited ({proc.returncode}):\n{tail(log)}")
            try:
                if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:  # health needs no auth
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        server.stop()
        raise RuntimeError(f"prefect server not healthy after {timeout} s:\n{tail(log)}")

    # ------------------------------------------------------------ CLI and workers

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*prefect_command(), *args], env=self.env, cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"prefect {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def start_workers(self, *pools: str, env: dict[str, str] | None = None, timeout: float = 90) -> list[Worker]:
        """One process worker a pool, started together, with `env` added to theirs; returns when every pool is READY.

        `env` is the worker's side of a deployment (an operator's KILN_POLICY_FILE, say): every
        flow run the worker starts inherits it.
        """
        worker_env = {**self.env, **(env or {})}
        started = []
        for pool in pools:
            log = self.home / f"worker-{pool}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [*prefect_command(), "worker", "start", "--pool", pool, "--type", "process",
                     "--name", f"{pool}-worker"],
                    env=worker_env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True, cwd=REPO_ROOT,
                )
            worker = Worker(pool=pool, proc=proc, log=log)
            self.workers.append(worker)
            started.append(worker)
        deadline = time.monotonic() + timeout
        waiting = list(started)
        while waiting:
            for worker in list(waiting):
                if worker.proc.poll() is not None:
                    raise RuntimeError(f"worker for {worker.pool} exited ({worker.proc.returncode}):\n{tail(worker.log)}")
                if self.get(f"/work_pools/{worker.pool}").get("status") == "READY":
                    waiting.remove(worker)
            if time.monotonic() > deadline:
                raise RuntimeError(f"pools never became READY: {[w.pool for w in waiting]}\n" + self.diagnostics())
            time.sleep(0.5)
        return started

    def run_python(self, code: str, *args: str, timeout: float = 300) -> Any:
        """Run `code` in a fresh interpreter against this server; it prints one `RESULT <json>` line.

        Flows run in a subprocess, not in the test process: a process whose flows talked to a
        server that has since stopped spends its exit retrying to send logs and events there.
        """
        proc = subprocess.run([sys.executable, "-c", code, *args], env=self.env, cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=timeout)
        line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise AssertionError(f"python child failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return json.loads(line.removeprefix("RESULT "))

    def stop(self) -> None:
        """Workers first, then the server; each by its own PID."""
        for worker in reversed(self.workers):
            stop_process(worker.proc)
        self.workers.clear()
        stop_process(self.proc)

    # ------------------------------------------------------------ REST API

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        # SQLite under a busy server answers 503 now and then ("database is locked"); Prefect's
        # own client retries those, and so does this one, a few times.
        for attempt in range(6):
            response = httpx.request(method, self.api_url + path, json=body, timeout=30, auth=self.basic_auth())
            if response.status_code not in (502, 503, 504) or attempt == 5:
                break
            time.sleep(1 + attempt)
        response.raise_for_status()
        return response.json()

    def basic_auth(self) -> httpx.BasicAuth | None:
        """The auth string as HTTP basic auth, the way Prefect's own clients send it."""
        if self.auth is None:
            return None
        user, _, password = self.auth.partition(":")
        return httpx.BasicAuth(user, password)

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._request("POST", path, body)

    def run_deployment(self, name: str, parameters: dict[str, Any], job_variables: dict[str, Any] | None = None) -> str:
        """Create a flow run of `flow/deployment` with `parameters` (as the UI's Run button does); its id.

        `job_variables`: the run's own overrides, as the UI's custom run sets them (e.g. `env`).
        """
        deployment = self.get(f"/deployments/name/{name}")
        body: dict[str, Any] = {"parameters": parameters}
        if job_variables is not None:
            body["job_variables"] = job_variables
        run = self.post(f"/deployments/{deployment['id']}/create_flow_run", body)
        return run["id"]

    def wait(self, flow_run_id: str, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.get(f"/flow_runs/{flow_run_id}")
            if (run.get("state") or {}).get("type") in FINAL_STATES:
                return run
            time.sleep(1)
        raise AssertionError(f"flow run {flow_run_id} not finished after {timeout} s:\n" + self.diagnostics())

    def child_flow_runs(self, parent_id: str) -> list[dict[str, Any]]:
        return self.post("/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [parent_id]}}})

    def task_runs(self, flow_run_ids: list[str]) -> list[dict[str, Any]]:
        return self.post("/task_runs/filter", {"flow_runs": {"id": {"any_": flow_run_ids}}})

    def artifacts(self, flow_run_id: str, key: str | None = None) -> list[dict[str, Any]]:
        body: dict[str, Any] = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
        if key:
            body["artifacts"]["key"] = {"any_": [key]}
        return self.post("/artifacts/filter", body)

    def logs(self, flow_run_id: str) -> str:
        rows = self.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC"})
        return "\n".join(row["message"] for row in rows)

    def diagnostics(self) -> str:
        parts = [f"--- server log\n{tail(self.log, 2000)}"]
        for worker in self.workers:
            parts.append(f"--- {worker.pool} worker log\n{tail(worker.log, 3000)}")
        return "\n".join(parts)


def task_states_by_kind(server: PrefectServer, flow_run_ids: list[str], expect: int, timeout: float = 30) -> dict[str, list[str]]:
    """State names of the convert and quantize task runs of these flow runs (task runs are recorded from events)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = server.task_runs(flow_run_ids)
        kinds: dict[str, list[str]] = {"convert": [], "quantize": []}
        for run in runs:
            kind = run["name"].rsplit("-", 1)[0]
            if kind in kinds and run.get("state"):
                kinds[kind].append(run["state"]["name"])
        if sum(map(len, kinds.values())) >= expect or time.monotonic() > deadline:
            return kinds
        time.sleep(1)


def logs_once(server: PrefectServer, flow_run_id: str, wanted: str, timeout: float = 20) -> str:
    """A flow run's logs, once `wanted` has arrived (logs reach the server in batches)."""
    deadline = time.monotonic() + timeout
    while True:
        logs = server.logs(flow_run_id)
        if wanted in logs or time.monotonic() > deadline:
            return logs
        time.sleep(1)


