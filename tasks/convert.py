"""Convert a Hugging Face folder to a float GGUF with llama.cpp's own converter.

The converter runs as a subprocess from the pinned llama.cpp tree (see
`tasks.toolchain`). The result is cached by (source content, outtype, toolchain),
so N adapters and N quant types on one base pay for one conversion.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from tasks.errors import ConversionFailed, KilnError, NotEnoughDisk
from tasks.files import (
    atomic_path,
    cache_dir,
    disk_full,
    remove_stale_temporaries,
    sha256_file,
    write_text_atomic,
)
from tasks.progress import progress_reporter
from tasks.step import step
from tasks.toolchain import Toolchain, converter_env

# The converter's tqdm bar: "Writing:  45%|████▌     | 123M/270M ..."
_WRITING_RE = re.compile(r"Writing:\s+(\d+)%")
_ERROR_LINE = re.compile(r"(Error|error|Exception|NotImplementedError|not supported|Traceback)")
# How the converter says the disk filled up: Python's strerror, numpy's `tofile`, the quota's errno.
_DISK_FULL_LINE = re.compile(r"No space left on device|Not enough free space|Disk quota exceeded|\[Errno (28|122)\]")
# The writer bar's total, "| 12.3M/269M [": what the whole output file takes.
_WRITER_TOTAL_RE = re.compile(r"Writing:.*?/\s*([\d.]+)\s*([kMGT]?)(?:B|byte)?\b")
_SI = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
# Below this much free space a failed build is taken to have failed for want of space.
_NEARLY_FULL = 16 * 1024 * 1024


def gguf_cache_path(content_key: str, variant: str, toolchain: Toolchain) -> Path:
    """Where a cached GGUF for (content, variant, toolchain) lives."""
    return cache_dir() / "gguf" / f"{content_key}-{variant}-{toolchain.cache_key}.gguf"


def run_converter(
    script: str,
    args: list[str],
    toolchain: Toolchain,
    on_line: Callable[[str], None] | None = None,
) -> None:
    """Run one of the tree's converter scripts; raise `ConversionFailed` with its cause, not a traceback dump,
    or `NotEnoughDisk` (the file, the bytes written, the writer's total) when its disk filled up."""
    root = Path(toolchain.converter_dir)
    cmd = [sys.executable, str(root / script), *args]
    tail: deque[str] = deque(maxlen=40)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        env=converter_env(root),
    )
    assert proc.stdout is not None
    total: int | None = None
    for raw in proc.stdout:
        for line in raw.rstrip("\n").split("\r"):
            if line.strip():
                tail.append(line)
                if match := _WRITER_TOTAL_RE.search(line):
                    total = int(float(match.group(1)) * _SI[match.group(2)])
                if on_line:
                    on_line(line)
    if proc.wait() != 0:
        lines = list(tail)
        if any(_DISK_FULL_LINE.search(line) for line in lines):
            raise converter_disk_full(script, args, lines, total)
        raise ConversionFailed(f"{script} failed (exit {proc.returncode}): {converter_cause(lines)}")


def converter_disk_full(script: str, args: list[str], lines: list[str], total: int | None) -> NotEnoughDisk:
    """The converter stopped because its output's disk filled: say which step, which file, how much it needed."""
    cause = next((line.strip() for line in reversed(lines) if _DISK_FULL_LINE.search(line)), converter_cause(lines))
    outfile = Path(args[args.index("--outfile") + 1]) if "--outfile" in args[:-1] else Path(script)
    written = outfile.stat().st_size if outfile.is_file() else 0
    step_name = "convert" if script == "convert_hf_to_gguf.py" else script
    return disk_full(outfile, step=step_name, written=written, need=total, cause=f"{script}: {cause}")


def converter_cause(lines: list[str]) -> str:
    """The converter's own reason: its last error-looking line, else its last line."""
    for line in reversed(lines):
        if _ERROR_LINE.search(line) and not line.startswith("Traceback"):
            return line.strip()
    return lines[-1].strip() if lines else "no output"


@step(name="convert")
def convert_to_gguf(
    model_dir: Path,
    content_key: str,
    outtype: str,
    toolchain: Toolchain,
    on_line: Callable[[str], None] | None = None,
) -> tuple[Path, bool]:
    """The float GGUF for `model_dir`; returns (path, reused_from_cache)."""
    final = gguf_cache_path(content_key, outtype, toolchain)

    def build(tmp: Path) -> None:
        report = progress_reporter(f"convert {model_dir.name} to {outtype} GGUF")

        def watch(line: str) -> None:
            if match := _WRITING_RE.search(line):
                report(int(match.group(1)) / 100)
            if on_line:
                on_line(line)

        run_converter("convert_hf_to_gguf.py", ["--outtype", outtype, "--outfile", str(tmp), str(model_dir)],
                      toolchain, watch)
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise ConversionFailed(f"the converter exited cleanly but wrote nothing for {model_dir}")

    return cached_build(final, build)


def cached_build(final: Path, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """`final` from the cache when its recorded sha256 still matches, else built by `build(tmp)`.

    One builder per entry across processes (a file lock): a second process waits,
    then finds the file. Outputs are hard links to cache entries, so an output
    edited in place would change the entry too; the hash check catches that.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    stamp = final.with_name(final.name + ".sha256")
    with FileLock(str(final) + ".lock"):
        # A killed builder's temporaries: every writer of this entry holds the lock, so none is live.
        remove_stale_temporaries(final.parent, final.name)
        if final.is_file() and stamp.is_file() and stamp.read_text().strip() == sha256_file(final):
            return final, True
        final.unlink(missing_ok=True)
        with atomic_path(final) as tmp:
            try:
                build(tmp)
            except KilnError as exc:
                # libllama's quantizer reports a full disk as a bare failure; the free space tells.
                if not isinstance(exc, NotEnoughDisk) and _nearly_full(tmp.parent):
                    raise disk_full(final, step=_step_of(exc), written=tmp.stat().st_size if tmp.is_file() else 0,
                                    cause=str(exc)) from None
                raise
        write_text_atomic(stamp, sha256_file(final) + "\n")
    return final, False


def _nearly_full(folder: Path) -> bool:
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < _NEARLY_FULL or (stats.f_files > 0 and stats.f_favail == 0)


def _step_of(exc: KilnError) -> str | None:
    from tasks.errors import QuantizationFailed

    return "convert" if isinstance(exc, ConversionFailed) else "quantize" if isinstance(exc, QuantizationFailed) else None


def place_output(cached: Path, final: Path) -> None:
    """Put a cached GGUF at its final name: a hard link where possible, else a copy; atomic either way."""
    with atomic_path(final, step="outputs", need=cached.stat().st_size) as tmp:
        tmp.unlink()
        try:
            os.link(cached, tmp)
        except OSError:
            import shutil

            shutil.copyfile(cached, tmp)
