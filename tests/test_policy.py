"""The operator's policy for deployment runs (tasks/policy.py), the authenticated server, and secrets.

The first tests need no server: the policy file, path confinement, and the `kiln` command on a
user's own machine, which the policy leaves alone. The rest use the session's server
(tests/support/fixtures_prefect.py): API authentication on, and workers started under a policy whose
roots are pytest's base temporary folder. Runs are triggered through the REST API as the UI's
form does. A refusal happens at the flow's start, before any folder is made, so the refused
runs are submitted together and take seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.kiln_cli import run_kiln
from tests.support.prefect_server import REPO_ROOT, PrefectServer, prefect_command

REFUSED_PATH = "outside the folders this server's policy allows"
# Shaped like a real Hub token, so every redaction rule would apply to it if it ever leaked.
TOKEN = "hf_KilnPolicyTestTokenAbCdEfGh0123456789"


@pytest.fixture
def outside() -> Iterator[Path]:
    """A folder outside every root of the session's policy (not under pytest's base temporary folder)."""
    folder = Path(tempfile.mkdtemp(prefix="kiln-policy-outside-")).resolve()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _strict_policy(tmp_path: Path) -> Path:
    policy = tmp_path / "strict-policy.yaml"
    policy.write_text(yaml.safe_dump({"output_roots": ["/nonexistent-kiln-root"], "source_roots": ["/nonexistent-kiln-root"]}))
    return policy


# ---------------------------------------------------------------- the policy, no server


def test_the_sample_policy_file_is_valid():
    from tasks.policy import load_policy

    policy = load_policy(REPO_ROOT / "deployments" / "policy.yaml")
    assert policy.output_roots == [Path("/srv/kiln/out")] and policy.source_roots == [Path("/srv/kiln/models")]
    assert not policy.allow_pickle and not policy.allow_trust_remote_code
    assert policy.registry_keys is None and policy.hub_orgs is None


def test_a_policy_file_kiln_cannot_use_is_refused_in_one_line(tmp_path):
    from tasks.policy import PolicyRefused, load_policy

    bad = tmp_path / "policy.yaml"
    bad.write_text(yaml.safe_dump({"output_roots": ["relative/out"], "allow_pickles": True}))
    with pytest.raises(PolicyRefused) as exc:
        load_policy(bad)
    message = str(exc.value)
    assert "KILN_POLICY_FILE" in message and "not an absolute folder" in message and "allow_pickles" in message
    assert load_policy(None).output_roots == []  # no file: the defaults (the run's working folder)


def test_confinement_resolves_symlinks_and_dotdot(tmp_path, outside):
    from tasks.policy import PolicyRefused, confine

    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "escape").symlink_to(outside)
    (root / "inner").symlink_to(root / "a")
    assert confine(root / "a" / ".." / "b", [root.resolve()], "output folder", "output_roots") == root.resolve() / "b"
    assert confine(root / "inner" / "x", [root.resolve()], "output folder", "output_roots") == root.resolve() / "a" / "x"
    for escaping in (root / "escape" / "x", root / "a" / ".." / os.path.relpath(outside, root), Path(os.path.relpath(outside, Path.cwd()))):
        with pytest.raises(PolicyRefused, match="outside the folders") as exc:
            confine(escaping, [root.resolve()], "output folder", "output_roots")
        assert "\n" not in str(exc.value) and str(outside) in str(exc.value)


def test_request_rules_switches_sources_adapters_keys_and_orgs(tmp_path, outside):
    from registry.models import ExportRequest
    from tasks.policy import DeploymentPolicy, PolicyRefused, check_request

    policy = DeploymentPolicy(output_roots=[tmp_path], source_roots=[tmp_path], registry_keys=["qwen2.5-0.5b-instruct"],
                              hub_orgs=["Qwen", "kiln-test"])
    out = str(tmp_path / "out")
    check_request(ExportRequest(source="qwen2.5-0.5b-instruct", out_dir=out), policy)
    check_request(ExportRequest(source="hf:kiln-test/x@" + "a" * 40, out_dir=out), policy)
    check_request(ExportRequest(source="demo", out_dir=out, imatrix="auto"), policy)  # Kiln's own text
    check_request(ExportRequest(source="demo", out_dir=out, quants=["q4_k_m"], imatrix=str(tmp_path / "calib.txt"),
                                recipe=str(tmp_path / "r.yaml")), policy)
    refused = {
        "allow_pickle is on": ExportRequest(source="demo", out_dir=out, allow_pickle=True),
        "trust_remote_code is on": ExportRequest(source="demo", out_dir=out, trust_remote_code=True),
        "registry key 'llama-3.2-1b-instruct' is not one": ExportRequest(source="llama-3.2-1b-instruct", out_dir=out),
        "Hub organisation 'evil'": ExportRequest(source="hf:evil/x@" + "a" * 40, out_dir=out),
        "adapter": ExportRequest(source="demo", out_dir=out, adapter=str(outside)),
        "source": ExportRequest(source=str(outside), out_dir=out),
        "importance matrix": ExportRequest(source="demo", out_dir=out, imatrix=str(outside / "calib.txt")),
        "recipe": ExportRequest(source="demo", out_dir=out, quants=["q4_k_m"], recipe=str(outside / "r.yaml")),
    }
    for expected, request in refused.items():
        with pytest.raises(PolicyRefused, match=expected):
            check_request(request, policy)
    # A typo in a registry key is left for the export's own "unknown registry key" message.
    check_request(ExportRequest(source="llama-3.2-1b-instruc", out_dir=out), policy)
    permissive = policy.model_copy(update={"allow_pickle": True, "allow_trust_remote_code": True})
    check_request(ExportRequest(source="demo", out_dir=out, allow_pickle=True, trust_remote_code=True), permissive)
    assert not (tmp_path / "out").exists()


def test_kiln_on_your_own_machine_keeps_its_freedom(tmp_path, demo_model_dir, demo_f16_gguf):
    """A strict KILN_POLICY_FILE in the environment: `kiln export` is not a deployment run, so it is not refused.

    `demo_f16_gguf`: the conversion is the session's, so this costs one q8_0 quantization.
    """
    out = tmp_path / "anywhere"
    proc = run_kiln("export", str(demo_model_dir), "--quant", "q8_0", "--out", str(out), "--no-verify", "--no-report",
                    "--allow-pickle", "--json", env={"KILN_POLICY_FILE": str(_strict_policy(tmp_path))})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "manifest.json").is_file()
    assert json.loads(proc.stdout)["request"]["allow_pickle"] is True


def test_kiln_secrets_names_only_credential_variables(monkeypatch):
    from tasks.settings import SettingInvalid, secret_blocks

    monkeypatch.setenv("KILN_SECRETS", "HF_TOKEN=hf-token, REGISTRY_PASSWORD=registry")
    assert secret_blocks() == {"HF_TOKEN": "hf-token", "REGISTRY_PASSWORD": "registry"}
    for bad in ("LD_PRELOAD=evil", "PATH=evil", "HF_TOKEN"):
        monkeypatch.setenv("KILN_SECRETS", bad)
        with pytest.raises(SettingInvalid, match="KILN_SECRETS"):
            secret_blocks()


# ---------------------------------------------------------------- against the authenticated server


def _failed_with(server: PrefectServer, run_id: str, expected: str) -> dict:
    run = server.wait(run_id, timeout=180)
    state = run["state"]
    assert state["type"] == "FAILED", (state, server.logs(run_id), server.diagnostics())
    assert "PolicyRefused" in state["message"] and expected in state["message"], state["message"]
    return run


def test_deployment_exports_outside_the_policy_are_refused_with_nothing_written(prefect_server, tmp_path, outside):
    server = prefect_server
    (tmp_path / "link").symlink_to(outside)
    fast = {"source": "demo", "quants": ["q8_0"], "verify": False, "report": False}
    cases = {
        "out_dir outside the root": ({**fast, "out_dir": str(outside / "export")}, REFUSED_PATH),
        "a symlink that leads outside": ({**fast, "out_dir": str(tmp_path / "link" / "export")}, REFUSED_PATH),
        "`..` that leads outside": ({**fast, "out_dir": str(tmp_path) + "/../../../" + str(outside) + "/dots"}, REFUSED_PATH),
        "trust_remote_code on": ({**fast, "out_dir": str(tmp_path / "remote-code"), "trust_remote_code": True},
                                 "trust_remote_code is on"),
        "allow_pickle on": ({**fast, "out_dir": str(tmp_path / "pickle"), "allow_pickle": True}, "allow_pickle is on"),
        "a local source outside": ({**fast, "source": str(outside), "out_dir": str(tmp_path / "source")}, REFUSED_PATH),
    }
    runs = {name: server.run_deployment("export/export", {"request": request}) for name, (request, _) in cases.items()}
    # The UI's custom run can set job variables; naming another policy file there is refused too.
    permissive = tmp_path / "permissive.yaml"
    permissive.write_text(yaml.safe_dump({"output_roots": [str(outside)], "allow_pickle": True}))
    runs["a per-run policy file"] = server.run_deployment(
        "export/export", {"request": {**fast, "out_dir": str(outside / "override"), "allow_pickle": True}},
        job_variables={"env": {"KILN_POLICY_FILE": str(permissive)}})
    cases["a per-run policy file"] = ({}, "the policy is the operator's")
    for name, run_id in runs.items():
        _failed_with(server, run_id, cases[name][1])
        assert server.child_flow_runs(run_id) == [], name
    assert list(outside.iterdir()) == [], "a refused export wrote outside the root"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "permissive.yaml"], "a refused export left a folder"


def test_convert_quantize_from_the_form_is_held_to_the_policy(prefect_server, tmp_path, outside):
    """The heavy flow's own deployment is in the UI too: a source folder outside, or pickles, are refused there."""
    server = prefect_server
    source = {"kind": "local", "id": str(outside), "path": str(outside)}
    request = {"source": "demo", "quants": ["q8_0"], "verify": False, "report": False, "out_dir": str(tmp_path / "o")}
    outside_run = server.run_deployment("convert-quantize/cpu", {"source": source, "request": request})
    pickle_run = server.run_deployment("convert-quantize/cpu", {
        "source": {"kind": "demo", "id": "demo", "path": str(outside)}, "request": {**request, "allow_pickle": True}})
    _failed_with(server, outside_run, REFUSED_PATH)
    _failed_with(server, pickle_run, "allow_pickle is on")


