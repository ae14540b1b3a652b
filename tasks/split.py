"""Split GGUF outputs (`--split-max-size`), with llama.cpp's own `llama-gguf-split`.

The semantics are gguf-split's (`--split --split-max-size N(M|G)`): the size is a whole number of
megabytes (10^6 bytes) or gigabytes (10^9); each shard is named `NAME-00001-of-0000N.gguf` and
holds at most N bytes of tensor data (the first shard also carries the metadata, the vocabulary
among it); llama.cpp loads the whole model given the first shard. A shard holds at least one
tensor, so N below the largest tensor is refused (gguf-split itself would write an empty shard).

Every step before placement works on single files in the cache (verify, report and the stop
proofs are unchanged); only the files placed in the output folder are split, and only those larger
than N: a file that fits stays whole under its usual name. The shards are a copy of the cached
file, which preflight's disk estimate counts (`split_extra_bytes`).

Ollama cannot import split GGUFs, so a split output has no Modelfile, and `--ollama-name` with
`--split-max-size` is refused by the request itself (registry/models.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tasks.errors import KilnError
from tasks.files import TEMP_PREFIX, safe_child
from tasks.units import human_size

_SIZE = re.compile(r"^([1-9][0-9]*)([MG])$")
_UNIT = {"M": 10**6, "G": 10**9}
# gguf-split pads every tensor to this before it compares a shard's size with N.
_ALIGNMENT = 32


class SplitSizeInvalid(KilnError):
    """A `--split-max-size` that gguf-split would refuse, or that no shard can keep to."""


class SplitFailed(KilnError):
    """llama-gguf-split failed; the message carries what it said."""


def parse_split_size(text: str) -> int:
    """`500M` → 500 000 000 bytes, as gguf-split reads it (M and G only, a whole number above zero)."""
    match = _SIZE.match(str(text).strip().upper())
    if not match:
        raise SplitSizeInvalid(f"--split-max-size {text!r}: write it as llama.cpp's gguf-split does, a whole number "
                               "of megabytes or gigabytes above zero, e.g. 500M or 2G")
    return int(match.group(1)) * _UNIT[match.group(2)]


def normal_split_size(text: str) -> str:
    """The size as gguf-split is given it (`500m` → `500M`)."""
    parse_split_size(text)
    return str(text).strip().upper()


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGNMENT) * _ALIGNMENT


def smallest_split_size(largest_tensor: int) -> str:
    """The smallest `--split-max-size` a tensor of `largest_tensor` bytes fits, in gguf-split's units."""
    megabytes = -(-_padded(largest_tensor) // 10**6)
    return f"{megabytes}M"


def check_split_fits(max_size: str, largest_tensor: int, what: str) -> None:
    """Refuse a split size below the largest tensor (`what` names the tensor and its file, or the estimate)."""
    if _padded(largest_tensor) > parse_split_size(max_size):
        raise SplitSizeInvalid(
            f"--split-max-size {max_size} is smaller than the largest tensor ({what}, {human_size(largest_tensor)}), "
            f"and a shard holds at least one tensor; give at least {smallest_split_size(largest_tensor)}")


def largest_tensor(path: Path) -> tuple[str, int]:
    """The name and byte size of a GGUF's largest tensor, from its tensor table."""
    from tasks.gguf_file import read_layout

    tensors = [t for t in read_layout(path).tensors if t.nbytes >= 0]
    if not tensors:
        return "", 0
    biggest = max(tensors, key=lambda t: t.nbytes)
    return biggest.name, biggest.nbytes


def will_split(size: int, max_size: str | None) -> bool:
    """Whether an output of `size` bytes is split (larger than the limit) or kept whole."""
    return max_size is not None and size > parse_split_size(max_size)


def split_extra_bytes(sizes: Iterable[int], max_size: str | None) -> int:
    """Disk the shards take beside the cache: a copy of every output that is split."""
    return sum(s for s in sizes if will_split(s, max_size))


def shard_pattern(stem: str) -> re.Pattern[str]:
    return re.compile(re.escape(stem) + r"-(\d{5})-of-(\d{5})\.gguf")


def remove_shards(out_dir: Path, stem: str) -> None:
    """Shards of `stem` an earlier export left (another split size, or a file now kept whole)."""
    pattern = shard_pattern(stem)
    if out_dir.is_dir():
        for path in out_dir.iterdir():
            if pattern.fullmatch(path.name):
                path.unlink(missing_ok=True)


def split_gguf(path: Path, max_size: str) -> list[Path]:
    """Split `path` into `<stem>-0000i-of-0000n.gguf` beside it with llama-gguf-split; the whole file is removed.

    The shards are written in a temporary folder in the output folder and moved to their final
    names once all are complete, so a killed run leaves no partial shard under a final name.
    Returns the shards in order.
    """
    from tasks.llama_tools import llama_tool

    name, biggest = largest_tensor(path)
    check_split_fits(max_size, biggest, f"{name} of {path.name}")
    tool = llama_tool("llama-gguf-split")
    out_dir, stem = path.parent, path.name.removesuffix(".gguf")
    remove_shards(out_dir, stem)
    with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{stem}-split.", dir=out_dir) as work:
        run = subprocess.run([str(tool), "--split", "--split-max-size", max_size, str(path), str(Path(work) / stem)],
                             capture_output=True, text=True)
        if run.returncode != 0:
            from tasks.files import disk_full

            said = (run.stderr.strip() or run.stdout.strip()).splitlines()[-1:] or ["no output"]
            # gguf-split reports a full disk only as a failed write; the free space tells.
            free = os.statvfs(work)
            if free.f_bavail * free.f_frsize < path.stat().st_size:
                raise disk_full(path, step="outputs", need=path.stat().st_size, cause=said[0]) from None
            raise SplitFailed(f"llama-gguf-split could not split {path.name} (exit {run.returncode}): {said[0]}")
        pattern = shard_pattern(stem)
        shards = sorted(p for p in Path(work).iterdir() if pattern.fullmatch(p.name))
        if not shards:
            raise SplitFailed(f"llama-gguf-split wrote no shards of {path.name}")
        placed = []
        for shard in shards:
            os.chmod(shard, 0o644)
            final = safe_child(out_dir, shard.name)
            os.replace(shard, final)
            placed.append(final)
    path.unlink()
    return placed


def check_split_for_config(max_size: str | None, config: dict, outtype: str) -> None:
    """Preflight's refusal of a split size below the float output's largest tensor, from config.json's shape.

    The float GGUF is the largest output and holds the widest matrix (the embedding or a
    feed-forward one) in `outtype`; the outputs step checks every file's real tensors again.
    """
    if max_size is None:
        return
    hidden = int(config.get("hidden_size") or config.get("n_embd") or 0)
    wide = max(int(config.get("vocab_size") or 0), int(config.get("intermediate_size") or 0))
    if hidden and wide:
        nbytes = hidden * wide * {"f32": 4}.get(outtype, 2)
        check_split_fits(max_size, nbytes, f"the {outtype} {hidden} x {wide} matrix config.json implies")
