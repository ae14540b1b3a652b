"""How Ollama will format chats for an export: a Go TEMPLATE, a built-in renderer, or the GGUF's own Jinja.

Read in Ollama's source (ollama/ollama at fb30760, v0.33.0-rc2; docs/ollama.md in this repo):

- `template`: the Modelfile TEMPLATE (Go `text/template`). Kiln writes it when a dialect's Go
  template renders the model's own Jinja template exactly (tasks/template_check), or when the
  user asked for a dialect with --dialect. Every Ollama version reads it.
- `renderer`: Ollama's built-in Go renderer and parser (`model/renderers/`, `model/parsers/`).
  For some architectures `ollama create` sets them itself (`server/create.go`: gemma4, laguna,
  nemotron_h*), and a model with a renderer never uses its TEMPLATE (`server/routes.go`
  `usesOllamaRenderedChat`). Kiln then writes the RENDERER/PARSER pair Ollama would choose, so
  the Modelfile says what Ollama does. Ollama's renderers are Go code in Ollama itself; Kiln
  cannot run them here, so this choice is recorded as Ollama's own, not verified by Kiln.
- `jinja`: no TEMPLATE. Since the llama-server engine (v0.30.0), Ollama renders a model with no
  Go TEMPLATE, renderer or parser with the GGUF's `tokenizer.chat_template` through llama.cpp's
  Jinja engine. Kiln chooses it when no dialect is exact (tasks/template_check decides), and
  checks that every GGUF carries the model's own template.

`jinja` and `renderer` get a REQUIRES line naming the first Ollama version that formats chats
that way. What older servers do: before v0.14.0 the Modelfile parser refuses REQUIRES
(`unknown command`), and the REST API ignores fields it does not know, so an old server would
create the model without the renderer (or, for `jinja`, with its own guess at a Go template or
none). Kiln's registration therefore refuses a server older than REQUIRES before it uploads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final, NamedTuple

from registry.models import OllamaFormat

# First Ollama release with each feature (the tag that first contains the commit).
REQUIRES_SINCE: Final = "0.14.0"  # the REQUIRES command: 8852220f5, 2025-12-18
JINJA_SINCE: Final = "0.30.0"  # every GGUF through llama-server, its Jinja when no TEMPLATE: 9db4bdbad, 2026-05-29


class BuiltinRenderer(NamedTuple):
    renderer: str
    parser: str
    since: str  # the first release whose `ollama create` assigns it to the architecture


# GGUF architecture → the pair `server/create.go` assigns when the create request names none.
ARCHITECTURE_RENDERERS: Final[dict[str, BuiltinRenderer]] = {
    "gemma4": BuiltinRenderer("gemma4", "gemma4", "0.20.0"),  # 96b202d34
    "laguna": BuiltinRenderer("laguna", "laguna", "0.22.1"),  # 87288ced4
    "nemotron_h": BuiltinRenderer("nemotron-3-nano", "nemotron-3-nano", "0.22.1"),  # 87288ced4
    "nemotron_h_moe": BuiltinRenderer("nemotron-3-nano", "nemotron-3-nano", "0.22.1"),
    "nemotron_h_omni": BuiltinRenderer("nemotron-3-nano", "nemotron-3-nano", "0.22.1"),
}
# Hugging Face `model_type` (config.json) → the GGUF architecture the converter writes, for the above.
_MODEL_TYPES: Final[dict[str, str]] = {"gemma4": "gemma4", "gemma4_text": "gemma4", "laguna": "laguna",
                                        "nemotron_h": "nemotron_h"}


class FormatDecision(NamedTuple):
    format: OllamaFormat
    renderer: str | None
    parser: str | None
    requires: str | None
    detail: str


def version_tuple(text: str) -> tuple[int, ...]:
    """'0.30.0' → (0, 30, 0); a pre-release suffix is ignored."""
    core = text.strip().lstrip("v").split("-")[0].split("+")[0]
    return tuple(int(p) for p in core.split(".") if p.isdigit())


def _later(a: str, b: str) -> str:
    return a if version_tuple(a) >= version_tuple(b) else b


def builtin_renderer(gguf_arch: str | None) -> BuiltinRenderer | None:
    return ARCHITECTURE_RENDERERS.get(gguf_arch or "")


def architecture_of_source(source: Path) -> str | None:
    """The GGUF architecture of a .gguf, or the one a model folder's config.json converts to (renderer table only)."""
    source = Path(source)
    if source.suffix == ".gguf" and source.is_file():
        from tasks.gguf_file import GGUFFileError, read_metadata

        try:
            value = read_metadata(source, ("general.architecture",)).get("general.architecture")
        except GGUFFileError:
            return None
        return value if isinstance(value, str) else None
    config = source / "config.json"
    if source.is_dir() and config.is_file():
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (ValueError, OSError, AttributeError):
            return None
        return _MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
    return None


def decide_format(chat_format: str, gguf_arch: str | None, dialect: str) -> FormatDecision:
    """The format for an export, from the template check's `template`/`jinja` and the GGUF architecture."""
    builtin = builtin_renderer(gguf_arch)
    if builtin is not None:
        return FormatDecision(
            "renderer", builtin.renderer, builtin.parser, _later(builtin.since, REQUIRES_SINCE),
            f"Ollama's built-in renderer {builtin.renderer!r} and parser {builtin.parser!r}: `ollama create` assigns "
            f"them to {gguf_arch} GGUFs since {builtin.since}, and a renderer overrides any TEMPLATE (Kiln cannot "
            "run Ollama's Go renderers, so this follows Ollama's own choice unverified)",
        )
    if chat_format == "jinja":
        return FormatDecision(
            "jinja", None, None, JINJA_SINCE,
            f"no TEMPLATE: no Go dialect renders the model's template exactly (closest: {dialect}), so Ollama "
            f"{JINJA_SINCE}+ renders the GGUF's own Jinja chat template",
        )
    return FormatDecision("template", None, None, None, f"the {dialect} dialect's Go TEMPLATE")
