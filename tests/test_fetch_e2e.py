"""End to end through the `kiln` command: `hf:ORG/NAME@SHA` from a Hub on loopback, then again offline.

The Hub is olah (a real Hub mirror) serving the demo SmolLM2-135M-Instruct
folder as a git+LFS repository (`tests/support/fixtures_hub.py`). The first export
downloads it at its commit through `HF_ENDPOINT` into an empty hub cache; the
second runs with `HF_HUB_OFFLINE=1` and `HF_ENDPOINT` pointed at the recording
proxy, and must succeed from the cache without a single request.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tasks.files import sha256_file
from tests.support.fixtures_hub import DEMO_SKIP

REPO_ROOT = Path(__file__).resolve().parent.parent


def kiln_command() -> list[str]:
    """The installed `kiln` script, else the same entry point (`cli:main`) run by this Python."""
    script = Path(sys.executable).with_name("kiln")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from cli import main; sys.exit(main())"]


def run_kiln(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run([*kiln_command(), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, (
        f"kiln {' '.join(args)} exited {done.returncode}\n--- stdout\n{done.stdout[-4000:]}\n"
        f"--- stderr\n{done.stderr[-4000:]}"
    )
    return done


def hub_env_for(tmp_path: Path, endpoint: str, offline: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update({
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_CACHE": str(tmp_path / "hf-hub"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    })
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env  # KILN_CACHE_DIR is the session's: the f16 conversion of these same bytes is reused


def check_export(out: Path, repo_id: str, sha: str, demo_model_dir: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    source = manifest["source"]
    assert (source["kind"], source["id"], source["revision"]) == ("hf", repo_id, sha)
    expected = {p.name: sha256_file(p) for p in demo_model_dir.iterdir() if p.is_file() and p.name not in DEMO_SKIP}
    assert {f["path"]: f["sha256"] for f in source["files"]} == expected
    quants = {o["quant"]: o for o in manifest["outputs"]}
    assert "q8_0" in quants
    q8 = out / quants["q8_0"]["path"]
    assert q8.is_file() and sha256_file(q8) == quants["q8_0"]["sha256"]
    return manifest


def test_export_from_the_loopback_hub_then_offline(demo_hub_repo, demo_model_dir, faults, tmp_path: Path):
    endpoint, repo_id, sha = demo_hub_repo
    source = f"hf:{repo_id}@{sha}"

    online = run_kiln(["export", source, "--quant", "q8_0", "--out", str(tmp_path / "out-online"), "--no-verify",
                       "--json"], hub_env_for(tmp_path, endpoint, offline=False))
    json.loads(online.stdout)  # --json prints one JSON document on stdout
    first = check_export(tmp_path / "out-online", repo_id, sha, demo_model_dir)

    faults.reset()
    run_kiln(["export", source, "--quant", "q8_0", "--out", str(tmp_path / "out-offline"), "--no-verify"],
             hub_env_for(tmp_path, faults.url, offline=True))
    second = check_export(tmp_path / "out-offline", repo_id, sha, demo_model_dir)
    assert second["source"]["files"] == first["source"]["files"]
    assert faults.requests == []  # offline: not one request reached the Hub


def test_export_pins_a_branch_once_with_resolve_revision(demo_hub_repo, demo_model_dir, tmp_path: Path):
    """`--resolve-revision` (README): `@main` is refused without it; with it, resolved to its commit once,
    and the manifest records both the commit and the branch it came from."""
    endpoint, repo_id, sha = demo_hub_repo
    env = hub_env_for(tmp_path, endpoint, offline=False)
    unpinned = subprocess.run([*kiln_command(), "export", f"hf:{repo_id}@main", "--out", str(tmp_path / "no")],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert unpinned.returncode == 2 and "--resolve-revision" in unpinned.stderr, unpinned.stderr[-3000:]
    out = tmp_path / "out"
    run_kiln(["export", f"hf:{repo_id}@main", "--resolve-revision", "--quant", "q8_0", "--out", str(out),
              "--no-verify", "--no-report"], env)
    manifest = check_export(out, repo_id, sha, demo_model_dir)
    assert manifest["source"]["requested_revision"] == "main"
    assert not (tmp_path / "no").exists()
