"""Headless Chromium (Debian's `chromium` package) driven by Playwright, logged in to a test Prefect server's UI.

Playwright drives the system browser (`executable_path`): nothing is downloaded at run time.
The server runs with `PREFECT_SERVER_API_AUTH_STRING`, so its UI (v2, the default for a browser
with no saved preference) opens on its login page; the test types the auth string there, as a
user would. The UI keeps it base64-encoded in localStorage (`prefect-password`) and sends it as
HTTP basic auth on every API call (prefect/server/ui-v2: AuthProvider).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = Path(os.environ.get("KILN_TEST_CHROMIUM", "/usr/bin/chromium"))
# What works in a container without a display, a GPU or the network.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 900}


def missing_browser() -> str | None:
    """Why the browser tests cannot run here (None: they can): setup.sh installs both."""
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is missing: `apt-get install chromium` (setup.sh does)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is missing: `pip install -e .[test]` (setup.sh does)"
    return None


@contextmanager
def chromium_page() -> Iterator[Any]:
    """A page in a fresh headless Chromium with a new, empty profile folder, removed afterwards."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="kiln-chromium-")
    try:
        with sync_playwright() as pw:
            # A persistent context is how Playwright takes a profile folder (it refuses --user-data-dir).
            context = pw.chromium.launch_persistent_context(
                profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, viewport=VIEWPORT,
            )
            try:
                context.set_default_timeout(30_000)
                yield context.pages[0] if context.pages else context.new_page()
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def ui_url(api_url: str) -> str:
    """The UI's root: the server's address without the `/api` suffix."""
    return api_url.removesuffix("/api")


def log_in(page: Any, api_url: str, auth: str) -> None:
    """Open the UI and log in with the server's auth string (`user:password`) on its login page."""
    page.goto(ui_url(api_url) + "/")
    page.wait_for_url("**/login**")
    page.get_by_placeholder("admin:pass").fill(auth)
    page.keyboard.press("Enter")
    page.wait_for_url("**/dashboard**")
