"""The curated base-model registry: `BaseModelSpec` entries kept as data.

Each entry is one YAML file in `registry/bases/`, named after its key.
"""

from __future__ import annotations

import difflib
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from registry.spec import BaseModelSpec
from tasks.errors import SpecInvalid, UnknownBaseModel

BASES_DIR = Path(__file__).resolve().parent / "bases"


class _StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key given twice (PyYAML silently keeps the last one)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key: construct_mapping below says so
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"found the key {key!r} twice", key_node.start_mark
            )
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_yaml(path: Path, what: str) -> Any:
    """A YAML file's data; `SpecInvalid` naming the file for anything unreadable (never another exception)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpecInvalid(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the {what} as UTF-8") from None
    except OSError as exc:
        raise SpecInvalid(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise SpecInvalid(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:
        raise SpecInvalid(f"{path}: not valid YAML: nested too deeply to be a {what}") from None


def load_spec_file(path: Path) -> BaseModelSpec:
    """Read and validate one registry entry; the error names the file and the field."""
    data = load_yaml(path, "registry entry")
    if not isinstance(data, dict):
        raise SpecInvalid(f"{path}: expected a mapping of BaseModelSpec fields, got {type(data).__name__}")
    try:
        spec = BaseModelSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecInvalid(f"{path}: {format_validation_error(exc, BaseModelSpec)}") from None
    except RecursionError:
        raise SpecInvalid(f"{path}: a value is nested too deeply to be a BaseModelSpec field") from None
    if spec.key != path.stem:
        raise SpecInvalid(f"{path}: key {spec.key!r} must equal the file name {path.stem!r}")
    return spec


# Patterns the models use, said in words.
_PATTERN_WORDS = {
    r"^[A-Za-z0-9][A-Za-z0-9._-]*$": "must be a plain name: letters, digits, '.', '_' and '-', "
                                     "starting with a letter or digit (no '/', no leading '.')",
}


def _model_named(title: str) -> type[BaseModel] | None:
    from registry import models, spec

    for module in (models, spec):
        candidate = getattr(module, title, None)
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _field_names(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str]:
    """The fields allowed where `loc` points (its parent model's fields), when that model is known."""
    for part in loc[:-1]:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return []
        annotation = model.model_fields[part].annotation
        args = getattr(annotation, "__args__", ()) or (annotation,)
        model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return sorted(model.model_fields) if model is not None else []


def format_loc(loc: tuple[Any, ...]) -> str:
    """`field.sub.0`; a key that is not a plain name is quoted, so the line stays one line."""
    parts = [str(p) if isinstance(p, int) or (isinstance(p, str) and _PLAIN_KEY.fullmatch(p)) else repr(p)
             for p in loc]
    return ".".join(parts) or "(root)"


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def format_validation_error(exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One clause per bad field: `field.path: what is wrong (got X)`, with the fix where one is known.

    An unknown field gets the nearest allowed name and the list of allowed names;
    a pattern is said in words. `model` defaults to the model the error names.
    """
    model = model or _model_named(exc.title)
    parts = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = format_loc(loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            allowed = _field_names(model, loc)
            near = difflib.get_close_matches(str(loc[-1]), allowed, n=1) if allowed else []
            hint = f"; did you mean `{near[0]}`?" if near else "."
            known = f" Allowed fields: {', '.join(allowed)}" if allowed else ""
            parts.append(f"{where}: unknown field{hint}{known}")
            continue
        message = err["msg"]
        if kind == "string_pattern_mismatch":
            message = _PATTERN_WORDS.get(str((err.get("ctx") or {}).get("pattern")), message)
        if kind not in ("missing", "value_error", "assertion_error") and "input" in err:
            message += f" (got {_shown(err['input'])})"
        parts.append(f"{where}: {' '.join(message.split())}")
    return "; ".join(parts)


@lru_cache(maxsize=1)
def load_registry() -> dict[str, BaseModelSpec]:
    """Every curated base, by key."""
    return {p.stem: load_spec_file(p) for p in sorted(BASES_DIR.glob("*.yaml"))}


def registered_keys() -> tuple[str, ...]:
    return tuple(load_registry())


def get_base(key: str) -> BaseModelSpec:
    """The spec for `key`, or an error that lists the known keys."""
    registry = load_registry()
    if key not in registry:
        raise UnknownBaseModel(
            f"unknown registry key {key!r}; known: {', '.join(sorted(registry))}. "
            "Run `kiln registry list`, or pass a local model folder or hf:ORG/NAME@SHA."
        )
    return registry[key]
