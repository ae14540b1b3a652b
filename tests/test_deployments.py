"""Deployments: `deployments/prefect.yaml` against a real Prefect server, workers on two pools, the batch.

The first tests need no server: the deployment file, the UI form, the catalogue's validation,
the cache keys, the memory budget. The rest start `prefect server start` (SQLite in a
temporary PREFECT_HOME), create the `cpu` and `gpu` pools and the `gpu` concurrency limit,
deploy with `prefect deploy --all`, start one process worker a pool, and trigger runs through
the REST API as the UI does. Small work: the demo model, q8_0, verification and the quality report off
(these tests are about orchestration; the export tests check the files themselves). Server and workers share
the session's KILN_CACHE_DIR, so the demo folder and its f16 conversion are built once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from tests.model_folders import demo_copy, give_unknown_pre_tokenizer
from tests.prefect_server import REPO_ROOT, PrefectServer

PREFECT_YAML = REPO_ROOT / "deployments" / "prefect.yaml"
CATALOGUE = REPO_ROOT / "deployments" / "catalogue.yaml"


# ---------------------------------------------------------------- no server


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


def test_the_shipped_catalogue_is_valid(tmp_path):
    from flows.batch import load_catalogue

    raw = yaml.safe_load(CATALOGUE.read_text())
    assert raw["out_root"] == "kiln-batch"
    items = load_catalogue(CATALOGUE, out_root=str(tmp_path))  # validation makes the output folders
    assert [i.name for i in items] == ["smollm2-135m-instruct"]
    assert items[0].request.quants == ["q8_0", "q4_k_m", "q5_k_m", "q6_k"]
    assert items[0].request.out_dir == str(tmp_path / "smollm2-135m-instruct")


def test_catalogue_errors_name_the_item_and_the_field_all_at_once(tmp_path):
    from flows.batch import load_catalogue
    from tasks.errors import SpecInvalid

    bad_shape = tmp_path / "shape.yaml"
    bad_shape.write_text(yaml.safe_dump({
        "out_root": str(tmp_path / "out"),
        "defaults": {"quant": ["q8_0"]},
        "bases": [{"source": "demo", "name": "small", "colour": "red"}],
    }))
    with pytest.raises(SpecInvalid) as exc:
        load_catalogue(bad_shape)
    message = str(exc.value)
    assert "field `defaults.quant`: Extra inputs are not permitted" in message
    assert "bases[0] (small): field `colour`: Extra inputs are not permitted" in message

    bad_items = tmp_path / "items.yaml"
    bad_items.write_text(yaml.safe_dump({
        "out_root": str(tmp_path / "out"),
        "bases": [
            {"source": "demo", "name": "a", "quants": ["q9_9"]},
            {"source": "demo", "name": "b", "ollama_name": "Not A Name!"},
            {"source": "demo", "name": "a", "quants": ["q8_0"]},
        ],
    }))
    with pytest.raises(SpecInvalid) as exc:
        load_catalogue(bad_items)
    message = str(exc.value)
    assert "item 'b' (bases[1]): field `ollama_name`" in message
    assert "item 'a' (bases[2]): field `name`: the same item name as bases[0]" in message
    assert "item 'a' (bases[0]): unknown quant type(s) q9_9" in message


def test_quantizations_in_parallel_stay_within_the_memory_budget(monkeypatch):
    from flows.convert_quantize import quant_job_memory, quant_parallelism

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    per_job = quant_job_memory(Path("unused"), {"hidden_size": 4096, "vocab_size": 128256, "intermediate_size": 14336})
    assert 5e9 < per_job < 6e9  # ten bytes an element of the 128256 × 4096 embedding
    assert quant_parallelism(4, per_job, budget=12 << 30) == (2, 8)
    assert quant_parallelism(4, per_job, budget=64 << 30) == (4, 4)
    assert quant_parallelism(4, per_job, budget=1 << 30) == (1, 16)  # at least one, always
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    # Two cores: two jobs side by side, two threads each (one job's reads and writes idle its threads).
    assert quant_parallelism(4, 1 << 20, budget=64 << 30) == (2, 2)
    assert quant_parallelism(1, 1 << 20, budget=64 << 30) == (1, 2)


def test_prefect_cache_keys_follow_content_not_folders(toolchain):
    from flows.convert_quantize import _convert_cache_key, _quantize_cache_key
    from tasks.convert import gguf_cache_path

    a = _convert_cache_key(None, {"model_dir": Path("/a"), "content_key": "k1", "outtype": "f16", "toolchain": toolchain})
    b = _convert_cache_key(None, {"model_dir": Path("/b"), "content_key": "k1", "outtype": "f16", "toolchain": toolchain})
    c = _convert_cache_key(None, {"model_dir": Path("/a"), "content_key": "k1", "outtype": "bf16", "toolchain": toolchain})
    assert a == b != c
    assert toolchain.cache_key in a
    src = gguf_cache_path("k1", "f16", toolchain)
    q8 = _quantize_cache_key(None, {"src": src, "dst": gguf_cache_path("k1", "q8_0", toolchain), "quant": "q8_0", "nthread": 1})
    q4 = _quantize_cache_key(None, {"src": src, "dst": gguf_cache_path("k1", "q4_0", toolchain), "quant": "q4_0", "nthread": 8})
    assert q8 != q4 and "q8_0" in q8


def test_a_cache_entry_changed_after_its_stamp_is_not_trusted(tmp_path):
    import os

    from tasks.convert import cache_entry_intact

    entry = tmp_path / "x.gguf"
    entry.write_bytes(b"GGUF")
    assert not cache_entry_intact(entry)  # no stamp
    stamp = tmp_path / "x.gguf.sha256"
    stamp.write_text("abc\n")
    later = entry.stat().st_mtime_ns + 10**9
    os.utime(stamp, ns=(later, later))
    assert cache_entry_intact(entry)
    os.utime(entry, ns=(later + 10**9, later + 10**9))  # edited in place after stamping
    assert not cache_entry_intact(entry)
    entry.unlink()
    assert not cache_entry_intact(entry)


# ---------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
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


def _tasks_by_kind(server: PrefectServer, flow_run_ids: list[str], expect: int, timeout: float = 30) -> dict[str, list[str]]:
    """State names of the convert and quantize task runs of these flow runs (task runs are recorded from events)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = server.task_runs(flow_run_ids)
        kinds: dict[str, list[str]] = {"convert": [], "quantize": []}
        for run in runs:
            kind = run["name"].rsplit("-", 1)[0]
            if kind in kinds and run.get("state"):
                kinds[kind].append(run["state"]["name"])
        if sum(map(len, kinds.values())) >= expect or time.monotonic() > deadline:
            return kinds
        time.sleep(1)


