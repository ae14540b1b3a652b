"""Merging a peft adapter without the converter: the layout read off the base's own conversion."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tasks.adapter.lora_gguf import _ST_ITEMSIZE, _as_f32, _peft_scale, _st_tensor_f32
from tasks.adapter.records import (
    _LORA_RE,
    _PEFT_PREFIX,
    AdapterInfo,
    LoraLayoutUnknown,
    MergeFailed,
)
from tasks.adapter.stream_merge import (
    _FLOAT_QTYPES,
    _ROW_CHUNK,
    GGUFTensorInfo,
    LoraPair,
    _release,
    _stream_merge,
    read_gguf_layout,
)
from tasks.adapter.validate import (
    _adapter_weights_file,
    _safetensors_table,
    validate_adapter,
)
from tasks.files import (
    cache_dir,
    read_json_object,
    write_text_atomic,
)

# --------------------------------------------------------------------------------------------
# Merging a peft adapter without the converter
#
# The converter's naming and row permutations still govern the merge; they are read off its own
# output for this base instead of being re-derived. The base GGUF was written by the pinned
# converter from the base folder's weights, so for each HF weight an adapter targets it holds a
# tensor whose rows are the HF rows, permuted or not: `W_gguf = W_hf[perm]`. The converter treats
# lora_B's rows (the output dimension) exactly as it treats the weight's, so the delta in GGUF
# space is `B[perm] @ A`. The candidate name comes from gguf-py's tensor name map (the table the
# converter maps names with), and the data decides: the HF tensor, cast to the GGUF tensor's type
# as the converter casts it, must equal the GGUF tensor byte for byte, either as is or row for
# row under one permutation. Anything else (a tensor the converter splits, fuses, transposes or
# rescales; a name the map lacks; duplicate rows that leave the permutation open) is
# `LoraLayoutUnknown`, and the converter runs after all.
# --------------------------------------------------------------------------------------------


class LoraTarget(BaseModel):
    """Where one HF weight sits in the base GGUF."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gguf_name: str
    perm: list[int] | None = Field(None, description="GGUF row i is HF row perm[i]; None: the rows are in HF order.")


class LoraLayout(BaseModel):
    """HF weight name -> its GGUF tensor, learned from one base GGUF and verified against its bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_gguf: str = Field(..., description="The base GGUF's file name (a cache entry's name: content, outtype, toolchain).")
    base_size: int
    base_mtime_ns: int
    targets: dict[str, LoraTarget]


def lora_layout_cache_path(base_gguf: Path, hf_weight_names: Iterable[str]) -> Path:
    """The cached layout of (base GGUF, set of HF weights); the base's cache name already names its content."""
    digest = hashlib.sha256("\n".join(sorted(set(hf_weight_names))).encode()).hexdigest()[:16]
    return cache_dir() / "lora-layout" / f"{Path(base_gguf).name}-{digest}.json"


