"""Match a model's Jinja chat template with a Kiln dialect's Go template.

Ollama renders a Modelfile TEMPLATE (Go `text/template`); Hugging Face and
llama.cpp render the model's Jinja `chat_template`. A model exported with the
wrong TEMPLATE answers, but badly, and nothing says why. `check_template`
renders both over a fixed message matrix and picks the dialect whose Go
template produces exactly the Jinja text on every case:

- Jinja is rendered as `transformers`' `apply_chat_template` does
  (sandboxed, `trim_blocks`/`lstrip_blocks`, `raise_exception`,
  `strftime_now`, the JSON `tojson`, special tokens, `add_generation_prompt`).
- Go templates are rendered by a small Go program shipped in
  `templates/gorender/`, built on demand with `go build` into the Kiln cache.
  It assembles messages exactly as Ollama's `/api/chat` does (Modelfile
  SYSTEM prepended when the request has no system message, consecutive
  same-role messages merged, `.System` joined with blank lines).
- A Jinja template that injects a default system prompt when the
  conversation has none (SmolLM2, Qwen2.5) is matched by inferring that prompt
  and making it the Modelfile SYSTEM: Ollama then prepends it exactly when the
  Jinja template would have written it.

A case the Jinja template refuses (`raise_exception`, e.g. Gemma's "System
role not supported") is skipped, not counted, and reported.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field

import templates
from tasks.errors import KilnError
from tasks.files import cache_dir

# ---------------------------------------------------------------------------
# Errors


class TemplateCheckError(KilnError):
    """A chat template could not be checked or matched."""


class NoChatTemplate(TemplateCheckError):
    """The source carries no chat template (no tokenizer.chat_template, no chat_template.jinja)."""


class ChatTemplateBroken(TemplateCheckError):
    """The model's Jinja chat template does not compile or crashes on ordinary messages."""


class NoDialectMatches(TemplateCheckError):
    """No Kiln dialect renders what the model's Jinja template renders."""

    def __init__(self, message: str, check: TemplateCheck) -> None:
        super().__init__(message)
        self.check = check


class GoToolchainMissing(KilnError):
    """`go` is needed to build the template renderer and is not on PATH."""


class GoRendererFailed(KilnError):
    """The Go template renderer could not be built or did not answer."""


# ---------------------------------------------------------------------------
# Messages and the matrix


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    index: int = 0


