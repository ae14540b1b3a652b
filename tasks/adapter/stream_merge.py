"""The streaming merge of a LoRA into a float GGUF, a few tensors in memory at a time."""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tasks import gguf_file
from tasks.adapter.records import _LORA_GGUF_SUFFIXES, MergeFailed
from tasks.files import (
    atomic_path,
)

# --------------------------------------------------------------------------------------------
# The streaming merge
#
# The merged file has the base's layout exactly: same metadata, same tensor infos and offsets
# (every merged tensor keeps its type and shape), only the adapted tensors' bytes differ. So
# header, metadata and tensor-info block are copied as raw bytes, unchanged tensors are copied
# by the kernel (copy_file_range), and each adapted tensor is computed from memory-mapped
# inputs and written in its place. The layout comes from `tasks.gguf_file`, which decodes only
# the keys asked for (gguf's GGUFReader turns every vocabulary string into numpy objects), and
# no GGUF writer re-encodes the metadata, which could only lose fidelity.
# --------------------------------------------------------------------------------------------

# Keys the merge and the layout learning read (the block count under every architecture's name, so
# one pass over the header finds it); the vocabulary arrays are skipped, never decoded.
_LAYOUT_KEYS = ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha",
                *(f"{arch}.block_count" for arch in gguf.MODEL_ARCH_NAMES.values()))


class GGUFTensorInfo(BaseModel):
    """One tensor as the merge addresses it: numpy's dimension order and an absolute file offset."""

    model_config = ConfigDict(frozen=True)

    name: str
    ne: tuple[int, ...] = Field(..., description="ggml dimensions, fastest first (numpy shape reversed)")
    ggml_type: int
    offset: int = Field(..., description="absolute file offset of the data")
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.ne))


class MergeLayout(BaseModel):
    """A GGUF file as the streaming merge sees it: the few metadata values it needs, tensors, size."""

    model_config = ConfigDict(frozen=True)

    metadata: dict[str, Any] = Field(..., description="general.architecture, general.type, adapter.*, <arch>.block_count")
    tensors: list[GGUFTensorInfo]
    file_size: int


def read_gguf_layout(path: Path) -> MergeLayout:
    """The tensor table (absolute offsets) and the metadata the merge needs, through `tasks.gguf_file`.

    Refused as `MergeFailed`: a big-endian file (the merge writes the base's bytes as they are, in
    little-endian arithmetic), a tensor type gguf-py does not know, a tensor past the end of the file.
    """
    path = Path(path)
    try:
        layout = gguf_file.read_layout(path)
        metadata = gguf_file.read_metadata(path, _LAYOUT_KEYS)
    except gguf_file.GGUFFileError as exc:
        raise MergeFailed(str(exc)) from None
    if layout.byte_order != "<":
        raise MergeFailed(f"{path}: a big-endian GGUF is not supported by the streaming merge")
    tensors = []
    for t in layout.tensors:
        if t.nbytes < 0:
            raise MergeFailed(f"{path}: tensor {t.name} has unknown ggml type {t.ggml_type}")
        start = layout.data_offset + t.offset
        if start + t.nbytes > layout.file_size:
            raise MergeFailed(f"{path} is truncated: tensor {t.name} ends past the end of the file")
        tensors.append(GGUFTensorInfo(name=t.name, ne=t.shape, ggml_type=t.ggml_type, offset=start, nbytes=t.nbytes))
    return MergeLayout(metadata=metadata, tensors=tensors, file_size=layout.file_size)


# The kernel maps pages around a faulting one too ("fault-around", 64 KiB by default), so pages of a
# neighbouring tensor become resident without being read; releases reach this far past each range.
_FAULT_AROUND = 256 * 1024


def _release(mm: np.memmap, offset: int, nbytes: int) -> None:
    """Drop a memory-mapped range (and its fault-around margin) from this process's resident set.

    The page cache keeps the pages; a later read of the same range simply maps them again. The
    kernel may also map pages well beyond the margin while it reads ahead of a sequential pass
    (large folios), so the readers here also map a file afresh for each tensor and let that
    mapping go with the tensor: whatever it mapped leaves with it.
    """
    raw = getattr(mm, "_mmap", None)
    if raw is None or nbytes <= 0 or not hasattr(raw, "madvise"):
        return
    start = max(0, offset - _FAULT_AROUND)
    start -= start % mmap.PAGESIZE
    end = min(offset + nbytes + _FAULT_AROUND, len(raw))
    try:
        raw.madvise(mmap.MADV_DONTNEED, start, end - start)
    except (OSError, ValueError):
        pass


