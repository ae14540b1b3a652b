"""Kiln's kept local Prefect server: started once, reused by the next command, stopped when idle."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.support.kiln_cli import run_kiln


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_second_export_reuses_the_server_and_it_stops_when_idle(tmp_path: Path, kiln_cache: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    # The session's cache already holds the demo model and toolchain; a cache of its own keeps
    # this test's server apart from any other.
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in ("toolchain", "demo"):
        if (kiln_cache / name).exists():
            (cache / name).symlink_to(kiln_cache / name)
    env = {"KILN_CACHE_DIR": str(cache), "KILN_PREFECT_SERVER_KEEP": "8"}
    first = run_kiln("export", "demo", "--quant", "q8_0", "--no-verify", "--no-report", "--out", str(tmp_path / "a"),
                     env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "started Kiln's local Prefect server" in first.stderr
    assert "Starting temporary server" not in first.stderr
    state = json.loads((cache / "prefect-server" / "server.json").read_text())
    assert _alive(state["keeper_pid"]) and _alive(state["server_pid"])
    # The source was hashed while the server booted (the keeper writes server.json once it is healthy):
    # fetch found the memo instead of reading every weight file after the start-up.
    hashed = [p.stat().st_mtime for p in (cache / "hashes").glob("*.json")]
    assert hashed and max(hashed) < (cache / "prefect-server" / "server.json").stat().st_mtime

    second = run_kiln("export", "demo", "--quant", "q8_0", "--no-verify", "--no-report", "--out", str(tmp_path / "a"),
                      "--force", env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "started Kiln's local Prefect server" not in second.stderr
    assert f"127.0.0.1:{state['port']}" in second.stderr  # Prefect's run links point at the kept server

    # Nobody uses it any more: it stops after 8 idle seconds (polled every 2 s).
    deadline = time.monotonic() + 60
    while _alive(state["server_pid"]) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _alive(state["server_pid"])
    assert not (cache / "prefect-server" / "server.json").exists()


def test_a_users_own_server_or_keep_zero_starts_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.local_server import use_local_server

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    ran: list[str] = []
    assert use_local_server(lambda: ran.append("hashing")) is None
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setenv("KILN_PREFECT_SERVER_KEEP", "0")
    assert use_local_server(lambda: ran.append("hashing")) is None
    assert ran == ["hashing", "hashing"]  # the work meant for the start-up still runs, once each
    assert "PREFECT_API_URL" not in os.environ
    assert not (tmp_path / "c" / "prefect-server").exists()