def test_a_batch_whose_item_escapes_the_root_is_refused_before_any_folder(prefect_server, tmp_path, outside):
    server = prefect_server
    (outside / "model").mkdir()
    (tmp_path / "out-link").symlink_to(outside)
    fast = {"quants": ["q8_0"], "verify": False, "options": {"report": False}}
    dotted = os.path.relpath(outside / "model", REPO_ROOT)  # relative to the deployment's working folder
    escaping_source = tmp_path / "source.yaml"
    escaping_source.write_text(yaml.safe_dump({
        "out_root": str(tmp_path / "out"), "defaults": fast,
        "bases": [{"source": "demo", "name": "fine"}, {"source": dotted, "name": "escapes"}],
    }))
    escaping_root = tmp_path / "root.yaml"
    escaping_root.write_text(yaml.safe_dump({
        "out_root": str(tmp_path / "out-link"), "defaults": fast, "bases": [{"source": "demo", "name": "fine"}],
    }))
    by_source = server.run_deployment("batch-export/batch-export", {"catalogue": str(escaping_source)})
    by_root = server.run_deployment("batch-export/batch-export", {"catalogue": str(escaping_root)})
    by_catalogue = server.run_deployment("batch-export/batch-export", {"catalogue": str(outside / "catalogue.yaml")})

    message = _failed_with(server, by_source, REFUSED_PATH)["state"]["message"]
    assert "item 'escapes' (bases[1])" in message and "'fine'" not in message
    assert "item 'fine' (bases[0])" in _failed_with(server, by_root, REFUSED_PATH)["state"]["message"]
    assert "catalogue" in _failed_with(server, by_catalogue, REFUSED_PATH)["state"]["message"]
    for run_id in (by_source, by_root, by_catalogue):
        assert server.child_flow_runs(run_id) == []
    assert not (tmp_path / "out").exists(), "a refused batch made the good item's folder"
    assert sorted(p.name for p in outside.iterdir()) == ["model"], "a refused batch wrote outside the root"