def _tensor_f32(mm: np.memmap, info: GGUFTensorInfo) -> np.ndarray:
    """A (small) tensor as float32, e.g. a lora_a or lora_b."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType(info.ggml_type)
    raw = mm[info.offset: info.offset + info.nbytes]
    if qtype == GGMLQuantizationType.F32:
        return np.array(raw.view(np.float32).reshape(info.shape))
    if qtype == GGMLQuantizationType.F16:
        return raw.view(np.float16).reshape(info.shape).astype(np.float32)
    rows = math.prod(info.shape[:-1])
    return quants.dequantize(raw.reshape(rows, -1), qtype).reshape(info.shape).astype(np.float32, copy=False)


_ROW_CHUNK = 1024
# The base tensor types the merge reads and writes itself; a quantized base would be requantized.
_FLOAT_QTYPES = (0, 1, 30)  # GGMLQuantizationType F32, F16, BF16

# One adapted tensor's LoRA, in the converter's convention: lora_a [r, in], lora_b [out, r] (for
# token_embd, lora_a [n_vocab, r] and lora_b [n_embd, r]), float32, and the scale of `lora_b @ lora_a`.
LoraPair = tuple[np.ndarray, np.ndarray, float]


def _write_merged(out: Any, mm: np.memmap, info: GGUFTensorInfo, lora_a: np.ndarray, lora_b: np.ndarray,
                  scale: float, embedding: bool) -> None:
    """Write `W + scale · delta` for one base tensor, in its own type, a block of rows at a time."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType(info.ggml_type)
    if qtype not in _FLOAT_QTYPES:
        raise MergeFailed(
            f"{info.name} is {qtype.name} in the base GGUF; the streaming merge needs a float base "
            "(f32, f16 or bf16) and quantizes afterwards"
        )
    if len(info.shape) != 2:
        raise MergeFailed(f"{info.name}: LoRA on a {len(info.shape)}-D tensor is not supported by the streaming merge")
    rows, cols = info.shape
    rank = lora_b.shape[1]
    if embedding:  # token_embd: lora_a [n_vocab, r] (the converter transposes it), lora_b [n_embd, r]
        ok = lora_a.shape == (rows, rank) and lora_b.shape == (cols, rank)
    else:  # lora_a [r, in], lora_b [out, r]
        ok = lora_a.shape == (rank, cols) and lora_b.shape == (rows, rank)
    if not ok:
        raise MergeFailed(
            f"{info.name}: LoRA a{list(lora_a.shape)} b{list(lora_b.shape)} does not fit the base's [{rows}, {cols}]"
        )
    factor = np.float32(scale)
    if embedding:
        left, right = lora_a * factor, lora_b.T
    else:
        left, right = lora_b * factor, lora_a
    row_bytes = info.nbytes // rows
    for r0 in range(0, rows, _ROW_CHUNK):
        r1 = min(rows, r0 + _ROW_CHUNK)
        raw = mm[info.offset + r0 * row_bytes: info.offset + r1 * row_bytes]
        if qtype == GGMLQuantizationType.F16:
            w = raw.view(np.float16).reshape(r1 - r0, cols).astype(np.float32)
        elif qtype == GGMLQuantizationType.F32:
            w = raw.view(np.float32).reshape(r1 - r0, cols).copy()
        else:
            w = quants.dequantize(raw.reshape(r1 - r0, row_bytes), qtype)
        w += left[r0:r1] @ right
        if qtype == GGMLQuantizationType.F16:
            block = w.astype(np.float16)  # one rounding, to nearest even
        elif qtype == GGMLQuantizationType.F32:
            block = w
        else:
            block = quants.quantize(w, qtype)
        assert block.nbytes == (r1 - r0) * row_bytes
        out.write(memoryview(np.ascontiguousarray(block)).cast("B"))
        _release(mm, info.offset + r0 * row_bytes, (r1 - r0) * row_bytes)


def _copy_range(src: Any, dst: Any, start: int, length: int) -> None:
    """Copy `length` bytes of `src` from `start` to `dst`'s current position, in the kernel where possible."""
    dst.flush()
    src_fd, dst_fd = src.fileno(), dst.fileno()
    offset = start
    remaining = length
    if hasattr(os, "copy_file_range"):
        try:
            while remaining > 0:
                n = os.copy_file_range(src_fd, dst_fd, min(remaining, 1 << 30), offset)
                if n <= 0:
                    break
                offset += n
                remaining -= n
        except OSError:
            pass  # e.g. across file systems on old kernels: fall back to reads
    dst.seek(0, os.SEEK_END)
    while remaining > 0:
        chunk = os.pread(src_fd, min(remaining, 8 << 20), offset)
        if not chunk:
            raise MergeFailed("the base GGUF ended early while copying")
        dst.write(chunk)
        offset += len(chunk)
        remaining -= len(chunk)


