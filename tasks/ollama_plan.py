"""The export step that writes one Modelfile beside each GGUF and plans its Ollama registration."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from registry.models import OllamaModel, OllamaPlan
from tasks.gguf_file import read_tokenizer
from tasks.modelfile import build_modelfile, render_modelfile
from tasks.step import step
from tasks.stops import compute_stops


def modelfile_name(gguf_name: str) -> str:
    return gguf_name.removesuffix(".gguf") + ".Modelfile"


@step(name="modelfile")
def write_modelfiles(
    out_dir: Path,
    ggufs: Mapping[str, str],
    dialect: str,
    verified: bool,
    system: str | None,
    license_text: str | None = None,
    ollama_name: str | None = None,
    adapter: str | None = None,
) -> OllamaPlan:
    """One Modelfile beside each GGUF (`FROM ./<file>`), with the dialect's template and checked stops.

    `ggufs` maps quant type → GGUF file name in `out_dir`; `adapter` names a GGUF LoRA there
    (adapter mode: every Modelfile gets `ADAPTER ./<adapter>`). Stops come from the
    first GGUF's vocabulary: every quant type of one export shares it.
    """
    from tasks.files import safe_child, write_text_atomic
    from tasks.ollama_name import ollama_names_for

    first = safe_child(out_dir, next(iter(ggufs.values())))
    tokenizer = read_tokenizer(first)
    stops = compute_stops(
        dialect,
        eos_tokens=[tokenizer.eos_token],
        eot_tokens=[tokenizer.eot_token, tokenizer.eom_token],
        vocab=tokenizer.tokens,
    )
    names = ollama_names_for(ollama_name, list(ggufs)) if ollama_name else {}
    plan = OllamaPlan(dialect=dialect, verified=verified, system=system, stops=list(stops.stops),
                      warnings=list(stops.warnings))
    for quant, gguf_name in ggufs.items():
        modelfile = build_modelfile(from_=f"./{gguf_name}", dialect=dialect, system=system, stop=stops.stops,
                                    license=license_text, adapter=f"./{adapter}" if adapter else None)
        header = [f"Kiln export: {gguf_name}, dialect {dialect} ({'verified' if verified else 'not verified'})"]
        target = safe_child(out_dir, modelfile_name(gguf_name))
        write_text_atomic(target, render_modelfile(modelfile, header=header))
        plan.models.append(OllamaModel(quant=quant, gguf=gguf_name, modelfile=target.name, name=names.get(quant)))
    return plan
