"""Ollama model names: parse and validate against today's server rules.

A name is `[host/][namespace/]model[:tag]`; missing parts take the defaults
`registry.ollama.ai`, `library` and `latest`. Validation follows Ollama's
current `types/model/name.go` (see shared OLLAMA.md), which is stricter than
the v0.1.33 grammar of seed 003 (parts up to 80 characters instead of 128, no
`+build` or `@digest` suffixes). A name today's servers refuse is refused here
first, before any conversion runs, with the part and the rule it breaks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from tasks.errors import KilnError

DEFAULT_HOST: Final = "registry.ollama.ai"
DEFAULT_NAMESPACE: Final = "library"
DEFAULT_TAG: Final = "latest"

PartKind = Literal["host", "namespace", "model", "tag"]

# (max length, characters allowed after the first). Every part starts with
# [A-Za-z0-9_]; the namespace is the only part that refuses '.', and only the
# host may hold ':' (a port).
_PART_RULES: Final[dict[str, tuple[int, str, str]]] = {
    "host": (350, "-_.:", "letters, digits, '_', '-', '.' and ':'"),
    "namespace": (80, "-_", "letters, digits, '_' and '-'"),
    "model": (80, "-_.", "letters, digits, '_', '-' and '.'"),
    "tag": (80, "-_.", "letters, digits, '_', '-' and '.'"),
}


def _is_word_char(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c == "_")


class InvalidModelName(KilnError):
    """A name that Ollama's server would refuse."""


@dataclass(frozen=True)
class ModelName:
    """A parsed, valid Ollama model name with defaults filled in."""

    host: str
    namespace: str
    model: str
    tag: str

    def __str__(self) -> str:
        return self.display_shortest()

    def display_long(self) -> str:
        """`host/namespace/model:tag`, every part written out."""
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    def display_shortest(self) -> str:
        """The shortest form naming the same model: default parts are left
        out from the left (host, then namespace) and the right (tag), as
        Ollama's DisplayShortest does with its default mask."""
        parts: list[str | None] = [self.host, self.namespace, self.model, self.tag]
        defaults = [DEFAULT_HOST, DEFAULT_NAMESPACE, None, DEFAULT_TAG]
        for i in range(2):
            if defaults[i] is None or parts[i].lower() != defaults[i]:  # type: ignore[union-attr]
                break
            parts[i] = None
        if parts[3] is not None and parts[3].lower() == DEFAULT_TAG:
            parts[3] = None
        prefix = "/".join(p for p in parts[:2] if p is not None)
        text = f"{prefix}/{parts[2]}" if prefix else str(parts[2])
        return f"{text}:{parts[3]}" if parts[3] is not None else text

    def equal_fold(self, other: ModelName) -> bool:
        """Same model, ignoring ASCII case (Ollama compares names case-insensitively)."""
        return self.display_long().lower() == other.display_long().lower()


def _check_part(kind: str, value: str, name: str) -> None:
    limit, extra, allowed = _PART_RULES[kind]
    prefix = f"invalid Ollama model name {name!r}: the {kind}"
    if not value:
        raise InvalidModelName(f"{prefix} is empty")
    if len(value) > limit:
        raise InvalidModelName(f"{prefix} {value!r} is {len(value)} characters; Ollama allows 1 to {limit}")
    if not _is_word_char(value[0]):
        raise InvalidModelName(f"{prefix} {value!r} must start with a letter, a digit or '_'")
    for c in value[1:]:
        if not (_is_word_char(c) or c in extra):
            raise InvalidModelName(f"{prefix} {value!r} contains {c!r}; it may contain only {allowed}")


def _cut_last(s: str, sep: str) -> tuple[str, str, bool]:
    i = s.rfind(sep)
    if i < 0:
        return s, "", False
    return s[:i], s[i + len(sep) :], True


def parse_model_name(name: str) -> ModelName:
    """Parse `name`, fill the default host, namespace and tag, and validate.

    Split as Ollama splits: the tag after the last ':' when it follows the
    last '/', then the model, namespace and host from the right. A host may
    carry an `http://`/`https://` scheme, which is dropped.
    """
    if not isinstance(name, str) or not name:
        raise InvalidModelName("invalid Ollama model name '': the model is empty")
    rest = name
    tag = ""
    if rest.rfind(":") > rest.rfind("/"):
        rest, tag, _ = _cut_last(rest, ":")
        if not tag:
            raise InvalidModelName(f"invalid Ollama model name {name!r}: the tag after ':' is empty")
    rest, model, has_slash = _cut_last(rest, "/")
    namespace = host = ""
    if not has_slash:
        model = rest
    else:
        if not model:
            raise InvalidModelName(f"invalid Ollama model name {name!r}: the model after '/' is empty")
        rest, namespace, has_second = _cut_last(rest, "/")
        if not has_second:
            namespace = rest
        else:
            host = rest
            scheme, sep, after = host.partition("://")
            if sep:
                if scheme not in ("http", "https"):
                    raise InvalidModelName(
                        f"invalid Ollama model name {name!r}: the scheme {scheme!r} is not http or https"
                    )
                host = after
            if not host:
                raise InvalidModelName(f"invalid Ollama model name {name!r}: the host before '/' is empty")
        if not namespace:
            raise InvalidModelName(f"invalid Ollama model name {name!r}: the namespace is empty")
    parsed = ModelName(
        host=host or DEFAULT_HOST,
        namespace=namespace or DEFAULT_NAMESPACE,
        model=model,
        tag=tag or DEFAULT_TAG,
    )
    for kind in ("host", "namespace", "model", "tag"):
        _check_part(kind, getattr(parsed, kind), name)
    return parsed


def is_valid_model_name(name: str) -> bool:
    try:
        parse_model_name(name)
    except InvalidModelName:
        return False
    return True


_NOT_ALLOWED = re.compile(r"[^a-z0-9_.-]+")


def _sanitize_part(text: str, limit: int = 80) -> str:
    cleaned = _NOT_ALLOWED.sub("-", text.lower())
    cleaned = re.sub(r"-{2,}", "-", cleaned)
    cleaned = cleaned.lstrip("-.")[:limit]
    return cleaned.rstrip("-.")


def default_ollama_name(base_name: str, quant: str) -> str:
    """The name Kiln registers by default: `<model>:<quant>`, lower-case.

    `base_name` may be a Hugging Face id (`HuggingFaceTB/SmolLM2-135M-Instruct`),
    whose last segment names the model; `quant` is the GGUF type (`Q4_K_M`).
    Characters Ollama refuses become '-'.
    """
    model = _sanitize_part(base_name.rstrip("/").rsplit("/", 1)[-1])
    tag = _sanitize_part(quant)
    if not model:
        raise InvalidModelName(f"cannot make an Ollama model name from {base_name!r}: nothing usable is left")
    if not tag:
        raise InvalidModelName(f"cannot make an Ollama tag from the quant type {quant!r}: nothing usable is left")
    name = f"{model}:{tag}"
    parse_model_name(name)  # the sanitizer's output must pass the server's rules
    return name


def ollama_names_for(name: str, quants: Sequence[str]) -> dict[str, str]:
    """Which output gets which Ollama name.

    A name with its own tag (`mymodel:v1`) names one model: the first quant type
    in `quants` (the user's first choice). A name without a tag registers every
    quant type under `<name>:<quant>`.
    """
    parse_model_name(name)
    if ":" in name.rsplit("/", 1)[-1]:
        return {quants[0]: name} if quants else {}
    names = {}
    for quant in quants:
        tag = _sanitize_part(quant)
        names[quant] = f"{name}:{tag}"
        parse_model_name(names[quant])
    return names