def test_a_client_without_the_auth_string_is_refused(prefect_server):
    server = prefect_server
    assert server.auth, "the session's server runs with API authentication"
    assert httpx.post(f"{server.api_url}/deployments/filter", json={}, timeout=10).status_code == 401
    wrong = httpx.BasicAuth("kiln-tests", "not-the-password")
    assert httpx.post(f"{server.api_url}/deployments/filter", json={}, auth=wrong, timeout=10).status_code == 401
    assert httpx.post(f"{server.api_url}/deployments/filter", json={}, auth=server.basic_auth(), timeout=10).status_code == 200

    env = {k: v for k, v in server.env.items() if k != "PREFECT_API_AUTH_STRING"}
    proc = subprocess.run([*prefect_command(), "deployment", "ls"], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "401" in proc.stdout + proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "export" in server.cli("deployment", "ls").stdout  # the same CLI with the auth string


SAVE_SECRET = r"""
import sys
from prefect.blocks.system import Secret
Secret(value=sys.stdin.read()).save("kiln-test-hf-token", overwrite=True)
print("RESULT null")
"""


def test_the_hub_token_comes_from_a_secret_block_and_appears_nowhere(prefect_server, demo_hub_repo, faults, tmp_path):
    """A gated repo on the loopback Hub, its token in a Prefect Secret block named by KILN_SECRETS (a job variable)."""
    server = prefect_server
    endpoint, repo_id, sha = demo_hub_repo
    faults.gate(repo_id, 401, token=TOKEN)  # the Hub lets only this token's account download
    proc = subprocess.run([sys.executable, "-c", SAVE_SECRET], input=TOKEN, env=server.env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "gated"
    run_id = server.run_deployment("export/export", {"request": {
        "source": f"hf:{repo_id}@{sha}", "quants": ["q8_0"], "verify": False, "report": False, "out_dir": str(out),
    }}, job_variables={"env": {
        "KILN_SECRETS": "HF_TOKEN=kiln-test-hf-token", "HF_ENDPOINT": faults.url, "HF_HUB_CACHE": str(tmp_path / "hf-hub"),
        "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }})
    run = server.wait(run_id, timeout=300)
    assert run["state"]["type"] == "COMPLETED", server.logs(run_id) + server.diagnostics()
    assert any(seen.authorization and repo_id in seen.path for seen in faults.seen()), "the token never reached the Hub"
    assert (out / "manifest.json").is_file()

    children = [c["id"] for c in server.child_flow_runs(run_id)]
    places = {
        "parameters": json.dumps([server.get(f"/flow_runs/{i}") for i in [run_id, *children]]),
        "logs": "\n".join(server.logs(i) for i in [run_id, *children]),
        "artifacts": json.dumps([server.artifacts(i) for i in [run_id, *children]]),
        "task runs": json.dumps(server.task_runs([run_id, *children])),
        "outputs and manifest": "\n".join(p.read_bytes().decode("latin-1") for p in out.rglob("*") if p.is_file()),
        "worker and server logs": "\n".join([server.log.read_text(errors="replace"), *(w.log_text() for w in server.workers)]),
    }
    for place, text in places.items():
        assert TOKEN not in text, f"the token is in the {place}"
    assert "kiln-test-hf-token" in places["parameters"]  # the block's name is there; its value is not