def _stream_merge(
    base_gguf: Path,
    out_path: Path,
    loras: Mapping[str, Callable[[], LoraPair]],
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the base GGUF with `W + scale · lora_b @ lora_a` for each tensor `loras` names; returns `out_path`.

    `loras` maps a base tensor name to a loader of its `LoraPair`, called when the merge reaches
    that tensor, so only one pair is in memory at a time. The delta is computed in float32 from
    the memory-mapped base and rounded once to the tensor's type (`token_embd` takes
    `lora_a @ lora_b.T`, the converter's convention). Everything else is copied byte for byte.
    Peak memory is one block of rows plus one pair, whatever the model's size; the output is
    written under a temporary name and renamed when complete.
    """
    base_gguf, out_path = Path(base_gguf), Path(out_path)
    base = read_gguf_layout(base_gguf)
    base_by_name = {t.name: t for t in base.tensors}
    missing = sorted(n for n in loras if n not in base_by_name)
    if missing:
        raise MergeFailed(f"the LoRA adapts {', '.join(missing[:4])}, which the base GGUF {base_gguf.name} does not hold")
    adapted = sorted((base_by_name[n] for n in loras), key=lambda t: t.offset)
    with atomic_path(out_path) as tmp, open(base_gguf, "rb") as src, open(tmp, "wb") as out:
        cursor = 0
        for i, t in enumerate(adapted):
            _copy_range(src, out, cursor, t.offset - cursor)  # everything up to this tensor, as is
            lora_a, lora_b, scale = loras[t.name]()
            _write_merged(out, np.memmap(base_gguf, mode="r"), t, lora_a, lora_b, scale,
                          embedding=t.name.startswith("token_embd."))
            cursor = t.offset + t.nbytes
            if on_progress:
                on_progress(i + 1, len(adapted))
        _copy_range(src, out, cursor, base.file_size - cursor)
        out.flush()
        if out.tell() != base.file_size:
            raise MergeFailed(f"merged GGUF has {out.tell()} bytes, the base {base.file_size}: write failed")
    return out_path


def merge_lora_gguf(
    base_gguf: Path,
    lora_gguf: Path,
    out_path: Path,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Merge a GGUF LoRA into a float GGUF, tensor by tensor (`_stream_merge`); returns `out_path`.

    Each pair is scaled by llama.cpp's own rule, `alpha / r` with the file's single alpha and the
    tensor's rank (`alpha == 0`: 1), so the merged file says what the base plus the GGUF LoRA say
    in llama.cpp.
    """
    base_gguf, lora_gguf = Path(base_gguf), Path(lora_gguf)
    base = read_gguf_layout(base_gguf)
    lora = read_gguf_layout(lora_gguf)
    if lora.metadata.get("general.type") != "adapter" or lora.metadata.get("adapter.type") != "lora":
        raise MergeFailed(f"{lora_gguf} is not a GGUF LoRA adapter (general.type / adapter.type)")
    arch, lora_arch = base.metadata.get("general.architecture"), lora.metadata.get("general.architecture")
    if arch != lora_arch:
        raise MergeFailed(f"{lora_gguf} is a LoRA for architecture {lora_arch!r}, the base GGUF is {arch!r}")
    alpha = float(lora.metadata.get("adapter.lora.alpha") or 0.0)

    pairs: dict[str, dict[str, GGUFTensorInfo]] = {}
    for t in lora.tensors:
        suffix = next((s for s in _LORA_GGUF_SUFFIXES if t.name.endswith(s)), None)
        if suffix is None:
            raise MergeFailed(
                f"{lora_gguf} holds {t.name}, which is not a lora_a/lora_b tensor; the streaming merge "
                "applies LoRA pairs only (use --adapter-mode peft)"
            )
        pairs.setdefault(t.name[: -len(suffix)], {})[suffix] = t
    for name, pair in pairs.items():
        if len(pair) != 2:
            raise MergeFailed(f"{lora_gguf}: {name} lacks its {'lora_b' if '.lora_a' in pair else 'lora_a'}")

    def load(name: str) -> LoraPair:
        lora_mm = np.memmap(lora_gguf, mode="r")  # this pair's own mapping (see `_release`)
        lora_a, lora_b = _tensor_f32(lora_mm, pairs[name][".lora_a"]), _tensor_f32(lora_mm, pairs[name][".lora_b"])
        # llama.cpp: scale = alpha ? alpha / rank : 1, with rank = lora_b's ne[0].
        rank = lora_b.shape[-1]
        return lora_a, lora_b, (alpha / rank if alpha else 1.0)

    return _stream_merge(base_gguf, out_path, {name: (lambda n=name: load(n)) for name in pairs}, on_progress)
