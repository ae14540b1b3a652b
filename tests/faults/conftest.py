"""Fixtures of the fault suite.

- `prefect_api` (session): one real `prefect server start` on loopback (tests/support/prefect_server.py)
  that every `kiln` run of the suite talks to through PREFECT_API_URL. The faults under test
  are Kiln's (kills, locks, disks, caches), not Prefect's; one shared server instead of an
  ephemeral one a run saves about 15 s a `kiln` invocation on a 2-core machine.
- `reference_export` (session): one uninterrupted `kiln demo --no-verify --no-report` on the session
  cache, with HF_TOKEN set to a marker: the byte-for-byte reference every interrupted run
  must end up equal to, and the run the token tests grep.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faults.helpers import (
    FAST,
    TOKEN_MARKER,
    Kiln,
    cli_env,
    demo_entry_name,
    entry,
    output_hashes,
)
from tests.support.prefect_server import PrefectServer


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    server = PrefectServer.start(tmp_path_factory.mktemp("faults-prefect-server"))
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Reference:
    out: Path
    manifest: dict
    run: Kiln
    hashes: dict[str, str]
    env: dict[str, str]
    prefect_home: Path

    def entry(self, cache: Path, variant: str) -> Path | None:
        """The demo's `variant` entry (f16, q8_0, q4_k_m) in `cache`, if it is there under its final name."""
        return entry(cache, demo_entry_name(self.manifest, variant))


@pytest.fixture(scope="session")
def reference_export(prefect_api: PrefectServer, kiln_cache: Path,
                     tmp_path_factory: pytest.TempPathFactory) -> Reference:
    root = tmp_path_factory.mktemp("faults-reference")
    env = cli_env(prefect_api.env, kiln_cache, root / "prefect-home")
    token_env = {**env, "HF_TOKEN": TOKEN_MARKER, "HUGGING_FACE_HUB_TOKEN": TOKEN_MARKER}
    out = root / "out"
    run = Kiln(["demo", "--out", str(out), *FAST, "--json"], token_env, root / "logs", "reference")
    assert run.wait() == 0, run.describe()
    return Reference(out=out, manifest=json.loads(run.stdout), run=run, hashes=output_hashes(out), env=env,
                     prefect_home=root / "prefect-home")
