"""Runs triggered from Prefect's UI, as a user sees them, in a real browser.

The session's Prefect server (tests/support/fixtures_prefect.py: API auth on, the UI on, the project's
deployments, a worker a pool) is opened in headless Chromium (tests/support/browser.py). Each
test logs in on the UI's login page, opens a deployment, chooses Run → Custom run, fills the form
in, submits it, follows the toast's "View run" link and reads what the run's page shows: its
state, its State Message, its artifacts (the summary table, the quant report and its plot).

`KILN_UPDATE_SCREENSHOTS=1` also writes the screenshots README's "From the Prefect UI" shows
(docs/ui-*.png), from the same pages the assertions read.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.prefect_server import REPO_ROOT, PrefectServer, logs_once
from tests.support.browser import chromium_page, log_in, missing_browser, ui_url

# One more try for a UI test: a fresh-clone run lost a Submit click once while the form validated,
# and once followed a run whose page had not caught up; a second failure is a failure.
pytestmark = [pytest.mark.browser, pytest.mark.flaky(reruns=1, reruns_delay=5)]

DOCS = REPO_ROOT / "docs"
CATALOGUE = REPO_ROOT / "deployments" / "catalogue.yaml"
# A quant type no other test makes: its quantization runs here, so its progress is seen.
FRESH_QUANT = "q5_1"


def update_screenshots() -> bool:
    return os.environ.get("KILN_UPDATE_SCREENSHOTS", "") not in ("", "0")


def save_screenshot(page: Any, name: str, **options: Any) -> None:
    """docs/<name>.png, with KILN_UPDATE_SCREENSHOTS=1; reduced to 256 colours (a UI has few) to stay small."""
    if not update_screenshots():
        return
    from PIL import Image

    page.add_style_tag(content="[data-sonner-toaster] { display: none !important; }")  # "scheduled" toasts
    image = Image.open(io.BytesIO(page.screenshot(**options))).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(DOCS / f"{name}.png", optimize=True)


@pytest.fixture(scope="module")
def page(prefect_server: PrefectServer):
    reason = missing_browser()
    if reason is not None:
        pytest.fail(f"the browser tests need Chromium and Playwright: {reason}")  # never skipped: CI has both
    with chromium_page() as page:
        log_in(page, prefect_server.api_url, prefect_server.auth)
        yield page


# ---------------------------------------------------------------- what a user does


def open_custom_run(page: Any, server: PrefectServer, deployment: str, first_field: str) -> None:
    """Deployments → the deployment → Run → Custom run: the parameters form, once `first_field` shows."""
    page.goto(ui_url(server.api_url) + "/v2/deployments")
    page.get_by_role("link", name=deployment, exact=True).first.click()
    page.get_by_role("button", name="Run").click()
    page.get_by_role("menuitem", name="Custom run").click()
    page.get_by_text(first_field, exact=True).wait_for()  # the form is drawn after the page, from the schema


def field(page: Any, label: str) -> Any:
    """The form group under the label `label` (its inputs, list items and switches)."""
    return page.locator(f"xpath=//label[normalize-space()='{label}']/ancestor::div[contains(@class,'group')][1]")


def submit_and_view_run(page: Any, server: PrefectServer, deployment: str) -> str:
    """Submit the form and open the new run's page; its id.

    The toast's "View run" is what a user clicks; on a slow machine it may be gone before the
    click lands, and then the run's name in the deployment's Runs list is.
    """
    flow, name = deployment.split("/")
    deployment_id = server.get(f"/deployments/name/{flow}/{name}")["id"]

    def runs() -> list[dict[str, Any]]:
        return server.post("/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}})

    before = {run["id"] for run in runs()}
    submit = page.get_by_role("button", name="Submit")
    submit.click()
    # On a loaded machine a click can land while the form still validates and be lost (seen once:
    # the form still on screen, no run after 30 s). A user whose click did nothing clicks again.
    started = time.monotonic()
    clicked_again = False
    while not (new := [run for run in runs() if run["id"] not in before]):
        now = time.monotonic()
        if now > started + 90:
            shot = Path(tempfile.mkdtemp(prefix="kiln-ui-")) / "form.png"
            page.screenshot(path=str(shot), full_page=True)
            raise AssertionError(f"the form made no flow run in 90 s; the page: {shot}")
        if not clicked_again and now > started + 30 and submit.is_visible() and submit.is_enabled():
            submit.click()
            clicked_again = True
        time.sleep(0.5)
    # The run the page opens is the one the test follows (two clicks may have made two runs).
    try:
        page.get_by_role("button", name="View run").click(timeout=5000)
    except Exception:
        page.get_by_role("link", name=new[-1]["name"], exact=True).first.click()
    page.wait_for_url("**/runs/flow-run/**")
    run_id = page.url.split("/runs/flow-run/", 1)[1].split("?", 1)[0].split("/", 1)[0]
    assert run_id in {run["id"] for run in runs()} - before, (page.url, new)
    return run_id


def wait_for_state(page: Any, server: PrefectServer, run_id: str, state: str, timeout: float) -> None:
    """Until the run's page shows `state` (and the server agrees); the server's logs on a timeout."""
    deadline = time.monotonic() + timeout
    try:
        page.get_by_text(state, exact=True).first.wait_for(timeout=timeout * 1000)
        while server.get(f"/flow_runs/{run_id}")["state"]["name"] != state:  # the text may be another run's
            if time.monotonic() > deadline:
                raise TimeoutError
            time.sleep(1)
    except Exception:
        run = server.get(f"/flow_runs/{run_id}")
        raise AssertionError(f"the run's page never showed {state!r}; the run is {run['state']}:\n"
                             + server.logs(run_id)[-3000:] + "\n" + server.diagnostics()) from None


def open_artifact(page: Any, server: PrefectServer, run_id: str, key: str) -> None:
    """The run's Artifacts tab → the artifact's card → this run's version of it."""
    page.goto(ui_url(server.api_url) + f"/v2/runs/flow-run/{run_id}?tab=Artifacts")
    page.get_by_text(key, exact=True).click()
    page.locator("a[href*='/artifacts/artifact/']").first.click()
    page.get_by_role("tab", name="Raw").wait_for()


