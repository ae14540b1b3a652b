"""SIGKILL mid-step: nothing half-written under a final name, and the next run resumes.

One scenario on a private cache (so conversion and quantization really run), three runs of
`kiln demo --no-verify --no-report` into one folder:

1. killed while the converter writes the f16 GGUF (its temporary in KILN_CACHE_DIR/gguf has
   bytes): the whole process group, so the converter subprocess dies with the CLI;
2. killed while libllama writes a quantization (the f16 entry is complete by then);
3. run to the end: it reuses the f16 entry the second run completed (same inode and mtime),
   leaves no `.kiln-tmp-*` anywhere, and writes files byte-identical to an uninterrupted run.

Both killed runs held the folder's export lock and the cache entry's lock (checked from here
while they ran); the runs after them went ahead at once, because `filelock` uses flock(2),
which the kernel drops with its holder.

A merge mode for LoRA adapters is built elsewhere; "killed during a merge" is not covered here.
"""

from __future__ import annotations

import json

import pytest

from flows.export import export_lock_path
from tests.faults.helpers import (
    DEMO_QUANTS,
    FAST,
    Identity,
    Kiln,
    cli_env,
    entry_is_complete,
    final_files,
    growing_temporary,
    lock_is_held,
    output_hashes,
    private_cache,
    temporaries,
    wait_until,
)

