"""The demo export made into Ollama models, against the Ollama stand-in (tests/ollama_standin.py)."""

from __future__ import annotations

import json
import shutil

from tasks.modelfile import parse_modelfile
from tests.kiln_cli import run_kiln
from tests.ollama_standin import closed_port


def test_register_is_idempotent_and_ships_the_verified_template(demo_export, ollama_standin, tmp_path):  # noqa: F811
    out = tmp_path / "export"
    shutil.copytree(demo_export[0], out)
    env = {"OLLAMA_HOST": ollama_standin.url}

    first = run_kiln("register", str(out), "--ollama-name", "smollm2-demo", env=env)
    assert first.returncode == 0, first.stderr
    uploads = len(ollama_standin.requests("POST", "/api/blobs"))
    assert uploads == 3  # one GGUF blob per quant type
    model = ollama_standin.model("smollm2-demo:q4_k_m")
    assert model is not None
    modelfile = parse_modelfile((out / "smollm2-135m-instruct-q4_k_m.Modelfile").read_text())
    assert model["request"]["template"] == modelfile.template
    assert model["request"]["system"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert "<|im_end|>" in model["request"]["parameters"]["stop"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(m["registered"] for m in manifest["ollama"]["models"])
    assert manifest["ollama"]["verified"]

    second = run_kiln("register", str(out), env=env)
    assert second.returncode == 0, second.stderr
    assert len(ollama_standin.requests("POST", "/api/blobs")) == uploads  # nothing uploaded again
    assert "0.0 MB uploaded" in second.stderr


def test_export_without_a_reachable_server_finishes_and_says_how_to_register(demo_model_dir, tmp_path,
                                                                             ollama_standin):  # noqa: F811
    out = tmp_path / "out"
    proc = run_kiln("export", str(demo_model_dir), "--quant", "q8_0", "--out", str(out), "--no-verify",
                    "--ollama-name", "later-model", "--json",
                    env={"OLLAMA_HOST": f"http://127.0.0.1:{closed_port()}"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads(proc.stdout)
    registration = next(c for c in manifest["checks"] if c["name"] == "ollama registration")
    assert f"kiln register {out}" in registration["detail"]
    assert not any(m["registered"] for m in manifest["ollama"]["models"])

    later = run_kiln("register", str(out), env={"OLLAMA_HOST": ollama_standin.url})
    assert later.returncode == 0, later.stderr
    assert ollama_standin.model("later-model:q8_0") is not None
    assert ollama_standin.model("later-model:f16") is not None
