"""A warm converter: one process that has imported llama.cpp's converter forks a child per job.

`convert_hf_to_gguf.py` spends seconds importing torch and its model classes before it
reads a byte of the model. An export of a base seen for the first time runs it twice (the
preflight probe, then the conversion), a batch once or twice per base. The host pays that import
once per process and toolchain; each job is a `fork` of it that runs the unchanged script as
`__main__` with its own argv, environment and working folder, so the converter behaves exactly
as when started on its own (`convert_lora_to_gguf.py` too: it imports from the same module).

The host imports only the converter; it never runs torch code itself, so forking it is safe (no
thread pools exist yet). It runs next to the Kiln process that started it, exits when that
process is gone or after `IDLE_SECONDS` without a job, and is keyed on the import-time
environment: a job asking for another one gets a fresh host. `KILN_CONVERTER_HOST=0`, or a
platform other than Linux, runs each job as a plain subprocess instead.

This file is both the host program (run as a script, stdlib only) and its client.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

IDLE_SECONDS = 120.0
READY_SECONDS = 120.0
_EXIT_MARK = "\0KILN-EXIT "
_PID_MARK = "\0KILN-PID "
# Variables read while the converter's modules import; a job whose values differ needs another host.
_IMPORT_TIME_PREFIXES = ("PYTHON", "LD_", "HF_", "HUGGING", "TRANSFORMERS", "TORCH", "CUDA", "OMP_", "MKL_",
                         "OPENBLAS", "TOKENIZERS", "NO_LOCAL_GGUF", "PATH", "HOME", "TMPDIR")


# ---------------------------------------------------------------- the host program


def _serve(sock_path: str, root: str) -> None:
    # As when the converter runs on its own: its folder first, not this file's (Kiln's modules).
    sys.path[0] = root
    import convert_hf_to_gguf  # noqa: F401  (the expensive import, paid once)

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps finished jobs
    parent = os.getppid()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    idle = 0.0
    while os.getppid() == parent and idle < IDLE_SECONDS:
        ready, _, _ = select.select([listener], [], [], 1.0)
        if not ready:
            idle += 1.0
            continue
        idle = 0.0
        conn, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            _run_job(conn)
        conn.close()


def _run_job(conn: socket.socket) -> None:
    """In the forked child: read the job, make the connection stdout and stderr, run the script."""
    import runpy
    import traceback

    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        reader = conn.makefile("rb")
        job = json.loads(reader.readline())
        fd = conn.fileno()
        os.write(fd, f"{_PID_MARK}{os.getpid()}\n".encode())
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        sys.argv = [job["script"], *job["args"]]
        try:
            runpy.run_path(job["script"], run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(1, f"{_EXIT_MARK}{code}\n".encode())
    finally:
        os._exit(code)


# ---------------------------------------------------------------- the client


class HostedJob:
    """A converter run in a forked child of the host; the subset of `subprocess.Popen` Kiln uses."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn
        self._lines = conn.makefile("r", encoding="utf-8", errors="replace", newline="\n")
        first = self._lines.readline()
        self.pid = int(first[len(_PID_MARK):]) if first.startswith(_PID_MARK) else None
        self.returncode: int | None = None if self.pid else -signal.SIGKILL

    @property
    def stdout(self) -> Iterator[str]:
        for line in self._lines:
            if line.startswith(_EXIT_MARK):
                self.returncode = int(line[len(_EXIT_MARK):])
                continue
            yield line

    def wait(self) -> int:
        for _ in self.stdout:
            pass
        self._conn.close()
        if self.returncode is None:  # no exit line: killed, by a signal or for want of memory
            self.returncode = -signal.SIGKILL
        return self.returncode

    def kill(self) -> None:
        if self.pid and self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class _Host:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.key = _host_key(root, env)
        self.folder = tempfile.mkdtemp(prefix="kiln-converter-")
        self.sock_path = os.path.join(self.folder, "sock")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, self.sock_path, str(root)],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        self.started: bool | None = None  # None: not known yet; False: it never got ready
        self._lock = threading.Lock()

    def ready(self) -> bool:
        """Waits for the host's import to finish; True while it serves."""
        with self._lock:
            if self.started is None:
                assert self.proc.stdout is not None
                waited, _, _ = select.select([self.proc.stdout], [], [], READY_SECONDS)
                self.started = bool(waited) and self.proc.stdout.readline().strip() == "ready"
            return self.started and self.proc.poll() is None

    def submit(self, script: Path, args: list[str], env: dict[str, str]) -> HostedJob:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.sock_path)
        job = {"script": str(script), "args": args, "env": env, "cwd": os.getcwd()}
        conn.sendall(json.dumps(job).encode() + b"\n")
        return HostedJob(conn)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        try:
            os.unlink(self.sock_path)
            os.rmdir(self.folder)
        except OSError:
            pass


_host: _Host | None = None
_host_lock = threading.Lock()
# Hosts that died before they were ready (a converter tree that does not import): not tried again.
_failed: set[str] = set()


def _host_key(root: Path, env: dict[str, str]) -> str:
    relevant = {k: v for k, v in env.items() if k.startswith(_IMPORT_TIME_PREFIXES)}
    return json.dumps([str(root), sys.executable, sorted(relevant.items())])


def enabled() -> bool:
    # Linux only: elsewhere forking a process that imported torch is not known to be safe.
    from tasks import settings  # not at the top: this file also runs as the host's own script

    return sys.platform == "linux" and settings.converter_host_enabled()


def warm(root: Path, env: dict[str, str]) -> _Host | None:
    """The host for (root, env), started now if need be; returns at once (the import goes on in it)."""
    global _host
    key = _host_key(root, env)
    if not enabled() or key in _failed:
        return None
    with _host_lock:
        if _host is not None and (_host.key != key or _host.proc.poll() is not None):
            _host.close()
            _host = None
        if _host is None:
            _host = _Host(root, env)
        return _host


def start_job(root: Path, script: str, args: list[str], env: dict[str, str]) -> HostedJob | subprocess.Popen:
    """Run `root/script args` in a forked child of the warm host, or as a plain subprocess where there is none."""
    host = warm(root, env)
    if host is not None:
        if host.ready():
            try:
                return host.submit(root / script, args, env)
            except OSError:
                pass  # the host went away between the check and the call: run it plainly
        elif host.started is False:
            _failed.add(host.key)  # the plain run below shows why it does not import
    return subprocess.Popen(
        [sys.executable, str(root / script), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        errors="replace", env=env,
    )


@atexit.register
def _close_host() -> None:
    if _host is not None:
        _host.close()


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2])
