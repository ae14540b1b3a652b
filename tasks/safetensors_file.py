"""Every read of a `.safetensors` header goes through here; tensor data is left to the callers' mappings.

The format: an 8-byte little-endian header length, a JSON object (tensor name -> dtype, shape,
data_offsets; plus an optional `__metadata__`), then the data, whose offsets count from the end of
the header. Reading the header alone tells shapes and sizes without touching a weight, and tells
whether the file is whole: the last tensor must end exactly where the file does.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, ConfigDict

from tasks.errors import KilnError

# No real header comes near this; a larger length means the file is not safetensors (or damaged).
MAX_HEADER_BYTES: Final[int] = 512 * 1024 * 1024


class SafetensorsFileError(KilnError):
    """A file whose safetensors header cannot be read, or whose size disagrees with it."""


class SafetensorsHeader(BaseModel):
    """A safetensors file's tensor table and where its data starts."""

    model_config = ConfigDict(frozen=True)

    tensors: dict[str, dict[str, Any]]
    data_start: int
    file_size: int

    @property
    def data_end(self) -> int:
        """Where the last tensor ends, as the header says (a whole file ends exactly there)."""
        return self.data_start + max((info["data_offsets"][1] for info in self.tensors.values()), default=0)


def read_header(path: Path) -> SafetensorsHeader:
    """The tensor table of `path`, from its header only; every tensor's data_offsets checked for shape.

    Raises:
        SafetensorsFileError: too short, a header length past the file, a header that is not a JSON
            object, or a tensor without a valid `[start, end]` pair of offsets.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise SafetensorsFileError(f"{path}: {size} bytes, too short to be a safetensors file (truncated)")
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise SafetensorsFileError(f"{path}: header length {length} exceeds the file's {size} bytes "
                                           "(truncated, or not a safetensors file)")
            raw = fh.read(length)
    except OSError as exc:
        raise SafetensorsFileError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        table = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise SafetensorsFileError(f"{path}: the safetensors header is not valid JSON (corrupt file)") from None
    if not isinstance(table, dict):
        raise SafetensorsFileError(f"{path}: the safetensors header is not a JSON object (corrupt file)")
    table.pop("__metadata__", None)
    for name, info in table.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise SafetensorsFileError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r} (corrupt file)")
    return SafetensorsHeader(tensors=table, data_start=8 + length, file_size=size)


def check_whole(header: SafetensorsHeader, path: Path) -> None:
    """Refuse a file shorter or longer than its header describes (a cut download, a damaged copy)."""
    if header.file_size < header.data_end:
        raise SafetensorsFileError(f"{path}: truncated: its header describes {header.data_end} bytes but the file has "
                                   f"{header.file_size}; delete it and download again")
    if header.file_size > header.data_end:
        raise SafetensorsFileError(f"{path}: {header.file_size - header.data_end} bytes past the end its header "
                                   "describes (corrupt file)")
