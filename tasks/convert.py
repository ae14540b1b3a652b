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

from tasks.errors import ConversionFailed
from tasks.step import step
from tasks.progress import progress_reporter
from tasks.files import atomic_path, cache_dir, sha256_file, write_text_atomic
from tasks.toolchain import Toolchain, converter_env

# The converter's tqdm bar: "Writing:  45%|████▌     | 123M/270M ..."
_WRITING_RE = re.compile(r"Writing:\s+(\d+)%")
_ERROR_LINE = re.compile(r"(Error|error|Exception|NotImplementedError|not supported|Traceback)")


def gguf_cache_path(content_key: str, variant: str, toolchain: Toolchain) -> Path:
    """Where a cached GGUF for (content, variant, toolchain) lives."""
    return cache_dir() / "gguf" / f"{content_key}-{variant}-{toolchain.cache_key}.gguf"


def run_converter(
    script: str,
    args: list[str],
    toolchain: Toolchain,
    on_line: Callable[[str], None] | None = None,
) -> None:
    """Run one of the tree's converter scripts; raise `ConversionFailed` with its cause, not a traceback dump."""
    root = Path(toolchain.converter_dir)
    cmd = [sys.executable, str(root / script), *args]
    tail: deque[str] = deque(maxlen=40)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        env=converter_env(root),
    )
    assert proc.stdout is not None
    for raw in proc.stdout:
        for line in raw.rstrip("\n").split("\r"):
            if line.strip():
                tail.append(line)
                if on_line:
                    on_line(line)
    if proc.wait() != 0:
        raise ConversionFailed(f"{script} failed (exit {proc.returncode}): {converter_cause(list(tail))}")


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
        if final.is_file() and stamp.is_file() and stamp.read_text().strip() == sha256_file(final):
            return final, True
        final.unlink(missing_ok=True)
        with atomic_path(final) as tmp:
            build(tmp)
        write_text_atomic(stamp, sha256_file(final) + "\n")
    return final, False


def place_output(cached: Path, final: Path) -> None:
    """Put a cached GGUF at its final name: a hard link where possible, else a copy; atomic either way."""
    with atomic_path(final) as tmp:
        tmp.unlink()
        try:
            os.link(cached, tmp)
        except OSError:
            import shutil

            shutil.copyfile(cached, tmp)