def _logs(server: PrefectServer, flow_run_id: str, wanted: str, timeout: float = 20) -> str:
    """A flow run's logs, once `wanted` has arrived (logs reach the server in batches)."""
    deadline = time.monotonic() + timeout
    while True:
        logs = server.logs(flow_run_id)
        if wanted in logs or time.monotonic() > deadline:
            return logs
        time.sleep(1)


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
    assert "accelerators on this worker" in _logs(server, child["id"], "accelerators on this worker")

    manifest = Manifest.model_validate_json((out / "manifest.json").read_text())
    assert manifest.request.placement == "gpu"
    assert {o.quant for o in manifest.outputs if o.path.endswith(".gguf")} == {"f16", "q8_0"}
    assert outputs_intact(out, manifest.outputs) == []

    assert server.artifacts(run_id, "kiln-export-summary"), "the export's Markdown summary"
    (progress,) = server.artifacts(child["id"], "kiln-quantize")
    assert progress["type"] == "progress" and progress["data"] == 100


def _batch(server: PrefectServer, catalogue: Path, **params) -> tuple[dict, list[dict]]:
    run_id = server.run_deployment("batch-export/batch-export", {"catalogue": str(catalogue), **params})
    run = server.wait(run_id, timeout=400)
    (table,) = server.artifacts(run_id, "kiln-batch-outcomes")
    data = table["data"]
    rows = json.loads(data) if isinstance(data, str) else data
    return run, rows


