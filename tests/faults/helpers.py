"""Plumbing for the fault suite: the real `kiln` command in its own process group, private caches, snapshots.

Every `kiln` started here runs in a new session (`start_new_session=True`), so a test
can SIGKILL the whole group (the CLI, the converter subprocess it started) by the
group id of the process it started itself, and nothing else.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from tasks.files import TEMP_PREFIX, sha256_file
from tests.support.kiln_cli import kiln_executable

DEMO_STEM = "smollm2-135m-instruct"
DEMO_QUANTS = ("f16", "q8_0", "q4_k_m")
# Checks that are not the point of a fault test and cost a minute on a 2-core machine.
FAST = ("--no-verify", "--no-report")
# Set as HF_TOKEN for the reference export; shaped like a Hub token so every redaction rule would apply.
TOKEN_MARKER = "hf_KilnFaultSuiteMarker" + "Q7x" * 6


def private_cache(session_cache: Path, root: Path) -> Path:
    """A KILN_CACHE_DIR of its own: the demo folder hard-linked (read only), toolchain and probes copied, no GGUF.

    Conversions and quantizations really run in it; nothing here writes to the session cache.
    """
    root.mkdir(parents=True)
    shutil.copytree(session_cache / "demo", root / "demo", copy_function=os.link)
    for name in ("toolchain", "probe"):
        if (session_cache / name).is_dir():
            shutil.copytree(session_cache / name, root / name)
    (root / "gguf").mkdir()
    return root


def cli_env(base: dict[str, str], cache: Path, prefect_home: Path, **extra: str) -> dict[str, str]:
    """Environment for one scenario's `kiln` runs: its cache, and its own Prefect result storage.

    Prefect's cross-run task cache is keyed by cache file *name* (not folder), so runs
    against different KILN_CACHE_DIRs must not share result storage (see the report).
    """
    prefect_home.mkdir(parents=True, exist_ok=True)
    env = {**base, "KILN_CACHE_DIR": str(cache), "PREFECT_HOME": str(prefect_home), **extra}
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
    return env


class Kiln:
    """One `kiln` process in its own session; stdout/stderr go to files beside the scenario."""

    def __init__(self, args: Iterable[str], env: dict[str, str], logs: Path, name: str):
        self.args = list(args)
        self.name = name
        logs.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = logs / f"{name}.stdout", logs / f"{name}.stderr"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([*kiln_executable(), *self.args], env=env, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait(self, timeout: float = 400) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"kiln {' '.join(self.args)} still running after {timeout} s:\n{self.stderr[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the whole group this process leads (the CLI and the converter it started), then reap."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def group_gone(self, timeout: float = 10) -> bool:
        """True once no process of the group is left (orphans are reaped by init)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.05)
        return False

    def describe(self) -> str:
        return f"kiln {' '.join(self.args)} (exit {self.proc.returncode}):\n{self.stderr[-4000:]}"


def wait_until(condition: Callable[[], bool], run: Kiln, what: str, timeout: float = 300, every: float = 0.02) -> None:
    """Poll `condition` while `run` is alive; fail saying `what` was never seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if run.proc.poll() is not None:
            raise AssertionError(f"{what} never happened: {run.describe()}")
        time.sleep(every)
    run.kill()
    raise AssertionError(f"{what} not seen within {timeout} s: {run.describe()}")


def temporaries(*folders: Path) -> list[Path]:
    """Every `.kiln-tmp-*` file or folder under `folders` (recursively)."""
    found: list[Path] = []
    for folder in folders:
        if folder.is_dir():
            found += [p for p in folder.rglob(f"{TEMP_PREFIX}*")]
    return found


def growing_temporary(folder: Path, variant: str) -> Callable[[], Path | None]:
    """A probe for a temporary of a `<key>-<variant>-<toolchain>.gguf` cache entry that has bytes in it."""

    def probe() -> Path | None:
        for tmp in folder.glob(f"{TEMP_PREFIX}*-{variant}-*.gguf.*"):
            try:
                if tmp.stat().st_size > 0:
                    return tmp
            except FileNotFoundError:
                continue
        return None

    return probe


def demo_entry_name(manifest: dict, variant: str) -> str:
    """The cache entry name of the demo's `variant` GGUF, from an export's manifest (as gguf_cache_path names it)."""
    from registry.models import ResolvedSource
    from tasks.convert import conversion_key
    from tasks.toolchain import Toolchain

    key = conversion_key(ResolvedSource(**manifest["source"]))
    return f"{key}-{variant}-{Toolchain(**manifest['toolchain']).cache_key}.gguf"


def entry(cache: Path, name: str) -> Path | None:
    """The final cache entry `name` under `cache`/gguf, if it is there."""
    path = cache / "gguf" / name
    return path if path.is_file() else None


def entry_is_complete(path: Path) -> bool:
    stamp = path.with_name(path.name + ".sha256")
    return stamp.is_file() and stamp.read_text().strip() == sha256_file(path)


@dataclass(frozen=True)
class Identity:
    """Which file is under a name: a rewrite (new inode) or an in-place write (new mtime) changes it."""

    inode: int
    mtime_ns: int
    size: int

    @classmethod
    def of(cls, path: Path) -> Identity:
        st = path.stat()
        return cls(st.st_ino, st.st_mtime_ns, st.st_size)


def final_files(folder: Path) -> dict[str, Path]:
    """Files under final names (no temporaries, no lock files)."""
    if not folder.is_dir():
        return {}
    return {p.name: p for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(TEMP_PREFIX) and not p.name.endswith(".lock")}


def output_hashes(out: Path, stem: str = DEMO_STEM, quants: Iterable[str] = DEMO_QUANTS) -> dict[str, str]:
    return {q: sha256_file(out / f"{stem}-{q}.gguf") for q in quants}


def lock_is_held(path: Path) -> bool:
    """Whether another process holds the file lock at `path` right now (never keeps it)."""
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    return False
