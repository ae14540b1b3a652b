"""The outputs step: cached GGUFs placed under their final names, and each output's manifest line.

Placement is a hard link to the cache entry where the filesystem allows (no extra disk), else a
copy; atomic either way (`tasks.convert.place_output`). The user's quant types come first, so a
tagged `--ollama-name` goes to their first choice.
"""

from __future__ import annotations

from pathlib import Path

from registry.models import OutputFile
from tasks.convert import output_sha256, place_output
from tasks.files import remove_stale_temporaries, safe_child, sha256_file
from tasks.step import step
from tasks.toolchain import Toolchain


def output_name(stem: str, quant: str) -> str:
    return f"{stem}-{quant}.gguf"


@step(name="outputs")
def place_outputs(out_dir: Path, stem: str, cached: dict[str, Path], wanted: list[str]) -> dict[str, str]:
    """Every cached GGUF at `<stem>-<quant>.gguf` in `out_dir`: quant type → file name, the user's types first."""
    remove_stale_temporaries(out_dir)
    placed: dict[str, str] = {}
    for quant in [q for q in wanted if q in cached] + [q for q in cached if q not in wanted]:
        final = safe_child(out_dir, output_name(stem, quant))
        place_output(cached[quant], final)
        placed[quant] = final.name
    return placed


@step(name="adapter lora")
def ship_adapter_lora(out_dir: Path, stem: str, adapter_dir: Path, base_dir: Path, toolchain: Toolchain,
                      info) -> tuple[str, Path]:
    """`--adapter-mode adapter`: the GGUF LoRA (cached) placed as `<stem>-lora.gguf`; (file name, cache entry)."""
    from tasks.adapter import convert_adapter_to_gguf

    lora_gguf, _ = convert_adapter_to_gguf(adapter_dir, base_dir, toolchain, info=info)
    final = safe_child(out_dir, f"{stem}-lora.gguf")
    place_output(lora_gguf, final)
    return final.name, lora_gguf


def record_output(out_dir: Path, name: str, quant: str, entry: Path | None = None) -> OutputFile:
    """The manifest's line for one output; one placed from cache `entry` takes the entry's stamp."""
    path = out_dir / name
    digest = output_sha256(path, entry) if entry is not None else sha256_file(path)
    return OutputFile(path=name, quant=quant, size=path.stat().st_size, sha256=digest)
