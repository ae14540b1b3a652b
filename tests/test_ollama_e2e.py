"""The demo export made into Ollama models, against the Ollama stand-in (tests/support/ollama_standin.py);
the chat format each export chooses, the template its GGUFs carry, and its stops' proofs."""

from __future__ import annotations

import hashlib
import json
import shutil

from tasks.gguf_file import read_chat_template
from tasks.modelfile import parse_modelfile
from tests.support.kiln_cli import run_kiln
from tests.support.ollama_standin import closed_port


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


def _template_check(source) -> dict:
    proc = run_kiln("template", "check", str(source), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_demo_export_carries_its_template_and_agrees_on_the_chat_format(demo_export, demo_model_dir):
    out, manifest = demo_export
    plan = manifest["ollama"]
    # SmolLM2's own template: the chatml Go TEMPLATE is exact, so Ollama's Go path is used.
    assert plan["format"] == "template" == _template_check(demo_model_dir)["ollama_format"]
    own = (demo_model_dir / "chat_template.jinja").read_text() if (demo_model_dir / "chat_template.jinja").is_file() \
        else json.loads((demo_model_dir / "tokenizer_config.json").read_text())["chat_template"]
    for model in plan["models"]:
        gguf = out / model["gguf"]
        assert read_chat_template(gguf) == own
        assert hashlib.sha256(own.encode()).hexdigest() == plan["chat_template_sha256"]
        modelfile = parse_modelfile((out / model["modelfile"]).read_text())
        assert modelfile.template and not (modelfile.renderer or modelfile.requires)
        assert "# ollama format: template" in (out / model["modelfile"]).read_text()
        # Every stop in the Modelfile has a recorded generation proof; none is a token used inside a turn.
        proofs = {p["stop"]: p for p in plan["stop_proofs"]}
        assert modelfile.stop and list(modelfile.stop) == plan["stops"]
        for stop in modelfile.stop:
            assert proofs[stop]["proven"] and proofs[stop]["in_modelfile"] and proofs[stop]["reply"].strip()
    assert plan["stops"] == ["<|im_end|>"]


def test_a_template_no_dialect_renders_is_exported_for_ollamas_jinja_path(demo_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(demo_model_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    # ChatML with a blank line after each system turn: no Go dialect writes that.
    odd = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
           "{% if m['role'] == 'system' %}{{ '\\n' }}{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (model / "chat_template.jinja").write_text(odd)
    out = tmp_path / "out"
    proc = run_kiln("export", str(model), "--quant", "q8_0", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout)["ollama"]
    assert plan["format"] == "jinja" == _template_check(model)["ollama_format"]
    assert plan["requires"] == "0.30.0"
    for entry in plan["models"]:
        assert read_chat_template(out / entry["gguf"]) == odd
        text = (out / entry["modelfile"]).read_text()
        modelfile = parse_modelfile(text)
        assert modelfile.template is None and modelfile.system is None and modelfile.requires == "0.30.0"
        assert "# ollama format: jinja" in text
        assert all(p["proven"] for p in plan["stop_proofs"] if p["stop"] in modelfile.stop)


def test_a_prebuilt_gguf_exported_with_a_dialect_carries_that_dialects_jinja(tmp_path):
    from tasks.demo import packaged_gguf
    from tasks.gguf_file import copy_with_string_metadata
    from tasks.ollama_plan import dialect_jinja

    source = tmp_path / "odd.gguf"
    # ChatML but for a blank line after an empty system turn: near chatml (one conversation differs).
    odd = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
           "{% if m['role'] == 'system' and not m['content'] %}{{ '\\n' }}{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    copy_with_string_metadata(packaged_gguf(), source, {"tokenizer.chat_template": odd})
    out = tmp_path / "out"
    proc = run_kiln("export", str(source), "--quant", "q4_1", "--dialect", "chatml", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(proc.stdout)
    plan = manifest["ollama"]
    assert plan["format"] == "template"
    jinja = dialect_jinja("chatml")
    for entry in plan["models"]:
        gguf = out / entry["gguf"]
        assert read_chat_template(gguf) == jinja
        recorded = next(o for o in manifest["outputs"] if o["path"] == entry["gguf"])
        assert recorded["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert read_chat_template(source) == odd  # the source (and Kiln's cache) untouched
    assert _template_check(out / plan["models"][0]["gguf"])["dialect"] == "chatml"


def test_kiln_register_refuses_a_server_older_than_requires_and_sends_it_to_a_current_one(demo_export, tmp_path):
    from tasks.modelfile import build_modelfile, render_modelfile
    from tests.support.ollama_standin import OllamaStandIn

    out = tmp_path / "export"
    shutil.copytree(demo_export[0], out)
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["ollama"]["models"]:
        # The same export as Ollama's Jinja path would take it: no TEMPLATE, REQUIRES 0.30.0.
        jinja = build_modelfile(from_=f"./{entry['gguf']}", dialect="chatml", stop=("<|im_end|>",),
                                chat_format="jinja", requires="0.30.0")
        (out / entry["modelfile"]).write_text(render_modelfile(jinja))
    with OllamaStandIn(version="0.29.1") as old:
        refused = run_kiln("register", str(out), "--ollama-name", "smollm2-jinja", env={"OLLAMA_HOST": old.url})
        assert refused.returncode != 0
        assert "older than 0.30.0" in refused.stderr and "Traceback" not in refused.stderr
        assert old.models == {} and old.requests("POST", "/api/blobs") == []
    with OllamaStandIn(version="0.33.0") as current:
        done = run_kiln("register", str(out), "--ollama-name", "smollm2-jinja", env={"OLLAMA_HOST": current.url})
        assert done.returncode == 0, done.stderr
        request = current.model("smollm2-jinja:q4_k_m")["request"]
        assert request["requires"] == "0.30.0" and "template" not in request
