"""The batch: the catalogue's validation, and `batch-export` runs on a real Prefect server.

The server (tests/support/fixtures_prefect.py) deploys deployments/prefect.yaml and runs a worker a pool;
small work only: the demo model, q8_0, verification and the quality report off.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.support.model_folders import demo_copy, folder_conversion_key, give_unknown_pre_tokenizer
from tests.support.prefect_server import REPO_ROOT, PrefectServer, task_states_by_kind

CATALOGUE = REPO_ROOT / "deployments" / "catalogue.yaml"


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
    kinds = task_states_by_kind(server, items, expect=4)
    # One base, two items: the second item's conversion is the first one's.
    assert kinds["convert"].count("Cached") >= 1 and len(kinds["convert"]) == 2

    # Again, exporting every item anew: every conversion and quantization comes from the cache.
    second, rows = _batch(server, catalogue, force=True)
    assert second["state"]["type"] == "COMPLETED", server.logs(second["id"])
    assert [r["status"] for r in rows] == ["completed", "completed"]
    items = [c["id"] for c in server.child_flow_runs(second["id"])]
    kinds = task_states_by_kind(server, items, expect=4)
    assert kinds == {"convert": ["Cached", "Cached"], "quantize": ["Cached", "Cached"]}

    # And identical: the folders are up to date (hashes checked), so no export runs, no task at all.
    third, rows = _batch(server, catalogue)
    assert third["state"]["type"] == "COMPLETED"
    assert [r["status"] for r in rows] == ["up to date", "up to date"]
    assert server.child_flow_runs(third["id"]) == []


def test_a_failed_batch_item_does_not_stop_the_others(prefect_server, tmp_path, demo_model_dir, kiln_cache):
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
    key = folder_conversion_key(unknown)
    left = [p.name for p in (kiln_cache / "gguf").iterdir() if key in p.name and not p.name.endswith(".lock")]
    assert left == [], "the refused item's conversion left files in the cache"
    assert (tmp_path / "out" / "fine" / "manifest.json").is_file()