class ToolCall(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = ""
    function: ToolCallFunction


class ChatMessage(BaseModel):
    """One chat message as both Ollama's API and Hugging Face's templates see it.

    `thinking` is Ollama's field; Hugging Face templates read the same text as
    `reasoning_content`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str
    thinking: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_name: str | None = None
    tool_call_id: str | None = None

    def for_jinja(self) -> dict[str, Any]:
        # Keys are only present when set: templates test `'tool_calls' in message`.
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.thinking is not None:
            out["reasoning_content"] = self.thinking
        if self.tool_calls:
            out["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
                for call in self.tool_calls
            ]
        if self.tool_name is not None:
            out["name"] = self.tool_name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out

    def for_ollama(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.thinking is not None:
            out["thinking"] = self.thinking
        if self.tool_calls:
            out["tool_calls"] = [
                {
                    "id": call.id,
                    "function": {
                        "index": call.function.index,
                        "name": call.function.name,
                        "arguments": call.function.arguments,
                    },
                }
                for call in self.tool_calls
            ]
        if self.tool_name is not None:
            out["tool_name"] = self.tool_name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class MatrixCase(BaseModel):
    """One conversation of the matrix; `think` maps to Jinja `enable_thinking`
    and to Ollama's request `think` (None: not set)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    messages: tuple[ChatMessage, ...]
    think: bool | None = None

    @property
    def has_system(self) -> bool:
        return bool(self.messages) and self.messages[0].role == "system"


def _system(text: str) -> ChatMessage:
    return ChatMessage(role="system", content=text)


def _user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def _assistant(text: str, thinking: str | None = None) -> ChatMessage:
    return ChatMessage(role="assistant", content=text, thinking=thinking)


_SYSTEM_TEXT = "You are a terse assistant. Answer in one sentence."
_Q1 = "What is the capital of France?"
_A1 = "The capital of France is Paris."
_Q2 = "And of Italy?\nPlease answer briefly."
_A2 = "Rome."
_Q3 = "Which of the two is larger?"
# Text that looks like template syntax or control tokens must come out verbatim:
# messages are data to both engines, never template source.
_TRICKY_USER = (
    "Print these literally: {{ .System }} {{ .Content }} {% if x %}{{ messages }}{% endif %} "
    "<|im_end|> <|im_start|>assistant [INST] [/INST] <end_of_turn> <|eot_id|> </s> <|end|>"
)
_TRICKY_ASSISTANT = 'Here they are: {{ .System }} <|im_end|> [/INST] <|eot_id|> and a quote """ too.'

# Contents never start or end with whitespace: Llama 3 and Gemma trim
# content in Jinja, and Go templates have no trim function (Ollama's FuncMap
# has none), so edge whitespace cannot round-trip for those dialects.
MESSAGE_MATRIX: Final[tuple[MatrixCase, ...]] = (
    MatrixCase(name="user", messages=(_user(_Q1),)),
    MatrixCase(name="system-user", messages=(_system(_SYSTEM_TEXT), _user(_Q1))),
    MatrixCase(name="user-assistant-user", messages=(_user(_Q1), _assistant(_A1), _user(_Q2))),
    MatrixCase(
        name="system-user-assistant-user",
        messages=(_system(_SYSTEM_TEXT), _user(_Q1), _assistant(_A1), _user(_Q2)),
    ),
    MatrixCase(
        name="several-turns",
        messages=(_user(_Q1), _assistant(_A1), _user(_Q2), _assistant(_A2), _user(_Q3)),
    ),
    MatrixCase(
        name="system-several-turns",
        messages=(_system(_SYSTEM_TEXT), _user(_Q1), _assistant(_A1), _user(_Q2), _assistant(_A2), _user(_Q3)),
    ),
    MatrixCase(name="final-assistant", messages=(_user(_Q1), _assistant(_A1))),
    MatrixCase(name="system-final-assistant", messages=(_system(_SYSTEM_TEXT), _user(_Q1), _assistant(_A1))),
    MatrixCase(name="empty-user", messages=(_user(""),)),
    MatrixCase(name="empty-system", messages=(_system(""), _user(_Q1))),
    MatrixCase(name="empty-assistant", messages=(_user(_Q1), _assistant(""), _user(_Q2))),
    MatrixCase(
        name="template-syntax-in-content",
        messages=(_user(_TRICKY_USER), _assistant(_TRICKY_ASSISTANT), _user(_Q3)),
    ),
    MatrixCase(
        name="thinking-in-history",
        messages=(_user(_Q1), _assistant(_A1, thinking="France's capital is Paris."), _user(_Q2)),
    ),
    MatrixCase(
        name="final-assistant-with-thinking",
        messages=(_user(_Q1), _assistant(_A1, thinking="France's capital is Paris.")),
    ),
    MatrixCase(name="think-off", messages=(_user(_Q1),), think=False),
    MatrixCase(
        name="think-off-several-turns",
        messages=(_user(_Q1), _assistant(_A1), _user(_Q2)),
        think=False,
    ),
)


# ---------------------------------------------------------------------------
# Jinja, as transformers' apply_chat_template renders it


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
    ) -> str:
        """Render with `add_generation_prompt=True`.

        Raises `ConversationRefused` when the template declines the conversation.
        A leading BOS printed from `bos_token` is removed (`strip_bos`): the
        runtime tokenizer adds BOS, so the Go template never writes it and the
        texts are compared without it.
        """
        kwargs: dict[str, Any] = dict(self.special_tokens)
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


