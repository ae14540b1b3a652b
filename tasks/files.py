"""File plumbing every step shares: the cache folder, hashing, atomic writes.

Every step writes under a temporary name in the final folder and renames when
complete, so a killed run never leaves a half-written file under a final name.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tasks import settings
from tasks.errors import KilnError, NotEnoughDisk, OutputDirInvalid
from tasks.units import human_size

if TYPE_CHECKING:  # registry.models imports this module (through tasks.toolchain)
    from registry.models import SourceFile

TEMP_PREFIX = ".kiln-tmp-"
# A write that fails with one of these failed for want of space (bytes, inodes or quota), not for a bug.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def cache_dir() -> Path:
    """Kiln's cache folder (`tasks.settings.cache_root`), created on first use."""
    root = settings.cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return root


def content_key(files: Iterable[SourceFile]) -> str:
    """A short key for a set of source files: equal content gives an equal key, wherever the folder is."""
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path):
        digest.update(f"{f.path}\0{f.sha256}\n".encode())
    return digest.hexdigest()[:16]


def path_cache_key(prefix: str, *paths: Path) -> str:
    """A Prefect cache key naming whole paths: a run with another KILN_CACHE_DIR must not get this cache's entries."""
    digest = hashlib.sha256("\0".join(str(p) for p in paths).encode()).hexdigest()[:24]
    return f"{prefix}-{paths[0].name}-{digest}"


def sha256_file(path: Path) -> str:
    # file_digest reads into one reused buffer; a fresh bytes object a chunk costs page faults
    # on every chunk, which on these machines is a large share of hashing a GGUF.
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_disk_full(exc: BaseException) -> bool:
    """True for an `OSError` that says the disk (or the quota, or the inode table) is full."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def _written(tmp: Path) -> int:
    """Bytes under a temporary file or folder so far (0 when it is gone)."""
    try:
        if tmp.is_dir():
            return sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        return tmp.stat().st_size
    except OSError:
        return 0


def disk_full(final: Path, *, step: str | None = None, written: int = 0, need: int | None = None,
              cause: str | None = None) -> NotEnoughDisk:
    """The error for a write of `final` that ran out of space: which step, which file, how much, what to do."""
    folder = final.parent
    name = final.name
    if name.startswith(TEMP_PREFIX):  # a temporary of ours: name the file it was becoming
        name = name[len(TEMP_PREFIX):].rsplit(".", 1)[0]
    free, no_inodes = None, False
    with contextlib.suppress(OSError):
        stats = os.statvfs(folder)
        free = stats.f_bavail * stats.f_frsize
        no_inodes = stats.f_files > 0 and stats.f_favail == 0
    what = f"step {step!r}" if step else "a write"
    parts = [f"{what} ran out of disk space writing {name} in {folder}: {human_size(written)} written"]
    if need:
        parts.append(f"it needs about {human_size(need)}")
    if free is not None:
        parts.append(f"{human_size(free)} free" + (" and no free inodes (files) left" if no_inodes else ""))
    message = "; ".join(parts)
    if cause:
        message += f" ({cause})"
    return NotEnoughDisk(
        f"{message}. The partial file was removed, so nothing is left under a final name. Free space, or "
        "point --out / KILN_CACHE_DIR at a larger disk, and run again: completed steps are reused."
    )


@contextlib.contextmanager
def atomic_path(final: Path, *, step: str | None = None, need: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds.

    The temporary name starts with `TEMP_PREFIX`, so leftovers of a killed run are
    recognisable and `remove_stale_temporaries` can sweep them. A write that runs out
    of space (ENOSPC/EDQUOT) becomes `NotEnoughDisk` naming `step`, the file, the bytes
    written so far, `need` (when the caller knows it) and the space left.
    """
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{final.name}.", dir=final.parent)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(final, step=step, need=need, cause=exc.strerror) from None
        raise
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; outputs are meant to be read by others (Ollama, workers).
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
        # rename(2) does nothing when both names are hard links to one file (an output
        # placed again from the cache entry it already is): the temporary name stays.
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    except BaseException as exc:
        written = _written(tmp)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if is_disk_full(exc):
            raise disk_full(final, step=step, written=written, need=need, cause=exc.strerror) from None
        raise


@contextlib.contextmanager
def atomic_dir(final: Path, *, step: str | None = None, need: int | None = None) -> Iterator[Path]:
    """Like `atomic_path`, for a folder built in place and renamed when complete."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{final.name}.", dir=final.parent))
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(final, step=step, need=need, cause=exc.strerror) from None
        raise
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as exc:
        written = _written(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            raise disk_full(final, step=step, written=written, need=need, cause=exc.strerror) from None
        raise


def write_text_atomic(final: Path, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def remove_stale_temporaries(folder: Path, name: str | None = None) -> list[Path]:
    """Delete temporaries a killed run left in `folder` (only those of the final file `name`, when given).

    Call it only while holding the lock that every writer of those names holds:
    a temporary in use by a live writer looks the same as a killed one's.
    """
    removed = []
    if folder.is_dir():
        pattern = f"{TEMP_PREFIX}{glob.escape(name)}.*" if name else f"{TEMP_PREFIX}*"
        for leftover in folder.glob(pattern):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


def read_json_object(path: Path, error: type[KilnError], fix: str) -> dict:
    """A JSON file that must hold an object; anything else raises `error` naming the file and `fix`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object; {fix}")
    return data


def safe_child(folder: Path, name: str) -> Path:
    """`folder / name`, refusing a name that is absolute or climbs out of `folder`."""
    candidate = Path(name)
    resolved_folder = folder.resolve()
    resolved = (resolved_folder / candidate).resolve()
    if candidate.is_absolute() or not resolved.is_relative_to(resolved_folder):
        raise OutputDirInvalid(f"path {name!r} escapes its folder {folder}; use a plain relative name")
    return resolved
