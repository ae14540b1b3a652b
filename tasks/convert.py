"""Convert a Hugging Face folder to a float GGUF with llama.cpp's own converter.

The converter runs as a subprocess from the pinned llama.cpp tree (see
`tasks.toolchain`). The result is cached by (source content, model name, outtype,
toolchain), so N adapters and N quant types on one base pay for one conversion.
"""

from __future__ import annotations

import json
import os
import re
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

from registry.models import ResolvedSource
from tasks.errors import ConversionFailed, KilnError, NotEnoughDisk
from tasks.files import (
    atomic_path,
    cache_dir,
    content_key,
    disk_full,
    path_cache_key,
    remove_stale_temporaries,
    sha256_file,
    sha256_text,
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
# libllama's Phi-3 rule matches these in the lowercased general.name (src/llama-vocab.cpp).
_PHI3_NAME_TAGS = ("phi-3", "phi3")
_PHI3_ARCHITECTURES = frozenset({"Phi3ForCausalLM", "PhiMoEForCausalLM"})
# A Hub repository's name part (ORG/NAME), as config.json's `_name_or_path` records it.
_HUB_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def gguf_model_name(source: ResolvedSource) -> str:
    """The model's own name, spelled as its publisher spells it: the converter's `--model-name`, so general.name.

    Left to itself the converter titles the name it finds ("Phi-3.5-mini-instruct" becomes
    "Phi 3.5 Mini Instruct"), and libllama reads general.name back: it strips the whitespace
    after Phi-3's chat tokens, as the published tokenizer does, only where the lowercased name
    contains "phi-3" or "phi3" (src/llama-vocab.cpp, the `_contains_any(model_name, ...)` rule).
    Without that, the prompt token ids differ from transformers'.

    - A Hub source or registry key: the repository's name (microsoft/Phi-3.5-mini-instruct ->
      Phi-3.5-mini-instruct); the local folder is a cache snapshot named by a commit hash.
    - A local folder (and the demo): see `folder_model_name`.
    """
    if source.kind in ("hf", "registry"):
        name = source.id.rsplit("/", 1)[-1]
    else:
        name = folder_model_name(Path(source.path))
    if _tokenizes_like_phi3(Path(source.path)) and not any(tag in name.lower() for tag in _PHI3_NAME_TAGS):
        # A Phi-3 fine-tune under a name of its own ("my-ft") has Phi-3's tokenizer, so it needs the
        # rule libllama grants by name alone: without it, its chat prompts tokenize unlike transformers'.
        name = f"{name}-phi3"
    return name


def _tokenizes_like_phi3(folder: Path) -> bool:
    """A Phi-3 architecture whose tokenizer.json strips the whitespace after a special token (Phi-3's `<|end|>`).

    Phi-4-mini shares the architecture but not the stripping tokens, so it keeps its own name.
    """
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        tokenizer = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict) or not isinstance(tokenizer, dict):
        return False
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not _PHI3_ARCHITECTURES.intersection(map(str, architectures)):
        return False
    added = tokenizer.get("added_tokens") or []
    return any(isinstance(t, dict) and t.get("special") and t.get("rstrip") for t in added)


def folder_model_name(folder: Path) -> str:
    """A local folder's model name: config.json's `_name_or_path` where it is a Hub id, else the folder's name.

    `_name_or_path` first, as the converter itself looks (only its titling is left out): it is the
    name the weights were published or loaded under, while a folder's name is whatever the download
    was put in ("model", "checkpoint-500", a snapshot hash). A path there (more than one '/', or
    starting with '/', '.' or '~') names no model. transformers 5 no longer saves `_name_or_path`,
    so a folder it wrote is named by the folder.
    """
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    declared = config.get("_name_or_path") if isinstance(config, dict) else None
    if isinstance(declared, str) and declared.count("/") <= 1 and not declared.startswith(("/", ".", "~")):
        name = declared.rsplit("/", 1)[-1]
        if _HUB_NAME_RE.fullmatch(name):
            return name
    return folder.name


def conversion_key(source: ResolvedSource) -> str:
    """The cache key of a source's conversion and of everything made from it (quantizations, merges).

    The model name is part of it: it is written into every GGUF, so entries converted under
    another name (before `--model-name` was passed, or from the same files in another folder)
    are not reused.
    """
    return f"{content_key(source.files)}-n{sha256_text(gguf_model_name(source))[:8]}"


def gguf_cache_path(content_key: str, variant: str, toolchain: Toolchain) -> Path:
    """Where a cached GGUF for (content, variant, toolchain) lives."""
    return cache_dir() / "gguf" / f"{content_key}-{variant}-{toolchain.cache_key}.gguf"


def warm_converter(toolchain: Toolchain) -> None:
    """Start the converter host's import now, so that the next `run_converter` finds it done."""
    from tasks.converter_host import warm

    root = Path(toolchain.converter_dir)
    warm(root, converter_env(root))


def run_converter(
    script: str,
    args: list[str],
    toolchain: Toolchain,
    on_line: Callable[[str], None] | None = None,
    on_start: Callable[[Any], None] | None = None,
) -> None:
    """Run one of the tree's converter scripts; raise `ConversionFailed` with its cause, not a traceback dump,
    or `NotEnoughDisk` (the file, the bytes written, the writer's total) when its disk filled up.

    It runs in a child of the warm converter host where there is one (`tasks.converter_host`).
    `on_start` gets the running job (it has `kill()`)."""
    from tasks.converter_host import start_job

    root = Path(toolchain.converter_dir)
    tail: deque[str] = deque(maxlen=40)
    proc = start_job(root, script, args, converter_env(root))
    if on_start:
        on_start(proc)
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