# ---------------------------------------------------------------------------
# Go templates, as Ollama renders them

_GORENDER_FILES: Final = ("main.go", "go.mod")
_GO_BUILD_TIMEOUT_S: Final = 300
_GO_RENDER_TIMEOUT_S: Final = 120


@dataclass(frozen=True)
class GoRenderJob:
    """One render: a TEMPLATE plus what a chat request would carry."""

    template: str
    messages: tuple[ChatMessage, ...]
    system: str | None = None
    modelfile_messages: tuple[ChatMessage, ...] = ()
    tools: tuple[Mapping[str, Any], ...] | None = None
    think: bool | str | None = None
    # Pins currentDate/yesterdayDate ("YYYY-MM-DD"); None means the clock.
    today: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "template": self.template,
            "system": self.system or "",
            "modelfile_messages": [m.for_ollama() for m in self.modelfile_messages],
            "messages": [m.for_ollama() for m in self.messages],
            "tools": list(self.tools) if self.tools is not None else None,
            "think": self.think,
            "today": self.today or "",
        }


@dataclass(frozen=True)
class GoRenderError:
    """A template that failed to parse or execute (Ollama would fail the request)."""

    message: str


def _gorender_source_digest(source: Path) -> str:
    digest = hashlib.sha256()
    for name in _GORENDER_FILES:
        path = source / name
        if not path.is_file():
            raise GoRendererFailed(f"the Go renderer source {path} is missing; the Kiln installation is incomplete")
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


