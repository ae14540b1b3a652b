"""The Go template renderer, built once per test session with `go build`.

Tests use the production code path (`tasks.template_check.GoRenderer`): the
Go source shipped in `templates/gorender/` is built into a temporary cache.
A machine without Go fails these tests with GoToolchainMissing, on purpose:
the renderer is part of Kiln, and CI installs golang-go.

Registered for every test by `pytest_plugins` in tests/conftest.py.
"""

from __future__ import annotations

import pytest

from tasks.template_check import GoRenderer


@pytest.fixture(scope="session")
def go_renderer(tmp_path_factory: pytest.TempPathFactory) -> GoRenderer:
    renderer = GoRenderer(cache_root=tmp_path_factory.mktemp("kiln-cache"))
    renderer.binary()  # build now: a missing `go` fails here, not in the middle of a test
    return renderer
