"""Exports of the same request at once, and locks left behind by a killed holder.

Three `kiln demo --no-verify --no-report` processes start together on a private cache, so the f16
conversion really runs: A and B write the same folder, C another one. A watcher samples the
identity (inode, mtime, size) of every file under a final name in both folders and the cache
every few milliseconds: a file written twice would show two identities.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.faults.helpers import (
    FAST,
    Identity,
    Kiln,
    cli_env,
    final_files,
    lock_is_held,
    output_hashes,
    private_cache,
    temporaries,
)


class Watcher(threading.Thread):
    """Records every identity seen under each final name in `folders` until stopped."""

    def __init__(self, *folders: Path):
        super().__init__(daemon=True)
        self.folders = folders
        self.seen: dict[Path, set[Identity]] = {}
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            time.sleep(0.005)

    def sample(self) -> None:
        self.samples += 1
        for folder in self.folders:
            for path in final_files(folder).values():
                try:
                    self.seen.setdefault(path, set()).add(Identity.of(path))
                except FileNotFoundError:
                    continue

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)
        self.sample()


@pytest.fixture(scope="module")
def concurrent_scenario(prefect_api, reference_export, kiln_cache, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("concurrent")
    cache = private_cache(kiln_cache, root / "cache")
    env = cli_env(prefect_api.env, cache, root / "prefect-home")
    shared, other = root / "shared", root / "other"
    watcher = Watcher(shared, other, cache / "gguf")
    watcher.start()
    runs = {
        "A": Kiln(["demo", "--out", str(shared), *FAST], env, root / "logs", "A"),
        "B": Kiln(["demo", "--out", str(shared), *FAST], env, root / "logs", "B"),
        "C": Kiln(["demo", "--out", str(other), *FAST], env, root / "logs", "C"),
    }
    try:
        codes = {name: run.wait() for name, run in runs.items()}
    finally:
        watcher.stop()
    return {"runs": runs, "codes": codes, "watcher": watcher, "shared": shared, "other": other, "cache": cache}


def test_every_run_succeeds(concurrent_scenario):
    for name, run in concurrent_scenario["runs"].items():
        assert concurrent_scenario["codes"][name] == 0, run.describe()


def test_one_export_of_a_folder_builds_the_other_waits_and_reuses_it(concurrent_scenario):
    a, b = concurrent_scenario["runs"]["A"], concurrent_scenario["runs"]["B"]
    waited = [run for run in (a, b) if "up to date; nothing to do" in run.stderr]
    assert len(waited) == 1, "exactly one of the two exports of one folder should find the other's outputs"
    builder = b if waited[0] is a else a
    assert "up to date; nothing to do" not in builder.stderr


def test_the_conversion_runs_once_for_every_process(concurrent_scenario):
    runs = concurrent_scenario["runs"].values()
    converted = [run for run in runs if "base f16 GGUF converted" in run.stderr]
    assert len(converted) == 1, [run.name for run in converted]
    # The other builder waited on the cache entry's lock and took the entry the first one wrote.
    reused = [run for run in runs if "base f16 GGUF reused from disk cache" in run.stderr
              or "base f16 GGUF cached (Prefect)" in run.stderr]
    assert len(reused) == 1, [run.name for run in reused]


def test_no_file_is_written_twice(concurrent_scenario):
    watcher = concurrent_scenario["watcher"]
    assert watcher.samples > 100
    twice = {str(path): ids for path, ids in watcher.seen.items() if len(ids) > 1}
    assert twice == {}
    names = {path.name for path in watcher.seen}
    assert "manifest.json" in names and any(n.endswith("-f16.gguf") for n in names)


def test_both_folders_match_the_uninterrupted_reference(concurrent_scenario, reference_export):
    assert output_hashes(concurrent_scenario["shared"]) == reference_export.hashes
    assert output_hashes(concurrent_scenario["other"]) == reference_export.hashes
    assert temporaries(concurrent_scenario["shared"], concurrent_scenario["other"], concurrent_scenario["cache"]) == []


HOLDER = """
import sys, time
from filelock import FileLock
locks = [FileLock(p) for p in sys.argv[1:]]
for lock in locks:
    lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_lock_whose_holder_was_killed_is_free_at_once(tmp_path: Path):
    """filelock uses flock(2): the kernel releases it when the holder dies, so a stale lock file blocks nothing."""
    paths = [tmp_path / "out" / ".kiln-export.lock", tmp_path / "gguf" / "x-f16-y.gguf.lock"]
    for path in paths:
        path.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, *map(str, paths)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert all(lock_is_held(p) for p in paths)
    finally:
        holder.kill()
        holder.wait(10)
    assert all(p.is_file() for p in paths), "the lock files stay behind"
    assert not any(lock_is_held(p) for p in paths)
