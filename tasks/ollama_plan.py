"""The export steps for Ollama: the chat template each GGUF carries, and one Modelfile beside each GGUF.

1. `embed_chat_template` (prebuilt GGUF exported with --dialect): every output GGUF gets a Jinja
   template equivalent to the dialect in `tokenizer.chat_template`, checked against the dialect's
   Go template over the message matrix, so Ollama's Jinja path and its TEMPLATE path agree.
2. `write_modelfiles`: checks that every GGUF carries the chat template it was verified with
   (for a Hugging Face source the model's own: `chat_template.jinja` or tokenizer_config.json),
   decides the chat format (tasks/ollama_format.py), derives the stops and proves them by
   generation (tasks/stops.py), and writes the Modelfiles.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from registry.models import OllamaModel, OllamaPlan
from tasks.errors import KilnError
from tasks.gguf_file import read_metadata, read_tokenizer
from tasks.modelfile import build_modelfile, render_modelfile
from tasks.ollama_format import decide_format
from tasks.preflight import DialectChoice
from tasks.step import step
from tasks.stops import compute_stops, derive_stops, prove_stops, unproven_stops


class ChatTemplateNotEmbedded(KilnError):
    """An output GGUF does not carry the chat template it was verified with."""


def modelfile_name(gguf_name: str) -> str:
    return gguf_name.removesuffix(".gguf") + ".Modelfile"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------
# The chat template inside the GGUF


def dialect_jinja(dialect: str) -> str | None:
    """A Jinja chat template equivalent to the dialect's Go template (no default system prompt).

    Kiln's own `templates/jinja/<dialect>.jinja` where there is one, else the first real model's
    template of the dialect that injects no default system prompt; None when there is neither.
    """
    import templates

    own = templates.TEMPLATES_DIR / "jinja" / f"{dialect}.jinja"
    if own.is_file():
        return own.read_text(encoding="utf-8")
    row = templates.get_dialect(dialect)
    return next((ref.read() for ref in row.references if ref.system is None), None)


@step(name="embed chat template")
def embed_chat_template(out_dir: Path, placed: Mapping[str, str], dialect: str) -> list[str]:
    """Write the dialect's Jinja equivalent into every placed GGUF whose own template is not it.

    Outputs are hard links into Kiln's cache, so each is rewritten as a new file (a streamed copy
    with the new metadata) and renamed over its link; the cache entry is untouched. Returns the
    names rewritten (their digests are no longer the cache entry's).
    """
    from tasks.files import safe_child
    from tasks.gguf_file import copy_with_string_metadata
    from tasks.template_check import check_template_text

    jinja = dialect_jinja(dialect)
    if jinja is None:
        raise ChatTemplateNotEmbedded(
            f"Kiln has no Jinja template equivalent to the {dialect} dialect to write into the GGUF; "
            "export from the Hugging Face model instead, or pick another --dialect")
    first = read_tokenizer(safe_child(out_dir, next(iter(placed.values()))), with_vocabulary=False)
    check = check_template_text(jinja, bos_token=first.bos_token, eos_token=first.eos_token, dialect=dialect,
                                strict=False, source=f"the {dialect} dialect's Jinja template")
    if not check.verified or check.system:
        raise ChatTemplateNotEmbedded(
            f"the Jinja template Kiln holds for the {dialect} dialect does not render what its Go template "
            "renders; this is a Kiln bug, please report it")
    rewritten = []
    for name in placed.values():
        path = safe_child(out_dir, name)
        if read_tokenizer(path, with_vocabulary=False).chat_template == jinja:
            continue
        copy_with_string_metadata(path, path, {"tokenizer.chat_template": jinja})
        rewritten.append(name)
    return rewritten


def check_embedded_template(out_dir: Path, placed: Mapping[str, str], expected: str, what: str) -> str:
    """Every placed GGUF's `tokenizer.chat_template` is `expected`; returns its sha256."""
    from tasks.files import safe_child

    for name in placed.values():
        carried = read_tokenizer(safe_child(out_dir, name), with_vocabulary=False).chat_template
        if carried != expected:
            state = "no chat template" if not carried else "a different chat template"
            raise ChatTemplateNotEmbedded(
                f"{name} carries {state} than {what}; Ollama's Jinja path would prompt it differently. "
                "The pinned converter wrote it: report it, or export with a converter that copies the template")
    return _sha256(expected)


# ---------------------------------------------------------------------------
# The Modelfiles


@step(name="modelfile")
def write_modelfiles(
    out_dir: Path,
    ggufs: Mapping[str, str],
    chat: DialectChoice,
    license_text: str | None = None,
    ollama_name: str | None = None,
    adapter: str | None = None,
    *,
    template_source: Path | None = None,
    prove: bool = True,
) -> OllamaPlan:
    """One Modelfile beside each GGUF (`FROM ./<file>`), in the chat format decided here, with proven stops.

    `ggufs` maps quant type → GGUF file name in `out_dir`; `adapter` names a GGUF LoRA there
    (adapter mode: every Modelfile gets `ADAPTER ./<adapter>`). `template_source` is the Hugging
    Face folder the model came from (its chat template must be the GGUFs'; its
    generation_config.json names EOS tokens). Stops come from the first GGUF (every quant type
    of one export shares the vocabulary) and are proven on it unless `prove` is off.
    """
    from tasks.files import safe_child, write_text_atomic
    from tasks.ollama_name import ollama_names_for

    first = safe_child(out_dir, next(iter(ggufs.values())))
    tokenizer = read_tokenizer(first)
    warnings: list[str] = []
    template_sha = None
    if template_source is not None and template_source.is_dir():
        from tasks.template_check import NoChatTemplate, load_chat_template

        try:
            own = load_chat_template(template_source).text
        except NoChatTemplate:
            own = None
        if own is not None:
            template_sha = check_embedded_template(out_dir, ggufs, own, "the model's own template")
    elif tokenizer.chat_template:
        template_sha = _sha256(tokenizer.chat_template)

    arch = read_metadata(first, ("general.architecture",)).get("general.architecture")
    decision = decide_format(chat.format, arch if isinstance(arch, str) else None, chat.dialect)
    if decision.format == "jinja" and not tokenizer.chat_template:
        raise ChatTemplateNotEmbedded(f"{first.name} carries no chat template, so Ollama has no Jinja to render; "
                                      "pass --dialect NAME to write a Go TEMPLATE")

    if tokenizer.chat_template:
        derived = derive_stops(
            chat_template=tokenizer.chat_template, tokens=tokenizer.tokens, special_tokens=tokenizer.special_tokens,
            bos_token=tokenizer.bos_token, gguf_eos=[tokenizer.eos_token, tokenizer.eot_token, tokenizer.eom_token],
            model_dir=template_source if template_source is not None and template_source.is_dir() else None,
        )
        warnings += derived.warnings
        if prove:
            proofs = prove_stops(first, derived, chat_template=tokenizer.chat_template, bos_token=tokenizer.bos_token,
                                 eos_token=tokenizer.eos_token, add_bos=bool(tokenizer.add_bos_token))
        else:
            proofs = unproven_stops(derived, "not proven: verification was turned off (--no-verify)")
            warnings.append("stops not proven by generation: verification was turned off (--no-verify)")
        stops = [p.stop for p in proofs if p.in_modelfile]
    else:
        # No template to derive from (a source without one, exported with --dialect and not embedded).
        guessed = compute_stops(chat.dialect, eos_tokens=[tokenizer.eos_token],
                                eot_tokens=[tokenizer.eot_token, tokenizer.eom_token], vocab=tokenizer.tokens)
        stops, proofs = list(guessed.stops), []
        warnings += list(guessed.warnings) + ["stops are the dialect's defaults: the GGUF carries no chat template "
                                              "to derive them from, and none was proven"]

    system = chat.system if decision.format == "template" else None
    names = ollama_names_for(ollama_name, list(ggufs)) if ollama_name else {}
    plan = OllamaPlan(dialect=chat.dialect, verified=chat.verified, system=system, stops=stops, warnings=warnings,
                      format=decision.format, renderer=decision.renderer, parser=decision.parser,
                      requires=decision.requires, format_detail=decision.detail, chat_template_sha256=template_sha,
                      stop_proofs=proofs)
    for quant, gguf_name in ggufs.items():
        modelfile = build_modelfile(
            from_=f"./{gguf_name}", dialect=chat.dialect, system=system, stop=stops, license=license_text,
            adapter=f"./{adapter}" if adapter else None, chat_format=decision.format, renderer=decision.renderer,
            parser=decision.parser, requires=decision.requires,
        )
        header = [f"Kiln export: {gguf_name}",
                  f"ollama format: {decision.format} ({decision.detail})",
                  f"dialect {chat.dialect} ({'verified' if chat.verified else 'not verified'})"]
        target = safe_child(out_dir, modelfile_name(gguf_name))
        write_text_atomic(target, render_modelfile(modelfile, header=header))
        plan.models.append(OllamaModel(quant=quant, gguf=gguf_name, modelfile=target.name, name=names.get(quant)))
    return plan
