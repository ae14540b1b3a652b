"""What SOURCE names, parsed but not fetched: `SourceRef`, and how messages and output files name it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from registry.spec import BaseModelSpec


@dataclass(frozen=True)
class SourceRef:
    """A parsed SOURCE argument, before anything is downloaded.

    kind: `demo`, `registry`, `hf` (a Hub repo of safetensors), `hf-gguf` (one
    prebuilt GGUF from a Hub repo), `local` (a folder), `gguf` (a local file).
    """

    kind: str
    id: str
    revision: str | None = None
    spec: BaseModelSpec | None = None
    requested_revision: str | None = None  # the branch/tag `resolve_revision` turned into `revision`
    gguf_pattern: str | None = None  # hf-gguf: the case-sensitive filename pattern
    allow_pickle: bool = False
    trust_remote_code: bool = False

    @property
    def is_hub(self) -> bool:
        return self.kind in ("registry", "hf", "hf-gguf")

    @property
    def is_gguf(self) -> bool:
        """A prebuilt GGUF (local or from the Hub): conversion is skipped."""
        return self.kind in ("gguf", "hf-gguf")


def display_source(ref: SourceRef) -> str:
    """How messages name the source: `ORG/NAME@SHA`, the registry key, or the path."""
    if ref.is_hub:
        return f"{ref.id}@{ref.revision}" + (f" ({ref.spec.key})" if ref.spec else "")
    return ref.id


def display_name(ref: SourceRef) -> str:
    """The stem output files are named after: registry key, repo name, or folder name."""
    if ref.spec is not None:
        return ref.spec.key
    if ref.kind == "demo":
        from tasks.demo import DEMO_MODEL_NAME

        return DEMO_MODEL_NAME
    name = Path(ref.id).name
    if ref.kind == "gguf":
        name = name.removesuffix(".gguf")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.").lower() or "model"
