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

Hub downloads go through `huggingface_hub.snapshot_download` with the exact file
list conversion needs (config, tokenizer, chat template, the safetensors index and
the shards it names); pickles only with `allow_pickle=True`. Every downloaded file
is checked against the hash the Hub lists for it at that commit (the LFS sha256
for weights, the git blob sha1 for small files); a mismatch deletes the file and
fails naming it. `HF_ENDPOINT`, `HF_HUB_CACHE`/`HF_HOME` and `HF_HUB_OFFLINE` are
read when a call is made, not when a module is imported. The token (`HF_TOKEN`)
is left to huggingface_hub and scrubbed from every message Kiln writes.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import logging
import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from registry import get_base, load_registry
from registry.models import ExportRequest, ResolvedSource, SourceFile
from registry.spec import SHA_RE, BaseModelSpec
from tasks.errors import (
    HubUnreachable,
    KilnError,
    NotEnoughDisk,
    PickleRefused,
    RemoteCodeRefused,
    RepoGated,
    RevisionNotPinned,
    SourceCorrupt,
    SourceInvalid,
    UnknownBaseModel,
)
from tasks.files import cache_dir, read_json_object, sha256_file, write_text_atomic
from tasks.step import step

log = logging.getLogger("kiln.fetch")

# What conversion reads from a Hugging Face folder besides the weights; everything else is ignored.
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
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
WEIGHT_PATTERNS = ("*.safetensors", SAFETENSORS_INDEX)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
PICKLE_DANGER = (
    "pickle files (*.bin, *.pt, *.pth) can run arbitrary code when they are loaded: unpickling executes "
    "whatever the file embeds, with your user's rights on this machine"
)
DEFAULT_BOS_TOKEN_ID = 1
DEFAULT_EOS_TOKEN_ID = 2
HUB_PAGE = "https://huggingface.co"

_HF_SOURCE_RE = re.compile(r"^hf:(?P<repo>[^@#\s]+)(?:@(?P<rev>[^#\s]*))?(?:#(?P<pattern>.*))?$")
_HEX40 = re.compile(r"^[0-9a-fA-F]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{20,}")
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")
_GIT_SHA1_LIMIT = 64 * 1024 * 1024  # non-LFS files are small; never sha1 a big file twice


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


# --------------------------------------------------------------------------- parsing


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


# --------------------------------------------------------------------------- Hub environment


@dataclass(frozen=True)
class _HubEnv:
    endpoint: str | None
    cache_dir: str | None
    offline: bool

    @property
    def site(self) -> str:
        return self.endpoint or HUB_PAGE


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_env() -> _HubEnv:
    """`HF_ENDPOINT`, the hub cache folder and offline mode, read now (huggingface_hub reads them at import)."""
    from huggingface_hub import constants

    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or None
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not cache and os.environ.get("HF_HOME"):
        cache = os.path.join(os.environ["HF_HOME"], "hub")
    cache = os.path.expandvars(os.path.expanduser(cache)) if cache else None
    offline = _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE") or bool(constants.HF_HUB_OFFLINE)
    return _HubEnv(endpoint=endpoint, cache_dir=cache, offline=offline)


def _hub_cache_root(env: _HubEnv) -> Path:
    from huggingface_hub import constants

    return Path(env.cache_dir or constants.HF_HUB_CACHE)


