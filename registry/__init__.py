"""The curated base-model registry: `BaseModelSpec` entries kept as data.

Each entry is one YAML file in `registry/bases/`, named after its key.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml
from pydantic import ValidationError

from registry.spec import BaseModelSpec
from tasks.errors import SpecInvalid, UnknownBaseModel

BASES_DIR = Path(__file__).resolve().parent / "bases"


def load_spec_file(path: Path) -> BaseModelSpec:
    """Read and validate one registry entry; the error names the file and the field."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SpecInvalid(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SpecInvalid(f"{path}: expected a mapping of BaseModelSpec fields, got {type(data).__name__}")
    try:
        spec = BaseModelSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecInvalid(f"{path}: {format_validation_error(exc)}") from None
    if spec.key != path.stem:
        raise SpecInvalid(f"{path}: key {spec.key!r} must equal the file name {path.stem!r}")
    return spec


def format_validation_error(exc: ValidationError) -> str:
    """One line per bad field: `field.path: message`."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
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
