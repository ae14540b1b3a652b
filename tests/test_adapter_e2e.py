"""`kiln export --adapter` end to end on the demo model with a real peft LoRA adapter."""

from __future__ import annotations

import json

from tests.support.kiln_cli import run_kiln


def export(model, adapter, out, mode):
    proc = run_kiln("export", str(model), "--adapter", str(adapter), "--adapter-mode", mode, "--quant", "q8_0",
                    "--out", str(out), "--no-verify", "--no-report", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_merge_mode_exports_the_merged_model(demo_model_dir, peft_adapter, tmp_path, demo_export):  # noqa: F811
    manifest = export(demo_model_dir, peft_adapter, tmp_path / "merged", "merge")
    adapter_check = next(c for c in manifest["checks"] if c["name"] == "adapter")
    assert "rank 16" in adapter_check["detail"] and "mode merge" in adapter_check["detail"]
    merged = {o["quant"]: o["sha256"] for o in manifest["outputs"] if o["path"].endswith(".gguf")}
    plain = {o["quant"]: o["sha256"] for o in demo_export[1]["outputs"] if o["path"].endswith(".gguf")}
    assert set(merged) == {"f16", "q8_0"}
    assert merged["f16"] != plain["f16"] and merged["q8_0"] != plain["q8_0"]  # the adapter changed the weights

    again = run_kiln("export", str(demo_model_dir), "--adapter", str(peft_adapter), "--quant", "q8_0",
                     "--out", str(tmp_path / "merged"), "--no-verify", "--no-report")
    assert again.returncode == 0 and "up to date" in again.stderr


def test_adapter_mode_ships_a_gguf_lora_with_an_adapter_line(demo_model_dir, peft_adapter, tmp_path):  # noqa: F811
    out = tmp_path / "adapter"
    manifest = export(demo_model_dir, peft_adapter, out, "adapter")
    lora = next(o for o in manifest["outputs"] if o["quant"] == "lora")
    assert (out / lora["path"]).is_file()
    modelfile = (out / manifest["ollama"]["models"][0]["modelfile"]).read_text()
    assert f"ADAPTER ./{lora['path']}" in modelfile
