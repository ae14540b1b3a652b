"""Source parsing: SOURCE (`demo`, a registry key, `hf:ORG/NAME@SHA[#PATTERN]`, a folder, a .gguf) to a SourceRef.

Only `resolve_revision=True` with a branch or tag touches the network (tasks.fetch.hub.resolve_commit).
"""

from __future__ import annotations

import re
from pathlib import Path

from registry import get_base, load_registry
from registry.models import ExportRequest
from tasks.errors import RevisionNotPinned, SourceInvalid, UnknownBaseModel
from tasks.fetch.hub import resolve_commit
from tasks.fetch.ref import SourceRef

_HF_SOURCE_RE = re.compile(r"^hf:(?P<repo>[^@#\s]+)(?:@(?P<rev>[^#\s]*))?(?:#(?P<pattern>.*))?$")
_HEX40 = re.compile(r"^[0-9a-fA-F]{40}$")


def parse_source(
    source: str,
    *,
    resolve_revision: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
) -> SourceRef:
    """Classify SOURCE; refuse branch names and unknown keys before any work.

    Only `resolve_revision=True` with a branch or tag touches the network (one
    `model_info` call, or the cache's `refs/` when offline).
    """
    source = source.strip()
    if source == "demo":
        _no_pattern(gguf_file, source)
        return SourceRef(kind="demo", id="demo")
    if source.startswith("hf:"):
        return _parse_hf(source, resolve_revision=resolve_revision, allow_pickle=allow_pickle,
                         trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    try:
        path = Path(source).expanduser()
    except RuntimeError:  # `~name/...` for a user this machine does not have
        raise SourceInvalid(f"{source}: no such folder or file (no home folder for {source.split('/')[0]!r})") from None
    if path.exists():
        _no_pattern(gguf_file, source)
        resolved = path.resolve()
        if resolved.is_file():
            if resolved.suffix != ".gguf":
                raise SourceInvalid(f"{source}: a file source must be a .gguf file; for a model pass its folder")
            return SourceRef(kind="gguf", id=str(resolved))
        return SourceRef(kind="local", id=str(resolved), allow_pickle=allow_pickle,
                         trust_remote_code=trust_remote_code)
    if source in load_registry():
        _no_pattern(gguf_file, source)
        spec = get_base(source)
        # Only the curated spec decides whether custom code may run for a registry base.
        return SourceRef(kind="registry", id=spec.hf_id, revision=spec.revision, spec=spec,
                         allow_pickle=allow_pickle, trust_remote_code=spec.trust_remote_code)
    if "/" in source or source.startswith((".", "~")):
        raise SourceInvalid(f"{source}: no such folder or file")
    raise UnknownBaseModel(
        f"{source!r} is neither a registry key nor a folder; known keys: {', '.join(sorted(load_registry()))}. "
        "Pass a local Hugging Face folder, hf:ORG/NAME@SHA, or `demo`."
    )


def source_ref(request: ExportRequest) -> SourceRef:
    """The parsed source of an export request, with the request's source options."""
    return parse_source(request.source, resolve_revision=request.resolve_revision,
                        allow_pickle=request.allow_pickle, trust_remote_code=request.trust_remote_code)


def _no_pattern(gguf_file: str | None, source: str) -> None:
    if gguf_file:
        raise SourceInvalid(
            f"a GGUF filename pattern ({gguf_file!r}) picks a file from a Hub repo; {source!r} is not one. "
            "Use hf:ORG/NAME@SHA#PATTERN, or pass a local .gguf file directly."
        )


def _parse_hf(source: str, *, resolve_revision: bool, allow_pickle: bool, trust_remote_code: bool,
              gguf_file: str | None) -> SourceRef:
    match = _HF_SOURCE_RE.match(source)
    if not match:
        raise SourceInvalid(f"hf source {source!r}: expected hf:ORG/NAME@<40-hex SHA> (optionally #GGUF-PATTERN)")
    repo, rev, pattern = match["repo"], match["rev"], match["pattern"]
    org, _, name = repo.partition("/")
    if not org or not name or "/" in name or ".." in repo:
        raise SourceInvalid(f"hf source {source!r}: the repo id must be ORG/NAME")
    if pattern is not None and gguf_file is not None and pattern != gguf_file:
        raise SourceInvalid(f"hf source {source!r}: GGUF pattern {pattern!r} disagrees with gguf_file={gguf_file!r}")
    pattern = pattern if pattern is not None else gguf_file
    if pattern is not None and not pattern.strip():
        raise SourceInvalid(f"hf source {source!r}: the GGUF filename pattern after '#' is empty")
    requested = None
    if rev and (rev.startswith("/") or ".." in rev.split("/")):
        raise SourceInvalid(f"hf source {source!r}: {rev!r} is not a revision")
    if not rev:
        if not resolve_revision:
            raise RevisionNotPinned(
                f"hf source {source!r} needs a pinned commit: hf:{repo}@<40-hex SHA>, "
                "or --resolve-revision to pin the current `main` once"
            )
        rev = "main"
    if _HEX40.fullmatch(rev):
        rev = rev.lower()
    else:
        if not resolve_revision:
            raise RevisionNotPinned(
                f"hf source {source!r}: revision {rev!r} is a branch or tag, not a 40-character commit SHA, so "
                "the weights could change under the same name. Pin the commit (the Hub's 'Files and versions' "
                "page lists it), or pass --resolve-revision to resolve it to its commit once and record that SHA."
            )
        requested = rev
        rev = resolve_commit(repo, rev)
    kind = "hf-gguf" if pattern is not None else "hf"
    return SourceRef(kind=kind, id=repo, revision=rev, requested_revision=requested, gguf_pattern=pattern,
                     allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)