@pytest.fixture(scope="module")
def killed_scenario(prefect_api, reference_export, kiln_cache, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("killed")
    cache = private_cache(kiln_cache, root / "cache")
    gguf, out = cache / "gguf", root / "out"
    env = cli_env(prefect_api.env, cache, root / "prefect-home")
    args = ["demo", "--out", str(out), *FAST]
    seen: dict = {}

    # 1. Killed during conversion: the converter is writing the f16 GGUF.
    run = Kiln(args, env, root / "logs", "1-killed-converting")
    wait_until(growing_temporary(gguf, "f16"), run, "the converter writing the f16 GGUF")
    f16_lock = next(gguf.glob("*-f16-*.gguf.lock"))
    seen["convert: export lock held"] = lock_is_held(export_lock_path(out, cache))
    seen["convert: cache lock held"] = lock_is_held(f16_lock)
    run.kill()
    seen["convert: group gone"] = run.group_gone()
    seen["convert: export lock free"] = not lock_is_held(export_lock_path(out, cache))
    seen["convert: cache lock free"] = not lock_is_held(f16_lock)
    seen["convert: cache"] = sorted(p.name for p in gguf.iterdir())
    seen["convert: temporaries"] = temporaries(gguf)
    seen["convert: f16 entry"] = reference_export.entry(cache, "f16")
    seen["convert: out"] = sorted(final_files(out))

    # 2. Killed during quantization: the f16 entry is complete, a quantization is being written.
    run = Kiln(args, env, root / "logs", "2-killed-quantizing")
    probes = [growing_temporary(gguf, q) for q in DEMO_QUANTS[1:]]
    wait_until(lambda: any(p() for p in probes), run, "libllama writing a quantization")
    seen["quantize: export lock held"] = lock_is_held(export_lock_path(out, cache))
    run.kill()
    seen["quantize: group gone"] = run.group_gone()
    seen["quantize: second run stderr"] = run.stderr
    f16 = reference_export.entry(cache, "f16")
    assert f16 is not None, "the second run never completed the f16 conversion"
    seen["quantize: f16"] = (f16, Identity.of(f16), entry_is_complete(f16))
    seen["quantize: quant entries"] = {q: reference_export.entry(cache, q) for q in DEMO_QUANTS[1:]}
    seen["quantize: complete quant entries"] = {
        q: Identity.of(p) for q, p in seen["quantize: quant entries"].items() if p and entry_is_complete(p)}
    seen["quantize: temporaries"] = temporaries(gguf)
    seen["quantize: out"] = sorted(final_files(out))

    # 3. The uninterrupted re-run.
    run = Kiln([*args, "--json"], env, root / "logs", "3-rerun")
    seen["rerun: rc"] = run.wait()
    seen["rerun"] = run
    seen["rerun: f16"] = Identity.of(f16)
    seen["rerun: quant entries"] = {q: Identity.of(reference_export.entry(cache, q)) for q in seen["quantize: complete quant entries"]}
    seen["rerun: temporaries"] = temporaries(cache, out)
    seen["out"], seen["cache"] = out, cache
    return seen


def test_a_run_killed_while_converting_leaves_no_half_file_under_a_final_name(killed_scenario):
    seen = killed_scenario
    assert seen["convert: export lock held"] and seen["convert: cache lock held"], "killed before it held its locks"
    assert seen["convert: group gone"], "the converter subprocess outlived the killed CLI"
    assert seen["convert: f16 entry"] is None, seen["convert: cache"]
    assert seen["convert: temporaries"], "the kill came after the converter finished writing"
    assert seen["convert: out"] == [], seen["convert: out"]


def test_locks_of_a_killed_run_are_released_by_the_kernel(killed_scenario):
    seen = killed_scenario
    assert seen["convert: export lock free"] and seen["convert: cache lock free"]
    # The lock files stay on disk (in the cache, not the output folder); the runs after the kill still went ahead.
    assert export_lock_path(seen["out"], seen["cache"]).is_file()
    assert seen["rerun: rc"] == 0


def test_a_run_killed_while_quantizing_keeps_the_completed_conversion(killed_scenario):
    seen = killed_scenario
    assert seen["quantize: export lock held"]
    assert seen["quantize: group gone"]
    f16, _, complete = seen["quantize: f16"]
    assert complete, f"{f16.name} is not what its sha256 stamp says"
    # The converter ran in this run: the first run's half file did not count as done.
    assert "base f16 GGUF converted" in seen["quantize: second run stderr"]
    incomplete = [q for q in DEMO_QUANTS[1:] if q not in seen["quantize: complete quant entries"]]
    assert incomplete, "both quantizations had finished before the kill"
    for quant in incomplete:
        assert seen["quantize: quant entries"][quant] is None, f"a half-written {quant} entry has a final name"
    assert seen["quantize: out"] == [], seen["quantize: out"]


def test_the_rerun_resumes_from_the_last_completed_step(killed_scenario):
    seen = killed_scenario
    run = seen["rerun"]
    assert seen["rerun: rc"] == 0, run.describe()
    _, before, _ = seen["quantize: f16"]
    assert seen["rerun: f16"] == before, "the completed f16 conversion was written again"
    assert "base f16 GGUF converted" not in run.stderr
    for quant, identity in seen["quantize: complete quant entries"].items():
        assert seen["rerun: quant entries"][quant] == identity, f"the completed {quant} entry was written again"


def test_the_rerun_leaves_no_temporaries_and_matches_an_uninterrupted_run(killed_scenario, reference_export):
    seen = killed_scenario
    assert seen["rerun: temporaries"] == []
    assert output_hashes(seen["out"]) == reference_export.hashes
    manifest = json.loads(seen["rerun"].stdout)
    assert {o["path"]: o["sha256"] for o in manifest["outputs"]} == \
        {o["path"]: o["sha256"] for o in reference_export.manifest["outputs"]}
    assert manifest["request_key"] == reference_export.manifest["request_key"]
    assert json.loads((seen["out"] / "manifest.json").read_text()) == manifest


def test_placing_an_output_that_already_is_the_cache_entry_leaves_no_temporary(tmp_path):
    """rename(2) of one hard link onto another of the same file does nothing: the temporary must still go.

    (A re-run into a folder whose outputs were placed before the kill, e.g. one killed while registering.)
    """
    from tasks.convert import place_output

    cached = tmp_path / "cache" / "entry.gguf"
    cached.parent.mkdir()
    cached.write_bytes(b"GGUF" + b"\0" * 64)
    final = tmp_path / "out" / "model-f16.gguf"
    place_output(cached, final)
    place_output(cached, final)
    assert sorted(p.name for p in final.parent.iterdir()) == ["model-f16.gguf"]
    assert final.stat().st_ino == cached.stat().st_ino
