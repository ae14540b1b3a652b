"""A full disk: preflight refuses what cannot fit; a write that fails anyway leaves nothing half-written.

Real small filesystems (tmpfs, mounted here as root; skipped where mounting is not allowed)
give real ENOSPC: from the converter subprocess, from libllama's quantizer, from a copy.
The injected-error tests at the end need no mount and always run.
"""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tasks.errors import NotEnoughDisk
from tasks.files import TEMP_PREFIX, atomic_dir, atomic_path
from tests.faults.helpers import FAST, Kiln, final_files, temporaries


def _mount(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return proc.returncode == 0


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """`tiny_fs(size="20m", inodes=None)`: a fresh tmpfs of that size; unmounted afterwards."""
    mounted: list[Path] = []

    def make(size: str = "20m", inodes: int | None = None) -> Path:
        path = tmp_path / f"fs-{uuid.uuid4().hex[:8]}"
        options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
        if not _mount(path, options):
            pytest.skip("cannot mount a tmpfs here (needs root); the injected-ENOSPC tests cover the mapping")
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def leftovers(folder: Path) -> list[str]:
    """What is left on the filesystem besides lock files (a lock file is not a half-written output)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


# ------------------------------------------------------------------ through the CLI


def last_line(run: Kiln) -> str:
    """The CLI's own one-line refusal. (Prefect logs the same exception with tracebacks before it: see the report.)"""
    return run.stderr.rstrip().splitlines()[-1]


def test_preflight_refuses_an_export_that_cannot_fit(prefect_api, reference_export, kiln_cache, tiny_fs, tmp_path):
    out = tiny_fs("20m")
    run = Kiln(["demo", "--out", str(out), *FAST], reference_export.env, tmp_path / "logs", "too-small")
    assert run.wait() == 2, run.describe()
    message = last_line(run)
    assert message.startswith("error: this export needs about") and "GB but only" in message
    assert "--out / KILN_CACHE_DIR" in message  # the fix
    assert "Task run 'convert" not in run.stderr  # refused before any heavy step
    assert final_files(out) == {} and temporaries(out) == []


def test_a_write_that_fails_after_preflight_names_the_step_and_leaves_no_partial_file(
        prefect_api, reference_export, tiny_fs, tmp_path):
    """Room enough for preflight's byte estimate, but only two inodes: root and one output (the export
    lock lives in the cache).

    Preflight counts bytes, not inodes; the second output then cannot even be created (ENOSPC).
    """
    out = tiny_fs("1g", inodes=2)
    run = Kiln(["demo", "--out", str(out), *FAST], reference_export.env, tmp_path / "logs", "no-inodes")
    assert run.wait() == 2, run.describe()
    message = last_line(run)
    assert message.startswith("error: step 'outputs' ran out of disk space writing smollm2-135m-instruct-")
    assert "no free inodes" in message and "it needs about" in message
    # The one output that fitted is whole; nothing else carries a final name.
    from tasks.files import sha256_file

    (placed,) = final_files(out).values()
    quant = placed.name.removeprefix("smollm2-135m-instruct-").removesuffix(".gguf")
    assert sha256_file(placed) == reference_export.hashes[quant]
    assert placed.name not in message
    assert temporaries(out) == []


# ------------------------------------------------------------------ each step on a full disk


def test_the_converter_running_out_of_space(tiny_fs, monkeypatch, demo_model_dir, toolchain):
    from tasks.convert import convert_to_gguf

    cache = tiny_fs("20m")
    monkeypatch.setenv("KILN_CACHE_DIR", str(cache))
    with pytest.raises(NotEnoughDisk) as info:
        convert_to_gguf(demo_model_dir, "fault", "f16", toolchain)
    message = str(info.value)
    assert message.startswith(f"step 'convert' ran out of disk space writing fault-f16-{toolchain.cache_key}.gguf")
    assert "it needs about 269" in message  # the converter's own total
    assert "Not enough free space" in message or "No space left" in message  # its own words
    assert leftovers(cache) == []


def test_the_quantizer_running_out_of_space(tiny_fs, demo_f16_gguf):
    from tasks.quantize import quantize_gguf

    folder = tiny_fs("20m")
    with pytest.raises(NotEnoughDisk) as info:
        quantize_gguf(demo_f16_gguf, folder / "gguf" / "fault-q8_0.gguf", "q8_0", 1)
    message = str(info.value)
    assert message.startswith("step 'quantize' ran out of disk space writing fault-q8_0.gguf")
    assert "MB written" in message and "libllama could not quantize" in message
    assert leftovers(folder) == []


def test_placing_an_output_on_a_full_disk(tiny_fs, demo_f16_gguf):
    """Another filesystem than the cache: the output is a copy, not a hard link, and it does not fit."""
    from tasks.convert import place_output

    out = tiny_fs("20m")
    with pytest.raises(NotEnoughDisk, match=r"step 'outputs' .* writing model-f16\.gguf .* it needs about 270"):
        place_output(demo_f16_gguf, out / "model-f16.gguf")
    assert leftovers(out) == []


# ------------------------------------------------------------------ injected ENOSPC (no mount needed)


def test_atomic_path_turns_enospc_into_not_enough_disk(tmp_path):
    final = tmp_path / "model-q8_0.gguf"
    with pytest.raises(NotEnoughDisk) as info:
        with atomic_path(final, step="quantize", need=5_000_000) as tmp:
            tmp.write_bytes(b"x" * 1500)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
    message = str(info.value)
    assert "step 'quantize' ran out of disk space writing model-q8_0.gguf" in message
    assert "1.5 kB written" in message and "it needs about 5.0 MB" in message and "free" in message
    assert "No space left on device" in message
    assert list(tmp_path.iterdir()) == []


def test_a_quota_counts_as_a_full_disk_and_other_errors_pass_through(tmp_path):
    with pytest.raises(NotEnoughDisk, match="Disk quota exceeded"):
        with atomic_path(tmp_path / "a.gguf"):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    with pytest.raises(PermissionError):
        with atomic_path(tmp_path / "b.gguf"):
            raise PermissionError(errno.EACCES, "denied")
    assert list(tmp_path.iterdir()) == []


def test_no_room_to_create_the_temporary(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("tasks.files.tempfile.mkstemp", full)
    monkeypatch.setattr("tasks.files.tempfile.mkdtemp", full)
    with pytest.raises(NotEnoughDisk, match="writing manifest.json"):
        with atomic_path(tmp_path / "manifest.json"):
            pass
    with pytest.raises(NotEnoughDisk, match="writing llama-cpp-python"):
        with atomic_dir(tmp_path / "llama-cpp-python"):
            pass


def test_atomic_dir_removes_its_partial_folder(tmp_path):
    with pytest.raises(NotEnoughDisk, match=r"step 'setup' .* 3 B written"):
        with atomic_dir(tmp_path / "tree", step="setup") as staging:
            (staging / "a.py").write_text("abc")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []


def test_the_converters_words_for_a_full_disk_are_recognised(tmp_path):
    from tasks.convert import converter_disk_full

    partial = tmp_path / f"{TEMP_PREFIX}base-f16.gguf.x1y2"
    partial.write_bytes(b"\0" * 2000)
    lines = [
        "INFO:hf-to-gguf:blk.0.attn_k.weight, torch.float16 --> F16, shape = {576, 192}",
        "Writing:   0%|          | 0.00/1.2G [00:00<?, ?byte/s]",
        "Traceback (most recent call last):",
        "OSError: [Errno 28] No space left on device",
    ]
    error = converter_disk_full("convert_hf_to_gguf.py", ["--outfile", str(partial), "model"], lines, 1_200_000_000)
    assert isinstance(error, NotEnoughDisk)
    assert str(error).startswith("step 'convert' ran out of disk space writing base-f16.gguf")
    assert "2.0 kB written" in str(error) and "it needs about 1.2 GB" in str(error)
