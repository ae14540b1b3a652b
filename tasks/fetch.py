"""Resolve what the user named into a local folder, pinned and fingerprinted.

Sources: `demo` (the embedded default), a registry key (its spec pins the Hub
revision), `hf:ORG/NAME@<40-hex>`, a local Hugging Face folder, a local GGUF.
Every kind resolves to one `ResolvedSource` record, which the manifest stores.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from registry import get_base, load_registry
from registry.models import ResolvedSource, SourceFile
from registry.spec import SHA_RE, BaseModelSpec
from tasks.errors import RevisionNotPinned, SourceInvalid, UnknownBaseModel
from tasks.files import sha256_file

# What conversion reads from a Hugging Face folder; everything else is ignored.
METADATA_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json")
_HF_SOURCE_RE = re.compile(r"^hf:(?P<repo>[^@\s]+)@(?P<rev>\S+)$")


@dataclass(frozen=True)
class SourceRef:
    """A parsed SOURCE argument, before anything is downloaded."""

    kind: str
    id: str
    revision: str | None = None
    spec: BaseModelSpec | None = None


def parse_source(source: str) -> SourceRef:
    """Classify SOURCE; refuse branch names and unknown keys before any work."""
    source = source.strip()
    if source == "demo":
        return SourceRef(kind="demo", id="demo")
    match = _HF_SOURCE_RE.match(source)
    if match:
        repo, rev = match["repo"], match["rev"]
        if repo.count("/") != 1 or repo.startswith("/") or repo.endswith("/"):
            raise SourceInvalid(f"hf source {source!r}: the repo id must be ORG/NAME")
        if not SHA_RE.fullmatch(rev):
            raise RevisionNotPinned(
                f"hf source {source!r}: revision {rev!r} is not a 40-character lowercase commit SHA. "
                "Pin the commit (the Hub's 'Files and versions' page lists it) so the export is reproducible."
            )
        return SourceRef(kind="hf", id=repo, revision=rev)
    if source.startswith("hf:"):
        raise RevisionNotPinned(f"hf source {source!r} needs a pinned commit: hf:ORG/NAME@<40-hex SHA>")
    path = Path(source).expanduser()
    if path.exists():
        resolved = path.resolve()
        if resolved.is_file():
            if resolved.suffix != ".gguf":
                raise SourceInvalid(f"{source}: a file source must be a .gguf file; for a model pass its folder")
            return SourceRef(kind="gguf", id=str(resolved))
        return SourceRef(kind="local", id=str(resolved))
    if source in load_registry():
        spec = get_base(source)
        return SourceRef(kind="registry", id=spec.hf_id, revision=spec.revision, spec=spec)
    if "/" in source or source.startswith((".", "~")):
        raise SourceInvalid(f"{source}: no such folder or file")
    raise UnknownBaseModel(
        f"{source!r} is neither a registry key nor a folder; known keys: {', '.join(sorted(load_registry()))}. "
        "Pass a local Hugging Face folder, hf:ORG/NAME@SHA, or `demo`."
    )


def hub_snapshot(ref: SourceRef, patterns: tuple[str, ...]) -> Path:
    """Download (or find in the cache) the files matching `patterns` at the pinned revision."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(snapshot_download(repo_id=ref.id, revision=ref.revision, allow_patterns=list(patterns)))
    except GatedRepoError:
        raise SourceInvalid(
            f"{ref.id} is gated: accept its licence on https://huggingface.co/{ref.id} and set HF_TOKEN"
        ) from None
    except RevisionNotFoundError:
        raise SourceInvalid(f"{ref.id} has no commit {ref.revision}") from None
    except RepositoryNotFoundError:
        raise SourceInvalid(f"{ref.id}: no such repository (or it is private: set HF_TOKEN)") from None


def model_files(folder: Path) -> list[Path]:
    """The files of `folder` that conversion reads, in a stable order."""
    names = set(METADATA_PATTERNS)
    files = [p for p in folder.iterdir() if p.is_file() and (p.name in names or p.suffix == ".safetensors")]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files.append(index)
    return sorted(set(files), key=lambda p: p.name)


def fingerprint(paths: list[Path], root: Path, previous: list[SourceFile] | None = None) -> list[SourceFile]:
    """sha256 of every file used; a file whose size and mtime match `previous` keeps its recorded hash.

    Trusting size+mtime is what lets an unchanged re-run answer in a second
    (the same bargain git's index makes); the output files are always re-hashed.
    """
    known = {f.path: f for f in previous or ()}
    records = []
    for path in paths:
        stat = path.stat()
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        old = known.get(rel)
        if old and old.size == stat.st_size and old.mtime_ns == stat.st_mtime_ns:
            records.append(old)
        else:
            records.append(SourceFile(path=rel, size=stat.st_size, sha256=sha256_file(path), mtime_ns=stat.st_mtime_ns))
    return records


def read_config(folder: Path) -> dict:
    """`config.json` as a dict, or an error that says what is wrong with it."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SourceInvalid(
            f"{folder} has no config.json, so it is not a Hugging Face model folder. "
            "Point SOURCE at the folder that holds config.json, the tokenizer files and *.safetensors."
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceInvalid(f"{config_path} is not valid JSON ({exc}); re-download or fix it") from None
    if not isinstance(config, dict):
        raise SourceInvalid(f"{config_path} must hold a JSON object")
    return config


def locate_metadata(ref: SourceRef) -> tuple[Path, str | None]:
    """The folder preflight reads (config and tokenizer only), and the demo's provenance line.

    For Hub sources this downloads the small files alone, so every refusal comes
    before a single weight byte is fetched.
    """
    if ref.kind == "demo":
        from tasks.demo import ensure_demo_model

        return ensure_demo_model()
    if ref.kind in ("local", "gguf"):
        return Path(ref.id), None
    return hub_snapshot(ref, METADATA_PATTERNS), None


def fetch_source(ref: SourceRef, metadata_folder: Path, derived_from: str | None,
                 previous: list[SourceFile] | None = None) -> ResolvedSource:
    """Make the weights local (Hub: at the pinned revision) and fingerprint every file used."""
    if ref.kind == "gguf":
        path = Path(ref.id)
        return ResolvedSource(kind="gguf", id=ref.id, path=ref.id, files=fingerprint([path], path.parent, previous))
    if ref.kind in ("registry", "hf"):
        folder = hub_snapshot(ref, METADATA_PATTERNS + WEIGHT_PATTERNS)
    else:
        folder = metadata_folder
    return ResolvedSource(
        kind=ref.kind,  # type: ignore[arg-type]
        id=ref.id,
        revision=ref.revision,
        path=str(folder),
        registry_key=ref.spec.key if ref.spec else None,
        derived_from=derived_from,
        files=fingerprint(model_files(folder), folder, previous),
    )


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