def test_batch_twice_the_second_run_converts_nothing(prefect_server, tmp_path):
    server = prefect_server
    catalogue = tmp_path / "catalogue.yaml"
    catalogue.write_text(yaml.safe_dump({
        "out_root": str(tmp_path / "out"),
        "defaults": {"quants": ["q8_0"], "verify": False, "options": {"report": False}},
        "bases": [{"source": "demo", "name": "first"}, {"source": "demo", "name": "second"}],
    }))

    first, rows = _batch(server, catalogue)
    assert first["state"]["type"] == "COMPLETED", server.logs(first["id"]) + server.diagnostics()
    assert [(r["item"], r["status"]) for r in rows] == [("first", "completed"), ("second", "completed")]
    items = [c["id"] for c in server.child_flow_runs(first["id"])]
    assert len(items) == 2
    kinds = _tasks_by_kind(server, items, expect=4)
    # One base, two items: the second item's conversion is the first one's.
    assert kinds["convert"].count("Cached") >= 1 and len(kinds["convert"]) == 2

    # Again, exporting every item anew: every conversion and quantization comes from the cache.
    second, rows = _batch(server, catalogue, force=True)
    assert second["state"]["type"] == "COMPLETED", server.logs(second["id"])
    assert [r["status"] for r in rows] == ["completed", "completed"]
    items = [c["id"] for c in server.child_flow_runs(second["id"])]
    kinds = _tasks_by_kind(server, items, expect=4)
    assert kinds == {"convert": ["Cached", "Cached"], "quantize": ["Cached", "Cached"]}

    # And identical: the folders are up to date (hashes checked), so no export runs, no task at all.
    third, rows = _batch(server, catalogue)
    assert third["state"]["type"] == "COMPLETED"
    assert [r["status"] for r in rows] == ["up to date", "up to date"]
    assert server.child_flow_runs(third["id"]) == []


def test_a_failed_batch_item_does_not_stop_the_others(prefect_server, tmp_path, demo_model_dir, kiln_cache):
    from tasks.fetch import fingerprint, model_files
    from tasks.manifest import content_key

    server = prefect_server
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    # Weights on disk and a tokenizer never probed: its conversion starts beside the probe, which refuses.
    unknown = demo_copy(demo_model_dir, tmp_path / "unknown-tokenizer")
    give_unknown_pre_tokenizer(unknown)
    catalogue = tmp_path / "catalogue.yaml"
    catalogue.write_text(yaml.safe_dump({
        "out_root": str(tmp_path / "out"),
        "defaults": {"quants": ["q8_0"], "verify": False, "options": {"report": False}},
        "bases": [{"source": str(broken), "name": "broken"}, {"source": str(unknown), "name": "unknown"},
                  {"source": "demo", "name": "fine"}],
    }))
    run, rows = _batch(server, catalogue)
    assert run["state"]["type"] == "FAILED"
    assert "2 of 3 item(s) failed: broken, unknown" in run["state"]["message"]
    assert [(r["item"], r["status"]) for r in rows] == [("broken", "failed"), ("unknown", "failed"), ("fine", "completed")]
    assert "has no *.safetensors weights" in rows[0]["detail"]
    assert "pre-tokenizer" in rows[1]["detail"] and "chkhsh" in rows[1]["detail"]
    key = content_key(fingerprint(model_files(unknown), unknown))
    left = [p.name for p in (kiln_cache / "gguf").iterdir() if key in p.name and not p.name.endswith(".lock")]
    assert left == [], "the refused item's conversion left files in the cache"
    assert (tmp_path / "out" / "fine" / "manifest.json").is_file()


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
while httpx.get(limit).json()["active_slots"] < 1:  # the first job holds the GPU
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


CACHE_GONE = r"""
import json, sys
from pathlib import Path
from prefect import flow
from prefect.context import FlowRunContext
from flows.convert_quantize import convert_and_quantize
from registry.models import ExportRequest
from tasks.fetch import fetch_source, locate_metadata, source_ref
from tasks.toolchain import current_toolchain

request = ExportRequest(source="demo", quants=["q4_0"], verify=False, out_dir=sys.argv[1])
ref = source_ref(request)
source = fetch_source(ref, *locate_metadata(ref))
run_ids = []

@flow(name="cache-probe")
def heavy():
    run_ids.append(str(FlowRunContext.get().flow_run.id))
    return convert_and_quantize(source, request, current_toolchain())

q4 = heavy()["q4_0"]
existed = q4.is_file()
q4.unlink()  # someone cleaned the Kiln cache; Prefect's record still points here
again = heavy()["q4_0"]
print("RESULT " + json.dumps({"runs": run_ids, "existed": existed, "same": again == q4, "rebuilt": q4.is_file()}))
"""


def test_a_cached_result_whose_file_is_gone_is_built_again(prefect_server, tmp_path):
    """Prefect's record says Cached, but the GGUF it points at was deleted: the task runs again."""
    result = prefect_server.run_python(CACHE_GONE, str(tmp_path / "out"))
    assert result["existed"] and result["same"] and result["rebuilt"], result
    logs = _logs(prefect_server, result["runs"][1], "quantizing again")
    assert "is gone or changed since stamped; quantizing again" in logs