def _repo_folder(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


def _api(env: _HubEnv):
    from huggingface_hub import HfApi

    return HfApi(endpoint=env.endpoint)


def _token() -> str | None:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # a broken token file must not turn into a crash here
        return os.environ.get("HF_TOKEN") or None


def redact(text: str) -> str:
    """`text` with the Hub token (and anything shaped like one) replaced by `***`."""
    token = _token()
    for secret in {token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")}:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    text = _BEARER.sub(r"\1***", text)
    return _TOKEN_LIKE.sub("hf_***", text)


def _server_says(exc: BaseException) -> str:
    """The server's own words where it gave some (X-Error-Message / body), else the exception's; token scrubbed."""
    said = getattr(exc, "server_message", None)
    text = said if isinstance(said, str) and said.strip() else str(exc)
    lines = list(dict.fromkeys(line.strip() for line in text.strip().splitlines() if line.strip()))
    detail = " ".join(lines)
    return redact(detail if len(detail) <= 300 else detail[:297] + "...")


def licence_page(ref: SourceRef, env: _HubEnv | None = None) -> str:
    """Where a person accepts the repo's licence: the spec's licence URL, else the repo's Hub page."""
    env = env or hub_env()
    page = f"{env.site}/{ref.id}"
    if ref.spec is not None and ref.spec.license_url:
        return f"{page} (licence: {ref.spec.license_url})"
    return page


@contextlib.contextmanager
def _hub_errors(ref: SourceRef, env: _HubEnv, what: str) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into Kiln errors a user can act on, token scrubbed."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{ref.id}@{ref.revision or ref.requested_revision or 'main'}"
    token_state = ("HF_TOKEN is set, but that token has no access yet" if _token()
                   else "HF_TOKEN is not set")
    gate_hint = (f"accept its licence at {licence_page(ref, env)} with your Hugging Face account, then set "
                 f"HF_TOKEN to a read token of that account ({token_state})")
    try:
        yield
    except KilnError:
        raise
    except GatedRepoError as exc:
        raise RepoGated(f"{ref.id} is a gated repository: {gate_hint}. "
                        f"The Hub answered: {_server_says(exc)}") from None
    except HFValidationError as exc:
        raise SourceInvalid(f"{where}: {_server_says(exc)}") from None
    except RevisionNotFoundError:
        raise SourceInvalid(f"{ref.id} has no commit {ref.revision} on {env.site}; check the SHA") from None
    except RepositoryNotFoundError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        raise RepoGated(
            f"{where}: the Hub answered {status or 'not found'} while {what}. The repository or revision does not "
            f"exist, or it is private or gated: if it is gated, {gate_hint}."
        ) from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise RepoGated(f"{where}: the Hub answered {status} while {what}: {gate_hint}. "
                            f"The Hub answered: {_server_says(exc)}") from None
        raise HubUnreachable(f"{where}: the Hub ({env.site}) answered {status} while {what}: {_server_says(exc)}. "
                             "Files already complete stay in the cache; run again to fetch the rest") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        if env.offline:
            raise HubUnreachable(
                f"{where}: offline (HF_HUB_OFFLINE=1) and the cache {_hub_cache_root(env)} does not hold every "
                f"file needed ({what}). Run once with the network to fill it, or unset HF_HUB_OFFLINE."
            ) from None
        raise HubUnreachable(f"{where}: could not reach {env.site} while {what}, and the cache does not hold "
                             f"the files: {_server_says(exc)}") from None
    except OSError as exc:
        message = _server_says(exc)
        if "Consistency check failed" in message:  # huggingface_hub's size check after its retries
            raise SourceCorrupt(f"{where}: a download came back with the wrong size ({message}); "
                                "run again to download it afresh") from None
        if exc.errno == errno.ENOSPC:
            raise NotEnoughDisk(f"{where}: the disk under {_hub_cache_root(env)} filled up while {what}; free "
                                "space or point HF_HUB_CACHE at a larger disk") from None
        if exc.errno is not None and not isinstance(exc, ConnectionError | TimeoutError):
            raise SourceInvalid(f"{where}: could not write the hub cache {_hub_cache_root(env)} while {what}: "
                                f"{message}") from None
        raise HubUnreachable(f"{where}: could not reach {env.site} while {what}: {message}") from None
    except Exception as exc:  # httpx errors that are not OSErrors (connect/timeout/protocol)
        if type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore"):
            raise HubUnreachable(f"{where}: could not reach {env.site} while {what}: {_server_says(exc)}") from None
        raise


def resolve_commit(repo_id: str, revision: str) -> str:
    """The commit SHA a branch or tag points at now (offline: the one the cache recorded for it)."""
    env = hub_env()
    ref = SourceRef(kind="hf", id=repo_id, requested_revision=revision)
    recorded = cache_dir() / "hub" / _repo_folder(repo_id) / "refs" / revision
    if env.offline:
        for ref_file in (recorded, _hub_cache_root(env) / _repo_folder(repo_id) / "refs" / revision):
            with contextlib.suppress(OSError):
                sha = ref_file.read_text().strip()
                if SHA_RE.fullmatch(sha):
                    log.info("offline: %s@%s is commit %s, as last resolved", repo_id, revision, sha)
                    return sha
        raise HubUnreachable(
            f"{repo_id}@{revision}: offline (HF_HUB_OFFLINE=1) and the cache holds no commit for {revision!r}; "
            "pin a commit SHA, or resolve it once with the network"
        )
    with _hub_errors(ref, env, f"resolving {revision!r} to a commit"):
        info = _api(env).model_info(repo_id, revision=revision)
    sha = (info.sha or "").lower()
    if not SHA_RE.fullmatch(sha):
        raise HubUnreachable(f"{repo_id}@{revision}: the Hub gave no commit SHA for it ({sha!r})")
    log.info("resolved %s@%s to commit %s", repo_id, revision, sha)
    with contextlib.suppress(OSError):
        recorded.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(recorded, sha)
    return sha


# --------------------------------------------------------------------------- Hub listing


@dataclass(frozen=True)
class HubFile:
    """One file of a repo at a commit, as the Hub lists it."""

    path: str
    size: int
    blob_id: str | None = None  # git blob sha1
    sha256: str | None = None  # LFS oid: the sha256 of the content


def _listing_cache(ref: SourceRef) -> Path:
    return cache_dir() / "hub" / _repo_folder(ref.id) / f"{ref.revision}.json"


def hub_listing(ref: SourceRef, env: _HubEnv | None = None) -> dict[str, HubFile] | None:
    """Every file of the repo at the pinned commit with its hash, or None offline when nothing recorded it.

    A commit never changes, so the listing is fetched once (`list_repo_tree`) and
    kept in Kiln's cache; huggingface_hub's own cached tree of that commit serves
    as well, so a cached commit needs no network even without HF_HUB_OFFLINE.
    """
    env = env or hub_env()
    saved = _listing_cache(ref)
    if saved.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return {p: HubFile(path=p, **e) for p, e in json.loads(saved.read_text())["files"].items()}
    cached = _hf_tree_cache(ref, env)
    if cached is not None or env.offline:
        return cached
    from huggingface_hub.hf_api import RepoFile

    with _hub_errors(ref, env, "listing the repository's files"):
        entries = list(_api(env).list_repo_tree(ref.id, recursive=True, revision=ref.revision))
    listing = {}
    for e in entries:
        if isinstance(e, RepoFile):
            listing[e.path] = HubFile(path=e.path, size=e.size, blob_id=e.blob_id,
                                      sha256=e.lfs.sha256 if e.lfs is not None else None)
    payload = {"repo": ref.id, "revision": ref.revision,
               "files": {p: {"size": f.size, "blob_id": f.blob_id, "sha256": f.sha256} for p, f in listing.items()}}
    saved.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(saved, json.dumps(payload, indent=1, sort_keys=True))
    return listing


def _hf_tree_cache(ref: SourceRef, env: _HubEnv) -> dict[str, HubFile] | None:
    """huggingface_hub's cached tree (`trees/<sha>.json`, format 1), if a download wrote one."""
    path = _hub_cache_root(env) / _repo_folder(ref.id) / "trees" / f"{ref.revision}.json"
    try:
        data = json.loads(path.read_text())
        if data.get("format_version") != 1:
            return None
        return {p: HubFile(path=p, size=int(e["size"]), blob_id=e.get("blob_id"), sha256=e.get("lfs_sha256"))
                for p, e in data["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _snapshot(ref: SourceRef, files: Iterable[str], env: _HubEnv, what: str) -> Path:
    """`snapshot_download` of exactly `files` at the pinned commit (offline: from the cache only)."""
    from huggingface_hub import snapshot_download

    names = sorted(set(files))
    kwargs: dict = {"repo_id": ref.id, "revision": ref.revision, "allow_patterns": [_literal(n) for n in names],
                    "local_files_only": env.offline}
    if env.endpoint:
        kwargs["endpoint"] = env.endpoint
    if env.cache_dir:
        kwargs["cache_dir"] = env.cache_dir
    with _hub_errors(ref, env, what):
        folder = Path(snapshot_download(**kwargs))
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        if env.offline:
            raise HubUnreachable(
                f"{ref.id}@{ref.revision}: offline (HF_HUB_OFFLINE=1) and the cache {_hub_cache_root(env)} lacks "
                f"{', '.join(missing)}. Run once with the network to fill it, or unset HF_HUB_OFFLINE."
            )
        raise SourceCorrupt(f"{ref.id}@{ref.revision}: the download left out {', '.join(missing)}; run again")
    return folder


def _literal(name: str) -> str:
    """An fnmatch pattern that matches exactly `name`."""
    return re.sub(r"([*?\[])", r"[\1]", name)


# --------------------------------------------------------------------------- folder plumbing


def safe_relpath(name: str, where: str) -> str:
    """`name` as a plain relative POSIX path, or SourceCorrupt when it would leave its folder."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise SourceCorrupt(f"{where}: file path {name!r} is not a plain relative path; refusing it")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or name.startswith("~"):
        raise SourceCorrupt(f"{where}: file path {name!r} escapes the model folder; refusing it")
    return pure.as_posix()


def _folder_names(folder: Path) -> set[str]:
    """Relative paths of the files in `folder` (symlinks to blobs count as files)."""
    names = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            rel = Path(dirpath, f).relative_to(folder).as_posix()
            names.add(rel)
    return names


def read_index(folder: Path, name: str = SAFETENSORS_INDEX) -> dict[str, str]:
    """The index's weight_map (tensor -> shard path), every shard path checked not to escape the folder."""
    data = read_json_object(folder / name, SourceCorrupt, "the shard index is damaged: re-download it")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceCorrupt(f"{folder / name}: no weight_map; the index names no shard")
    return {str(t): safe_relpath(s, f"{name} in {folder}") for t, s in weight_map.items()}


def plan_weights(names: set[str], folder: Path | None, *, allow_pickle: bool, where: str) -> list[str]:
    """The weight files conversion reads, given the files a repo or folder has.

    With a safetensors index: the index and exactly the shards it names (every
    one must exist). Else the top-level `*.safetensors`. Else pickles, only with
    `allow_pickle`. `folder` holds the index (it is downloaded with the metadata).
    """
    if SAFETENSORS_INDEX in names:
        if folder is None or not (folder / SAFETENSORS_INDEX).is_file():
            raise SourceCorrupt(f"{where}: {SAFETENSORS_INDEX} is listed but was not fetched")
        shards = sorted(set(read_index(folder, SAFETENSORS_INDEX).values()))
        missing = [s for s in shards if s not in names]
        if missing:
            raise SourceCorrupt(
                f"{where}: {SAFETENSORS_INDEX} names shard(s) {', '.join(missing)}, which it does not hold; "
                "the model is incomplete, refusing it before conversion"
            )
        return [SAFETENSORS_INDEX, *shards]
    top = sorted(n for n in names if "/" not in n and n.endswith(".safetensors"))
    if top:
        return top
    pickles = sorted(n for n in names if "/" not in n and n.endswith(PICKLE_SUFFIXES))
    if pickles:
        if not allow_pickle:
            raise PickleRefused(
                f"{where} has no safetensors weights, only pickles ({', '.join(pickles)}); {PICKLE_DANGER}. "
                "Kiln does not download or read them unless you pass --allow-pickle (allow_pickle=True), and then "
                "only for a source you trust. A revision or fork with *.safetensors is the safe choice."
            )
        log.warning("%s: using pickle weights %s because allow_pickle is set: %s", where, ", ".join(pickles),
                    PICKLE_DANGER)
        if PICKLE_INDEX in names and folder is not None and (folder / PICKLE_INDEX).is_file():
            shards = sorted(set(read_index(folder, PICKLE_INDEX).values()))
            missing = [s for s in shards if s not in names]
            if missing:
                raise SourceCorrupt(f"{where}: {PICKLE_INDEX} names missing shard(s) {', '.join(missing)}")
            return [PICKLE_INDEX, *shards]
        return [n for n in pickles if n.startswith("pytorch_model")] or pickles
    raise SourceInvalid(f"{where} holds no weights: no *.safetensors (and no pickle weights)")


def model_files(folder: Path, *, allow_pickle: bool = False) -> list[Path]:
    """The files of `folder` that conversion reads, in a stable order.

    The metadata files present, plus the weights `plan_weights` picks: with an
    index, only the shards it names (a stray `consolidated.safetensors` is not
    hashed or read).
    """
    names = _folder_names(folder)
    metadata = [n for n in METADATA_PATTERNS if n in names]
    try:
        weights = plan_weights(names, folder, allow_pickle=allow_pickle, where=str(folder))
    except SourceInvalid:
        weights = []
    return sorted({folder / n for n in (*metadata, *weights)}, key=lambda p: p.relative_to(folder).as_posix())


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
    return read_json_object(config_path, SourceInvalid, "re-download or fix it")


@dataclass(frozen=True)
class ModelFamily:
    """What `config.json` says about the model (seed 004): architecture, BOS and EOS ids."""

    architecture: str | None
    bos_token_id: int
    eos_token_id: int | list[int]


def model_family(config: dict) -> ModelFamily:
    """`architectures[0]`, and the BOS/EOS ids with the defaults 1 and 2 where config.json gives none."""
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}

    def pick(key: str, default: int):
        for where in (config, text):
            value = where.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
                return value if len(value) > 1 else value[0]
        return default

    bos = pick("bos_token_id", DEFAULT_BOS_TOKEN_ID)
    if isinstance(bos, list):
        bos = bos[0]
    return ModelFamily(architecture=arch, bos_token_id=bos, eos_token_id=pick("eos_token_id", DEFAULT_EOS_TOKEN_ID))


def check_remote_code(folder: Path, ref: SourceRef) -> None:
    """Refuse a model that needs custom code (`auto_map`) unless its spec trusts remote code."""
    needing = []
    for name in ("config.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(data, dict) and data.get("auto_map"):
                    mapping = data["auto_map"]
                    modules = sorted({str(v).split(".")[0] for v in _flat(mapping) if "." in str(v)})
                    needing.append(f"{name} auto_map → {', '.join(modules) or mapping}")
    if needing and not ref.trust_remote_code:
        raise RemoteCodeRefused(
            f"{display_source(ref)} needs custom Python code from the repository ({'; '.join(needing)}). "
            "Running it means executing the author's code on this machine, so Kiln refuses unless the model's "
            "registry spec says `trust_remote_code: true` (a curator read the code)."
        )


def _flat(value) -> list:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flat(v)]
    if isinstance(value, list):
        return [x for v in value for x in _flat(v)]
    return [value]


# --------------------------------------------------------------------------- checks on the files


def check_safetensors(path: Path, name: str) -> list[str]:
    """Tensor names in a safetensors file; SourceCorrupt when the header's data_offsets disagree with its size."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise SourceCorrupt(f"{name}: {size} bytes, too short to be a safetensors file (truncated)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, 512 * 1024 * 1024):
            raise SourceCorrupt(f"{name}: header length {header_len} exceeds the file's {size} bytes (truncated "
                                "or not a safetensors file)")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except ValueError:
        raise SourceCorrupt(f"{name}: the safetensors header is not valid JSON (corrupt file)") from None
    if not isinstance(header, dict):
        raise SourceCorrupt(f"{name}: the safetensors header is not a JSON object (corrupt file)")
    end = 0
    tensors = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or offsets[0] > offsets[1]):
            raise SourceCorrupt(f"{name}: tensor {key!r} has invalid data_offsets {offsets!r} (corrupt file)")
        end = max(end, offsets[1])
        tensors.append(key)
    expected = 8 + header_len + end
    if size < expected:
        raise SourceCorrupt(f"{name}: truncated: its header describes {expected} bytes but the file has {size}; "
                            "delete it and download again")
    if size > expected:
        raise SourceCorrupt(f"{name}: {size - expected} bytes past the end its header describes (corrupt file)")
    return tensors


def check_gguf_magic(path: Path, name: str) -> None:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise SourceCorrupt(f"{name}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")


def check_weights(folder: Path, weights: list[str], where: str) -> None:
    """Every safetensors shard's header against its size, and the index's tensors against the shards."""
    holds: dict[str, set[str]] = {}
    for rel in weights:
        if rel.endswith(".safetensors"):
            holds[rel] = set(check_safetensors(folder / rel, f"{where}: {rel}"))
    if SAFETENSORS_INDEX in weights:
        for tensor, shard in read_index(folder, SAFETENSORS_INDEX).items():
            if tensor not in holds.get(shard, ()):
                raise SourceCorrupt(f"{where}: {SAFETENSORS_INDEX} puts tensor {tensor!r} in {shard}, which does "
                                    "not hold it; the index and shards come from different checkpoints")


def _git_blob_sha1(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha1(b"blob %d\x00" % size)
    with open(path, "rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _delete_cached(path: Path) -> None:
    """Remove a snapshot entry and the blob it points at, so the next run downloads it afresh."""
    with contextlib.suppress(OSError):
        target = path.resolve()
        if target != path:
            target.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def _stamp_path(ref: SourceRef) -> Path:
    return cache_dir() / "hub" / _repo_folder(ref.id) / f"{ref.revision}.verified.json"


def _load_stamp(ref: SourceRef) -> list[SourceFile]:
    with contextlib.suppress(OSError, ValueError, TypeError):
        return [SourceFile.model_validate(r) for r in json.loads(_stamp_path(ref).read_text())]
    return []


def verify_hub_files(ref: SourceRef, folder: Path, rels: list[str], listing: dict[str, HubFile] | None,
                     previous: list[SourceFile] | None = None) -> list[SourceFile]:
    """Fingerprint `rels` and check each against the hash the Hub lists at this commit.

    LFS files (the weights) against their sha256, others against their git blob
    sha1; with no listing (a cache filled by another tool, offline) against the
    cache's blob name, which huggingface_hub sets to the same hash. A mismatch
    deletes the file and raises SourceCorrupt naming it.
    """
    stamp = _load_stamp(ref)
    records = fingerprint([folder / r for r in rels], folder, [*stamp, *(previous or ())])
    where = f"{ref.id}@{ref.revision}"
    for rec in records:
        path = folder / rec.path
        entry = (listing or {}).get(rec.path)
        want_sha256 = entry.sha256 if entry else None
        want_sha1 = entry.blob_id if entry and not entry.sha256 else None
        if entry is None:
            blob = path.resolve().name
            if _HEX64.fullmatch(blob):
                want_sha256 = blob
            elif SHA_RE.fullmatch(blob):
                want_sha1 = blob
        if entry is not None and entry.size != rec.size:
            _delete_cached(path)
            raise SourceCorrupt(f"{where}: {rec.path} is {rec.size} bytes but the Hub lists {entry.size}; "
                                "the file was deleted, run again to download it afresh")
        if want_sha256:
            if rec.sha256 != want_sha256:
                _delete_cached(path)
                raise SourceCorrupt(f"{where}: {rec.path} has sha256 {rec.sha256}, but the Hub lists {want_sha256}; "
                                    "the corrupt file was deleted, run again to download it afresh")
        elif want_sha1 and rec.size <= _GIT_SHA1_LIMIT:
            got = _git_blob_sha1(path)
            if got != want_sha1:
                _delete_cached(path)
                raise SourceCorrupt(f"{where}: {rec.path} has git blob id {got}, but the Hub lists {want_sha1}; "
                                    "the corrupt file was deleted, run again to download it afresh")
        elif not want_sha1:
            raise SourceCorrupt(f"{where}: no hash is known for {rec.path}, so it cannot be verified; "
                                "run once with the network to fetch the repository's file list")
    with contextlib.suppress(OSError):
        merged = {r.path: r for r in stamp} | {r.path: r for r in records}
        write_text_atomic(_stamp_path(ref), json.dumps([r.model_dump() for r in merged.values()], indent=1))
    return records


# --------------------------------------------------------------------------- Hub GGUF


def match_gguf(ref: SourceRef, names: Iterable[str]) -> str:
    """The one GGUF file the pattern names (case-sensitive), or an error listing the candidates."""
    pattern = ref.gguf_pattern or ""
    ggufs = sorted(n for n in names if n.endswith(".gguf"))
    hits = [n for n in ggufs if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n.rsplit("/", 1)[-1], pattern)]
    where = f"{ref.id}@{ref.revision}"
    if len(hits) == 1:
        return safe_relpath(hits[0], where)
    if not hits:
        listed = ", ".join(ggufs) if ggufs else "none"
        raise SourceInvalid(f"{where}: no GGUF file matches {pattern!r} (patterns are case-sensitive). "
                            f"Its GGUF files: {listed}")
    raise SourceInvalid(f"{where}: {pattern!r} matches {len(hits)} GGUF files: {', '.join(hits)}. "
                        "Give a pattern that matches exactly one (split GGUFs are not supported)")


def _hub_gguf(ref: SourceRef, env: _HubEnv, previous: list[SourceFile] | None) -> tuple[Path, SourceFile]:
    listing = hub_listing(ref, env)
    if listing is not None:
        name = match_gguf(ref, listing)
        folder = _snapshot(ref, [name], env, f"downloading {name}")
    else:  # offline with no listing: pick from what the cached snapshot holds
        folder = _cached_snapshot_folder(ref, env)
        name = match_gguf(ref, _folder_names(folder))
    (record,) = verify_hub_files(ref, folder, [name], listing, previous)
    check_gguf_magic(folder / name, f"{ref.id}@{ref.revision}: {name}")
    return folder, record


def _cached_snapshot_folder(ref: SourceRef, env: _HubEnv) -> Path:
    folder = _hub_cache_root(env) / _repo_folder(ref.id) / "snapshots" / str(ref.revision)
    if not folder.is_dir():
        raise HubUnreachable(
            f"{ref.id}@{ref.revision}: offline (HF_HUB_OFFLINE=1) and the cache {_hub_cache_root(env)} does not "
            "hold this commit. Run once with the network to fill it, or unset HF_HUB_OFFLINE."
        )
    return folder


# --------------------------------------------------------------------------- the two steps


def _hub_metadata(ref: SourceRef, env: _HubEnv, listing: dict[str, HubFile] | None) -> tuple[Path, list[str]]:
    """Download config, tokenizer, chat template and the shard index; verify them."""
    if listing is not None:
        wanted = [n for n in (*METADATA_PATTERNS, SAFETENSORS_INDEX) if n in listing]
        if ref.allow_pickle and PICKLE_INDEX in listing:
            wanted.append(PICKLE_INDEX)
        if ref.trust_remote_code:
            wanted += [n for n in listing if "/" not in n and n.endswith(".py")]
        if "config.json" not in listing:
            raise SourceInvalid(f"{ref.id}@{ref.revision} has no config.json, so it is not a Hugging Face model "
                                "repository (for a repo of GGUF files add #PATTERN, e.g. hf:ORG/NAME@SHA#*Q4_K_M.gguf)")
        folder = _snapshot(ref, wanted, env, "downloading config and tokenizer files")
    else:
        folder = _snapshot(ref, [*METADATA_PATTERNS, SAFETENSORS_INDEX], env, "reading config and tokenizer files")
        names = _folder_names(folder)
        wanted = [n for n in (*METADATA_PATTERNS, SAFETENSORS_INDEX) if n in names]
    verify_hub_files(ref, folder, wanted, listing)
    return folder, wanted


def planned_weight_bytes(ref: SourceRef, metadata_folder: Path) -> int | None:
    """Bytes of the weight files `fetch_source` will download for a Hub source (None where unknown).

    From the Hub's file list at the pinned commit, so preflight can check disk
    space before the download; for a Hub GGUF, that file's size.
    """
    if not ref.is_hub:
        return None
    env = hub_env()
    listing = hub_listing(ref, env)
    if listing is None:
        return None
    if ref.kind == "hf-gguf":
        return listing[match_gguf(ref, listing)].size
    weights = plan_weights(set(listing), metadata_folder, allow_pickle=ref.allow_pickle,
                           where=f"{ref.id}@{ref.revision}")
    return sum(listing[w].size for w in weights)


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
        check_gguf_magic(Path(ref.id), ref.id)
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
        check_gguf_magic(path, ref.id)
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
