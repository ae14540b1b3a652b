"""Source hashes remembered across commands (tasks/source_hashes.py): reused for the very file, never for a changed one."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tasks import source_hashes
from tasks.files import sha256_file


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    reads: list[Path] = []

    def counting(path: Path) -> str:
        reads.append(Path(path))
        return sha256_file(path)

    monkeypatch.setattr(source_hashes, "sha256_file", counting)
    return reads


def test_the_same_file_is_hashed_once(tmp_path: Path, counted: list[Path]) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 4096)
    first = source_hashes.remembered_sha256(weights)
    assert source_hashes.remembered_sha256(weights) == first == sha256_file(weights)
    assert counted == [weights]


def test_a_file_rewritten_with_its_old_size_and_mtime_is_hashed_again(tmp_path: Path, counted: list[Path]) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 4096)
    before = weights.stat()
    first = source_hashes.remembered_sha256(weights)
    time.sleep(0.01)
    weights.write_bytes(b"b" * 4096)  # same size; the mtime is set back below, the ctime cannot be
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    second = source_hashes.remembered_sha256(weights)
    assert second != first and second == sha256_file(weights)
    assert len(counted) == 2


def test_a_file_replaced_under_the_same_name_is_hashed_again(tmp_path: Path, counted: list[Path]) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 4096)
    source_hashes.remembered_sha256(weights)
    replacement = tmp_path / "new"
    replacement.write_bytes(b"c" * 4096)
    os.replace(replacement, weights)
    assert source_hashes.remembered_sha256(weights) == sha256_file(weights)
    assert len(counted) == 2


def test_a_damaged_record_is_ignored(tmp_path: Path, counted: list[Path]) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 4096)
    source_hashes.remembered_sha256(weights)
    source_hashes._record(weights).write_text("{not json")
    assert source_hashes.remembered_sha256(weights) == sha256_file(weights)
    assert len(counted) == 2
