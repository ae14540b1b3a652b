"""Importance matrices: which input columns of each weight matter, so a quantizer spends its bits there.

`--imatrix` takes one of:
- `auto`: computed on Kiln's own calibration text (`tasks/calibration_text/`, held apart from the
  evaluation text the report measures on, so the report does not grade the matrix on what it saw);
- `PATH.txt`: computed on the user's text;
- `PATH.gguf` / `PATH.dat`: a matrix computed elsewhere (llama-imatrix's GGUF or legacy format),
  checked against the model before anything is quantized with it.

Computing runs llama.cpp's `llama-imatrix` on the float GGUF the flow converted: at most
`MAX_CHUNKS` chunks of `CTX` tokens (bounded time), one chunk a batch (bounded memory: the
logits of one chunk; the weights are mapped, not loaded). The matrix is a cache entry keyed by
(the float GGUF's content, the text's sha256, the toolchain), so a second export reuses it.
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
from pathlib import Path
from typing import Final, Literal

from registry.models import ImatrixRecord
from tasks.errors import KilnError
from tasks.files import cache_dir, sha256_file
from tasks.step import step

CALIBRATION_TEXT: Final = Path(__file__).resolve().parent / "calibration_text" / "kiln-calib-v1.txt"
# Recorded, so a changed text is caught instead of silently giving other matrices (README there: never edit in place).
CALIBRATION_SHA256: Final = "64b87beaa778231532a485729c51d80042c8de6de53366b917d0d47c181b6c43"
CTX: Final = 512
MAX_CHUNKS: Final = 16
IMATRIX_SUFFIXES: Final = (".gguf", ".dat")
ImatrixKind = Literal["auto", "user-text", "file"]


class ImatrixInvalid(KilnError):
    """An --imatrix value, calibration text or matrix file Kiln cannot use for this model."""


class ImatrixFailed(KilnError):
    """llama-imatrix ran and failed."""


def imatrix_kind(value: str) -> ImatrixKind:
    if value == "auto":
        return "auto"
    suffix = Path(value).suffix.lower()
    if suffix == ".txt":
        return "user-text"
    if suffix in IMATRIX_SUFFIXES:
        return "file"
    raise ImatrixInvalid(f"--imatrix {value}: give `auto`, a calibration text PATH.txt, or a matrix "
                         "PATH.gguf / PATH.dat (llama-imatrix's output)")


def check_calibration_text(path: Path) -> str:
    """The text's sha256, or a one-line refusal: missing, empty, not UTF-8, or surely too short.

    llama-imatrix needs two chunks of `CTX` tokens. A token is at least one byte of text (plus the
    BOS), so fewer than 2 × CTX bytes can never be enough; llama-imatrix checks the exact count.
    """
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise ImatrixInvalid(f"calibration text {path} is a folder; give a UTF-8 .txt file") from None
    except OSError as exc:
        raise ImatrixInvalid(f"calibration text {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise ImatrixInvalid(f"calibration text {path} is empty; give a few thousand words of text like "
                             "the model's use, or --imatrix auto")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ImatrixInvalid(f"calibration text {path} is not UTF-8 (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); "
                             "convert it with `iconv -t UTF-8`") from None
    if len(data) + 1 < 2 * CTX:
        raise ImatrixInvalid(f"calibration text {path} is too short: {len(data)} bytes, at most {len(data) + 1} tokens; "
                             f"llama-imatrix needs two chunks of {CTX} tokens ({2 * CTX} tokens, about "
                             f"{2 * CTX * 4 // 1000} KB of English)")
    import hashlib

    return hashlib.sha256(data).hexdigest()


def check_imatrix_value(value: str) -> ImatrixKind:
    """Everything the --imatrix value alone shows (before Prefect starts): the kind, and the file is usable."""
    kind = imatrix_kind(value)
    if kind == "auto":
        if sha256_file(CALIBRATION_TEXT) != CALIBRATION_SHA256:
            raise ImatrixInvalid(f"Kiln's calibration text {CALIBRATION_TEXT} differs from the one recorded "
                                 "(sha256); reinstall Kiln")
    elif kind == "user-text":
        check_calibration_text(Path(value))
    else:
        read_matrix_entries(Path(value))
    return kind


def imatrix_input_sha256(value: str) -> str:
    """The sha256 of what an --imatrix value names (Kiln's text for `auto`), for the export's request key."""
    if imatrix_kind(value) == "auto":
        return CALIBRATION_SHA256
    try:
        return sha256_file(Path(value))
    except OSError:
        return "missing"  # preflight refuses it with its reason; the key only has to differ


# ---------------------------------------------------------------- reading a matrix


def read_matrix_entries(path: Path) -> dict[str, int]:
    """Tensor name → number of values, for every entry of a matrix file (GGUF or legacy .dat).

    Like llama.cpp's `common_imatrix_load`: a file that starts as a GGUF is one, anything else is
    read as the legacy format.
    """
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except IsADirectoryError:
        raise ImatrixInvalid(f"importance matrix {path} is a folder, not a file") from None
    except OSError as exc:
        raise ImatrixInvalid(f"importance matrix {path}: {exc.strerror or exc}") from None
    entries = _gguf_entries(path) if magic == b"GGUF" else _legacy_entries(path)
    if not entries:
        raise ImatrixInvalid(f"{path} holds no importance matrix entries")
    return entries


def _gguf_entries(path: Path) -> dict[str, int]:
    from tasks.gguf_file import GGUFFileError, read_layout

    try:
        layout = read_layout(path)
    except GGUFFileError as exc:
        raise ImatrixInvalid(str(exc)) from None
    entries = {}
    for tensor in layout.tensors:
        if tensor.name.endswith(".in_sum2"):
            count = 1
            for dim in tensor.shape:
                count *= dim
            entries[tensor.name.removesuffix(".in_sum2")] = count
    if not entries:
        raise ImatrixInvalid(f"{path} is a GGUF but not an importance matrix (no *.in_sum2 tensors): a model "
                             "file? Give llama-imatrix's output, or a .txt to compute one from")
    return entries


def _legacy_entries(path: Path) -> dict[str, int]:
    """llama-imatrix's `--output-format dat`: int32 count, then (int32 len, name, int32 ncall, int32 nval, floats)."""
    not_one = f"{path} is not an importance matrix (neither llama-imatrix's GGUF nor its .dat format)"
    size = path.stat().st_size
    entries: dict[str, int] = {}
    try:
        with open(path, "rb") as fh:
            (n_entries,) = struct.unpack("<i", fh.read(4))
            if not 0 < n_entries < 1_000_000:
                raise ImatrixInvalid(not_one)
            for _ in range(n_entries):
                (length,) = struct.unpack("<i", fh.read(4))
                if not 0 < length < 4096:
                    raise ImatrixInvalid(not_one)
                name = fh.read(length).decode("utf-8")
                _ncall, nval = struct.unpack("<ii", fh.read(8))
                if nval < 1 or fh.tell() + 4 * nval > size:
                    raise ImatrixInvalid(not_one)
                fh.seek(4 * nval, os.SEEK_CUR)
                entries[name] = nval
    except (struct.error, UnicodeDecodeError):
        raise ImatrixInvalid(not_one) from None
    return entries


def check_imatrix_matches(imatrix_path: Path, gguf_path: Path) -> int:
    """Refuse a matrix made for another model; returns how many of the model's tensors it covers.

    Every entry must name a tensor of the model, with one value per input column (times the
    experts, for a 3-D expert tensor), as llama-quantize later requires; llama-quantize itself
    only warns about names it does not know and quantizes those tensors without the matrix.
    """
    from tasks.gguf_file import read_layout

    entries = read_matrix_entries(imatrix_path)
    shapes = {t.name: t.shape for t in read_layout(gguf_path).tensors}
    unknown = [name for name in entries if name not in shapes]
    wrong = [(name, n, _columns(shapes[name])) for name, n in entries.items()
             if name in shapes and n != _columns(shapes[name])]
    if unknown or wrong:
        detail = (f"{len(unknown)} of its {len(entries)} tensors are not in the model (e.g. {unknown[0]})" if unknown
                  else f"{wrong[0][0]} has {wrong[0][1]} values where the model's tensor has {wrong[0][2]} columns")
        raise ImatrixInvalid(f"importance matrix {imatrix_path.name} was made for another model than "
                             f"{gguf_path.name}: {detail}; compute one for this model (--imatrix auto or a .txt)")
    return len(entries)


def _columns(shape: tuple[int, ...]) -> int:
    return shape[0] * (shape[2] if len(shape) == 3 else 1)


# ---------------------------------------------------------------- computing one


def _content_key(gguf: Path) -> str:
    """The float GGUF's sha256: its cache stamp when it is a cache entry (written by cached_build), else hashed."""
    stamp = gguf.with_name(gguf.name + ".sha256")
    if stamp.is_file() and stamp.stat().st_mtime_ns >= gguf.stat().st_mtime_ns:
        return stamp.read_text().strip()
    return sha256_file(gguf)


def imatrix_cache_path(model_sha256: str, text_sha256: str, toolchain_key: str) -> Path:
    return cache_dir() / "imatrix" / f"{model_sha256[:24]}-{text_sha256[:16]}-{toolchain_key}.gguf"


_CHUNKS_PLANNED = re.compile(r"computing over (\d+) chunks")
_CHUNK_DONE = re.compile(r"\[(\d+)\]\d")
_TOO_FEW = re.compile(r"tokenizes to only (\d+) tokens")


def compute_imatrix(f16_gguf: Path, text_path: Path, dst: Path,
                    threads: int | None = None) -> tuple[Path, float, bool]:
    """The matrix of `f16_gguf` on `text_path` at the cache entry `dst`: (path, seconds it took to compute, reused).

    The seconds are kept beside the entry, so a reused matrix still reports what it cost. No
    Prefect cache record on top: a reused entry costs reading the float GGUF's stamp and hashing
    the matrix (megabytes), and a record could outlive the entry.
    """
    from tasks.convert import cached_build
    from tasks.llama_tools import llama_tool
    from tasks.progress import progress_reporter
    from tasks.quantize import run_tool

    tool = llama_tool("llama-imatrix")
    seconds_file = dst.with_name(dst.name + ".json")

    def build(tmp: Path) -> None:
        progress = progress_reporter(f"importance matrix on {text_path.name}", key="kiln-imatrix")
        planned = [MAX_CHUNKS]

        def on_text(text: str) -> None:
            if found := _CHUNKS_PLANNED.search(text):
                planned[0] = int(found.group(1))
            for done in _CHUNK_DONE.findall(text):
                progress(min(1.0, int(done) / planned[0]))

        started = time.perf_counter()
        rc, tail = run_tool([str(tool), "-m", str(f16_gguf), "-f", str(text_path), "-o", str(tmp),
                             "--output-format", "gguf", "--chunks", str(MAX_CHUNKS), "-c", str(CTX),
                             "-b", str(CTX), "-ub", str(CTX), "-t", str(threads or os.cpu_count() or 1)], on_text)
        if rc != 0:
            short = next((_TOO_FEW.search(line) for line in tail if _TOO_FEW.search(line)), None)
            if short:
                raise ImatrixInvalid(f"calibration text {text_path} is too short for this model: it tokenizes to "
                                     f"{short.group(1)} tokens, and llama-imatrix needs two chunks of {CTX} "
                                     f"({2 * CTX}); give a longer text")
            raise ImatrixFailed(f"llama-imatrix failed on {f16_gguf.name}: {error_cause(tail, rc)}")
        progress(1.0)
        seconds_file.write_text(json.dumps({"seconds": round(time.perf_counter() - started, 3)}))

    path, reused = cached_build(dst, build)
    try:
        seconds = float(json.loads(seconds_file.read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        seconds = float("nan")
    return path, seconds, reused


def _chunks_used(matrix: Path) -> int | None:
    """How many chunks llama-imatrix recorded (fewer than MAX_CHUNKS where the text is shorter)."""
    from tasks.gguf_file import read_metadata

    value = read_metadata(matrix, ["imatrix.chunk_count"]).get("imatrix.chunk_count")
    return int(value) if isinstance(value, int) else None


def error_cause(tail: list[str], rc: int) -> str:
    """The line of a llama.cpp tool's output that says why it failed (its error lines, else its last line)."""
    errors = [line for line in tail if re.search(r"(^|\s)E\s|error|failed|invalid|requires", line, re.IGNORECASE)]
    line = (errors or tail or [f"exit status {rc}"])[-1]
    # Drop llama.cpp's log prefix ("0.00.577.478 E compute_imatrix: ") and the run's own paths' noise.
    return re.sub(r"^[\d.]+\s+[IWE]\s+", "", line).strip() or f"exit status {rc}"


@step(name="imatrix")
def resolve_imatrix(value: str, f16_gguf: Path, toolchain_key: str, threads: int | None = None) -> ImatrixRecord:
    """The matrix an export quantizes with, computed (cached) or the user's file checked against the model."""
    kind = check_imatrix_value(value)
    if kind == "file":
        path = Path(value).resolve()
        entries = check_imatrix_matches(path, f16_gguf)
        return ImatrixRecord(source="file", path=str(path), sha256=sha256_file(path), entries=entries)
    text = CALIBRATION_TEXT if kind == "auto" else Path(value).resolve()
    text_sha256 = CALIBRATION_SHA256 if kind == "auto" else check_calibration_text(text)
    dst = imatrix_cache_path(_content_key(f16_gguf), text_sha256, toolchain_key)
    path, seconds, reused = compute_imatrix(f16_gguf, text, dst, threads)
    entries = check_imatrix_matches(path, f16_gguf)
    return ImatrixRecord(source=kind, path=str(path), sha256=sha256_file(path), text=text.name,
                         text_sha256=text_sha256, chunks=_chunks_used(path), ctx=CTX, computed_s=seconds, reused=reused,
                         entries=entries)
