"""File plumbing every step shares: the cache folder, hashing, atomic writes.

Every step writes under a temporary name in the final folder and renames when
complete, so a killed run never leaves a half-written file under a final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tasks.errors import OutputDirInvalid

TEMP_PREFIX = ".kiln-tmp-"
_HASH_CHUNK = 8 * 1024 * 1024


def cache_dir() -> Path:
    """`KILN_CACHE_DIR`, else the user's cache folder (`$XDG_CACHE_HOME/kiln` or `~/.cache/kiln`)."""
    explicit = os.environ.get("KILN_CACHE_DIR")
    if explicit:
        root = Path(explicit).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "kiln"
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds.

    The temporary name starts with `TEMP_PREFIX`, so leftovers of a killed run are
    recognisable and `remove_stale_temporaries` can sweep them.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{final.name}.", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; outputs are meant to be read by others (Ollama, workers).
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Like `atomic_path`, for a folder built in place and renamed when complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{final.name}.", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(final: Path, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete temporaries a killed run left in `folder`; return what was removed."""
    removed = []
    if folder.is_dir():
        for leftover in folder.glob(f"{TEMP_PREFIX}*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


def safe_child(folder: Path, name: str) -> Path:
    """`folder / name`, refusing a name that is absolute or climbs out of `folder`."""
    candidate = Path(name)
    resolved_folder = folder.resolve()
    resolved = (resolved_folder / candidate).resolve()
    if candidate.is_absolute() or not resolved.is_relative_to(resolved_folder):
        raise OutputDirInvalid(f"path {name!r} escapes its folder {folder}; use a plain relative name")
    return resolved