def _convert_cache_key(_ctx: Any, params: dict[str, Any]) -> str:
    return path_cache_key("kiln-convert", gguf_cache_path(params["content_key"], params["outtype"], params["toolchain"]))


@step(name="convert", cache_key=_convert_cache_key)
def convert_to_gguf(
    model_dir: Path,
    content_key: str,
    outtype: str,
    toolchain: Toolchain,
    model_name: str | None = None,
    on_line: Callable[[str], None] | None = None,
    on_start: Callable[[Any], None] | None = None,
) -> tuple[Path, bool]:
    """The float GGUF for `model_dir`, named `model_name` (general.name); returns (path, reused_from_cache).

    `content_key` is the source's `conversion_key`, which covers the name. Without `model_name`,
    the folder's (`folder_model_name`).
    """
    final = gguf_cache_path(content_key, outtype, toolchain)
    name = model_name or folder_model_name(model_dir)

    def build(tmp: Path) -> None:
        report = progress_reporter(f"convert {model_dir.name} to {outtype} GGUF", key="kiln-convert")

        def watch(line: str) -> None:
            if match := _WRITING_RE.search(line):
                report(int(match.group(1)) / 100)
            if on_line:
                on_line(line)

        # `--model-name=` in one argument: a name may start with "-".
        run_converter("convert_hf_to_gguf.py", ["--outtype", outtype, f"--model-name={name}", "--outfile", str(tmp),
                                                str(model_dir)], toolchain, watch, on_start)
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise ConversionFailed(f"the converter exited cleanly but wrote nothing for {model_dir}")

    return cached_build(final, build)


class ConversionAhead:
    """A base conversion started in the background while preflight's converter probe runs.

    The export flow starts one where `tasks.preflight.conversion_can_start_early` allows. On a
    refusal it calls `cancel`: the converter is killed and its temporary removed, like any failed
    build's. Otherwise the convert step asks `cached_build` for the same entry, waits on the
    entry's lock while this build finishes, and finds it done. A failure here is not reported:
    the convert step builds again and reports its cause.
    """

    def __init__(self, model_dir: Path, content_key: str, outtype: str, toolchain: Toolchain,
                 model_name: str | None = None) -> None:
        import contextvars
        import threading

        self._job: Any = None
        self._cancelled = threading.Event()
        args = (model_dir, content_key, outtype, toolchain, model_name)
        # The run's context goes along, so progress shows under the export as it would in the convert step.
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run, *args),
                                        name="kiln-conversion-ahead", daemon=True)
        self._thread.start()

    def _run(self, *args: Any) -> None:
        try:
            convert_to_gguf(*args, on_start=self._started)
        except Exception:
            pass

    def _started(self, job: Any) -> None:
        self._job = job
        if self._cancelled.is_set():
            job.kill()

    def cancel(self) -> None:
        self._cancelled.set()
        if self._job is not None:
            self._job.kill()
        self._thread.join()


# Entries this process built and stamped: the file's identity when hashed, and the digest. The
# next lookup of such an entry in this process (the convert step finding the conversion that ran
# ahead of it, beside the probe) trusts an identical identity instead of reading the file again.
# The identity includes the ctime, which every write and every utime moves on, so an entry
# changed in between is hashed as usual. Used once: later lookups hash again.
_stamped_here: dict[Path, tuple[tuple[int, ...], str]] = {}


def _identity(path: Path) -> tuple[int, ...]:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _entry_sha256(final: Path) -> str:
    remembered = _stamped_here.pop(final, None)
    if remembered is not None and remembered[0] == _identity(final):
        return remembered[1]
    return sha256_file(final)


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
        if final.is_file() and stamp.is_file() and stamp.read_text().strip() == _entry_sha256(final):
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
        identity = _identity(final)  # before hashing: a write while it is read changes the ctime
        digest = sha256_file(final)
        write_text_atomic(stamp, digest + "\n")
        _stamped_here[final] = (identity, digest)
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


def cache_entry_intact(path: Path) -> bool:
    """Cheap check that a cache entry a Prefect record points at is still what was stamped.

    The entry exists and was not modified after its sha256 stamp was written (outputs are hard
    links to entries, so an output edited in place would show here). No hashing: that is the
    point of the Prefect cache; `cached_build` re-hashes whenever the task really runs.
    """
    stamp = path.with_name(path.name + ".sha256")
    try:
        return path.stat().st_size > 0 and path.stat().st_mtime_ns <= stamp.stat().st_mtime_ns
    except OSError:
        return False


def output_sha256(output: Path, entry: Path) -> str:
    """sha256 of an output placed from a cache entry: the entry's stamp when the output is that
    very file (a hard link) and it is intact, which saves reading every output back; else hashed."""
    try:
        same_file = os.path.samefile(output, entry)
    except OSError:
        same_file = False
    if same_file and cache_entry_intact(entry):
        return entry.with_name(entry.name + ".sha256").read_text().strip()
    return sha256_file(output)


def place_output(cached: Path, final: Path) -> None:
    """Put a cached GGUF at its final name: a hard link where possible, else a copy; atomic either way."""
    with atomic_path(final, step="outputs", need=cached.stat().st_size) as tmp:
        tmp.unlink()
        try:
            os.link(cached, tmp)
        except OSError:
            import shutil

            shutil.copyfile(cached, tmp)
