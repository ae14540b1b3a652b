"""The warm converter host: llama.cpp's own converter, run as forks of one process that imported it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tasks.files import TEMP_PREFIX, sha256_file
from tests.support.prefect_server import REPO_ROOT


def _vocab_only(model_dir: Path, out: Path, toolchain, jobs: list) -> None:
    from tasks.convert import run_converter

    run_converter("convert_hf_to_gguf.py", ["--vocab-only", "--outtype", "f16", "--outfile", str(out), str(model_dir)],
                  toolchain, on_start=jobs.append)


def test_a_job_in_the_host_writes_what_a_plain_converter_process_writes(demo_model_dir, toolchain, tmp_path, monkeypatch):
    from tasks.converter_host import HostedJob

    jobs: list = []
    _vocab_only(demo_model_dir, tmp_path / "hosted.gguf", toolchain, jobs)
    monkeypatch.setenv("KILN_CONVERTER_HOST", "0")
    _vocab_only(demo_model_dir, tmp_path / "plain.gguf", toolchain, jobs)

    assert isinstance(jobs[0], HostedJob) and isinstance(jobs[1], subprocess.Popen)
    assert jobs[0].returncode == 0 and jobs[1].returncode == 0
    assert sha256_file(tmp_path / "hosted.gguf") == sha256_file(tmp_path / "plain.gguf")


def test_a_conversion_started_early_and_cancelled_leaves_nothing(demo_model_dir, toolchain, tmp_path, monkeypatch):
    from tasks.convert import ConversionAhead, convert_to_gguf, gguf_cache_path

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    entry = gguf_cache_path("cancelled", "f16", toolchain)
    ahead = ConversionAhead(demo_model_dir, "cancelled", "f16", toolchain)
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(TEMP_PREFIX) for p in entry.parent.glob("*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert time.monotonic() < deadline, "the conversion never started writing"
    ahead.cancel()

    assert not entry.exists()
    assert [p.name for p in entry.parent.iterdir() if not p.name.endswith(".lock")] == []
    # Nothing holds the entry: the same conversion runs to the end.
    path, reused = convert_to_gguf(demo_model_dir, "cancelled", "f16", toolchain)
    assert path == entry and not reused and entry.stat().st_size > 100e6


HOST_OWNER = r"""
import os, sys
from pathlib import Path
from tasks.converter_host import warm
from tasks.toolchain import converter_env, current_toolchain
root = Path(current_toolchain().converter_dir)
host = warm(root, converter_env(root))
print(host.proc.pid, flush=True)
host.ready()
print("ready", flush=True)
sys.stdin.read()
"""


def test_the_host_does_not_outlive_the_process_that_started_it(toolchain):
    owner = subprocess.Popen([sys.executable, "-c", HOST_OWNER], cwd=REPO_ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "KILN_CONVERTER_HOST": "1"})
    assert owner.stdout is not None
    host_pid = int(owner.stdout.readline())
    assert owner.stdout.readline().strip() == "ready"
    assert Path(f"/proc/{host_pid}").exists()
    owner.kill()  # no clean-up runs: SIGKILL
    owner.wait()
    deadline = time.monotonic() + 10
    while _alive(host_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(host_pid), "the converter host is still running after its owner was killed"


def _alive(pid: int) -> bool:
    """Running and not a zombie (the host is reparented, so nobody may have reaped it yet)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status
