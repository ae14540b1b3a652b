"""LoRA adapters: validate against the base, then merge by streaming, ship as a GGUF LoRA, or merge with peft.

Three modes (`AdapterMode`):

- `merge` (default): `W + scale · B @ A` is streamed into a copy of the base's cached float GGUF,
  one tensor at a time from memory-mapped inputs (peak memory: a few tensors). The LoRA must land
  on the GGUF tensors exactly as llama.cpp's converter would put it: under the converter's names,
  with lora_B's rows permuted the way it permutes the base's (llama's Q/K). Both are read off the
  converter's own output for this base (`learn_lora_layout`): each adapted HF weight is found in
  the base GGUF by gguf-py's name map and verified row by row against its bytes there, and the
  peft adapter is merged from its safetensors directly (`merge_peft_adapter`). Only where that
  cannot be learned (`LoraLayoutUnknown`) does the pinned `convert_lora_to_gguf.py` run, and its
  GGUF LoRA is merged instead (`merge_lora_gguf`): it imports torch, which costs more memory than
  the whole streaming merge.
- `adapter`: the base GGUF plus the GGUF LoRA by `convert_lora_to_gguf.py`, which the Modelfile
  names on an `ADAPTER` line: the shipped file is the converter's own.
- `peft`: the reference: transformers + peft `merge_and_unload`, save, convert. It covers what the
  GGUF LoRA format cannot carry (DoRA, `modules_to_save`, a resized vocabulary, bias terms).

Scaling. llama.cpp (and so Ollama, and `merge_lora_gguf`) applies a GGUF LoRA as
`W + (alpha / r) · B @ A`, with `alpha` the file's single `adapter.lora.alpha` and `r` each tensor's
own rank (`lora_b`'s inner dimension); `alpha == 0` means scale 1. peft's scale is
`alpha_i / r_i`, or `alpha_i / sqrt(r_i)` with `use_rslora`, where `alpha_pattern` may give a
module its own alpha. `merge_peft_adapter` applies peft's own scale. Where the two differ
(rslora, an `alpha_pattern`), `convert_adapter_to_gguf` converts a staged copy whose `lora_B`
carries the ratio, so the GGUF LoRA means exactly what peft means, in `adapter` mode as in the
`merge` mode's fallback.

Everything here is plain Python; the heavy imports (torch, transformers, peft) happen only inside
the `peft` mode, the converter subprocess, and when a base folder holds no weights to read shapes from.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

from tasks.adapter.layout import (
    learn_lora_layout,
    lora_layout_cache_path,
    merge_peft_adapter,
)
from tasks.adapter.lora_gguf import (
    adapter_gguf_cache_path,
    convert_adapter_to_gguf,
    fold_scale_into_lora_b,
)
from tasks.adapter.peft_reference import peft_merge_to_gguf
from tasks.adapter.records import (
    ADAPTER_MODES,
    AdapterIncompatible,
    AdapterInfo,
    AdapterMode,
    AdapterModeUnsupported,
    AdapterOutput,
    LoraLayoutUnknown,
    MergeFailed,
)
from tasks.adapter.stream_merge import merge_lora_gguf, read_gguf_layout
from tasks.adapter.validate import adapter_identity, adapter_sha256, validate_adapter
from tasks.convert import cached_build, gguf_cache_path
from tasks.errors import KilnError
from tasks.progress import progress_reporter
from tasks.step import step
from tasks.toolchain import Toolchain

__all__ = [
    "ADAPTER_MODES", "AdapterIncompatible", "AdapterInfo", "AdapterMode", "AdapterModeUnsupported", "AdapterOutput",
    "LoraLayoutUnknown", "MergeFailed", "adapter_gguf_cache_path", "adapter_identity", "adapter_sha256",
    "apply_adapter", "convert_adapter_to_gguf", "describe", "fold_scale_into_lora_b", "learn_lora_layout",
    "lora_layout_cache_path", "merge_adapter_into_gguf", "merge_lora_gguf", "merge_peft_adapter",
    "merged_gguf_cache_path", "peft_merge_to_gguf", "read_gguf_layout", "validate_adapter",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# One call for the flow
# --------------------------------------------------------------------------------------------


def merged_gguf_cache_path(base_key: str, info: AdapterInfo, outtype: str, toolchain: Toolchain) -> Path:
    return gguf_cache_path(f"{base_key}-merge{info.sha256[:16]}", outtype, toolchain)


@step(name="adapter")
def apply_adapter(
    info: AdapterInfo,
    mode: AdapterMode,
    *,
    base_dir: Path,
    base_gguf: Path | None,
    base_key: str,
    toolchain: Toolchain,
    outtype: Literal["f16", "bf16", "f32"] = "f16",
    on_line: Callable[[str], None] | None = None,
    model_name: str | None = None,
) -> AdapterOutput:
    """Run one adapter mode after `validate_adapter`; every result is cached and shared across runs.

    - merge: the peft adapter streamed into `base_gguf` (cached per base and adapter), placed by
      the layout learned from the base's own conversion (`merge_peft_adapter`). Where that layout
      cannot be learned, the GGUF LoRA by `convert_lora_to_gguf.py` (cached) is merged instead,
      and `lora_gguf` names it.
    - adapter: GGUF LoRA (cached); `gguf` is the base GGUF itself, to quantize as usual.
    - peft: the reference merge, converted (cached per base and adapter) under `model_name` (general.name).
    """
    info.check_mode(mode)
    started = time.perf_counter()
    adapter_dir = Path(info.path)
    if mode == "peft":
        path, reused = peft_merge_to_gguf(adapter_dir, base_dir, toolchain, outtype, info=info, base_key=base_key,
                                          on_line=on_line, model_name=model_name)
        return AdapterOutput(mode=mode, adapter_sha256=info.sha256, gguf=str(path), reused=reused,
                             seconds=round(time.perf_counter() - started, 3))
    if base_gguf is None:
        raise KilnError(f"--adapter-mode {mode} needs the base's float GGUF")
    base_gguf = Path(base_gguf)
    if mode == "adapter":
        lora, lora_reused = convert_adapter_to_gguf(adapter_dir, base_dir, toolchain, info=info, on_line=on_line)
        return AdapterOutput(mode=mode, adapter_sha256=info.sha256, gguf=str(base_gguf), lora_gguf=str(lora),
                             reused=lora_reused, seconds=round(time.perf_counter() - started, 3))
    final = merged_gguf_cache_path(base_key, info, outtype, toolchain)
    lora: Path | None = None

    def build(tmp: Path) -> None:
        nonlocal lora
        report = progress_reporter(f"merge adapter {adapter_dir.name} into {base_gguf.name}")
        lora = merge_adapter_into_gguf(info, base_dir, base_gguf, tmp, toolchain, on_line=on_line,
                                       on_progress=lambda done, total: report(done / total))

    final, reused = cached_build(final, build)
    return AdapterOutput(mode=mode, adapter_sha256=info.sha256, gguf=str(final), lora_gguf=str(lora) if lora else None,
                         reused=reused, seconds=round(time.perf_counter() - started, 3))


def merge_adapter_into_gguf(
    info: AdapterInfo,
    base_dir: Path,
    base_gguf: Path,
    out_path: Path,
    toolchain: Toolchain,
    on_line: Callable[[str], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path | None:
    """`--adapter-mode merge` into `out_path`, uncached; returns the GGUF LoRA it merged, None when it needed none.

    The learned layout first (`merge_peft_adapter`); the converter, a torch process and the
    costliest part of the mode, runs only where the base's own conversion does not show where
    the adapter goes.
    """
    adapter_dir = Path(info.path)
    try:
        merge_peft_adapter(adapter_dir, base_dir, base_gguf, out_path, info, on_progress)
        return None
    except LoraLayoutUnknown as exc:
        logger.warning("adapter %s: cannot place it from the base's own conversion (%s); "
                       "converting it with convert_lora_to_gguf.py", adapter_dir.name, exc)
    lora, _ = convert_adapter_to_gguf(adapter_dir, base_dir, toolchain, info=info, on_line=on_line)
    merge_lora_gguf(base_gguf, lora, out_path, on_progress)
    return lora


def describe(info: AdapterInfo) -> Iterable[str]:
    """Human lines for logs and the run summary."""
    yield f"adapter {info.path} sha256 {info.sha256[:16]}"
    yield (f"rank {info.rank} alpha {info.alpha:g} ({info.scale_rule}), {info.adapted_weights} weights over "
           f"{', '.join(info.target_modules)}")
    for mode, why in info.unsupported.items():
        yield f"mode {mode}: unavailable ({why})"
    yield from info.notes
