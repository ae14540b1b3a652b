"""Where the Jinja template comes from: a .jinja file, a model folder or a GGUF."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.template_check.errors import NoChatTemplate, TemplateCheckError

class ChatTemplateSource(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: Literal["jinja", "model_dir", "gguf"]
    path: str
    text: str
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos_token: bool | None = Field(default=None, description="the GGUF's tokenizer.ggml.add_bos_token")


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as strings or AddedToken dicts.
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _template_from_config(config: Mapping[str, Any]) -> str | None:
    value = config.get("chat_template")
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        # Named templates ({"name", "template"}); "default" is what apply_chat_template uses.
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        chosen = named.get("default")
        return chosen if isinstance(chosen, str) else None
    return None


def load_chat_template(source: Path) -> ChatTemplateSource:
    """Read the Jinja chat template (and BOS/EOS) from a .jinja file, a model folder or a .gguf."""
    source = Path(source)
    if source.is_dir():
        config: dict[str, Any] = {}
        config_path = source / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise TemplateCheckError(f"{config_path} is not valid JSON: {exc}") from None
        text = None
        standalone = source / "chat_template.jinja"
        if standalone.is_file():
            # transformers prefers the standalone file when both exist.
            text = standalone.read_text(encoding="utf-8")
        if text is None:
            text = _template_from_config(config)
        if text is None:
            raise NoChatTemplate(
                f"{source} has no chat template (neither chat_template.jinja nor tokenizer_config.json's "
                "chat_template); give the dialect explicitly with --dialect"
            )
        return ChatTemplateSource(
            kind="model_dir",
            path=str(source),
            text=text,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
        )
    if not source.is_file():
        raise TemplateCheckError(f"{source} does not exist")
    if source.suffix == ".gguf":
        from tasks.gguf_file import read_tokenizer

        facts = read_tokenizer(source, with_vocabulary=False)
        if not facts.chat_template:
            raise NoChatTemplate(
                f"{source} carries no tokenizer.chat_template; give the dialect explicitly with --dialect"
            )
        return ChatTemplateSource(
            kind="gguf", path=str(source), text=facts.chat_template, bos_token=facts.bos_token,
            eos_token=facts.eos_token, add_bos_token=facts.add_bos_token,
        )
    return ChatTemplateSource(kind="jinja", path=str(source), text=source.read_text(encoding="utf-8"))
