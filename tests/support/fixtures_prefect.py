"""The real Prefect server the deployment, batch, placement and policy tests share (one a session).

Authentication is on (tests/support/prefect_server.py), and the workers run under an operator's policy
(`KILN_POLICY_FILE`, tasks/policy.py) whose roots are pytest's temporary folders: the tests'
outputs and local sources lie there, and anything outside is refused.
Registered for every test by `pytest_plugins` in tests/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.support.prefect_server import PrefectServer


def policy_roots(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The folders the session's policy allows for outputs and sources: pytest's base temporary folder."""
    return [str(tmp_path_factory.getbasetemp().resolve())]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory, kiln_cache: Path, demo_f16_gguf: Path):
    """Server (auth on), pools, GPU limit, deployments from deployments/prefect.yaml, one worker a pool."""
    home = tmp_path_factory.mktemp("prefect-home")
    # The UI too (off in PrefectServer by default): tests/test_ui_browser.py drives it in a browser.
    server = PrefectServer.start(home, {"KILN_CACHE_DIR": str(kiln_cache), "PREFECT_SERVER_UI_ENABLED": "true"})
    policy = home / "policy.yaml"
    roots = policy_roots(tmp_path_factory)
    policy.write_text(yaml.safe_dump({"output_roots": roots, "source_roots": roots}))
    try:
        server.cli("work-pool", "create", "cpu", "--type", "process")
        server.cli("work-pool", "create", "gpu", "--type", "process")
        server.cli("concurrency-limit", "create", "gpu", "1")
        server.cli("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
        server.start_workers("cpu", "gpu", env={"KILN_POLICY_FILE": str(policy)})
        yield server
    finally:
        server.stop()
