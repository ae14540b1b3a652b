"""The adapter as a GGUF LoRA: `convert_lora_to_gguf.py`, with peft's scale folded into lora_B where llama.cpp's differs."""

from __future__ import annotations

import hashlib
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tasks.adapter.records import (
    _LORA_RE,
    _PEFT_PREFIX,
    ADAPTER_CONFIG,
    AdapterIncompatible,
    AdapterInfo,
    AdapterModeUnsupported,
)
from tasks.adapter.stream_merge import _release
from tasks.adapter.validate import (
    _adapter_weights_file,
    _pattern_value,
    _safetensors_table,
    validate_adapter,
)
from tasks.convert import cached_build, gguf_cache_path, run_converter
from tasks.errors import ConversionFailed
from tasks.toolchain import Toolchain

# --------------------------------------------------------------------------------------------
# The adapter as a GGUF LoRA
# --------------------------------------------------------------------------------------------


def adapter_gguf_cache_path(info: AdapterInfo, base_dir: Path, toolchain: Toolchain, outtype: str = "f32") -> Path:
    """Cache entry of the GGUF LoRA: (adapter content, base config, outtype, toolchain)."""
    base_cfg = hashlib.sha256((Path(base_dir) / "config.json").read_bytes()).hexdigest()[:8]
    return gguf_cache_path(f"lora{info.sha256[:16]}-{base_cfg}", f"lora-{outtype}", toolchain)


def convert_adapter_to_gguf(
    adapter_dir: Path,
    base_dir: Path,
    toolchain: Toolchain,
    info: AdapterInfo | None = None,
    outtype: Literal["f32", "f16", "bf16", "q8_0"] = "f32",
    on_line: Callable[[str], None] | None = None,
) -> tuple[Path, bool]:
    """The adapter as a GGUF LoRA by the pinned `convert_lora_to_gguf.py`; returns (path, reused).

    Cached by (adapter sha256, base config, outtype, toolchain). Where peft's scale is not
    llama.cpp's alpha/r (rslora, alpha_pattern), a staged copy with the ratio folded into
    lora_B is converted instead, so the file means what peft means.
    """
    adapter_dir = Path(adapter_dir)
    base_dir = Path(base_dir)
    if info is None:
        info = validate_adapter(adapter_dir, base_dir)
    reason = info.unsupported.get("adapter")
    if reason:
        raise AdapterModeUnsupported(f"the adapter {adapter_dir} cannot become a GGUF LoRA: {reason}. Use --adapter-mode peft.")
    final = adapter_gguf_cache_path(info, base_dir, toolchain, outtype)

    def build(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="kiln-lora-") as staging_root:
            source = adapter_dir
            if info.needs_scale_fold:
                source = Path(staging_root) / "adapter"
                fold_scale_into_lora_b(adapter_dir, source, info)
            run_converter(
                "convert_lora_to_gguf.py",
                ["--outtype", outtype, "--base", str(base_dir), "--outfile", str(tmp), str(source)],
                toolchain,
                on_line,
            )
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise ConversionFailed(f"convert_lora_to_gguf.py exited cleanly but wrote nothing for {adapter_dir}")

    return cached_build(final, build)


_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
_ST_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


def _as_f32(raw: np.ndarray, dtype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    """Raw safetensors bytes (a uint8 array, e.g. a memory-mapped slice) as a new float32 array of `shape`.

    Exact for bf16, f16 and f32: the widening the converter does before it writes a tensor.
    """
    if dtype == "BF16":
        arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif dtype in _ST_DTYPES:
        arr = raw.view(_ST_DTYPES[dtype]).astype(np.float32)
    else:
        raise AdapterIncompatible(f"{where} has dtype {dtype}; expected a float type")
    return arr.reshape(shape)


def _st_tensor_f32(mm: np.memmap, data_start: int, name: str, meta: dict[str, Any], path: Path) -> np.ndarray:
    """One tensor of a memory-mapped safetensors file as float32; its pages are released after the copy."""
    start, end = (data_start + int(o) for o in meta["data_offsets"])
    arr = _as_f32(mm[start:end], meta["dtype"], tuple(meta["shape"]), f"{path}: tensor {name}")
    _release(mm, start, end - start)
    return arr


def _read_safetensors_f32(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as float32 numpy (bf16 included), without torch."""
    header, data_start = _safetensors_table(path)
    mm = np.memmap(path, mode="r")
    try:
        return {name: _st_tensor_f32(mm, data_start, name, meta, path) for name, meta in header.items()}
    finally:
        del mm


def _peft_scale(info: AdapterInfo, module: str, rank: int) -> float:
    """peft's scale for one module: alpha_i / r, or alpha_i / sqrt(r) with use_rslora (peft's LoraLayer)."""
    alpha_i = float(_pattern_value(info.alpha_pattern, module, info.alpha))
    return alpha_i / (math.sqrt(rank) if info.use_rslora else rank)


def fold_scale_into_lora_b(adapter_dir: Path, dest: Path, info: AdapterInfo) -> None:
    """Write a copy of the adapter whose lora_B carries peft's scale / llama.cpp's (alpha / r) scale.

    llama.cpp reads one alpha and each tensor's rank, so it can express alpha_i / r_i only for a
    single alpha, and never alpha / sqrt(r). Keeping the config's global lora_alpha and scaling
    lora_B by (peft scale) / (alpha / r_i) makes `alpha / r_i · B' @ A` equal peft's delta.
    """
    from safetensors.numpy import save_file

    weights = _adapter_weights_file(adapter_dir)
    if weights.suffix != ".safetensors":
        raise AdapterModeUnsupported(
            f"{weights}: an rslora/alpha_pattern adapter must be in safetensors form to be rescaled; "
            "re-save it with save_pretrained(safe_serialization=True), or use --adapter-mode peft"
        )
    tensors = _read_safetensors_f32(weights)
    for name in list(tensors):
        m = _LORA_RE.match(name.removeprefix(_PEFT_PREFIX))
        if not m or m["part"] not in ("lora_B", "lora_embedding_B"):
            continue
        r = tensors[name].shape[1]
        llama_scale = info.alpha / r
        tensors[name] = np.ascontiguousarray(tensors[name] * np.float32(_peft_scale(info, m["module"], r) / llama_scale))
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest / "adapter_model.safetensors"))
    shutil.copyfile(adapter_dir / ADAPTER_CONFIG, dest / ADAPTER_CONFIG)
    readme = adapter_dir / "README.md"
    if readme.is_file():
        shutil.copyfile(readme, dest / "README.md")