def learn_lora_layout(base_dir: Path, base_gguf: Path, hf_weight_names: Iterable[str]) -> LoraLayout:
    """Where each HF weight of `base_dir` went in `base_gguf` (its name and row order), verified by data.

    Raises `LoraLayoutUnknown` naming the weight that cannot be placed. Reads one tensor at a time,
    memory-mapped and released as it goes. Cached as JSON per (base GGUF, weight names).
    """
    base_dir, base_gguf = Path(base_dir), Path(base_gguf)
    names = sorted(set(hf_weight_names))
    cache = lora_layout_cache_path(base_gguf, names)
    stat = base_gguf.stat()
    if cache.is_file():
        try:
            cached = LoraLayout.model_validate_json(cache.read_text(encoding="utf-8"))
        except ValueError:
            cached = None  # a damaged entry is learned again
        if (cached is not None and sorted(cached.targets) == names
                and (cached.base_size, cached.base_mtime_ns) == (stat.st_size, stat.st_mtime_ns)):
            return cached

    import gguf

    base = read_gguf_layout(base_gguf)
    arch_name = base.metadata.get("general.architecture")
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch_name)
    block_count = base.metadata.get(f"{arch_name}.block_count")
    if arch is None or not isinstance(block_count, int):
        raise LoraLayoutUnknown(
            f"{base_gguf.name}: architecture {arch_name!r} with block_count {block_count!r} is not in gguf-py's tensor map"
        )
    name_map = gguf.get_tensor_name_map(arch, block_count)
    base_by_name = {t.name: t for t in base.tensors}
    tables = _safetensors_tables(base_dir)
    targets: dict[str, LoraTarget] = {}
    for name in names:
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise LoraLayoutUnknown(f"{name}: gguf-py's {arch_name} tensor map has no GGUF name for it")
        if gguf_name not in base_by_name:
            raise LoraLayoutUnknown(f"{name}: the base GGUF {base_gguf.name} holds no {gguf_name}")
        if name not in tables:
            raise LoraLayoutUnknown(f"{name}: no safetensors file in {base_dir} holds it")
        path, data_start, meta = tables[name]
        # Each tensor on its own mappings of both files (see `_release`).
        perm = _learn_rows(f"{name} -> {gguf_name}", np.memmap(path, mode="r"), data_start, meta,
                           np.memmap(base_gguf, mode="r"), base_by_name[gguf_name])
        targets[name] = LoraTarget(gguf_name=gguf_name, perm=perm)
    seen: dict[str, str] = {}
    for name, target in targets.items():
        if target.gguf_name in seen:  # e.g. a tensor the converter shares between two weights
            raise LoraLayoutUnknown(f"{name} and {seen[target.gguf_name]} both map to {target.gguf_name}")
        seen[target.gguf_name] = name
    layout = LoraLayout(base_gguf=base_gguf.name, base_size=stat.st_size, base_mtime_ns=stat.st_mtime_ns, targets=targets)
    write_text_atomic(cache, layout.model_dump_json(exclude_defaults=True))
    return layout


def _safetensors_tables(base_dir: Path) -> dict[str, tuple[Path, int, dict[str, Any]]]:
    """HF weight name -> (safetensors file, its data start, the tensor's header entry), over every shard."""
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, LoraLayoutUnknown, "the converter reads the base instead").get("weight_map") or {}
        shards = [base_dir / str(n) for n in sorted(set(weight_map.values()))]
    else:
        shards = sorted(base_dir.glob("*.safetensors"))
    tables: dict[str, tuple[Path, int, dict[str, Any]]] = {}
    for shard in shards:
        if not shard.is_file():
            raise LoraLayoutUnknown(f"{base_dir}: the shard {shard.name} the index names is missing")
        header, data_start = _safetensors_table(shard)
        tables.update({name: (shard, data_start, meta) for name, meta in header.items()})
    return tables


def _learn_rows(label: str, st_mm: np.memmap, data_start: int, meta: dict[str, Any], base_mm: np.memmap,
                info: GGUFTensorInfo) -> list[int] | None:
    """The row permutation that takes the HF tensor to the GGUF one (None: identity), checked byte for byte.

    The HF rows are cast to the GGUF tensor's type the way the converter casts them, a block at a
    time, so both sides compare as bytes: kept as they are where the types agree (the converter
    hands f16 and f32 to numpy unchanged), else widened to float32 and put through gguf-py's
    `quants.quantize`.
    """
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType(info.ggml_type)
    if qtype not in _FLOAT_QTYPES:
        raise LoraLayoutUnknown(f"{label}: the base GGUF stores it as {qtype.name}, not a float type")
    shape = tuple(int(d) for d in meta["shape"])
    if len(shape) != 2:
        raise LoraLayoutUnknown(f"{label}: a {len(shape)}-D tensor")
    if shape != info.shape:
        raise LoraLayoutUnknown(f"{label}: shape {list(shape)} in the base folder, {list(info.shape)} in the base GGUF")
    dtype = meta["dtype"]
    if dtype not in _ST_ITEMSIZE:
        raise LoraLayoutUnknown(f"{label}: the base folder stores it as {dtype}, not a float type")
    rows, cols = shape
    src_start = data_start + int(meta["data_offsets"][0])
    src_row = cols * _ST_ITEMSIZE[dtype]
    dst_row = info.nbytes // rows

    same_type = (dtype, qtype) in (("F16", GGMLQuantizationType.F16), ("F32", GGMLQuantizationType.F32))

    def hf_block(r0: int, r1: int) -> np.ndarray:
        start = src_start + r0 * src_row
        raw = st_mm[start: start + (r1 - r0) * src_row]
        if same_type:
            block = np.array(raw).reshape(r1 - r0, dst_row)
        else:
            x = quants.quantize(_as_f32(raw, dtype, (r1 - r0, cols), label), qtype)
            block = np.ascontiguousarray(x).view(np.uint8).reshape(r1 - r0, dst_row)
        _release(st_mm, start, (r1 - r0) * src_row)
        return block

    def gguf_block(r0: int, r1: int) -> np.ndarray:
        """A copy, so the mapped pages can go at once."""
        start = info.offset + r0 * dst_row
        block = np.array(base_mm[start: start + (r1 - r0) * dst_row]).reshape(r1 - r0, dst_row)
        _release(base_mm, start, (r1 - r0) * dst_row)
        return block

    spans = [(r0, min(rows, r0 + _ROW_CHUNK)) for r0 in range(0, rows, _ROW_CHUNK)]
    if all(np.array_equal(hf_block(r0, r1), gguf_block(r0, r1)) for r0, r1 in spans):
        return None
    # Not in HF order: each GGUF row must be exactly one HF row, each HF row used once.
    hf_rows: dict[bytes, int] = {}
    for r0, r1 in spans:
        for i, row in enumerate(hf_block(r0, r1), start=r0):
            first = hf_rows.setdefault(row.tobytes(), i)
            if first != i:
                raise LoraLayoutUnknown(f"{label}: HF rows {first} and {i} are equal, so the row order is ambiguous")
    perm: list[int] = []
    for r0, r1 in spans:
        for i, row in enumerate(gguf_block(r0, r1), start=r0):
            j = hf_rows.pop(row.tobytes(), None)
            if j is None:
                raise LoraLayoutUnknown(f"{label}: GGUF row {i} is no row of the HF tensor (not a row permutation)")
            perm.append(j)
    return perm


