"""The two steps: `locate_metadata` (what preflight reads) and `fetch_source` (the weights, fingerprinted)."""

from __future__ import annotations

from pathlib import Path

from registry.models import ResolvedSource, SourceFile
from tasks.fetch.folders import (
    METADATA_PATTERNS,
    _folder_names,
    check_gguf_complete,
    check_remote_code,
    check_weights,
    fingerprint,
    model_family,
    model_files,
    plan_weights,
    read_config,
    safe_relpath,
)
from tasks.fetch.hub import (
    _cached_snapshot_folder,
    _hub_gguf,
    _hub_metadata,
    _snapshot,
    hub_env,
    hub_listing,
    verify_hub_files,
)
from tasks.fetch.ref import SourceRef
from tasks.step import step


def locate_metadata(ref: SourceRef) -> tuple[Path, str | None]:
    """The folder preflight reads (config and tokenizer only), and the demo's provenance line.

    For Hub sources this downloads the small files alone (verified), so every
    refusal comes before a single weight byte is fetched; it also refuses custom
    code that is not trusted. For a GGUF source it returns the GGUF file itself
    (a Hub GGUF is resolved from its pattern, downloaded and verified here).
    """
    if ref.kind == "demo":
        from tasks.demo import ensure_demo_model

        return ensure_demo_model()
    if ref.kind == "gguf":
        check_gguf_complete(Path(ref.id), ref.id)
        return Path(ref.id), None
    if ref.kind == "local":
        folder = Path(ref.id)
        read_config(folder)
        check_remote_code(folder, ref)
        return folder, None
    env = hub_env()
    if ref.kind == "hf-gguf":
        folder, record = _hub_gguf(ref, env, None)
        return folder / record.path, None
    folder, _ = _hub_metadata(ref, env, hub_listing(ref, env))
    read_config(folder)
    check_remote_code(folder, ref)
    return folder, None


def remember_local_hashes(ref: SourceRef, metadata_folder: Path) -> None:
    """Hash the local files `fetch_source` will fingerprint into the memo (tasks/source_hashes.py), ahead of it.

    The CLI runs this while the Prefect server boots, on the other core, so that fetch reads
    the memo instead of every shard (bench/pre_prefect.py). Hub weights are hashed as they are
    verified. A file that cannot be read is left to fetch, whose refusal names it.
    """
    import contextlib

    from tasks.source_hashes import remembered_sha256

    if ref.kind == "gguf":
        paths = [Path(ref.id)]
    elif ref.kind in ("local", "demo"):
        paths = model_files(metadata_folder, allow_pickle=ref.allow_pickle)
    else:
        return
    for path in paths:
        with contextlib.suppress(OSError):
            remembered_sha256(path)


@step(name="fetch")
def fetch_source(ref: SourceRef, metadata_folder: Path, derived_from: str | None,
                 previous: list[SourceFile] | None = None) -> ResolvedSource:
    """Make the weights local (Hub: at the pinned commit, verified) and fingerprint every file used.

    Refused before conversion: a shard the index names that is missing, a path
    that escapes the folder, a safetensors file shorter than its header says,
    a file whose hash differs from the Hub's (deleted, so the next run
    re-downloads it). An interrupted transfer resumes where it stopped
    (huggingface_hub retries with a Range request); files already complete in
    the cache are not downloaded again.
    """
    if ref.kind == "gguf":
        path = Path(ref.id)
        check_gguf_complete(path, ref.id)
        return ResolvedSource(kind="gguf", id=ref.id, path=ref.id, files=fingerprint([path], path.parent, previous))
    if ref.kind == "hf-gguf":
        env = hub_env()
        folder, record = _hub_gguf(ref, env, previous)
        return ResolvedSource(kind="gguf", id=ref.id, revision=ref.revision, path=str(folder / record.path),
                              files=[record], **_extra_fields(ref, None))
    if ref.is_hub:
        env = hub_env()
        listing = hub_listing(ref, env)
        where = f"{ref.id}@{ref.revision}"
        if listing is not None:
            meta_folder, metadata = _hub_metadata(ref, env, listing)
            weights = plan_weights(set(listing), meta_folder, allow_pickle=ref.allow_pickle, where=where)
            for name in (*metadata, *weights):
                safe_relpath(name, where)
            folder = _snapshot(ref, [*metadata, *weights], env, f"downloading the weights ({', '.join(weights)})")
        else:  # offline, no file list recorded anywhere: trust the cached snapshot's own contents
            folder = _cached_snapshot_folder(ref, env)
            names = _folder_names(folder)
            metadata = [n for n in METADATA_PATTERNS if n in names]
            weights = plan_weights(names, folder, allow_pickle=ref.allow_pickle, where=where)
        check_remote_code(folder, ref)
        files = verify_hub_files(ref, folder, [*metadata, *weights], listing, previous)
        check_weights(folder, weights, where)
    else:
        folder = metadata_folder
        where = str(folder)
        check_remote_code(folder, ref)
        names = _folder_names(folder)
        weights = plan_weights(names, folder, allow_pickle=ref.allow_pickle, where=where)
        check_weights(folder, weights, where)
        files = fingerprint(model_files(folder, allow_pickle=ref.allow_pickle), folder, previous)
    files = sorted(files, key=lambda f: f.path)
    return ResolvedSource(
        kind=ref.kind,  # type: ignore[arg-type]
        id=ref.id,
        revision=ref.revision,
        path=str(folder),
        registry_key=ref.spec.key if ref.spec else None,
        derived_from=derived_from,
        files=files,
        **_extra_fields(ref, folder),
    )


def _extra_fields(ref: SourceRef, folder: Path | None) -> dict:
    """Optional ResolvedSource fields, passed only where the record declares them."""
    declared = ResolvedSource.model_fields
    extra: dict = {}
    if "requested_revision" in declared and ref.requested_revision:
        extra["requested_revision"] = ref.requested_revision
    if folder is not None and (folder / "config.json").is_file():
        family = model_family(read_config(folder))
        for key in ("architecture", "bos_token_id", "eos_token_id"):
            if key in declared:
                extra[key] = getattr(family, key)
    return extra