class GoRenderer:
    """Builds (once, cached by source hash) and runs the Go template renderer."""

    def __init__(self, cache_root: Path | None = None, source: Path | None = None) -> None:
        self.source = source or templates.GORENDER_DIR
        self._cache_root = cache_root
        self._binary: Path | None = None

    @property
    def cache_root(self) -> Path:
        return self._cache_root if self._cache_root is not None else cache_dir()

    def binary(self) -> Path:
        """Path to the built renderer, building it with `go build` when missing."""
        if self._binary is not None and self._binary.is_file():
            return self._binary
        key = _gorender_source_digest(self.source)[:16]
        target_dir = self.cache_root / "gorender" / key
        target = target_dir / "gorender"
        if not target.is_file():
            self._build(target)
        self._binary = target
        return target

    def _build(self, target: Path) -> None:
        go = shutil.which("go")
        if go is None:
            raise GoToolchainMissing(
                "Go is needed to render Ollama templates (Kiln builds a small renderer with `go build`); "
                "install it (Debian/Ubuntu: apt-get install golang-go) or put `go` on PATH"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        # Offline, standard library only: never reach for a module proxy or a
        # newer toolchain, and need no C compiler.
        env.update({"GO111MODULE": "on", "GOPROXY": "off", "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"})
        if not any(env.get(k) for k in ("GOCACHE", "XDG_CACHE_HOME", "HOME")):
            env["GOCACHE"] = str(self.cache_root / "go-build")
        with tempfile.TemporaryDirectory(prefix=".kiln-tmp-gorender-", dir=target.parent) as work:
            work_dir = Path(work)
            for name in _GORENDER_FILES:
                shutil.copyfile(self.source / name, work_dir / name)
            built = work_dir / "gorender.bin"
            try:
                proc = subprocess.run(
                    [go, "build", "-trimpath", "-o", str(built), "."],
                    cwd=work_dir,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=_GO_BUILD_TIMEOUT_S,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise GoRendererFailed(f"`go build` of the template renderer took over {_GO_BUILD_TIMEOUT_S} s") from None
            if proc.returncode != 0:
                raise GoRendererFailed(
                    "`go build` of the template renderer failed:\n" + (proc.stderr or proc.stdout).strip()
                )
            # Atomic: a concurrent build or a killed one never leaves half a binary.
            os.replace(built, target)

    def render_many(self, jobs: Sequence[GoRenderJob]) -> list[str | GoRenderError]:
        """Render every job in one renderer process; results in job order."""
        if not jobs:
            return []
        payload = json.dumps({"jobs": [job.to_json() for job in jobs]})
        try:
            proc = subprocess.run(
                [str(self.binary())],
                input=payload,
                capture_output=True,
                text=True,
                timeout=_GO_RENDER_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise GoRendererFailed(f"the Go template renderer did not answer within {_GO_RENDER_TIMEOUT_S} s") from None
        if proc.returncode != 0:
            raise GoRendererFailed(f"the Go template renderer failed: {proc.stderr.strip()}")
        results = json.loads(proc.stdout)["results"]
        if len(results) != len(jobs):
            raise GoRendererFailed(f"the Go template renderer answered {len(results)} results for {len(jobs)} jobs")
        return [r["render"] if "render" in r else GoRenderError(r.get("error", "unknown error")) for r in results]

    def render(self, job: GoRenderJob) -> str:
        """Render one job; a template error becomes a TemplateCheckError."""
        (result,) = self.render_many([job])
        if isinstance(result, GoRenderError):
            raise TemplateCheckError(f"the Go template failed to render: {result.message}")
        return result


def render_go_template(
    template: str,
    messages: Sequence[ChatMessage],
    *,
    system: str | None = None,
    think: bool | str | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    renderer: GoRenderer | None = None,
) -> str:
    """The prompt Ollama would build from `template` for a chat request."""
    job = GoRenderJob(
        template=template,
        messages=tuple(messages),
        system=system,
        think=think,
        tools=tuple(tools) if tools is not None else None,
    )
    return (renderer or GoRenderer()).render(job)


# ---------------------------------------------------------------------------
# Where the Jinja template comes from


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
        from tasks.modelfile import read_gguf_tokenizer

        facts = read_gguf_tokenizer(source, with_vocabulary=False)
        if not facts.chat_template:
            raise NoChatTemplate(
                f"{source} carries no tokenizer.chat_template; give the dialect explicitly with --dialect"
            )
        return ChatTemplateSource(
            kind="gguf", path=str(source), text=facts.chat_template, bos_token=facts.bos_token,
            eos_token=facts.eos_token, add_bos_token=facts.add_bos_token,
        )
    return ChatTemplateSource(kind="jinja", path=str(source), text=source.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------
# The check


class CaseOutcome(BaseModel):
    model_config = ConfigDict(frozen=True)

    case: str
    status: Literal["match", "mismatch", "reference-refused", "go-error"]
    detail: str | None = None


class TemplateMismatch(BaseModel):
    """The first case where a dialect's Go render differs from the Jinja render."""

    model_config = ConfigDict(frozen=True)

    dialect: str
    case: str
    system: str | None
    jinja_render: str
    go_render: str
    offset: int = Field(description="index of the first differing character")

    def describe(self, context: int = 40) -> str:
        start = max(0, self.offset - context)
        jinja_part = self.jinja_render[start : self.offset + context]
        go_part = self.go_render[start : self.offset + context]
        return (
            f"dialect {self.dialect!r}, case {self.case!r}, first difference at character {self.offset}:\n"
            f"  model's Jinja: {jinja_part!r}\n"
            f"  Go template:   {go_part!r}"
        )


class DialectTrial(BaseModel):
    """How one dialect fared against the model's template."""

    model_config = ConfigDict(frozen=True)

    dialect: str
    matched: bool
    system: str | None
    cases: tuple[CaseOutcome, ...]
    mismatch: TemplateMismatch | None = None

    @property
    def cases_matched(self) -> int:
        return sum(1 for c in self.cases if c.status == "match")


class TemplateCheck(BaseModel):
    """The result of matching a model's chat template with the dialects."""

    model_config = ConfigDict(frozen=True)

    source: str
    source_kind: Literal["jinja", "model_dir", "gguf", "none"]
    jinja_sha256: str | None
    dialect: str | None
    template: str | None = Field(description="the chosen dialect's Go template (the Modelfile TEMPLATE)")
    system: str | None = Field(description="the Modelfile SYSTEM the match needs (the template's default system prompt)")
    verified: bool = Field(description="the Go template rendered exactly the Jinja text on every case checked")
    matrix_size: int
    cases_checked: int
    cases_skipped: tuple[str, ...] = Field(description="cases the model's own template refuses")
    candidates: tuple[str, ...] = Field(description="every dialect that matched, in table order")
    mismatch: TemplateMismatch | None = Field(description="closest dialect's first differing case, when none matched")
    template_writes_bos: bool = Field(
        default=False, description="the Jinja template prints bos_token itself (removed before comparing)"
    )
    warnings: tuple[str, ...] = ()
    trials: tuple[DialectTrial, ...] = ()


def _first_difference(a: str, b: str) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


_SYSTEM_CANARY: Final = "KILN-SYSTEM-CANARY-5f0c1e"


def _infer_default_system(
    template: str,
    jinja_renders: Mapping[str, str],
    renderer: GoRenderer,
    matrix: Sequence[MatrixCase],
) -> str | None:
    """The Modelfile SYSTEM that makes the Go template write what Jinja writes
    when the conversation has no system message, if there is one.

    Render a no-system case with a canary SYSTEM; the Go output is then
    prefix + canary + suffix, and the Jinja text must be prefix + S + suffix.
    """
    probe = next((c for c in matrix if not c.has_system and c.think is None and c.name in jinja_renders), None)
    if probe is None:
        return None
    (canary_render,) = renderer.render_many(
        [GoRenderJob(template=template, messages=probe.messages, system=_SYSTEM_CANARY)]
    )
    if isinstance(canary_render, GoRenderError) or canary_render.count(_SYSTEM_CANARY) != 1:
        return None
    prefix, suffix = canary_render.split(_SYSTEM_CANARY)
    expected = jinja_renders[probe.name]
    if len(expected) <= len(prefix) + len(suffix):
        return None
    if not (expected.startswith(prefix) and expected.endswith(suffix)):
        return None
    inferred = expected[len(prefix) : len(expected) - len(suffix)]
    return inferred or None


def _judge(
    dialect: str,
    system: str | None,
    matrix: Sequence[MatrixCase],
    jinja_renders: Mapping[str, str],
    refusals: Mapping[str, str],
    go_renders: Sequence[str | GoRenderError],
) -> DialectTrial:
    outcomes: list[CaseOutcome] = []
    mismatch: TemplateMismatch | None = None
    renders = iter(go_renders)
    for case in matrix:
        if case.name in refusals:
            outcomes.append(CaseOutcome(case=case.name, status="reference-refused", detail=refusals[case.name]))
            continue
        go = next(renders)
        if isinstance(go, GoRenderError):
            outcomes.append(CaseOutcome(case=case.name, status="go-error", detail=go.message))
            if mismatch is None:
                mismatch = TemplateMismatch(
                    dialect=dialect, case=case.name, system=system,
                    jinja_render=jinja_renders[case.name], go_render=f"<error: {go.message}>", offset=0,
                )
            continue
        expected = jinja_renders[case.name]
        if go == expected:
            outcomes.append(CaseOutcome(case=case.name, status="match"))
            continue
        outcomes.append(CaseOutcome(case=case.name, status="mismatch"))
        if mismatch is None:
            mismatch = TemplateMismatch(
                dialect=dialect, case=case.name, system=system,
                jinja_render=expected, go_render=go, offset=_first_difference(expected, go),
            )
    matched = mismatch is None and any(o.status == "match" for o in outcomes)
    return DialectTrial(dialect=dialect, matched=matched, system=system, cases=tuple(outcomes), mismatch=mismatch)


def compare_with_dialects(
    jinja: JinjaChatTemplate,
    dialects: Sequence[str] | None = None,
    *,
    matrix: Sequence[MatrixCase] = MESSAGE_MATRIX,
    renderer: GoRenderer | None = None,
) -> tuple[tuple[DialectTrial, ...], dict[str, str], dict[str, str]]:
    """Try each dialect against a compiled Jinja template.

    Returns the trials (table order) plus the Jinja renders and refusals by
    case name. Each dialect is tried first with no Modelfile SYSTEM, then with
    the default system prompt inferred from the Jinja template.
    """
    renderer = renderer or GoRenderer()
    names = list(dialects) if dialects is not None else list(templates.registered_dialects())
    rows = [templates.get_dialect(n) for n in names]

    jinja_renders: dict[str, str] = {}
    refusals: dict[str, str] = {}
    for case in matrix:
        try:
            jinja_renders[case.name] = jinja.render(case.messages, think=case.think)
        except ConversationRefused as exc:
            refusals[case.name] = f"the model's template refuses it: {exc.message}"
        except jinja2.UndefinedError as exc:
            raise ChatTemplateBroken(
                f"the chat template uses a value Kiln does not pass ({exc.message}); if it is a special "
                "token such as eos_token, check the model folder or the GGUF (a bare .jinja file carries "
                "none) or pass bos_token/eos_token"
            ) from None
        except jinja2.TemplateError as exc:
            raise ChatTemplateBroken(f"the chat template fails on the {case.name!r} conversation: {exc}") from None
        except Exception as exc:  # a template bug surfaces as a Python error inside the sandbox
            raise ChatTemplateBroken(
                f"the chat template crashes on the {case.name!r} conversation: {type(exc).__name__}: {exc}"
            ) from None
    if not jinja_renders:
        reasons = sorted(set(refusals.values()))
        raise ChatTemplateBroken("the chat template refuses every conversation of the matrix: " + "; ".join(reasons))

    rendered_cases = [c for c in matrix if c.name in jinja_renders]
    texts = {row.dialect: row.read_template() for row in rows}

    def jobs_for(dialect: str, system: str | None) -> list[GoRenderJob]:
        return [
            GoRenderJob(template=texts[dialect], messages=c.messages, system=system, think=c.think)
            for c in rendered_cases
        ]

    # Pass 1: every dialect with no SYSTEM, in one renderer process.
    plain_jobs = [job for row in rows for job in jobs_for(row.dialect, None)]
    plain = renderer.render_many(plain_jobs)
    per = len(rendered_cases)
    trials: dict[str, DialectTrial] = {}
    for i, row in enumerate(rows):
        trials[row.dialect] = _judge(
            row.dialect, None, matrix, jinja_renders, refusals, plain[i * per : (i + 1) * per]
        )

    # Pass 2: dialects that missed, with the inferred default system prompt.
    retry: list[tuple[str, str]] = []
    for row in rows:
        if trials[row.dialect].matched:
            continue
        inferred = _infer_default_system(texts[row.dialect], jinja_renders, renderer, matrix)
        if inferred is not None:
            retry.append((row.dialect, inferred))
    if retry:
        second = renderer.render_many([job for d, s in retry for job in jobs_for(d, s)])
        for i, (dialect, system) in enumerate(retry):
            attempt = _judge(dialect, system, matrix, jinja_renders, refusals, second[i * per : (i + 1) * per])
            if attempt.matched or attempt.cases_matched > trials[dialect].cases_matched:
                trials[dialect] = attempt
    return tuple(trials[row.dialect] for row in rows), jinja_renders, refusals


def check_template_text(
    text: str,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    dialect: str | None = None,
    strict: bool = True,
    source: str = "<text>",
    source_kind: Literal["jinja", "model_dir", "gguf"] = "jinja",
    matrix: Sequence[MatrixCase] = MESSAGE_MATRIX,
    renderer: GoRenderer | None = None,
) -> TemplateCheck:
    """`check_template` for a Jinja template given as text."""
    if dialect is not None:
        templates.get_dialect(dialect)  # an unknown name is refused before any rendering
    jinja = JinjaChatTemplate(text, {"bos_token": bos_token, "eos_token": eos_token})
    trials, jinja_renders, refusals = compare_with_dialects(
        jinja, [dialect] if dialect else None, matrix=matrix, renderer=renderer
    )
    matched = [t for t in trials if t.matched]
    chosen = matched[0] if matched else None
    closest = max(trials, key=lambda t: t.cases_matched)
    check = TemplateCheck(
        source=source,
        source_kind=source_kind,
        jinja_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        dialect=chosen.dialect if chosen else dialect,
        template=templates.load_template_text(chosen.dialect if chosen else dialect) if (chosen or dialect) else None,
        system=chosen.system if chosen else None,
        verified=chosen is not None,
        matrix_size=len(matrix),
        cases_checked=chosen.cases_matched if chosen else 0,
        cases_skipped=tuple(refusals),
        candidates=tuple(t.dialect for t in matched),
        mismatch=None if chosen else closest.mismatch,
        template_writes_bos=jinja.writes_bos,
        trials=trials,
    )
    if chosen is None and strict:
        tried = ", ".join(t.dialect for t in trials)
        detail = closest.mismatch.describe() if closest.mismatch else "no case could be compared"
        if dialect:
            message = (
                f"the {dialect!r} dialect does not render what {source}'s chat template renders; {detail}\n"
                "Pick another dialect with --dialect, or run without it to let Kiln search."
            )
        else:
            message = (
                f"no Kiln dialect renders what {source}'s chat template renders (tried {tried}). "
                f"Closest: {detail}\n"
                "Give the dialect explicitly with --dialect to export anyway; Ollama will then prompt "
                "the model differently from its own template."
            )
        raise NoDialectMatches(message, check)
    return check


def check_template(
    source: Path,
    *,
    dialect: str | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    strict: bool = True,
    matrix: Sequence[MatrixCase] = MESSAGE_MATRIX,
    renderer: GoRenderer | None = None,
) -> TemplateCheck:
    """Match the chat template of `source` (.jinja, model folder or .gguf) with a dialect.

    With `dialect`, only that dialect is checked. With no chat template in the
    source and a `dialect` given, the dialect is returned unverified; with
    neither, `NoChatTemplate` is raised. When nothing matches, `strict` raises
    `NoDialectMatches` (its `.check` holds the details); otherwise the check
    is returned with `verified=False` and the closest mismatch.
    `bos_token`/`eos_token` fill in what the source does not say (a bare
    .jinja file says nothing).
    """
    try:
        loaded = load_chat_template(Path(source))
    except NoChatTemplate:
        if dialect is None:
            raise
        templates.get_dialect(dialect)
        return TemplateCheck(
            source=str(source),
            source_kind="none",
            jinja_sha256=None,
            dialect=dialect,
            template=templates.load_template_text(dialect),
            system=None,
            verified=False,
            matrix_size=len(matrix),
            cases_checked=0,
            cases_skipped=(),
            candidates=(),
            mismatch=None,
        )
    check = check_template_text(
        loaded.text,
        bos_token=loaded.bos_token or bos_token,
        eos_token=loaded.eos_token or eos_token,
        dialect=dialect,
        strict=strict,
        source=loaded.path,
        source_kind=loaded.kind,
        matrix=matrix,
        renderer=renderer,
    )
    if check.template_writes_bos and loaded.add_bos_token is False:
        # Kiln's templates never write BOS (the runtime adds it); this GGUF
        # tells the runtime not to, so the prompt would start without one.
        warning = (
            f"the chat template writes the BOS token itself but {loaded.path} sets "
            "tokenizer.ggml.add_bos_token=false: llama.cpp and Ollama will not add BOS, and the Modelfile "
            "TEMPLATE does not write it, so prompts will start without BOS"
        )
        check = check.model_copy(update={"warnings": check.warnings + (warning,)})
    return check
