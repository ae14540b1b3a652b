"""Quantize a float GGUF with libllama's quantizer, in process (the code behind `llama-quantize`)."""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

from tasks.errors import QuantizationFailed, QuantTypeUnknown
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


@step(name="quantize")
def quantize_gguf(src: Path, dst: Path, quant: str, nthread: int | None = None, at_once: int | None = None) -> Path:
    """Write `dst` as `quant` from the GGUF `src` (a cache entry: reused while its hash holds).

    With `at_once`, at most that many quantizations run libllama together in this process.
    """
    import llama_cpp

    from tasks.convert import cached_build

    # libllama logs a line per tensor through llama-cpp-python's logger; keep errors only.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    check_quant_types([quant])
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = known_quant_types()[quant]
    params.nthread = nthread or os.cpu_count() or 1
    # A prebuilt GGUF may already be quantized; libllama refuses to requantize unless told.
    params.allow_requantize = True

    def build(tmp: Path) -> None:
        with _slots(at_once) if at_once else nullcontext():
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise QuantizationFailed(f"libllama could not quantize {src.name} to {quant} (return code {rc})")

    return cached_build(dst, build)[0]