def state_message(page: Any, server: PrefectServer, run_id: str) -> str:
    """The Details tab's State Message, as the UI shows it."""
    page.goto(ui_url(server.api_url) + f"/v2/runs/flow-run/{run_id}?tab=Details")
    label = page.get_by_text("State Message", exact=True)
    return label.locator("xpath=following-sibling::*[1]").inner_text()


# ---------------------------------------------------------------- the tests


def test_export_form_run_progress_and_artifacts(page, prefect_server, kiln_cache, tmp_path):
    """The export form, filled in as a user would; the finished run's summary, quant report and plot."""
    for stale in (kiln_cache / "gguf").glob(f"*-{FRESH_QUANT}-*"):  # a reused cache (KILN_TEST_CACHE_DIR)
        stale.unlink()
    out = tmp_path / "ui-export"
    open_custom_run(page, prefect_server, "export", "Source (Optional)")
    # The request's fields, with the titles and descriptions the model gives them.
    for title in ("Source (Optional)", "Quant types (Optional)", "Float type (Optional)", "Output folder (Optional)",
                  "Placement (Optional)", "Max KL (Optional)"):
        assert page.get_by_text(title, exact=True).count() == 1, title
    assert page.get_by_text("Quant types to produce besides the float base", exact=False).count() == 1

    page.get_by_label("Source (Optional)").fill("demo")
    quants = field(page, "Quant types (Optional)").locator("textarea")
    assert quants.count() == 2  # the deployment's default, q8_0 and q4_k_m
    quants.nth(0).fill("q8_0")
    quants.nth(1).fill(FRESH_QUANT)
    page.get_by_label("Output folder (Optional)").fill(str(out))
    page.get_by_role("button", name="Select Placement").click()
    page.get_by_role("option", name="local", exact=True).click()
    verify = page.get_by_label("Verify (Optional)")
    verify.click()  # verification runs every file: the quant report is what this run is for
    assert verify.get_attribute("aria-checked") == "false"
    assert page.get_by_label("Report (Optional)").get_attribute("aria-checked") == "true"
    field(page, "Source (Optional)").scroll_into_view_if_needed()
    save_screenshot(page, "ui-export-form")

    run_id = submit_and_view_run(page, prefect_server, "export/export")
    wait_for_state(page, prefect_server, run_id, "Completed", timeout=300)
    run = prefect_server.get(f"/flow_runs/{run_id}")
    assert run["state"]["type"] == "COMPLETED"
    assert run["parameters"]["request"]["quants"] == ["q8_0", FRESH_QUANT]
    assert run["parameters"]["request"]["out_dir"] == str(out)
    assert (out / f"smollm2-135m-instruct-{FRESH_QUANT}.gguf").is_file()

    # Progress while the quantization ran: the run's log has the bar's intermediate values
    # (tasks/progress.py logs every quarter where it updates the progress artifact), and the
    # quantization's own progress artifact ended at 100.
    logs = logs_once(prefect_server, run_id, f"quantize to {FRESH_QUANT}: 50%")
    assert f"quantize to {FRESH_QUANT}: 50%" in logs, logs[-3000:]
    (bar,) = prefect_server.artifacts(run_id, f"kiln-quantize-{FRESH_QUANT.replace('_', '-')}")
    assert bar["type"] == "progress" and float(bar["data"]) == 100.0

    page.get_by_role("tab", name="Artifacts").click()
    for key in ("kiln-export-summary", "kiln-quant-report", "kiln-quantize"):
        page.get_by_text(key, exact=True).wait_for()
    save_screenshot(page, "ui-export-run", full_page=True)

    open_artifact(page, prefect_server, run_id, "kiln-export-summary")
    summary = page.locator("table").first
    assert "smollm2-135m-instruct-q8_0.gguf" in summary.inner_text()
    assert f"smollm2-135m-instruct-{FRESH_QUANT}.gguf" in summary.inner_text()
    assert page.get_by_text("kiln-quant-report", exact=True).count() >= 1  # where the report is

    open_artifact(page, prefect_server, run_id, "kiln-quant-report")
    report = page.locator("table").first.inner_text()
    for text in ("KL", "top-1", "PPL", "f16", "q8_0", FRESH_QUANT):
        assert text in report, text
    plot = page.locator("img[alt='size against quality']")
    plot.wait_for()
    assert plot.get_attribute("src").startswith("data:image/png;base64,")
    width, height = plot.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert width > 300 and height > 200  # the PNG decoded: the browser drew it
    save_screenshot(page, "ui-quant-report", full_page=True)


