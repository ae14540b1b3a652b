"""Ollama Modelfiles: the grammar, parsed and written (stops: tasks/stops.py; the export step: tasks/ollama_plan.py).

The writer and the parser implement the grammar of Ollama's
`parser/parser.go` (shared OLLAMA.md, "Modelfile grammar"):

- a command word (case-insensitive), one space, then a value;
- a value is the rest of the line, or `"…"` / `\"\"\"…\"\"\"` spanning lines;
- there are no escape sequences. A value ends at the first line break where
  the text read so far, trimmed, is a complete quoted string, so a triple-quoted
  value may contain `\"\"\"` anywhere except just before a line break;
- characters Go's `strconv.IsPrint` rejects (other than tab and line breaks)
  are dropped by Ollama's reader.

Because of those last two rules some texts have no representation at all.
`render_modelfile` therefore writes every value in the first form that the
parser reads back unchanged, and refuses (`ModelfileError`) when none does,
instead of writing a Modelfile that Ollama would read differently.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

import templates
from tasks.errors import KilnError


class ModelfileError(KilnError):
    """A Modelfile that cannot be written or read as Ollama would."""


# ---------------------------------------------------------------------------
# PARAMETER names and types: the fields of Ollama's api.Options.

ParamValue = int | float | bool | str

PARAMETER_TYPES: Final[dict[str, type]] = {
    "num_keep": int,
    "seed": int,
    "num_predict": int,
    "top_k": int,
    "top_p": float,
    "min_p": float,
    "typical_p": float,
    "repeat_last_n": int,
    "temperature": float,
    "repeat_penalty": float,
    "presence_penalty": float,
    "frequency_penalty": float,
    "stop": list,
    "num_ctx": int,
    "num_batch": int,
    "num_gpu": int,
    "main_gpu": int,
    "use_mmap": bool,
    "num_thread": int,
    "draft_num_predict": int,
}
# Ollama prints a warning and ignores these.
DEPRECATED_PARAMETERS: Final = frozenset(
    {"penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock",
     "mirostat", "mirostat_tau", "mirostat_eta"}
)
MESSAGE_ROLES: Final = ("system", "user", "assistant")
_COMMANDS: Final = frozenset(
    {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter", "message", "requires"}
)

_INT_RE: Final = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE: Final = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_GO_TRUE: Final = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE: Final = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def parse_parameter(name: str, text: str) -> ParamValue:
    """Convert a PARAMETER value as Ollama's api.FormatParams does (Go's
    ParseInt / ParseFloat / ParseBool)."""
    kind = PARAMETER_TYPES.get(name)
    if kind is None:
        raise ModelfileError(f"unknown parameter {name!r}; Ollama knows {', '.join(sorted(PARAMETER_TYPES))}")
    if kind is list or kind is str:
        return text
    if kind is int:
        if not _INT_RE.fullmatch(text):
            raise ModelfileError(f"PARAMETER {name} needs an integer, got {text!r}")
        return int(text)
    if kind is float:
        if _FLOAT_RE.fullmatch(text) or text.lower().lstrip("+-") in ("inf", "infinity", "nan"):
            return float(text)
        raise ModelfileError(f"PARAMETER {name} needs a number, got {text!r}")
    if text in _GO_TRUE:
        return True
    if text in _GO_FALSE:
        return False
    raise ModelfileError(f"PARAMETER {name} needs true or false, got {text!r}")


def format_parameter(name: str, value: ParamValue) -> str:
    """The text of a PARAMETER value that parse_parameter reads back as `value`."""
    kind = PARAMETER_TYPES.get(name)
    if kind is None:
        raise ModelfileError(f"unknown parameter {name!r}; Ollama knows {', '.join(sorted(PARAMETER_TYPES))}")
    if kind is bool:
        if not isinstance(value, bool):
            raise ModelfileError(f"PARAMETER {name} needs true or false, got {value!r}")
        return "true" if value else "false"
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelfileError(f"PARAMETER {name} needs an integer, got {value!r}")
        return str(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ModelfileError(f"PARAMETER {name} needs a finite number, got {value!r}")
        return repr(float(value))
    if not isinstance(value, str):
        raise ModelfileError(f"PARAMETER {name} needs a string, got {value!r}")
    return value


# ---------------------------------------------------------------------------
# The model


class ModelfileMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class Modelfile(BaseModel):
    """What a Modelfile says, in the shape of Ollama's create request."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    from_: str = Field(alias="from", min_length=1, description="a GGUF path or an existing model name")
    adapter: str | None = None
    template: str | None = None
    system: str | None = None
    stop: tuple[str, ...] = ()
    parameters: dict[str, ParamValue] = Field(default_factory=dict, description="every PARAMETER but stop")
    license: tuple[str, ...] = ()
    messages: tuple[ModelfileMessage, ...] = ()
    draft: str | None = None
    renderer: str | None = None
    parser: str | None = None
    requires: str | None = None

    @field_validator("adapter", "template", "system", "draft", "renderer", "parser", "requires")
    @classmethod
    def _empty_is_absent(cls, value: str | None) -> str | None:
        # Ollama treats an empty TEMPLATE/SYSTEM/... as not given; so does the parser.
        return value or None

    @field_validator("parameters")
    @classmethod
    def _known_parameters(cls, value: dict[str, ParamValue]) -> dict[str, ParamValue]:
        # ModelfileError (a KilnError, not a ValueError) passes through pydantic
        # unchanged, so the CLI shows it as a plain refusal.
        for name, item in value.items():
            if name == "stop":
                raise ModelfileError("stop strings go in `stop`, not `parameters`")
            format_parameter(name, item)  # raises on an unknown name or a wrongly typed value
        return value

    def ollama_parameters(self) -> dict[str, Any]:
        """`parameters` for ollama.Client.create: the scalars plus the stop list."""
        out: dict[str, Any] = dict(self.parameters)
        if self.stop:
            out["stop"] = list(self.stop)
        return out


