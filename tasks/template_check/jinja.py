"""Jinja, as transformers' apply_chat_template renders it."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import date, datetime, time
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tasks.template_check.errors import ChatTemplateBroken
from tasks.template_check.matrix import ChatMessage

class ConversationRefused(jinja2.TemplateError):
    """The Jinja template called raise_exception: it declines this conversation
    (e.g. Gemma's "System role not supported")."""


class _GenerationBlock(Extension):
    """`{% generation %}…{% endgeneration %}` (transformers' AssistantTracker), rendered as its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise ConversationRefused(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers replaces Jinja's HTML-escaping tojson with plain json.dumps.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _jinja_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class JinjaChatTemplate:
    """A compiled Hugging Face chat template with its model's special tokens."""

    def __init__(self, text: str, special_tokens: Mapping[str, str | None] | None = None) -> None:
        self.text = text
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        try:
            self._template = _jinja_environment().from_string(text)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateBroken(
                f"the chat template does not compile (line {exc.lineno}: {exc.message})"
            ) from None

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    def render(
        self,
        messages: Sequence[ChatMessage],
        *,
        think: bool | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        strip_bos: bool = True,
        today: date | None = None,
    ) -> str:
        """Render with `add_generation_prompt=True`.

        Raises `ConversationRefused` when the template declines the conversation.
        A leading BOS printed from `bos_token` is removed (`strip_bos`): the
        runtime tokenizer adds BOS, so the Go template never writes it and the
        texts are compared without it. `today` pins the clock `strftime_now`
        reads (None: the real clock).
        """
        kwargs: dict[str, Any] = dict(self.special_tokens)
        if today is not None:
            # A render variable shadows the environment's global of the same name.
            noon = datetime.combine(today, time(12, 0))
            kwargs["strftime_now"] = noon.strftime
        if think is not None:
            kwargs["enable_thinking"] = think
        text = self._template.render(
            messages=[m.for_jinja() for m in messages],
            tools=list(tools) if tools is not None else None,
            documents=None,
            add_generation_prompt=True,
            **kwargs,
        )
        if strip_bos and self.writes_bos and text.startswith(self.bos_token or "\0"):
            text = text[len(self.bos_token or "") :]
        return text

    @property
    def writes_bos(self) -> bool:
        """Whether the template prints `bos_token` itself.

        Only such a BOS is removed before comparing: a model whose BOS string
        is also its turn marker (SmolLM2's `<|im_start|>`) starts its prompt
        with that marker as text, and the Go template must write it.
        """
        return bool(self.bos_token) and "bos_token" in self.text
