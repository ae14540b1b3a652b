"""Resolve what the user named into local files, pinned, verified and fingerprinted.

Sources (`parse_source`):
- `demo`: the embedded default;
- a registry key: its spec pins the Hub revision;
- `hf:ORG/NAME@<40-hex>`: a Hub repo at a commit. A branch or tag is refused
  unless `resolve_revision=True` (CLI `--resolve-revision`), which resolves it to
  its commit SHA once; the SHA is what is downloaded and recorded;
- `hf:ORG/NAME@<40-hex>#<pattern>` (or `gguf_file=<pattern>`): one prebuilt GGUF
  from a Hub repo, picked by a case-sensitive filename pattern such as
  `*Q5_0.gguf` that must match exactly one file; it skips conversion;
- a local Hugging Face folder, or a local `.gguf` file.
Every kind resolves to one `ResolvedSource` record, which the manifest stores.

The package splits along what each part touches:
- `ref`: the parsed `SourceRef` and how messages and file names show it;
- `parse`: SOURCE strings to a `SourceRef`;
- `hub`: the Hugging Face Hub (environment, errors, file list, downloads, hashes);
- `folders`: local model folders (which files conversion reads, fingerprints,
  config.json, the checks on safetensors and GGUF files);
- `steps`: the two steps, `locate_metadata` and `fetch_source` (and `remember_local_hashes`, its
  hashing done ahead while the Prefect server boots).
Import from `tasks.fetch`; the names below are its public surface.
"""

from tasks.fetch.folders import (
    DEFAULT_BOS_TOKEN_ID,
    DEFAULT_EOS_TOKEN_ID,
    METADATA_PATTERNS,
    PICKLE_DANGER,
    PICKLE_INDEX,
    PICKLE_SUFFIXES,
    SAFETENSORS_INDEX,
    WEIGHT_PATTERNS,
    ModelFamily,
    check_gguf_complete,
    check_gguf_magic,
    check_remote_code,
    check_safetensors,
    check_weights,
    fingerprint,
    model_family,
    model_files,
    plan_weights,
    read_config,
    read_index,
    safe_relpath,
)
from tasks.fetch.hub import (
    HUB_PAGE,
    HubFile,
    hub_env,
    hub_listing,
    licence_page,
    match_gguf,
    planned_weight_bytes,
    redact,
    resolve_commit,
    verify_hub_files,
)
from tasks.fetch.parse import parse_source, source_ref
from tasks.fetch.ref import SourceRef, display_name, display_source
from tasks.fetch.steps import fetch_source, locate_metadata, remember_local_hashes

__all__ = [
    "DEFAULT_BOS_TOKEN_ID", "DEFAULT_EOS_TOKEN_ID", "HUB_PAGE", "METADATA_PATTERNS", "PICKLE_DANGER",
    "PICKLE_INDEX", "PICKLE_SUFFIXES", "SAFETENSORS_INDEX", "WEIGHT_PATTERNS", "HubFile", "ModelFamily",
    "SourceRef", "check_gguf_complete", "check_gguf_magic", "check_remote_code", "check_safetensors",
    "check_weights", "display_name", "display_source", "fetch_source", "fingerprint", "hub_env", "hub_listing",
    "licence_page", "locate_metadata", "match_gguf", "model_family", "model_files", "parse_source",
    "plan_weights", "planned_weight_bytes", "read_config", "read_index", "redact", "resolve_commit",
    "remember_local_hashes", "safe_relpath", "source_ref", "verify_hub_files",
]
