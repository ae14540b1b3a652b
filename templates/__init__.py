"""Chat-template dialects: one Go `text/template` per dialect, after seed 001.

A *dialect* is a family of chat formats that share turn framing (ChatML,
Llama 3 headers, Gemma turns, ...). Each row of the table records:

- the `.gotmpl` file shipped beside this module: the Modelfile TEMPLATE, in
  Ollama's template language (`.Messages`, `.System`, `.Tools`, `.Think`);
- default stops: strings Ollama must not generate past (a missing stop means
  runaway generation);
- default sampling parameters (`temperature`, `top_p`) for the family;
- the reference Jinja chat templates (real models' `tokenizer.chat_template`,
  vendored under `reference/`) that the Go template must reproduce byte for
  byte over Kiln's message matrix, and `verified`: True only for dialects with
  such a reference, which `tests/test_template_roundtrip.py` checks;
- `fixed_date`: the date the Go template prints where a model's template
  prints today's (Llama 3.2), so such a template is "exact apart from the date".

The templates never write a BOS token: Ollama's tokenizer adds BOS itself
when the GGUF says `tokenizer.ggml.add_bos_token`, and a template that wrote
one would double it. Reference renders are compared with their leading BOS
removed for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Final, Literal

from tasks.errors import KilnError

Dialect = Literal[
    "chatml",
    "qwen2.5",
    "qwen3thinking",
    "gemma2",
    "smollm3",
    "olmo2",
    "llama3",
    "phi3",
    "phi4mini",
    "mistral",
    "mistralv3",
]
# Dialects seed 000 plans for multimodal bases. No `.gotmpl` ships for them yet: a registry spec may
# name one, and an export of such a base writes no Modelfile TEMPLATE for it.
PlannedDialect = Literal["paligemma", "qwen2-audio", "qwen2-vl", "internvl2"]

TEMPLATES_DIR: Final[Path] = Path(__file__).resolve().parent
REFERENCE_DIR: Final[Path] = TEMPLATES_DIR / "reference"
# Source of the Go program that renders templates as Ollama does; built on
# demand into Kiln's cache (tasks.template_check).
GORENDER_DIR: Final[Path] = TEMPLATES_DIR / "gorender"


class TemplateRegistryError(KilnError):
    """An unknown dialect, or a dialect whose shipped files are missing."""


@dataclass(frozen=True)
class ReferenceTemplate:
    """A real model's Jinja chat template that a dialect must reproduce.

    `bos_token`/`eos_token` are that model's special tokens as its
    tokenizer_config.json names them (templates print them). `system` is the
    Modelfile SYSTEM that makes the Go template match: the default system
    prompt the Jinja template injects when a conversation has none, or None.
    """

    model: str
    file_name: str
    bos_token: str | None = None
    eos_token: str | None = None
    system: str | None = None

    @property
    def path(self) -> Path:
        return REFERENCE_DIR / self.file_name

    def read(self) -> str:
        if not self.path.is_file():
            raise TemplateRegistryError(
                f"reference template {self.file_name} is missing from {REFERENCE_DIR}; "
                "the Kiln installation is incomplete"
            )
        return self.path.read_text(encoding="utf-8")


@dataclass(frozen=True)
class DialectTemplate:
    """One registry row: a dialect's Go template, stops and sampling defaults."""

    dialect: Dialect
    template_path: Path
    default_stops: tuple[str, ...]
    default_temperature: float = 0.7
    default_top_p: float = 0.9
    references: tuple[ReferenceTemplate, ...] = field(default_factory=tuple)
    # Whether the template reads `.Tools` (Ollama then reports the model as
    # tool-capable).
    has_tools: bool = False
    # The date the Go template prints where a model's template prints today's
    # (`strftime_now`). Ollama's `currentDate` prints 2006-01-02 only, so a Go
    # template cannot print "26 Jul 2024"-style dates of today; the fixed date
    # its family's template falls back to is the honest choice. A date-bearing
    # model template is compared with its clock pinned to this date, and the
    # check reports "exact apart from the date".
    fixed_date: date | None = None

    @property
    def verified(self) -> bool:
        """True when a real model's Jinja template backs this dialect.

        The round-trip test fails if any reference of a verified dialect stops
        matching, so the flag cannot drift from the truth.
        """
        return bool(self.references)

    @property
    def reference(self) -> str | None:
        """Name of the first reference model, or None for unverified dialects."""
        return self.references[0].model if self.references else None

    def read_template(self) -> str:
        """The `.gotmpl` file, verbatim (trailing newlines are significant)."""
        if not self.template_path.is_file():
            raise TemplateRegistryError(
                f"template file missing for dialect {self.dialect!r}: {self.template_path}"
            )
        return self.template_path.read_text(encoding="utf-8")


