"""sha256 of source files, remembered across commands by the file's identity.

A second export of the same weights (into another folder, a batch item on the same base, an
export after --force) would otherwise read every shard again before conversion can start: at 8B
that is 16 GB. The identity is the device, inode, size, mtime and ctime: any write to the file,
or any change of its times, moves the ctime, which nothing can set back (the bargain git's index
makes, with the ctime added). Kept in Kiln's cache under `hashes/`, one small file per path.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from tasks.files import cache_dir, sha256_file, sha256_text, write_text_atomic


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _record(path: Path) -> Path:
    return cache_dir() / "hashes" / f"{sha256_text(str(path.resolve()))[:32]}.json"


def remembered_sha256(path: Path) -> str:
    """`sha256_file(path)`, read from the cache when the file is the very one hashed before."""
    record = _record(path)
    identity = _identity(path)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(record.read_text())
        if saved["identity"] == identity and len(saved["sha256"]) == 64:
            return str(saved["sha256"])
    digest = sha256_file(path)
    if _identity(path) == identity:  # not written while it was read
        with contextlib.suppress(OSError):
            record.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(record, json.dumps({"path": str(path.resolve()), "identity": identity,
                                                  "sha256": digest}))
    return digest
