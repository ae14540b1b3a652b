"""Ollama faults through the `kiln` command, against OllamaStandIn (a stand-in server, not Ollama).

tests/test_register.py drives `register_model` in process through every fault the stand-in
has (refused, 500 mid-upload, dropped connections, cut create streams, slow answers past a
timeout, a server stopped mid-registration), and tests/test_ollama_e2e.py registers the demo
export and defers registration when no server answers. Here the faults go through the real CLI
(`kiln export --ollama-name`, `kiln register DIR`) and a SIGKILL lands mid-upload; after each,
no model on the server names a blob it does not hold, and a re-run completes.

Not testable through the CLI: a slow server past a timeout. `kiln register` and `kiln export`
use register.DEFAULT_TIMEOUT (600 s a read) with no option or variable to change it; the
in-process test covers the retry-then-fail logic (see the report).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.helpers import (
    FAST,
    Identity,
    Kiln,
    final_files,
    temporaries,
    wait_until,
)
from tests.support.ollama_standin import OllamaStandIn, closed_port

NAME = "kiln-fault:q4"  # a tagged name: one model, the first quant type's GGUF


def assert_no_model_points_at_a_missing_blob(server: OllamaStandIn) -> None:
    for record in server.models.values():
        request = record["request"]
        for digest in list((request.get("files") or {}).values()) + list((request.get("adapters") or {}).values()):
            assert digest in server.blobs, f"{record['name']} points at missing blob {digest}"


def assert_registered(server: OllamaStandIn, out: Path) -> None:
    model = server.model(NAME)
    assert model is not None, sorted(server.models)
    assert_no_model_points_at_a_missing_blob(server)
    from tasks.files import sha256_file

    (digest,) = model["request"]["files"].values()
    assert digest == "sha256:" + sha256_file(out / "smollm2-135m-instruct-q4_k_m.gguf")


@pytest.fixture
def standin() -> Iterator[OllamaStandIn]:
    server = OllamaStandIn().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def deferred(prefect_api, reference_export, tmp_path_factory) -> dict:
    """An export whose Ollama server refuses connections: it completes and says how to register later."""
    root = tmp_path_factory.mktemp("ollama")
    out = root / "out"
    env = {**reference_export.env, "OLLAMA_HOST": f"http://127.0.0.1:{closed_port()}"}
    run = Kiln(["export", "demo", "--quant", "q4_k_m", "--out", str(out), *FAST, "--ollama-name", NAME, "--json"],
               env, root / "logs", "deferred")
    assert run.wait() == 0, run.describe()
    return {"root": root, "out": out, "run": run, "manifest": json.loads(run.stdout), "env": reference_export.env}


def register(deferred: dict, server: OllamaStandIn, name: str) -> Kiln:
    env = {**deferred["env"], "OLLAMA_HOST": server.url}
    return Kiln(["register", str(deferred["out"])], env, deferred["root"] / "logs", name)


def test_a_refused_connection_defers_registration_and_says_how(deferred):
    check = next(c for c in deferred["manifest"]["checks"] if c["name"] == "ollama registration")
    assert check["passed"] and check["detail"].startswith("deferred: Ollama at http://127.0.0.1:")
    assert "not reachable" in check["detail"] and f"kiln register {deferred['out']}" in check["detail"]
    assert [m["registered"] for m in deferred["manifest"]["ollama"]["models"] if m["name"]] == [False]


def test_a_500_mid_upload_is_retried(deferred, standin):
    standin.fail_uploads = 1
    run = register(deferred, standin, "500-once")
    assert run.wait(120) == 0, run.describe()
    statuses = [status for method, _, status in standin.requests("POST", "/api/blobs")]
    assert statuses == [500, 201]
    assert "retrying" in run.stderr and f"registered {NAME}" in run.stderr
    assert_registered(standin, deferred["out"])


def test_a_server_that_keeps_failing_gets_a_clear_error_and_no_model(deferred, standin):
    manifest_before = (deferred["out"] / "manifest.json").read_bytes()
    standin.fail_uploads = 100
    run = register(deferred, standin, "500-always")
    assert run.wait(120) == 2, run.describe()
    message = run.stderr.rstrip().splitlines()[-1]
    assert message.startswith("error: Ollama at http://127.0.0.1:") and "kept failing while uploading" in message
    assert "4 tries" in message and "kiln register DIR" in message
    assert "Traceback" not in run.stderr
    assert len(standin.requests("POST", "/api/blobs")) == 4  # bounded
    assert standin.models == {} and standin.requests("POST", "/api/create") == []
    assert (deferred["out"] / "manifest.json").read_bytes() == manifest_before


def test_a_dropped_create_is_retried(deferred, standin):
    standin.drop = {"POST /api/create": 1}
    standin.cut_create_streams = 1
    run = register(deferred, standin, "dropped")
    assert run.wait(120) == 0, run.describe()
    assert [status for _, _, status in standin.requests("POST", "/api/create")] == [0, 200, 0, 200]  # dropped; cut after one line; success
    assert_registered(standin, deferred["out"])


def test_kiln_register_killed_mid_upload_leaves_no_model_then_completes(deferred, standin):
    manifest_before = (deferred["out"] / "manifest.json").read_bytes()
    standin.delay_s = 0.5  # every answer waits: the upload is under way when the kill lands
    run = register(deferred, standin, "register-killed")
    wait_until(lambda: bool(standin.requests("HEAD", "/api/blobs")), run, "the blob check before the upload")
    run.kill()
    assert run.group_gone()
    assert standin.models == {}  # (a blob may or may not have arrived whole; no model names one)
    assert (deferred["out"] / "manifest.json").read_bytes() == manifest_before
    assert temporaries(deferred["out"]) == []

    standin.delay_s = 0.0
    again = register(deferred, standin, "register-again")
    assert again.wait(120) == 0, again.describe()
    assert_registered(standin, deferred["out"])
    manifest = json.loads((deferred["out"] / "manifest.json").read_text())
    assert [m["registered"] for m in manifest["ollama"]["models"] if m["name"]] == [True]


def test_an_export_killed_while_registering_completes_on_the_rerun(prefect_api, reference_export, kiln_cache,
                                                                    standin, tmp_path):
    out = tmp_path / "out"
    env = {**reference_export.env, "OLLAMA_HOST": standin.url}
    args = ["export", "demo", "--quant", "q4_k_m", "--out", str(out), *FAST, "--ollama-name", NAME]
    standin.delay_s = 0.5
    run = Kiln(args, env, tmp_path / "logs", "export-killed")
    wait_until(lambda: bool(standin.requests("GET", "/api/version")), run, "registration starting")
    run.kill()
    assert run.group_gone()
    assert standin.models == {}
    assert "manifest.json" not in final_files(out)
    assert temporaries(out) == []
    # What is under a final name is whole: the GGUFs are the cache entries themselves (hard links).
    placed = {q: Identity.of(out / f"smollm2-135m-instruct-{q}.gguf") for q in ("f16", "q4_k_m")
              if (out / f"smollm2-135m-instruct-{q}.gguf").is_file()}
    for quant, identity in placed.items():
        assert identity.inode == Identity.of(reference_export.entry(kiln_cache, quant)).inode

    standin.delay_s = 0.0
    again = Kiln([*args, "--json"], env, tmp_path / "logs", "export-again")
    assert again.wait() == 0, again.describe()
    assert_registered(standin, out)
    for quant in ("f16", "q4_k_m"):
        path = out / f"smollm2-135m-instruct-{quant}.gguf"
        assert Identity.of(path).inode == Identity.of(reference_export.entry(kiln_cache, quant)).inode
        from tasks.files import sha256_file

        assert sha256_file(path) == reference_export.hashes[quant]
    check = next(c for c in json.loads(again.stdout)["checks"] if c["name"] == "ollama registration")
    assert check["detail"].startswith(f"registered {NAME}")
    assert temporaries(out) == []