# ---------------------------------------------------------------------------
# Parsing: the state machine of Ollama's parser.ParseFile

_NIL, _NAME, _VALUE, _PARAMETER, _MESSAGE, _COMMENT = range(6)


def _is_space(c: str) -> bool:
    return c in " \t"


def _is_newline(c: str) -> bool:
    return c in "\r\n"


def _is_alpha(c: str) -> bool:
    return c.isascii() and c.isalpha()


def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        if len(s) >= 6 and s.endswith('"""'):
            return s[3:-3], True
        return "", False
    if s.startswith('"'):
        if len(s) >= 2 and s.endswith('"'):
            return s[1:-1], True
        return "", False
    return s, True


def _trim(s: str) -> str:
    # Go's strings.TrimSpace; the buffer holds no other whitespace than these.
    return s.strip(" \t\r\n")


class ModelfileCommand(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str = Field(description="lower-case command ('model' for FROM), or the PARAMETER name as written")
    args: str
    line: int


def parse_modelfile_commands(text: str) -> list[ModelfileCommand]:
    """The commands of a Modelfile, read exactly as Ollama's parser reads them."""
    if text.startswith("\ufeff"):
        text = text[1:]
    commands: list[ModelfileCommand] = []
    state = _NIL
    buf: list[str] = []
    name = ""
    role = ""
    line = 1
    start_line = 1

    def fail(message: str) -> ModelfileError:
        return ModelfileError(f"Modelfile line {line}: {message}")

    for ch in text:
        # Next state and the character to keep ("" keeps nothing).
        if state == _NIL:
            if ch == "#":
                nxt, keep = _COMMENT, ""
            elif _is_space(ch) or _is_newline(ch):
                nxt, keep = _NIL, ""
            else:
                nxt, keep = _NAME, ch
        elif state == _NAME:
            if _is_alpha(ch):
                nxt, keep = _NAME, ch
            elif _is_space(ch):
                nxt, keep = _VALUE, ""
            elif "".join(buf).lower() in _COMMANDS and _is_newline(ch):
                raise fail(f"{''.join(buf)} needs a value on the same line")
            else:
                raise fail(f"a command is a word followed by a space; {''.join(buf) + ch!r} is not one of "
                           f"{', '.join(sorted(c.upper() for c in _COMMANDS))}")
        elif state == _VALUE:
            nxt, keep = (_NIL, ch) if (_is_newline(ch) or _is_space(ch)) else (_VALUE, ch)
        elif state == _PARAMETER:
            if _is_alpha(ch) or ch.isdigit() and ch.isascii() or ch == "_":
                nxt, keep = _PARAMETER, ch
            elif _is_space(ch):
                nxt, keep = _VALUE, ""
            else:
                raise fail(f"unexpected {ch!r} in the PARAMETER name {''.join(buf)!r}")
        elif state == _MESSAGE:
            if _is_alpha(ch):
                nxt, keep = _MESSAGE, ch
            elif _is_space(ch):
                nxt, keep = _VALUE, ""
            else:
                raise fail(f"unexpected {ch!r} in the MESSAGE role {''.join(buf)!r}")
        else:  # comment
            nxt, keep = (_NIL, "") if _is_newline(ch) else (_COMMENT, "")

        if nxt != state:
            word = "".join(buf)
            if state == _NAME:
                lowered = word.lower()
                if lowered not in _COMMANDS:
                    raise fail(f"unknown command {word!r}; commands are "
                               f"{', '.join(sorted(c.upper() for c in _COMMANDS))}")
                start_line = line
                if lowered == "from":
                    name = "model"
                elif lowered == "parameter":
                    nxt = _PARAMETER
                elif lowered == "message":
                    nxt = _MESSAGE
                    name = "message"
                else:
                    name = lowered
            elif state == _PARAMETER:
                name = word
            elif state == _MESSAGE:
                if word not in MESSAGE_ROLES:
                    raise fail(f"MESSAGE role must be one of {', '.join(MESSAGE_ROLES)}, not {word!r}")
                role = word
            elif state == _VALUE:
                value, complete = _unquote(_trim(word))
                if not complete or _is_space(ch):
                    # Spaces never end a value; a line break inside an open quote is kept.
                    buf.append(ch)
                    line += _is_newline(ch)
                    continue
                if role:
                    value = f"{role}: {value}"
                    role = ""
                commands.append(ModelfileCommand(name=name, args=value, line=start_line))
            buf = []
            state = nxt
        if keep and keep.isprintable():
            buf.append(keep)
        line += _is_newline(ch)

    if state == _VALUE:
        value, complete = _unquote(_trim("".join(buf)))
        if not complete:
            raise ModelfileError(f"Modelfile line {start_line}: unexpected end of file inside a quoted value")
        if role:
            value = f"{role}: {value}"
        commands.append(ModelfileCommand(name=name, args=value, line=start_line))
    elif state not in (_NIL, _COMMENT):
        raise ModelfileError(f"Modelfile line {line}: unexpected end of file after {''.join(buf)!r}")
    if not any(c.name == "model" for c in commands):
        raise ModelfileError("the Modelfile has no FROM line")
    return commands


def parse_modelfile(text: str) -> Modelfile:
    """Parse a Modelfile into a `Modelfile`, resolving commands as Ollama's
    create request does (TEMPLATE/SYSTEM/ADAPTER: the last one wins; LICENSE,
    MESSAGE and PARAMETER stop accumulate; deprecated parameters are ignored).
    Kiln supports a single FROM."""
    fields: dict[str, Any] = {}
    stop: list[str] = []
    parameters: dict[str, ParamValue] = {}
    licenses: list[str] = []
    messages: list[ModelfileMessage] = []
    for cmd in parse_modelfile_commands(text):
        if cmd.name == "model":
            if "from" in fields:
                raise ModelfileError(f"Modelfile line {cmd.line}: more than one FROM; Kiln writes and reads one")
            fields["from"] = cmd.args
        elif cmd.name in ("adapter", "template", "system", "draft", "renderer", "parser", "requires"):
            fields[cmd.name] = cmd.args
        elif cmd.name == "license":
            licenses.append(cmd.args)
        elif cmd.name == "message":
            role, _, content = cmd.args.partition(": ")
            messages.append(ModelfileMessage(role=role, content=content))  # type: ignore[arg-type]
        elif cmd.name in DEPRECATED_PARAMETERS:
            continue
        elif cmd.name == "stop":
            stop.append(cmd.args)
        else:
            try:
                parameters[cmd.name] = parse_parameter(cmd.name, cmd.args)
            except ModelfileError as exc:
                raise ModelfileError(f"Modelfile line {cmd.line}: {exc}") from None
    return Modelfile(
        **fields, stop=tuple(stop), parameters=parameters, license=tuple(licenses), messages=tuple(messages)
    )


# ---------------------------------------------------------------------------
# Writing

_TEXT_FORMS: Final = ("triple", "double", "bare")
_WORD_FORMS: Final = ("bare", "double", "triple")


def _candidate(value: str, form: str) -> str:
    if form == "triple":
        return f'"""{value}"""'
    if form == "double":
        return f'"{value}"'
    return value


def _reads_back(value: str, written: str) -> bool:
    try:
        commands = parse_modelfile_commands(f"FROM x\nSYSTEM {written}\n")
    except ModelfileError:
        return False
    return len(commands) == 2 and commands[1].args == value


def _why_unwritable(what: str, value: str) -> str:
    dropped = sorted({c for c in value if not (c.isprintable() or c in "\t\r\n")})
    if dropped:
        shown = ", ".join(f"U+{ord(c):04X}" for c in dropped[:5])
        return (f"the {what} contains characters Ollama's Modelfile reader drops ({shown}); "
                "remove them or register through the API")
    for raw_line in value.splitlines(keepends=False)[:-1]:
        if raw_line.rstrip(" \t").endswith('"""'):
            return (f'the {what} has a line ending with """, which ends a triple-quoted Modelfile value '
                    "early, and Modelfiles have no escape sequences; rephrase that line")
    return f"the {what} cannot be written so that Ollama reads it back unchanged"


def format_value(value: str, *, what: str = "value", prefer: Literal["text", "word"] = "text") -> str:
    """The Modelfile form of `value` that Ollama's parser reads back unchanged.

    `prefer="text"` tries `\"\"\"…\"\"\"` first (templates, system prompts,
    licences); `"word"` tries the bare form first (paths, parameters).
    """
    for form in _TEXT_FORMS if prefer == "text" else _WORD_FORMS:
        written = _candidate(value, form)
        if _reads_back(value, written):
            return written
    raise ModelfileError(f"cannot write the {what} into a Modelfile: {_why_unwritable(what, value)}")


def render_modelfile(modelfile: Modelfile, *, header: Sequence[str] = ()) -> str:
    """The Modelfile text; `header` lines become leading `#` comments."""
    lines = [f"# {h}" if h else "#" for h in header]
    lines.append(f"FROM {format_value(modelfile.from_, what='FROM path', prefer='word')}")
    if modelfile.adapter:
        lines.append(f"ADAPTER {format_value(modelfile.adapter, what='ADAPTER path', prefer='word')}")
    if modelfile.draft:
        lines.append(f"DRAFT {format_value(modelfile.draft, what='DRAFT path', prefer='word')}")
    if modelfile.template:
        lines.append(f"TEMPLATE {format_value(modelfile.template, what='TEMPLATE')}")
    if modelfile.system:
        lines.append(f"SYSTEM {format_value(modelfile.system, what='SYSTEM prompt')}")
    for name in ("renderer", "parser", "requires"):
        value = getattr(modelfile, name)
        if value:
            lines.append(f"{name.upper()} {format_value(value, what=name.upper(), prefer='word')}")
    for stop in modelfile.stop:
        lines.append(f"PARAMETER stop {format_value(stop, what=f'stop string {stop!r}', prefer='word')}")
    for name, value in modelfile.parameters.items():
        lines.append(f"PARAMETER {name} {format_value(format_parameter(name, value), what=f'PARAMETER {name}', prefer='word')}")
    for text in modelfile.license:
        lines.append(f"LICENSE {format_value(text, what='LICENSE')}")
    for message in modelfile.messages:
        lines.append(f"MESSAGE {message.role} {format_value(message.content, what=f'{message.role} MESSAGE')}")
    text = "\n".join(lines) + "\n"
    # Belt and braces: the whole file must read back as the model we were given.
    if parse_modelfile(text) != modelfile:
        raise ModelfileError("the written Modelfile does not read back as the model it was written from")
    return text


def build_modelfile(
    *,
    from_: str | Path,
    dialect: str | None = None,
    template: str | None = None,
    system: str | None = None,
    stop: Iterable[str] = (),
    temperature: float | None = None,
    top_p: float | None = None,
    num_ctx: int | None = None,
    parameters: Mapping[str, ParamValue] | None = None,
    adapter: str | Path | None = None,
    license: str | Sequence[str] | None = None,
    messages: Sequence[ModelfileMessage] = (),
    chat_format: Literal["template", "renderer", "jinja"] = "template",
    renderer: str | None = None,
    parser: str | None = None,
    requires: str | None = None,
) -> Modelfile:
    """A Modelfile for a Kiln export.

    With `dialect`, the TEMPLATE is the dialect's `.gotmpl` (unless `template`
    is given) and temperature/top_p default to the dialect's values. `stop`
    should come from tasks/stops.py. `parameters` adds any other api.Options
    field (`num_predict`, `seed`, …). `chat_format` other than "template"
    (tasks/ollama_format.py) writes no TEMPLATE: "renderer" writes RENDERER and
    PARSER, and both write REQUIRES.
    """
    row = templates.get_dialect(dialect) if dialect else None
    if chat_format != "template":
        if template is not None:
            raise ModelfileError(f"a Modelfile for chat format {chat_format!r} has no TEMPLATE")
        if chat_format == "renderer" and not (renderer and parser):
            raise ModelfileError("chat format 'renderer' needs a RENDERER and a PARSER")
        if not requires:
            raise ModelfileError(f"chat format {chat_format!r} needs REQUIRES: the first Ollama version that has it")
    else:
        if template is None and row is not None:
            template = row.read_template()
        if template is None:
            raise ModelfileError("a Modelfile needs a TEMPLATE: give a dialect or a template")
    params: dict[str, ParamValue] = {}
    chosen_temperature = temperature if temperature is not None else (row.default_temperature if row else None)
    chosen_top_p = top_p if top_p is not None else (row.default_top_p if row else None)
    if chosen_temperature is not None:
        params["temperature"] = float(chosen_temperature)
    if chosen_top_p is not None:
        params["top_p"] = float(chosen_top_p)
    if num_ctx is not None:
        params["num_ctx"] = int(num_ctx)
    for name, value in (parameters or {}).items():
        if name == "stop":
            raise ModelfileError("pass stop strings with stop=, not in parameters")
        params[name] = value
    licenses: tuple[str, ...] = (license,) if isinstance(license, str) else tuple(license or ())
    return Modelfile(
        from_=str(from_),
        adapter=str(adapter) if adapter is not None else None,
        template=template,
        system=system or None,
        stop=tuple(dict.fromkeys(s for s in stop)),
        parameters=params,
        license=tuple(t for t in licenses if t),
        messages=tuple(messages),
        renderer=renderer,
        parser=parser,
        requires=requires,
    )