def test_an_unknown_quant_type_fails_the_run_with_kilns_one_line_reason(page, prefect_server, tmp_path):
    """The form takes any quant type name; the run refuses it in preflight, and says why in one line."""
    open_custom_run(page, prefect_server, "export", "Source (Optional)")
    quants = field(page, "Quant types (Optional)").locator("textarea")
    quants.nth(0).fill("q9_z")
    page.get_by_label("Output folder (Optional)").fill(str(tmp_path / "bad"))
    page.get_by_role("button", name="Select Placement").click()
    page.get_by_role("option", name="local", exact=True).click()
    run_id = submit_and_view_run(page, prefect_server, "export/export")
    wait_for_state(page, prefect_server, run_id, "Failed", timeout=180)
    message = state_message(page, prefect_server, run_id)
    assert "unknown quant type(s) q9_z; libllama knows:" in message, message
    assert "QuantTypeUnknown" in message
    assert "Traceback" not in message and "\n" not in message.strip(), message
    assert not (tmp_path / "bad").exists()  # nothing left behind


def test_batch_form_runs_the_shipped_catalogue(page, prefect_server, tmp_path):
    """The batch-export form with the shipped catalogue, its outputs under a folder of the test's.

    The catalogue entered is the shipped one with verification and the quant report off for
    every item (a nightly batch wants both; they took minutes of this test on a loaded 2-core
    machine, and the export test covers the report): the same bases, names and quant types.
    """
    import yaml

    from flows.batch import load_catalogue

    shipped = yaml.safe_load(CATALOGUE.read_text())
    fast = {**shipped, "defaults": {**shipped.get("defaults", {}), "verify": False,
                                    "options": {**shipped.get("defaults", {}).get("options", {}), "report": False}}}
    catalogue = tmp_path / "catalogue.yaml"
    catalogue.write_text(yaml.safe_dump(fast, sort_keys=False))
    out_root = tmp_path / "batch"
    items = load_catalogue(str(catalogue), str(out_root))
    # The UI test runs the catalogue as shipped; it stays the demo alone, or this test grows slow.
    assert [i.request.source for i in items] == ["demo"], "the shipped catalogue grew: keep this test fast"
    assert [i.name for i in items] == [i.name for i in load_catalogue(str(CATALOGUE), str(out_root))]

    open_custom_run(page, prefect_server, "batch-export", "catalogue (Optional)")
    form_catalogue = page.get_by_label("catalogue (Optional)")
    assert form_catalogue.input_value() == "deployments/catalogue.yaml"  # the deployment's default
    form_catalogue.fill(str(catalogue))
    group = field(page, "out_root (Optional)")
    group.get_by_role("tab", name="str").click()
    group.locator("textarea").fill(str(out_root))
    started = time.monotonic()
    run_id = submit_and_view_run(page, prefect_server, "batch-export/batch-export")
    wait_for_state(page, prefect_server, run_id, "Completed", timeout=300)
    print(f"batch run from the UI: {time.monotonic() - started:.0f} s")

    open_artifact(page, prefect_server, run_id, "kiln-batch-outcomes")
    table = page.locator("table").first.inner_text()
    item = items[0]
    assert item.name in table and "completed" in table, table
    assert (out_root / item.name / "manifest.json").is_file()
    assert {p.name for p in (out_root / item.name).glob("*.gguf")} == {
        f"{item.name}-{q}.gguf" for q in [item.request.outtype, *item.request.quants]}
