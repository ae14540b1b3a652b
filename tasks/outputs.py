"""The outputs step: cached GGUFs placed under their final names, and each output's manifest line.

Placement is a hard link to the cache entry where the filesystem allows (no extra disk), else a
copy; atomic either way (`tasks.convert.place_output`). The user's quant types come first, so a
tagged `--ollama-name` goes to their first choice. With `--split-max-size`, `split_outputs` then
splits the placed files larger than the limit (tasks/split.py), after the Modelfiles' stops were
proven on the whole files; a split output's Modelfile is dropped (Ollama cannot import shards).
"""

from __future__ import annotations

from pathlib import Path

from registry.models import Check, OllamaPlan, OutputFile
from tasks.convert import output_sha256, place_output
from tasks.files import remove_stale_temporaries, safe_child, sha256_file
from tasks.split import check_split_fits, largest_tensor, remove_shards, split_gguf, will_split
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
        remove_shards(out_dir, final.stem)  # an earlier export's split of this file
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


@step(name="split outputs")
def split_outputs(out_dir: Path, placed: dict[str, str], max_size: str) -> dict[str, list[str]]:
    """Every placed GGUF larger than `max_size` split into shards: quant type → shard names, in order.

    Every file is checked against its largest tensor before any is split, so a refusal leaves the
    outputs as placed.
    """
    paths = {quant: safe_child(out_dir, name) for quant, name in placed.items()}
    to_split = {quant: path for quant, path in paths.items() if will_split(path.stat().st_size, max_size)}
    for path in to_split.values():
        name, nbytes = largest_tensor(path)
        check_split_fits(max_size, nbytes, f"{name} of {path.name}")
    return {quant: [shard.name for shard in split_gguf(path, max_size)] for quant, path in to_split.items()}


def drop_split_modelfiles(out_dir: Path, plan: OllamaPlan, split: dict[str, list[str]]) -> OllamaPlan:
    """The plan without the Modelfiles of split outputs (Ollama imports one GGUF file), saying so."""
    dropped = [m for m in plan.models if m.quant in split]
    if not dropped:
        return plan
    for model in dropped:
        safe_child(out_dir, model.modelfile).unlink(missing_ok=True)
    quants = ", ".join(m.quant for m in dropped)
    note = (f"no Modelfile for {quants}: split by --split-max-size, and Ollama cannot import split GGUFs; "
            "export without --split-max-size for Ollama")
    return plan.model_copy(update={"models": [m for m in plan.models if m.quant not in split],
                                   "warnings": [*plan.warnings, note]})


def split_check(split: dict[str, list[str]], max_size: str, plan: OllamaPlan | None) -> Check:
    """The summary's one line on splitting: what was split into how many shards, and what Ollama gets."""
    if not split:
        return Check(name="split outputs", target="request", passed=True,
                     detail=f"every output is at most {max_size}: none split")
    parts = ", ".join(f"{quant} in {len(shards)} shards" for quant, shards in split.items())
    detail = f"{parts} of at most {max_size} of tensor data each (load the first shard)"
    if plan is not None:
        detail += "; Ollama cannot import split GGUFs, so " + (
            "only the whole outputs have Modelfiles" if plan.models else "no output has a Modelfile")
    return Check(name="split outputs", target="request", passed=True, detail=detail)


def record_shards(out_dir: Path, shards: list[str], quant: str) -> list[OutputFile]:
    """The manifest's lines for one split output: every shard with its size and sha256."""
    records = []
    for i, name in enumerate(shards, start=1):
        path = safe_child(out_dir, name)
        records.append(OutputFile(path=name, quant=quant, size=path.stat().st_size, sha256=sha256_file(path),
                                  shard=i, shards=len(shards)))
    return records


def record_placed(out_dir: Path, placed: dict[str, str], cached: dict[str, Path], rewritten: list[str],
                  split: dict[str, list[str]]) -> list[OutputFile]:
    """The manifest's lines for the placed GGUFs: one a file, or one a shard where it was split.

    A file placed from the cache takes its entry's stamp; one rewritten since (a new chat template)
    is hashed anew.
    """
    records: list[OutputFile] = []
    for quant, name in placed.items():
        if quant in split:
            records += record_shards(out_dir, split[quant], quant)
        else:
            records.append(record_output(out_dir, name, quant, None if name in rewritten else cached[quant]))
    return records