_CHATML_STOPS: Final = ("<|im_end|>", "<|endoftext|>", "<|im_start|>")
_PHI_STOPS: Final = ("<|end|>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>")

_REGISTRY: Final[dict[str, DialectTemplate]] = {
    "chatml": DialectTemplate(
        dialect="chatml",
        template_path=TEMPLATES_DIR / "chatml.gotmpl",
        # `<|im_start|>` too: a model that opens a new turn instead of
        # closing its own must still stop.
        default_stops=_CHATML_STOPS,
        references=(
            ReferenceTemplate(
                model="HuggingFaceTB/SmolLM2-135M-Instruct",
                file_name="chatml.SmolLM2-135M-Instruct.jinja",
                bos_token="<|im_start|>",
                eos_token="<|im_end|>",
                system="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
            ),
        ),
    ),
    # ChatML plus Qwen2.5's tool format. Not folded into "chatml": a TEMPLATE that reads .Tools makes
    # Ollama report the model as tool-capable, and a ChatML model without tools (SmolLM2) is not.
    "qwen2.5": DialectTemplate(
        dialect="qwen2.5",
        template_path=TEMPLATES_DIR / "qwen2.5.gotmpl",
        default_stops=_CHATML_STOPS,
        references=(
            ReferenceTemplate(
                model="Qwen/Qwen2.5-7B-Instruct",
                file_name="qwen2.5.Qwen2.5-7B-Instruct.jinja",
                eos_token="<|im_end|>",
                system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
            ),
        ),
        has_tools=True,
    ),
    "qwen3thinking": DialectTemplate(
        dialect="qwen3thinking",
        template_path=TEMPLATES_DIR / "qwen3thinking.gotmpl",
        default_stops=_CHATML_STOPS,
        default_temperature=0.6,
        default_top_p=0.95,
        references=(
            ReferenceTemplate(
                model="Qwen/Qwen3-0.6B",
                file_name="qwen3thinking.Qwen3-0.6B.jinja",
                eos_token="<|im_end|>",
            ),
        ),
        has_tools=True,
    ),
    "gemma2": DialectTemplate(
        dialect="gemma2",
        template_path=TEMPLATES_DIR / "gemma2.gotmpl",
        default_stops=("<end_of_turn>", "<eos>", "<start_of_turn>"),
        references=(
            ReferenceTemplate(
                model="google/gemma-2-2b-it",
                file_name="gemma2.gemma-2-2b-it.jinja",
                bos_token="<bos>",
                eos_token="<eos>",
            ),
            # Differs from Gemma 2 only where a conversation opens with a
            # system message (Gemma 2 refuses it; Gemma 3 writes it, even empty).
            ReferenceTemplate(
                model="google/gemma-3-4b-it",
                file_name="gemma2.gemma-3-it.jinja",
                bos_token="<bos>",
                eos_token="<eos>",
            ),
        ),
    ),
    "smollm3": DialectTemplate(
        dialect="smollm3",
        template_path=TEMPLATES_DIR / "smollm3.gotmpl",
        default_stops=("<|im_end|>", "<|end_of_text|>", "<|im_start|>"),
        default_temperature=0.6,
        default_top_p=0.95,
        references=(
            ReferenceTemplate(
                model="HuggingFaceTB/SmolLM3-3B",
                file_name="smollm3.SmolLM3-3B.jinja",
                eos_token="<|im_end|>",
            ),
        ),
    ),
    "olmo2": DialectTemplate(
        dialect="olmo2",
        template_path=TEMPLATES_DIR / "olmo2.gotmpl",
        # No reference template yet: unverified (shared/reference/README.md).
        default_stops=("<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>"),
    ),
    "llama3": DialectTemplate(
        dialect="llama3",
        template_path=TEMPLATES_DIR / "llama3.gotmpl",
        # `<|eom_id|>` ends Llama 3.1's tool-call turns.
        default_stops=("<|eot_id|>", "<|end_of_text|>", "<|start_header_id|>", "<|eom_id|>"),
        references=(
            ReferenceTemplate(
                model="meta-llama/Llama-3.1-8B-Instruct",
                file_name="llama3.Llama-3.1-8B-Instruct.jinja",
                bos_token="<|begin_of_text|>",
                eos_token="<|eot_id|>",
            ),
            # Prints today's date (strftime_now("%d %b %Y")) where 3.1 prints
            # 26 Jul 2024: exact apart from the date (see `fixed_date`).
            ReferenceTemplate(
                model="meta-llama/Llama-3.2-3B-Instruct",
                file_name="llama3.Llama-3.2-3B-Instruct.jinja",
                bos_token="<|begin_of_text|>",
                eos_token="<|eot_id|>",
            ),
        ),
        has_tools=True,
        # Llama 3.1's template and Llama 3.2's without strftime_now print this.
        fixed_date=date(2024, 7, 26),
    ),
    "phi3": DialectTemplate(
        dialect="phi3",
        template_path=TEMPLATES_DIR / "phi3.gotmpl",
        default_stops=_PHI_STOPS,
        references=(
            ReferenceTemplate(
                model="microsoft/Phi-3.5-mini-instruct",
                file_name="phi3.Phi-3.5-mini-instruct.jinja",
                bos_token="<s>",
                eos_token="<|endoftext|>",
            ),
        ),
    ),
    "phi4mini": DialectTemplate(
        dialect="phi4mini",
        template_path=TEMPLATES_DIR / "phi4mini.gotmpl",
        # No reference template yet: unverified. Phi-4-mini-reasoning's own
        # default system preamble is not guessed here; check_template infers
        # it from the model's Jinja template when the model is at hand.
        default_stops=_PHI_STOPS,
    ),
    "mistral": DialectTemplate(
        dialect="mistral",
        template_path=TEMPLATES_DIR / "mistral.gotmpl",
        default_stops=("</s>", "[/INST]", "[INST]"),
        references=(
            ReferenceTemplate(
                model="mistralai/Mistral-Nemo-Instruct-2407",
                file_name="mistral.Mistral-Nemo-Instruct-2407.jinja",
                bos_token="<s>",
                eos_token="</s>",
            ),
        ),
        has_tools=True,
    ),
    "mistralv3": DialectTemplate(
        dialect="mistralv3",
        template_path=TEMPLATES_DIR / "mistralv3.gotmpl",
        default_stops=("</s>", "[/INST]", "[INST]"),
        references=(
            ReferenceTemplate(
                model="mistralai/Mistral-7B-Instruct-v0.3",
                file_name="mistralv3.Mistral-7B-Instruct-v0.3.jinja",
                bos_token="<s>",
                eos_token="</s>",
            ),
        ),
        has_tools=True,
    ),
}


def registered_dialects() -> tuple[Dialect, ...]:
    """Every shipped dialect, in table order (the order check_template tries them)."""
    return tuple(row.dialect for row in _REGISTRY.values())


def verified_dialects() -> tuple[Dialect, ...]:
    """Dialects backed by a reference Jinja template."""
    return tuple(row.dialect for row in _REGISTRY.values() if row.verified)


def get_dialect(name: str) -> DialectTemplate:
    """The table row for `name`; an unknown name is refused naming the known ones."""
    row = _REGISTRY.get(name)
    if row is None:
        raise TemplateRegistryError(
            f"unknown chat-template dialect {name!r}; known dialects: "
            + ", ".join(_REGISTRY)
        )
    return row


def load_template_text(name: str) -> str:
    """The Go template text of dialect `name`."""
    return get_dialect(name).read_template()
