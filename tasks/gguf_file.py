"""Every read of a GGUF file goes through here; so does the one copy Kiln writes with new metadata.

Names and value types are gguf-py's (`gguf.Keys`, `gguf.GGUFValueType`, `gguf.TokenType`,
`gguf.GGML_QUANT_SIZES`), pinned with the converter. Errors are one type, `GGUFFileError`.

Why not `gguf.GGUFReader` for the key/value section: it builds a numpy view for every
element of every array and every tensor before it returns. Measured with
`bench/gguf_read.py` on this machine: SmolLM2-135M (49,152 tokens) 1.8 s against 0.06 s
here; llama.cpp's Gemma-4 vocabulary GGUF (262,144 tokens) 20 s against 0.5 s. This module
reads the header once, sequentially, decoding only the keys asked for, and walks the tensor
table itself when a layout is wanted. tests/test_gguf_file.py holds it against GGUFReader.
`tensor_reader` hands out a GGUFReader where tensor data (numpy views) is wanted.
"""

from __future__ import annotations

import mmap
import os
import shutil
import struct
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import gguf
from gguf import GGUFValueType, Keys
from pydantic import BaseModel, ConfigDict, Field

from tasks.errors import KilnError


class GGUFFileError(KilnError):
    """A file that is not a GGUF Kiln can read (or write a copy of)."""


# struct formats of the scalar value types.
_SCALAR_FORMATS: Final[dict[GGUFValueType, str]] = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}

TOKENIZER_KEYS: Final = frozenset({
    Keys.Tokenizer.CHAT_TEMPLATE,
    Keys.Tokenizer.LIST,
    Keys.Tokenizer.TOKEN_TYPE,
    Keys.Tokenizer.BOS_ID,
    Keys.Tokenizer.EOS_ID,
    Keys.Tokenizer.EOT_ID,
    Keys.Tokenizer.EOM_ID,
    Keys.Tokenizer.ADD_BOS,
})


class TensorInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    shape: tuple[int, ...] = Field(description="dimensions as the file lists them (fastest-varying first)")
    ggml_type: int
    offset: int = Field(description="byte offset inside the data section")
    nbytes: int = Field(description="bytes the tensor's data takes (-1 for a type gguf-py does not know)")


class GGUFLayout(BaseModel):
    """Where everything lies in a GGUF file; enough to check extents or rewrite the metadata."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    byte_order: str = Field(description="'<' little-endian, '>' big-endian")
    version: int
    kv_start: int
    kv_end: int
    kv_count: int
    tensor_info_end: int
    alignment: int
    data_offset: int
    tensors: tuple[TensorInfo, ...]
    file_size: int


class _Cursor:
    """A position in a mapped GGUF, with the file's byte order."""

    def __init__(self, data: mmap.mmap, path: Path) -> None:
        self.data = data
        self.path = path
        self.pos = 0
        self.order = "<"

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from(self.order + fmt, self.data, self.pos)
        self.pos += struct.calcsize(self.order + fmt)
        return values

    def string(self, keep: bool = True) -> str | None:
        (length,) = self.unpack("Q")
        end = self.pos + length
        if end > len(self.data):
            raise struct.error(f"a string runs past the end of the file at byte {self.pos}")
        text = self.data[self.pos : end].decode("utf-8", errors="replace") if keep else None
        self.pos = end
        return text

    def value(self, kind: int, keep: bool) -> Any:
        if kind == GGUFValueType.STRING:
            return self.string(keep)
        if kind == GGUFValueType.ARRAY:
            item_kind, count = self.unpack("IQ")
            fmt = self.scalar_format(item_kind)
            if fmt is not None:
                size = struct.calcsize(fmt) * count
                if self.pos + size > len(self.data):
                    raise struct.error(f"an array runs past the end of the file at byte {self.pos}")
                items = list(struct.unpack_from(f"{self.order}{count}{fmt}", self.data, self.pos)) if keep else None
                self.pos += size
                return items
            if item_kind == GGUFValueType.STRING and keep:
                return [self.string() for _ in range(count)]
            out = [self.value(item_kind, keep) for _ in range(count)]
            return out if keep else None
        fmt = self.scalar_format(kind)
        assert fmt is not None
        (value,) = self.unpack(fmt)
        return value if keep else None

    def scalar_format(self, kind: int) -> str | None:
        """The struct format of a scalar type; None for STRING and ARRAY."""
        try:
            return _SCALAR_FORMATS.get(GGUFValueType(kind))
        except ValueError:
            raise GGUFFileError(f"{self.path}: unknown GGUF value type {kind} at byte {self.pos}") from None


