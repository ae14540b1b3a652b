"""Fetch: parsing every kind of source, and downloading from a real Hub mirror on loopback.

The Hub is olah (a real Hub mirror, PyPI `olah`) serving git+LFS repositories
made by `tests/support/fixtures_hub.py`, reached through the fault-injecting stand-in in
`tests/support/hub_faults_proxy.py`; huggingface_hub is pointed at it through
`HF_ENDPOINT`, exactly as a user points it at a mirror.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest

from registry import get_base
from tasks.errors import (
    HubUnreachable,
    PickleRefused,
    RemoteCodeRefused,
    RepoGated,
    RevisionNotPinned,
    SourceCorrupt,
    SourceInvalid,
)
from tasks.fetch import (
    display_name,
    fetch_source,
    fingerprint,
    locate_metadata,
    model_family,
    model_files,
    parse_source,
    read_config,
    redact,
)
from tasks.files import sha256_file
from tests.support.fixtures_hub import (
    BIG_REPO,
    CUSTOM_CODE_REPO,
    DEMO_SKIP,
    GATED_REPO,
    GGUF_REPO,
    MISSING_SHARD_REPO,
    PICKLE_REPO,
    SHARD1,
    SHARD2,
    TINY_REPO,
    big_model_files,
    tiny_gguf,
    tiny_model_files,
    tiny_safetensors,
)

SHA = "12fd25f77366fa6b3b4b768ec3050bf629380bac"
SECRET = "hf_" + "kilnTestSecretToken0123456789abcd"


def write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def hub(mirror, repo: str) -> str:
    return f"hf:{repo}@{mirror.shas[repo]}"


def weight_gets(proxy) -> list[str]:
    """Paths of the weight files the proxy served a GET for."""
    return [r.path for r in proxy.seen(method="GET")
            if "/resolve/" in r.path and r.path.endswith((".safetensors", ".bin", ".gguf", ".pth", ".pt"))]


# --------------------------------------------------------------------------- parsing, no network


def test_parse_every_source_kind(tmp_path: Path):
    ref = parse_source(f"hf:Org/Name@{SHA.upper()}")
    assert (ref.kind, ref.id, ref.revision, ref.is_hub, ref.is_gguf) == ("hf", "Org/Name", SHA, True, False)

    gguf = parse_source(f"hf:TheBloke/openchat_3.5-GGUF@{SHA}#*Q5_0.gguf")
    assert (gguf.kind, gguf.id, gguf.revision, gguf.gguf_pattern, gguf.is_gguf) == (
        "hf-gguf", "TheBloke/openchat_3.5-GGUF", SHA, "*Q5_0.gguf", True)
    assert parse_source(f"hf:TheBloke/openchat_3.5-GGUF@{SHA}", gguf_file="*Q5_0.gguf") == gguf
    assert display_name(gguf) == "openchat_3.5-gguf"

    reg = parse_source("smollm2-135m-instruct")
    assert (reg.kind, reg.id, reg.revision, reg.spec.key) == ("registry", "HuggingFaceTB/SmolLM2-135M-Instruct",
                                                              SHA, "smollm2-135m-instruct")
    assert parse_source("demo").kind == "demo"

    folder = write_folder(tmp_path / "My Model", {"config.json": b"{}"})
    local = parse_source(str(folder))
    assert (local.kind, local.id, display_name(local)) == ("local", str(folder.resolve()), "my-model")
    gfile = tmp_path / "x.Q4_K_M.gguf"
    gfile.write_bytes(tiny_gguf("x"))
    assert parse_source(str(gfile)).kind == "gguf"


@pytest.mark.parametrize("source, error, words", [
    ("hf:Org/Name@main", RevisionNotPinned, ["'main'", "branch or tag", "--resolve-revision"]),
    ("hf:Org/Name@v1.0#*.gguf", RevisionNotPinned, ["--resolve-revision"]),
    ("hf:Org/Name", RevisionNotPinned, ["pinned commit", "--resolve-revision"]),
    ("hf:OrgOnly@" + SHA, SourceInvalid, ["ORG/NAME"]),
    ("hf:a/b/c@" + SHA, SourceInvalid, ["ORG/NAME"]),
    (f"hf:Org/Name@{SHA}#", SourceInvalid, ["empty"]),
])
def test_parse_refuses_unpinned_or_malformed(source: str, error: type, words: list[str]):
    with pytest.raises(error) as info:
        parse_source(source)
    for word in words:
        assert word in str(info.value)


def test_parse_refuses_conflicting_or_misplaced_patterns(tmp_path: Path):
    with pytest.raises(SourceInvalid, match="disagrees"):
        parse_source(f"hf:O/N@{SHA}#*Q5_0.gguf", gguf_file="*Q4_0.gguf")
    folder = write_folder(tmp_path / "m", {"config.json": b"{}"})
    with pytest.raises(SourceInvalid, match="Hub repo"):
        parse_source(str(folder), gguf_file="*Q5_0.gguf")


def test_registry_trust_comes_from_the_spec_only():
    spec = get_base("smollm2-135m-instruct")
    assert spec.trust_remote_code is False
    assert parse_source("smollm2-135m-instruct", trust_remote_code=True).trust_remote_code is False
    assert parse_source(f"hf:O/N@{SHA}", trust_remote_code=True).trust_remote_code is True


def test_redact_scrubs_tokens(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    text = redact(f"401 for url; Authorization: Bearer {SECRET}; also {SECRET[:-1]}Z and tok={SECRET}")
    assert SECRET not in text and SECRET[:-1] not in text
    assert "Bearer ***" in text


# --------------------------------------------------------------------------- local folders and files


def test_model_family_seed_defaults():
    assert model_family({"architectures": ["LlamaForCausalLM"], "bos_token_id": 0, "eos_token_id": [2, 7]}) == \
        model_family({"architectures": ["LlamaForCausalLM", "X"], "bos_token_id": [0], "eos_token_id": [2, 7]})
    family = model_family({"architectures": ["Qwen2ForCausalLM"]})
    assert (family.architecture, family.bos_token_id, family.eos_token_id) == ("Qwen2ForCausalLM", 1, 2)
    family = model_family({"text_config": {"eos_token_id": 106}, "bos_token_id": None})
    assert (family.architecture, family.bos_token_id, family.eos_token_id) == (None, 1, 106)


def test_local_folder_resolves_to_the_record(tmp_path: Path):
    folder = write_folder(tmp_path / "tiny", tiny_model_files())
    ref = parse_source(str(folder))
    meta, derived = locate_metadata(ref)
    assert (meta, derived) == (folder.resolve(), None)
    assert read_config(meta)["architectures"] == ["LlamaForCausalLM"]
    resolved = fetch_source(ref, meta, None)
    names = [f.path for f in resolved.files]
    # The index's shards only: not the stray consolidated.safetensors, not the pickle, not README.
    assert names == sorted(["config.json", "model.safetensors.index.json", SHARD1, SHARD2,
                            "tokenizer.json", "tokenizer_config.json"])
    assert [p.name for p in model_files(folder)] == names
    for record in resolved.files:
        assert record.sha256 == sha256_file(folder / record.path)
    assert (resolved.kind, resolved.id, resolved.revision, resolved.path) == ("local", str(folder.resolve()),
                                                                              None, str(folder.resolve()))
    # An unchanged re-run trusts size+mtime instead of hashing again.
    again = fingerprint([folder / n for n in names], folder, resolved.files)
    assert again == resolved.files


def _corrupt_index(files: dict[str, bytes], weight_map: dict[str, str]) -> dict[str, bytes]:
    index = json.loads(files["model.safetensors.index.json"])
    index["weight_map"].update(weight_map)
    return files | {"model.safetensors.index.json": json.dumps(index).encode()}


@pytest.mark.parametrize("case, words", [
    ("missing-shard", [SHARD2, "does not hold"]),
    ("escape-parent", ["../outside.safetensors", "escapes"]),
    ("escape-absolute", ["/etc/passwd", "escapes"]),
    ("truncated", [SHARD1, "truncated"]),
    ("trailing", [SHARD1, "past the end"]),
    ("wrong-shard", ["lm_head.weight", SHARD1, "does not hold it"]),
])
def test_local_folder_refused_before_conversion(tmp_path: Path, case: str, words: list[str]):
    files = tiny_model_files()
    if case == "missing-shard":
        del files[SHARD2]
    elif case == "escape-parent":
        files = _corrupt_index(files, {"lm_head.weight": "../outside.safetensors"})
        (tmp_path / "outside.safetensors").write_bytes(tiny_safetensors({"lm_head.weight": (8, 1024)}, 5))
    elif case == "escape-absolute":
        files = _corrupt_index(files, {"lm_head.weight": "/etc/passwd"})
    elif case == "truncated":
        files[SHARD1] = files[SHARD1][:-1000]
    elif case == "trailing":
        files[SHARD1] = files[SHARD1] + b"\0" * 16
    elif case == "wrong-shard":
        files = _corrupt_index(files, {"lm_head.weight": SHARD1})
    folder = write_folder(tmp_path / "m", files)
    ref = parse_source(str(folder))
    meta, derived = locate_metadata(ref)
    with pytest.raises(SourceCorrupt) as info:
        fetch_source(ref, meta, derived)
    for word in words:
        assert word in str(info.value)


def test_local_pickles_need_allow_pickle(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    folder = write_folder(tmp_path / "p", {"config.json": b'{"architectures": ["GPT2LMHeadModel"]}',
                                           "pytorch_model.bin": b"pickle"})
    ref = parse_source(str(folder))
    with pytest.raises(PickleRefused) as info:
        fetch_source(ref, *locate_metadata(ref))
    assert "arbitrary code" in str(info.value) and "--allow-pickle" in str(info.value)
    ref = parse_source(str(folder), allow_pickle=True)
    with caplog.at_level(logging.WARNING, logger="kiln.fetch"):
        resolved = fetch_source(ref, *locate_metadata(ref))
    assert [f.path for f in resolved.files] == ["config.json", "pytorch_model.bin"]
    assert "arbitrary code" in caplog.text


def test_local_custom_code_needs_trust(tmp_path: Path):
    folder = write_folder(tmp_path / "c", {
        "config.json": b'{"architectures": ["X"], "auto_map": {"AutoModel": "modeling_x.XModel"}}',
        "model.safetensors": tiny_safetensors({"w": (2,)}, 1)})
    with pytest.raises(RemoteCodeRefused, match="modeling_x.*trust_remote_code: true"):
        locate_metadata(parse_source(str(folder)))
    ref = parse_source(str(folder), trust_remote_code=True)
    assert fetch_source(ref, *locate_metadata(ref)).files


def test_local_gguf_file(tmp_path: Path):
    good = tmp_path / "m.Q8_0.gguf"
    good.write_bytes(tiny_gguf("ok"))
    ref = parse_source(str(good))
    meta, _ = locate_metadata(ref)
    resolved = fetch_source(ref, meta, None)
    assert (resolved.kind, resolved.path, resolved.files[0].sha256) == ("gguf", str(good), sha256_file(good))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(SourceCorrupt, match="not a GGUF"):
        locate_metadata(parse_source(str(bad)))


# --------------------------------------------------------------------------- the loopback Hub


def test_hub_metadata_first_then_only_the_needed_weights(hub_mirror, hub_env, faults):
    ref = parse_source(hub(hub_mirror, TINY_REPO))
    folder, derived = locate_metadata(ref)
    assert derived is None
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors.index.json",
                                                        "tokenizer.json", "tokenizer_config.json"]
    assert weight_gets(faults) == []  # every preflight refusal can come before a weight byte

    resolved = fetch_source(ref, folder, derived)
    assert (resolved.kind, resolved.id, resolved.revision) == ("hf", TINY_REPO, hub_mirror.shas[TINY_REPO])
    assert sorted(Path(p).name for p in weight_gets(faults)) == [SHARD1, SHARD2]  # no pickle, no stray file
    expected = tiny_model_files()
    assert {f.path: f.sha256 for f in resolved.files} == {
        name: hashlib.sha256(expected[name]).hexdigest()
        for name in ["config.json", "model.safetensors.index.json", SHARD1, SHARD2, "tokenizer.json",
                     "tokenizer_config.json"]}
    assert Path(resolved.path) == folder

    before = len(faults.requests)
    assert fetch_source(ref, folder, derived).files == resolved.files
    assert len(faults.requests) == before  # pinned and cached: no request at all


def test_hub_resolve_revision_pins_a_branch_once(hub_mirror, hub_env, faults, monkeypatch):
    sha = hub_mirror.shas[TINY_REPO]
    with pytest.raises(RevisionNotPinned):
        parse_source(f"hf:{TINY_REPO}@main")
    ref = parse_source(f"hf:{TINY_REPO}@main", resolve_revision=True)
    assert (ref.revision, ref.requested_revision) == (sha, "main")
    assert [r.path.split("?")[0] for r in faults.requests] == [f"/api/models/{TINY_REPO}/revision/main"]
    resolved = fetch_source(ref, *locate_metadata(ref))
    assert resolved.revision == sha
    assert all("/main/" not in r.path for r in faults.requests[1:])  # everything after is fetched by SHA
    assert parse_source(f"hf:{TINY_REPO}", resolve_revision=True).revision == sha

    faults.reset()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline, the branch resolves to the commit recorded above
    assert parse_source(f"hf:{TINY_REPO}@main", resolve_revision=True).revision == sha
    assert faults.requests == []


def test_hub_missing_shard_refused_before_any_weight(hub_mirror, hub_env, faults):
    ref = parse_source(hub(hub_mirror, MISSING_SHARD_REPO))
    folder, derived = locate_metadata(ref)
    with pytest.raises(SourceCorrupt) as info:
        fetch_source(ref, folder, derived)
    assert SHARD2 in str(info.value) and MISSING_SHARD_REPO in str(info.value)
    assert weight_gets(faults) == []


def test_hub_dropped_connection_resumes(hub_mirror, hub_env, faults):
    """A connection cut at 16 MiB of a 24 MiB shard: the client asks for the rest with Range and finishes it."""
    from huggingface_hub import constants

    ref = parse_source(hub(hub_mirror, BIG_REPO))
    data = big_model_files()["model.safetensors"]
    cut = 16 * 1024 * 1024
    faults.drop_once("model.safetensors", after=cut)
    resolved = fetch_source(ref, *locate_metadata(ref))
    first, second = faults.seen("model.safetensors", "GET")
    assert (first.range, first.status) == (None, 200)
    # huggingface_hub writes whole 10 MiB chunks, so it resumes from the last chunk it wrote, not from 0.
    assert (second.range, second.status) == (f"bytes={constants.DOWNLOAD_CHUNK_SIZE}-", 206)
    assert 0 < constants.DOWNLOAD_CHUNK_SIZE <= cut
    record = next(f for f in resolved.files if f.path == "model.safetensors")
    assert (record.size, record.sha256) == (len(data), hashlib.sha256(data).hexdigest())


def test_hub_failed_run_keeps_completed_files(hub_mirror, hub_env, faults):
    """A run that fails on one shard leaves the other complete in the cache; the next run fetches only the rest."""
    ref = parse_source(hub(hub_mirror, TINY_REPO))
    folder, derived = locate_metadata(ref)
    faults.fail(SHARD2, 500)
    with pytest.raises(HubUnreachable) as info:
        fetch_source(ref, folder, derived)
    assert "500" in str(info.value)
    assert [g.status for g in faults.seen(SHARD1, "GET")] == [200]
    faults.reset()
    fetch_source(ref, folder, derived)
    assert faults.seen(SHARD1, "GET") == [] and [g.status for g in faults.seen(SHARD2, "GET")] == [200]


def test_hub_corrupt_download_is_deleted_and_named(hub_mirror, hub_env, faults):
    ref = parse_source(hub(hub_mirror, TINY_REPO))
    folder, derived = locate_metadata(ref)
    faults.corrupt(SHARD1)
    with pytest.raises(SourceCorrupt) as info:
        fetch_source(ref, folder, derived)
    message = str(info.value)
    assert SHARD1 in message and "sha256" in message and "deleted" in message
    assert not (folder / SHARD1).exists() and not (folder / SHARD1).is_symlink()
    blob = hashlib.sha256(tiny_model_files()[SHARD1]).hexdigest()
    assert not (hub_env / f"models--{TINY_REPO.replace('/', '--')}" / "blobs" / blob).exists()
    faults.reset()
    resolved = fetch_source(ref, folder, derived)  # the next run downloads it afresh
    assert [g.status for g in faults.seen(SHARD1, "GET")] == [200]
    assert (folder / SHARD1).is_file() and SHARD1 in [f.path for f in resolved.files]


@pytest.mark.parametrize("status", [401, 403])
def test_hub_gated_repo_names_repo_licence_and_token(hub_mirror, hub_env, faults, monkeypatch, caplog, capfd,
                                                     status):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    faults.gate(GATED_REPO, status)
    ref = parse_source(f"hf:{GATED_REPO}@{SHA}")
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(RepoGated) as info:
            locate_metadata(ref)
    message = str(info.value)
    assert GATED_REPO in message
    assert f"{faults.url}/{GATED_REPO}" in message  # the licence page, on the Hub the user points at
    assert "HF_TOKEN" in message and "licence" in message
    assert faults.requests and all(r.authorization for r in faults.requests)  # the token was sent...
    out, err = capfd.readouterr()
    for text in (message, repr(info.value), caplog.text, out, err):
        assert SECRET not in text  # ...and never written anywhere


def test_hub_gated_without_token_says_so(hub_mirror, hub_env, faults):
    faults.gate(GATED_REPO, 401)
    with pytest.raises(RepoGated, match="HF_TOKEN is not set"):
        locate_metadata(parse_source(f"hf:{GATED_REPO}@{SHA}"))


def test_hub_offline_uses_the_cache_and_no_network(hub_mirror, hub_env, faults, monkeypatch):
    ref = parse_source(hub(hub_mirror, TINY_REPO))
    online = fetch_source(ref, *locate_metadata(ref))
    faults.reset()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = fetch_source(ref, *locate_metadata(ref))
    assert offline.files == online.files and offline.path == online.path
    assert faults.requests == []

    # Kiln's own file list gone too: huggingface_hub's cached tree still gives every hash.
    shutil.rmtree(Path(hub_env.parent / "kiln-cache" / "hub"))
    assert fetch_source(ref, *locate_metadata(ref)).files == online.files
    assert faults.requests == []


def test_hub_offline_without_the_revision_says_how_to_fix(hub_mirror, hub_env, faults, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachable, match="HF_HUB_OFFLINE"):
        locate_metadata(parse_source(hub(hub_mirror, TINY_REPO)))
    with pytest.raises(HubUnreachable, match="HF_HUB_OFFLINE"):
        parse_source(f"hf:{TINY_REPO}@main", resolve_revision=True)
    assert faults.requests == []


def test_hub_pickles_refused_unless_allowed(hub_mirror, hub_env, faults):
    ref = parse_source(hub(hub_mirror, PICKLE_REPO))
    with pytest.raises(PickleRefused, match="arbitrary code"):
        fetch_source(ref, *locate_metadata(ref))
    assert weight_gets(faults) == []
    ref = parse_source(hub(hub_mirror, PICKLE_REPO), allow_pickle=True)
    resolved = fetch_source(ref, *locate_metadata(ref))
    assert [f.path for f in resolved.files] == ["config.json", "pytorch_model.bin"]


def test_hub_custom_code_refused_unless_trusted(hub_mirror, hub_env, faults):
    with pytest.raises(RemoteCodeRefused) as info:
        locate_metadata(parse_source(hub(hub_mirror, CUSTOM_CODE_REPO)))
    assert "modeling_custom" in str(info.value) and CUSTOM_CODE_REPO in str(info.value)
    assert not [r for r in faults.requests if r.path.endswith(".py")]
    ref = parse_source(hub(hub_mirror, CUSTOM_CODE_REPO), trust_remote_code=True)
    resolved = fetch_source(ref, *locate_metadata(ref))
    assert "model.safetensors" in [f.path for f in resolved.files]


def test_hub_prebuilt_gguf_by_case_sensitive_pattern(hub_mirror, hub_env, faults):
    sha = hub_mirror.shas[GGUF_REPO]
    ref = parse_source(f"hf:{GGUF_REPO}@{sha}#*Q5_0.gguf")  # tiny.q5_0.gguf exists too: case matters
    path, derived = locate_metadata(ref)
    assert path.name == "tiny.Q5_0.gguf" and path.read_bytes() == tiny_gguf("Q5_0")
    resolved = fetch_source(ref, path, derived)
    assert (resolved.kind, resolved.id, resolved.revision, resolved.path) == ("gguf", GGUF_REPO, sha, str(path))
    assert [(f.path, f.sha256) for f in resolved.files] == [("tiny.Q5_0.gguf", sha256_file(path))]
    assert [Path(p).name for p in weight_gets(faults)] == ["tiny.Q5_0.gguf"]

    with pytest.raises(SourceInvalid) as info:
        locate_metadata(parse_source(f"hf:{GGUF_REPO}@{sha}", gguf_file="*Q4_K_*.gguf"))
    assert "matches 2" in str(info.value) and "tiny.Q4_K_M.gguf" in str(info.value)
    with pytest.raises(SourceInvalid) as info:
        locate_metadata(parse_source(f"hf:{GGUF_REPO}@{sha}#*Q8_0.gguf"))
    assert "case-sensitive" in str(info.value)
    for name in ("tiny.Q5_0.gguf", "tiny.q5_0.gguf", "tiny.Q4_K_M.gguf", "tiny.Q4_K_S.gguf"):
        assert name in str(info.value)


def test_hub_demo_model_at_its_sha_then_offline(demo_hub_repo, demo_model_dir, hub_env, faults, monkeypatch):
    """The real SmolLM2 folder through the mirror: byte-identical files, recorded, then again with no network."""
    endpoint, repo_id, sha = demo_hub_repo
    monkeypatch.setenv("HF_ENDPOINT", endpoint)  # olah itself: no fault to inject, and the relay costs time
    ref = parse_source(f"hf:{repo_id}@{sha}")
    resolved = fetch_source(ref, *locate_metadata(ref))
    local = fetch_source(parse_source(str(demo_model_dir)), demo_model_dir, None)
    assert [(f.path, f.size, f.sha256) for f in resolved.files] == \
        [(f.path, f.size, f.sha256) for f in local.files if f.path not in DEMO_SKIP]
    assert (resolved.kind, resolved.id, resolved.revision) == ("hf", repo_id, sha)

    monkeypatch.setenv("HF_ENDPOINT", faults.url)  # the recording proxy: offline must not call it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = fetch_source(ref, *locate_metadata(ref), previous=resolved.files)
    assert offline.files == resolved.files and faults.requests == []


def test_hub_record_carries_family_and_planned_size(hub_mirror, hub_env, faults):
    from tasks.fetch import planned_weight_bytes

    ref = parse_source(hub(hub_mirror, TINY_REPO))
    folder, derived = locate_metadata(ref)
    files = tiny_model_files()
    assert planned_weight_bytes(ref, folder) == sum(len(files[n]) for n in
                                                    ("model.safetensors.index.json", SHARD1, SHARD2))
    assert weight_gets(faults) == []
    resolved = fetch_source(ref, folder, derived)
    assert (resolved.architecture, resolved.bos_token_id, resolved.eos_token_id) == ("LlamaForCausalLM", 0, [2, 7])


def test_hub_cached_commit_needs_no_network(hub_mirror, hub_env, faults, monkeypatch):
    """Once a commit is cached, a dead endpoint does not matter, even without HF_HUB_OFFLINE."""
    import socket

    ref = parse_source(hub(hub_mirror, PICKLE_REPO), allow_pickle=True)
    online = fetch_source(ref, *locate_metadata(ref))
    shutil.rmtree(hub_env.parent / "kiln-cache" / "hub")  # only huggingface_hub's cache is left
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")  # nothing listens there
    assert fetch_source(ref, *locate_metadata(ref)).files == online.files
