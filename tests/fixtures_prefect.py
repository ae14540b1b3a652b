"""The real Prefect server the deployment, batch and placement tests share (one a session).

Registered for every test by `pytest_plugins` in tests/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.prefect_server import PrefectServer


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory, kiln_cache: Path, demo_f16_gguf: Path):
    """Server, pools, GPU limit, deployments from deployments/prefect.yaml, one worker a pool."""
    server = PrefectServer.start(tmp_path_factory.mktemp("prefect-home"), {"KILN_CACHE_DIR": str(kiln_cache)})
    try:
        server.cli("work-pool", "create", "cpu", "--type", "process")
        server.cli("work-pool", "create", "gpu", "--type", "process")
        server.cli("concurrency-limit", "create", "gpu", "1")
        server.cli("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
        server.start_workers("cpu", "gpu")
        yield server
    finally:
        server.stop()