def _open_header(cursor: _Cursor) -> tuple[int, int, int]:
    """Magic, byte order and counts; returns (version, tensor count, kv count)."""
    if cursor.data[:4] != b"GGUF":
        raise GGUFFileError(f"{cursor.path} is not a readable GGUF file: bad magic {bytes(cursor.data[:4])!r}")
    cursor.pos = 4
    (version,) = cursor.unpack("I")
    if version & 0xFFFF == 0:  # written big-endian
        cursor.order = ">"
        cursor.pos = 4
        (version,) = cursor.unpack("I")
    if version < 2:
        raise GGUFFileError(f"{cursor.path} is GGUF version {version}; Kiln reads version 2 and later")
    tensor_count, kv_count = cursor.unpack("QQ")
    return version, tensor_count, kv_count


@contextmanager
def _mapped(path: Path) -> Iterator[_Cursor]:
    """A cursor on the mapped file; every failure to read it becomes a GGUFFileError."""
    try:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                raise GGUFFileError(f"{path} is empty, not a GGUF file")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
                yield _Cursor(data, path)
    except OSError as exc:
        raise GGUFFileError(f"{path} is not a readable GGUF file: {exc.strerror or exc}") from None
    except (ValueError, struct.error) as exc:
        raise GGUFFileError(f"{path} is not a readable GGUF file: {exc}") from None


def read_metadata(path: Path, keys: Collection[str]) -> dict[str, Any]:
    """The values of `keys` (those present) from a GGUF file's key/value section.

    Strings come back as `str`, arrays as lists, scalars as Python numbers.
    """
    wanted = set(keys)
    with _mapped(Path(path)) as cursor:
        _, _, kv_count = _open_header(cursor)
        found: dict[str, Any] = {}
        for _ in range(kv_count):
            if len(found) == len(wanted):
                break
            key = cursor.string()
            (kind,) = cursor.unpack("I")
            value = cursor.value(kind, key in wanted)
            if key in wanted:
                found[str(key)] = value
        return found


