"""Quantize a float GGUF: with libllama's quantizer in process, or through `llama-quantize` for a matrix or recipe.

Plain types run in process (no start-up, progress from libllama's log). An importance matrix or
a per-tensor recipe reaches libllama's quantizer only as C++ objects (tasks/llama_tools.py), so
those run llama.cpp's own `llama-quantize`, built from the same source.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import subprocess
import threading
from collections import Counter
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.errors import QuantizationFailed, QuantTypeUnknown
from tasks.files import path_cache_key
from tasks.progress import log_in_run, progress_reporter
from tasks.step import step

if TYPE_CHECKING:
    from tasks.recipe import Recipe

FLOAT_TYPES = ("f32", "f16", "bf16")
# llama-quantize refuses these without an importance matrix: the result would be garbage.
# src/llama-quant.cpp `tensor_requires_imatrix`: any tensor stored as iq1_s/iq1_m/iq2_xxs/iq2_xs/
# iq2_s/iq3_xxs, or q2_k inside a q2_k_s file. iq2_m stores iq2_s, iq3_xs stores its attention
# q/k as iq3_xxs. (A model whose rows are not whole 256-blocks falls back to other types and may
# escape: SmolLM2-135M's 576 columns do for iq3_*; Kiln refuses them for every model alike.)
NEEDS_IMATRIX = frozenset({"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "q2_k_s"})
# Bits per weight, for disk estimates before anything is written (llama.cpp's published figures,
# rounded up; embeddings and norms kept at higher precision make small models a little larger).
BITS_PER_WEIGHT = {
    "f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.7, "q5_k_s": 5.6,
    "q5_1": 6.0, "q5_0": 5.5, "q4_k_m": 4.9, "q4_k_s": 4.6, "q4_1": 5.0, "q4_0": 4.5, "iq4_nl": 4.5,
    "iq4_xs": 4.3, "q3_k_l": 4.3, "q3_k_m": 3.9, "q3_k_s": 3.5, "q2_k": 3.4,
    # The types that need an importance matrix (llama-quantize's table, rounded up).
    "iq3_xs": 3.3, "iq3_xxs": 3.1, "q2_k_s": 3.0, "iq2_m": 2.7, "iq2_s": 2.5, "iq2_xs": 2.4, "iq2_xxs": 2.1,
    "iq1_m": 1.8, "iq1_s": 1.6,
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
            "add --imatrix auto (or your own text or matrix), or pick q2_k, q3_k_m or larger"
        )



def estimated_size(params: int, quant: str) -> int:
    return int(params * BITS_PER_WEIGHT.get(quant, 16.0) / 8)


_setup_lock = threading.Lock()  # the first quantizations arrive together, on threads of their own
_semaphores: dict[int, threading.BoundedSemaphore] = {}


def _slots(at_once: int) -> threading.BoundedSemaphore:
    """Process-wide. The flow submits every quantization at once, so that Prefect's bookkeeping
    for the next one overlaps the one running; this keeps libllama to `at_once` jobs together."""
    with _setup_lock:
        return _semaphores.setdefault(at_once, threading.BoundedSemaphore(at_once))


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


_routing: list[Any] = []  # the one installed callback: libllama keeps only its pointer, so it lives as long as the process


def _route_libllama_log() -> Any:
    """Send a quantizing thread's libllama lines to `_quantizer_log`; other threads' go where they went.

    Installed once, under a lock: the flow starts its quantizations together, and two threads
    installing at once left libllama holding the pointer of a callback Python had freed (`kiln
    demo` died of SIGSEGV in CI; tests/test_quantize.py starts eight threads together).
    """
    with _setup_lock:
        if not _routing:
            _routing.append(_install_route())
        return _routing[0]


def _install_route() -> Any:
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
    return route


def _quantize_cache_key(_ctx: Any, params: dict[str, Any]) -> str:
    key = path_cache_key("kiln-quantize", Path(params["dst"]), Path(params["src"]))
    imatrix, recipe = params.get("imatrix"), params.get("recipe")
    if imatrix is None and recipe is None:
        return key  # as before: plain types keep their records
    from tasks.files import sha256_file, sha256_text

    # The matrix's and recipe's content, not their paths: a matrix recomputed in place is another input.
    extra = f"imatrix={sha256_file(Path(imatrix)) if imatrix else ''};recipe={recipe.sha256 if recipe else ''}"
    return f"{key}-{sha256_text(extra)[:24]}"


def run_tool(args: list[str], on_text: Any = None, keep: int = 40) -> tuple[int, list[str]]:
    """Run a llama.cpp tool (argument list, no shell); (exit status, its last `keep` output lines).

    stdout and stderr together, read as they come: `on_text(text)` sees every piece (progress
    that is printed without line ends, as llama-imatrix's, too).
    """
    from collections import deque

    tail: deque[str] = deque(maxlen=keep)
    pending = ""
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(65536):
            text = chunk.decode("utf-8", errors="replace")
            if on_text is not None:
                on_text(text)
            *lines, pending = (pending + text).replace("\r", "\n").split("\n")
            tail.extend(line.strip() for line in lines if line.strip())
        rc = proc.wait()
    if pending.strip():
        tail.append(pending.strip())
    return rc, list(tail)


# llama-quantize's error lines: libllama's "llama_model_quantize: failed to quantize: <why>" says why.
_QUANTIZE_WHY = re.compile(r"failed to quantize:\s*(.+)$")


def _quantize_with_tool(src: Path, tmp: Path, quant: str, nthread: int, imatrix: Path | None,
                        recipe: Recipe | None, progress: Any) -> None:
    from tasks.llama_tools import llama_tool

    def on_text(text: str) -> None:
        for started in re.finditer(r"^\[\s*(\d+)/\s*(\d+)\]", text, re.MULTILINE):
            progress((int(started.group(1)) - 1) / int(started.group(2)))

    args = [str(llama_tool("llama-quantize")), "--allow-requantize",
            *(["--imatrix", str(imatrix)] if imatrix else []), *(recipe.tool_args() if recipe else []),
            str(src), str(tmp), quant.upper(), str(nthread)]
    rc, tail = run_tool(args, on_text)
    if rc != 0:
        why = next((m.group(1) for line in reversed(tail) if (m := _QUANTIZE_WHY.search(line))), None)
        if why is None:
            from tasks.imatrix import error_cause

            why = error_cause(tail, rc)
        raise QuantizationFailed(f"llama-quantize could not quantize {src.name} to {quant}: {why.strip()}")


@step(name="quantize", cache_key=_quantize_cache_key)
def quantize_gguf(src: Path, dst: Path, quant: str, nthread: int | None = None, at_once: int | None = None,
                  imatrix: Path | None = None, recipe: Recipe | None = None) -> Path:
    """Write `dst` as `quant` from the GGUF `src` (a cache entry: reused while its hash holds).

    With `at_once`, at most that many quantizations run libllama together in this process.
    With an importance matrix or a recipe, llama-quantize writes it (the cache entry `dst` must
    be named for them).
    """
    import llama_cpp

    from tasks.convert import cached_build

    if imatrix is not None or recipe is not None:
        from tasks.recipe import quant_label

        check_quant_types([quant], have_imatrix=imatrix is not None)
        threads = nthread or os.cpu_count() or 1
        label = quant_label(quant, imatrix is not None, recipe)

        def build_with_tool(tmp: Path) -> None:
            with _slots(at_once) if at_once else nullcontext():
                progress = progress_reporter(f"quantize to {label}", key=f"kiln-quantize-{label.replace('_', '-')}")
                _quantize_with_tool(src, tmp, quant, threads, imatrix, recipe, progress)
                progress(1.0)

        return cached_build(dst, build_with_tool)[0]

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