def merge_peft_adapter(
    adapter_dir: Path,
    base_dir: Path,
    base_gguf: Path,
    out_path: Path,
    info: AdapterInfo | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Merge a peft LoRA adapter straight into the base's float GGUF (`_stream_merge`); returns `out_path`.

    Names and lora_B row orders come from `learn_lora_layout`; each module gets peft's own scale
    (`alpha_i / r`, or `alpha_i / sqrt(r)` with use_rslora). The adapter's safetensors are read
    memory-mapped, one pair at a time. Raises `LoraLayoutUnknown` (before writing anything) for
    what this path does not carry: a legacy .bin adapter, embedding LoRA, whole tensors, or a
    base whose conversion cannot be read back.
    """
    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    if info is None:
        info = validate_adapter(adapter_dir, base_dir)
    info.check_mode("merge")
    if info.full_tensors or info.modules_to_save or info.vocab_resized:
        raise LoraLayoutUnknown(f"the adapter brings whole tensors ({', '.join(info.full_tensors[:4]) or 'modules_to_save'})")
    weights = _adapter_weights_file(adapter_dir)
    if weights.suffix != ".safetensors":
        raise LoraLayoutUnknown(f"{weights.name} is a torch pickle, which only torch reads")
    header, data_start = _safetensors_table(weights)
    modules: dict[str, dict[str, str]] = {}
    for name in header:
        m = _LORA_RE.match(name.removeprefix(_PEFT_PREFIX))
        if m is None:
            raise LoraLayoutUnknown(f"{weights.name} holds {name}, which is not a lora_A/lora_B tensor")
        if m["part"] not in ("lora_A", "lora_B"):
            raise LoraLayoutUnknown(f"{name}: embedding LoRA, which the converter transposes its own way")
        modules.setdefault(m["module"], {})[m["part"]] = name
    layout = learn_lora_layout(base_dir, base_gguf, [f"{module}.weight" for module in modules])

    def load(module: str) -> LoraPair:
        parts = modules[module]
        mm = np.memmap(weights, mode="r")  # this pair's own mapping (see `_release`)
        lora_a, lora_b = (_st_tensor_f32(mm, data_start, parts[p], header[parts[p]], weights) for p in ("lora_A", "lora_B"))
        perm = layout.targets[f"{module}.weight"].perm
        if perm is not None:
            if len(perm) != lora_b.shape[0]:
                raise MergeFailed(f"{module}: lora_B has {lora_b.shape[0]} rows, the learned layout {len(perm)}")
            lora_b = lora_b[np.asarray(perm)]
        return lora_a, lora_b, _peft_scale(info, module, lora_b.shape[1])

    loras = {layout.targets[f"{module}.weight"].gguf_name: (lambda m=module: load(m)) for module in modules}
    return _stream_merge(base_gguf, out_path, loras, on_progress)