def read_layout(path: Path) -> GGUFLayout:
    """The file's sections and tensor table (names, shapes, types, offsets, sizes), without reading data."""
    path = Path(path)
    with _mapped(path) as cursor:
        version, tensor_count, kv_count = _open_header(cursor)
        kv_start = cursor.pos
        alignment = gguf.GGUF_DEFAULT_ALIGNMENT
        for _ in range(kv_count):
            key = cursor.string()
            (kind,) = cursor.unpack("I")
            value = cursor.value(kind, key == Keys.General.ALIGNMENT)
            if key == Keys.General.ALIGNMENT and isinstance(value, int) and value > 0:
                alignment = value
        kv_end = cursor.pos
        tensors = []
        for _ in range(tensor_count):
            name = str(cursor.string())
            (n_dims,) = cursor.unpack("I")
            shape = cursor.unpack(f"{n_dims}Q") if n_dims else ()
            ggml_type, offset = cursor.unpack("IQ")
            tensors.append(TensorInfo(name=name, shape=tuple(shape), ggml_type=ggml_type, offset=offset,
                                      nbytes=_tensor_nbytes(tuple(shape), ggml_type)))
        tensor_info_end = cursor.pos
        data_offset = -(-tensor_info_end // alignment) * alignment
        return GGUFLayout(byte_order=cursor.order, version=version, kv_start=kv_start, kv_end=kv_end,
                          kv_count=kv_count, tensor_info_end=tensor_info_end, alignment=alignment,
                          data_offset=data_offset, tensors=tuple(tensors), file_size=len(cursor.data))


def _tensor_nbytes(shape: tuple[int, ...], ggml_type: int) -> int:
    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        return -1
    count = 1
    for dim in shape:
        count *= dim
    return count // block * type_size


def tensor_reader(path: Path) -> gguf.GGUFReader:
    """gguf-py's full reader (numpy views of every tensor); slow on large vocabularies, see above."""
    try:
        return gguf.GGUFReader(Path(path))
    except (OSError, ValueError, struct.error) as exc:
        raise GGUFFileError(f"{path} is not a readable GGUF file: {exc}") from None


# ---------------------------------------------------------------------------
# Tokenizer facts (what the Modelfile, the stops and the template check need)


class GGUFTokenizer(BaseModel):
    model_config = ConfigDict(frozen=True)

    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    eot_token: str | None
    eom_token: str | None
    add_bos_token: bool | None
    tokens: tuple[str, ...] | None = Field(description="the vocabulary, when read")
    special_tokens: tuple[str, ...] = Field(default=(), description="control and user-defined tokens")


def read_tokenizer(path: Path, *, with_vocabulary: bool = True) -> GGUFTokenizer:
    """The chat template, special tokens and (optionally) the vocabulary of a GGUF."""
    meta = read_metadata(path, TOKENIZER_KEYS)
    tokens_list: list[str] | None = meta.get(Keys.Tokenizer.LIST)

    def token(key: str) -> str | None:
        index = meta.get(key)
        if index is None or tokens_list is None or not 0 <= int(index) < len(tokens_list):
            return None
        return tokens_list[int(index)]

    special: tuple[str, ...] = ()
    types = meta.get(Keys.Tokenizer.TOKEN_TYPE)
    if tokens_list is not None and types is not None and len(types) == len(tokens_list):
        kinds = (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)
        special = tuple(tok for tok, kind in zip(tokens_list, types) if kind in kinds)
    add_bos = meta.get(Keys.Tokenizer.ADD_BOS)
    return GGUFTokenizer(
        chat_template=meta.get(Keys.Tokenizer.CHAT_TEMPLATE),
        bos_token=token(Keys.Tokenizer.BOS_ID),
        eos_token=token(Keys.Tokenizer.EOS_ID),
        eot_token=token(Keys.Tokenizer.EOT_ID),
        eom_token=token(Keys.Tokenizer.EOM_ID),
        add_bos_token=bool(add_bos) if add_bos is not None else None,
        tokens=tuple(tokens_list) if (with_vocabulary and tokens_list is not None) else None,
        special_tokens=special if with_vocabulary else (),
    )


def read_chat_template(path: Path) -> str | None:
    """`tokenizer.chat_template`, or None."""
    value = read_metadata(path, (Keys.Tokenizer.CHAT_TEMPLATE,)).get(Keys.Tokenizer.CHAT_TEMPLATE)
    return value if isinstance(value, str) else None


def read_file_type(path: Path) -> int | None:
    """`general.file_type` (a llama_ftype code), or None when the file does not say."""
    value = read_metadata(path, (Keys.General.FILE_TYPE,)).get(Keys.General.FILE_TYPE)
    return int(value) if value is not None else None


# ---------------------------------------------------------------------------
# Writing: a copy with some string keys set, streamed


def _encode_string_kv(key: str, value: str, order: str) -> bytes:
    k, v = key.encode("utf-8"), value.encode("utf-8")
    return (struct.pack(order + "Q", len(k)) + k + struct.pack(order + "I", int(GGUFValueType.STRING))
            + struct.pack(order + "Q", len(v)) + v)


def copy_with_string_metadata(source: Path, target: Path, updates: Mapping[str, str]) -> None:
    """Copy `source` to `target` with the string keys `updates` set (replaced or added).

    What llama.cpp's gguf_new_metadata.py does, without loading tensors: every other key/value
    entry and the tensor table are copied byte for byte, the data section is streamed after
    re-padding to the file's alignment (tensor offsets are relative to it, so they stay valid).
    `target` is written whole or not at all.
    """
    source, target = Path(source), Path(target)
    layout = read_layout(source)
    order = layout.byte_order
    entries: list[bytes] = []
    replaced: set[str] = set()
    with _mapped(source) as cursor:
        data = cursor.data
        cursor.order = order
        cursor.pos = layout.kv_start
        for _ in range(layout.kv_count):
            start = cursor.pos
            key = str(cursor.string())
            (kind,) = cursor.unpack("I")
            cursor.value(kind, keep=False)
            if key in updates:
                entries.append(_encode_string_kv(key, updates[key], order))
                replaced.add(key)
            else:
                entries.append(bytes(data[start : cursor.pos]))
        entries += [_encode_string_kv(k, v, order) for k, v in updates.items() if k not in replaced]
        header = b"GGUF" + struct.pack(order + "IQQ", layout.version, len(layout.tensors), len(entries))
        tensor_table = bytes(data[layout.kv_end : layout.tensor_info_end])
    head = header + b"".join(entries) + tensor_table
    head += b"\0" * (-len(head) % layout.alignment)
    partial = target.with_name(f".{target.name}.partial")
    try:
        with open(source, "rb") as src, open(partial, "wb") as out:
            out.write(head)
            src.seek(layout.data_offset)
            shutil.copyfileobj(src, out, 16 << 20)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
