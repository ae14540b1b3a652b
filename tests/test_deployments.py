"""Deployments: `deployments/prefect.yaml` against a real Prefect server, workers on two pools.

The first tests need no server: the deployment file and the UI form. The rest use the session's
server (tests/support/fixtures_prefect.py: `prefect server start` with SQLite in a temporary PREFECT_HOME,
the `cpu` and `gpu` pools, the `gpu` concurrency limit, `prefect deploy --all`, one process worker
a pool) and trigger runs through the REST API as the UI does. Small work: the demo model, q8_0,
verification and the quality report off. Server and workers share the session's KILN_CACHE_DIR.
"""

from __future__ import annotations

import yaml

from tests.support.prefect_server import REPO_ROOT, logs_once

PREFECT_YAML = REPO_ROOT / "deployments" / "prefect.yaml"


def _deployments() -> dict[str, dict]:
    config = yaml.safe_load(PREFECT_YAML.read_text())
    flows = {"flows/export.py:export": "export", "flows/batch.py:batch_export": "batch-export",
             "flows/convert_quantize.py:convert_quantize": "convert-quantize"}
    return {f"{flows[d['entrypoint']]}/{d['name']}": d for d in config["deployments"]}


def test_prefect_yaml_has_the_four_deployments_on_their_pools():
    deployments = _deployments()
    assert set(deployments) == {"export/export", "batch-export/batch-export", "convert-quantize/gpu",
                                "convert-quantize/cpu"}
    pools = {name: d["work_pool"]["name"] for name, d in deployments.items()}
    assert pools == {"export/export": "cpu", "batch-export/batch-export": "cpu", "convert-quantize/gpu": "gpu",
                     "convert-quantize/cpu": "cpu"}
    (schedule,) = deployments["batch-export/batch-export"]["schedules"]
    assert schedule["cron"] == "0 2 * * *" and schedule["active"] is False
    config = yaml.safe_load(PREFECT_YAML.read_text())
    (pull,) = config["pull"]
    assert "prefect.deployments.steps.set_working_directory" in pull


def test_export_defaults_are_the_demo_on_the_gpu_pool_and_a_valid_request():
    from registry.models import ExportRequest

    params = _deployments()["export/export"]["parameters"]
    request = ExportRequest(**params["request"])
    assert request.source == "demo" and request.placement == "gpu"


def test_the_export_form_is_the_request_model_with_descriptions():
    """The UI renders the deployment's parameter schema: ExportRequest's fields, each described."""
    from prefect.utilities.callables import parameter_schema

    from flows.export import export

    schema = parameter_schema(export).model_dump()
    definitions = schema["definitions"]
    request = definitions["ExportRequest"]["properties"]
    for field in ("source", "quants", "placement", "ollama_name", "accept_license", "outtype", "out_dir"):
        assert request[field].get("description"), field
    assert request["placement"]["default"] == "local"
    assert set(request["placement"]["enum"]) == {"local", "cpu", "gpu"}


def test_export_triggered_through_the_api_runs_its_heavy_part_on_the_gpu_worker(prefect_server, tmp_path):
    from registry.models import Manifest
    from tasks.manifest import outputs_intact

    server = prefect_server
    out = tmp_path / "export"
    run_id = server.run_deployment("export/export", {"request": {
        "source": "demo", "quants": ["q8_0"], "verify": False, "report": False, "out_dir": str(out), "placement": "gpu",
    }})
    run = server.wait(run_id, timeout=400)
    assert run["state"]["type"] == "COMPLETED", server.logs(run_id) + server.diagnostics()
    assert run["work_pool_name"] == "cpu"

    (child,) = [c for c in server.child_flow_runs(run_id) if c["deployment_id"]]
    assert child["work_pool_name"] == "gpu"
    assert child["state"]["type"] == "COMPLETED"
    gpu_log, cpu_log = (next(w for w in server.workers if w.pool == p).log_text() for p in ("gpu", "cpu"))
    assert child["id"] in gpu_log and child["id"] not in cpu_log
    assert run_id in cpu_log and run_id not in gpu_log
    assert "accelerators on this worker" in logs_once(server, child["id"], "accelerators on this worker")

    manifest = Manifest.model_validate_json((out / "manifest.json").read_text())
    assert manifest.request.placement == "gpu"
    assert {o.quant for o in manifest.outputs if o.path.endswith(".gguf")} == {"f16", "q8_0"}
    assert outputs_intact(out, manifest.outputs) == []

    assert server.artifacts(run_id, "kiln-export-summary"), "the export's Markdown summary"
    (progress,) = server.artifacts(child["id"], "kiln-quantize")
    assert progress["type"] == "progress" and progress["data"] == 100


GPU_JOBS = r"""
import json, threading, time
from prefect import flow
from flows.convert_quantize import gpu_slot
spans = {}
@flow(name="gpu-slot-probe")
def job(name: str, hold: float) -> None:
    with gpu_slot("gpu"):
        start = time.monotonic()
        time.sleep(hold)
        spans[name] = (start, time.monotonic())
import httpx, os
first = threading.Thread(target=job, args=("first", 4.0))
first.start()
deadline = time.monotonic() + 60
limit = os.environ["PREFECT_API_URL"] + "/v2/concurrency_limits/tag:gpu"
auth = tuple(os.environ["PREFECT_API_AUTH_STRING"].split(":", 1))  # the server wants its auth string
while httpx.get(limit, auth=auth).json()["active_slots"] < 1:  # the first job holds the GPU
    assert first.is_alive() and time.monotonic() < deadline, "the first job never took the gpu slot"
    time.sleep(0.2)
job("second", 0.0)
first.join()
print("RESULT " + json.dumps(spans))
"""


def test_gpu_jobs_take_turns_under_the_gpu_tag_limit(prefect_server):
    """`prefect concurrency-limit create gpu 1` (made by the fixture): a second GPU job waits for the first."""
    spans = prefect_server.run_python(GPU_JOBS)
    assert spans["second"][0] >= spans["first"][1] - 0.05, spans
