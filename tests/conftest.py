"""Session-wide fixtures: one cache, one demo model, one conversion, shared by every test.

The expensive parts (rebuilding the demo folder, the f16 conversion) run once per
session; tests that need a fresh cache make their own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.local_server import stop_kept_server

REPO_ROOT = Path(__file__).resolve().parent.parent

# Shared fixtures live in these modules; registering them here makes them visible to every test.
pytest_plugins = [
    "tests.support.fixtures_adapter",
    "tests.support.fixtures_gotemplate",
    "tests.support.fixtures_hub",
    "tests.support.fixtures_ollama",
    "tests.support.fixtures_prefect",
]
pytest.register_assert_rewrite("tests.support.hub_faults_proxy")


@pytest.fixture(scope="session", autouse=True)
def kiln_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`KILN_CACHE_DIR` for the session: `KILN_TEST_CACHE_DIR` when set (reused across runs), else a temp dir.

    The `kiln` commands the tests run share the Prefect server Kiln keeps in this cache; it is
    stopped when the session ends rather than left idling for KILN_PREFECT_SERVER_KEEP seconds.
    """
    reuse = os.environ.get("KILN_TEST_CACHE_DIR")
    path = Path(reuse) if reuse else tmp_path_factory.mktemp("kiln-cache")
    path.mkdir(parents=True, exist_ok=True)
    os.environ["KILN_CACHE_DIR"] = str(path)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    yield path
    stop_kept_server(path / "prefect-server")


@pytest.fixture(scope="session")
def toolchain(kiln_cache: Path):
    from tasks.toolchain import current_toolchain

    return current_toolchain()


@pytest.fixture(scope="session")
def demo_model_dir(kiln_cache: Path) -> Path:
    """The embedded SmolLM2-135M-Instruct as a Hugging Face folder (built once)."""
    from tasks.demo import ensure_demo_model

    return ensure_demo_model()[0]


@pytest.fixture(scope="session")
def demo_f16_gguf(demo_model_dir: Path, demo_base_key: str, toolchain) -> Path:
    """The demo model converted to f16 GGUF by the pinned converter, once per session.

    The demo export's own cache entry (same key), so the session converts the demo once.
    """
    from tasks.convert import convert_to_gguf

    return convert_to_gguf(demo_model_dir, demo_base_key, "f16", toolchain)[0]


@pytest.fixture(scope="session")
def demo_export(tmp_path_factory: pytest.TempPathFactory, kiln_cache: Path) -> tuple[Path, dict]:
    """`kiln demo --json` run once per session through the real CLI: (output folder, manifest)."""
    import json

    from tests.support.kiln_cli import run_kiln

    out = tmp_path_factory.mktemp("demo-export") / "out"
    proc = run_kiln("demo", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout)
