"""Quantize a float GGUF with libllama's quantizer, in process (the code behind `llama-quantize`)."""

from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
from collections import Counter
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Any

from tasks.errors import QuantizationFailed, QuantTypeUnknown
from tasks.files import path_cache_key
from tasks.progress import log_in_run, progress_reporter
from tasks.step import step

FLOAT_TYPES = ("f32", "f16", "bf16")
# llama-quantize refuses these without an importance matrix: the result would be garbage.
NEEDS_IMATRIX = frozenset({"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "q2_k_s"})
# Bits per weight, for disk estimates before anything is written (llama.cpp's published figures,
# rounded up; embeddings and norms kept at higher precision make small models a little larger).
BITS_PER_WEIGHT = {
    "f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.7, "q5_k_s": 5.6,
    "q5_1": 6.0, "q5_0": 5.5, "q4_k_m": 4.9, "q4_k_s": 4.6, "q4_1": 5.0, "q4_0": 4.5, "iq4_nl": 4.5,
    "iq4_xs": 4.3, "q3_k_l": 4.3, "q3_k_m": 3.9, "q3_k_s": 3.5, "q2_k": 3.4,
}


@lru_cache(maxsize=1)
def known_quant_types() -> dict[str, int]:
    """Every ftype the installed libllama knows, by lower-case name (`q4_k_m` → LLAMA_FTYPE_MOSTLY_Q4_K_M)."""
    import llama_cpp

    types: dict[str, int] = {}
    for attr in dir(llama_cpp):
        if attr.startswith("LLAMA_FTYPE_MOSTLY_"):
            types[attr.removeprefix("LLAMA_FTYPE_MOSTLY_").lower()] = getattr(llama_cpp, attr)
    types["f32"] = llama_cpp.LLAMA_FTYPE_ALL_F32
    return types


def check_quant_types(quants: list[str], have_imatrix: bool = False) -> None:
    """Refuse unknown types, and types that need an importance matrix when none is given."""
    known = known_quant_types()
    unknown = [q for q in quants if q not in known]
    if unknown:
        raise QuantTypeUnknown(
            f"unknown quant type(s) {', '.join(unknown)}; libllama knows: {', '.join(sorted(known))}"
        )
    starved = [q for q in quants if q in NEEDS_IMATRIX and not have_imatrix]
    if starved:
        raise QuantTypeUnknown(
            f"quant type(s) {', '.join(starved)} need an importance matrix and none was given; "
            "pick q2_k, q3_k_m or larger instead"
        )


def estimated_size(params: int, quant: str) -> int:
    return int(params * BITS_PER_WEIGHT.get(quant, 16.0) / 8)


@lru_cache(maxsize=None)
def _slots(at_once: int) -> threading.BoundedSemaphore:
    """Process-wide. The flow submits every quantization at once, so that Prefect's bookkeeping
    for the next one overlaps the one running; this keeps libllama to `at_once` jobs together."""
    return threading.BoundedSemaphore(at_once)


class _QuantizerLog(threading.local):
    """What libllama said on this thread during the quantization it is running."""

    def __init__(self) -> None:
        self.active = False
        self.fallbacks: Counter[str] = Counter()
        self.tensors = 0
        self.errors: list[str] = []
        # Called with (tensor number, tensors) as libllama starts each tensor: the quantization's progress.
        self.on_tensor: Any = None


_quantizer_log = _QuantizerLog()
# libllama warns about every tensor it stores in another type than asked, because
# its rows are not a whole number of that type's blocks ("warning: blk.0.attn_k.weight - ncols
# 576 not divisible by 256 (required for type q4_K)", then " -> falling back to q5_0"). That is
# 180 pairs of lines a k-quant of SmolLM2-135M, all over the terminal; Kiln counts them instead.
_FALLBACK_TO = re.compile(r"->\s*falling back to\s+(\S+)")
_FALLBACK_NOTICE = re.compile(r"not divisible by \d+ \(required for type")
_FALLBACK_TOTAL = re.compile(r"\d+ of (\d+) tensor\(s\) required fallback")
# libllama has no progress callback for a quantization, but it logs one line as it starts each
# tensor: "[  12/ 272]                   blk.0.attn_k.weight - [  576,    64,     1,     1], type = ..."
_TENSOR_STARTED = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")
# ggml.h's `enum ggml_log_level`: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5. (llama-cpp-python
# 0.3.36 maps an older order, so it prints these WARN lines as errors and hides the real errors.)
_GGML_LOG_LEVEL_ERROR = 4


@lru_cache(maxsize=1)
def _route_libllama_log() -> Any:
    """Send a quantizing thread's libllama lines to `_quantizer_log`; other threads' go where they went."""
    import llama_cpp

    previous = llama_cpp.llama_log_callback()
    previous_data = ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(previous_data))

    @llama_cpp.llama_log_callback
    def route(level: int, text: bytes, user_data: Any) -> None:
        log = _quantizer_log
        if not log.active:
            if previous:
                previous(level, text, user_data)
            return
        line = text.decode("utf-8", errors="replace").strip()
        if log.on_tensor is not None and (started := _TENSOR_STARTED.match(line)):
            try:
                log.on_tensor(int(started.group(1)), int(started.group(2)))
            except Exception:  # an exception cannot cross libllama's C frames; progress is not worth a crash
                pass
        if match := _FALLBACK_TO.search(line):
            log.fallbacks[match.group(1)] += 1
        elif match := _FALLBACK_TOTAL.search(line):
            log.tensors = int(match.group(1))
        elif level == _GGML_LOG_LEVEL_ERROR and line and not _FALLBACK_NOTICE.search(line):
            log.errors.append(line)

    llama_cpp.llama_log_set(route, previous_data)
    return route  # libllama keeps only the pointer: the callback must live as long as the process


def _quantize_cache_key(_ctx: Any, params: dict[str, Any]) -> str:
    return path_cache_key("kiln-quantize", Path(params["dst"]), Path(params["src"]))


@step(name="quantize", cache_key=_quantize_cache_key)
def quantize_gguf(src: Path, dst: Path, quant: str, nthread: int | None = None, at_once: int | None = None) -> Path:
    """Write `dst` as `quant` from the GGUF `src` (a cache entry: reused while its hash holds).

    With `at_once`, at most that many quantizations run libllama together in this process.
    """
    import llama_cpp

    from tasks.convert import cached_build

    # Other threads' libllama lines (a model load) still go through llama-cpp-python's logger: errors only.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    _route_libllama_log()
    check_quant_types([quant])
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = known_quant_types()[quant]
    params.nthread = nthread or os.cpu_count() or 1
    # A prebuilt GGUF may already be quantized; libllama refuses to requantize unless told.
    params.allow_requantize = True

    def build(tmp: Path) -> None:
        log = _quantizer_log
        log.fallbacks, log.tensors, log.errors = Counter(), 0, []
        with _slots(at_once) if at_once else nullcontext():
            # Keyed, so that the bar shows on the flow run's Artifacts tab too (artifact keys: a-z, 0-9, -).
            progress = progress_reporter(f"quantize to {quant}", key=f"kiln-quantize-{quant.replace('_', '-')}")
            log.on_tensor = lambda number, total: progress((number - 1) / total)  # tensor `number` begins
            log.active = True
            try:
                rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
            finally:
                log.active, log.on_tensor = False, None
            if rc == 0:
                progress(1.0)
        if rc != 0:
            cause = log.errors[-1] if log.errors else f"return code {rc}"
            raise QuantizationFailed(f"libllama could not quantize {src.name} to {quant}: {cause}")
        if log.fallbacks:
            types = ", ".join(f"{name} ×{n}" for name, n in log.fallbacks.most_common())
            log_in_run("%s: %d of %s tensors stored as %s instead: their rows are not whole %s blocks", quant,
                       log.fallbacks.total(), log.tensors or "the", types, quant)

    return cached_build(dst, build)[0]
