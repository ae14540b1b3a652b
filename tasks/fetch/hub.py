"""Hub access: the environment, error translation, the pinned commit's file list, downloads and their hashes.

Hub downloads go through `huggingface_hub.snapshot_download` with the exact file
list conversion needs; every downloaded file is checked against the hash the Hub
lists for it at that commit (the LFS sha256 for weights, the git blob sha1 for
small files); a mismatch deletes the file and fails naming it. `HF_ENDPOINT`,
`HF_HUB_CACHE`/`HF_HOME` and `HF_HUB_OFFLINE` are read when a call is made, not
when a module is imported. The token (`HF_TOKEN`) is left to huggingface_hub and
scrubbed from every message Kiln writes.
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from registry.models import SourceFile
from registry.spec import SHA_RE
from tasks.errors import HubUnreachable, KilnError, NotEnoughDisk, RepoGated, SourceCorrupt, SourceInvalid
from tasks.fetch.folders import (
    METADATA_PATTERNS,
    PICKLE_INDEX,
    SAFETENSORS_INDEX,
    _folder_names,
    check_gguf_complete,
    fingerprint,
    plan_weights,
    safe_relpath,
)
from tasks.fetch.ref import SourceRef
from tasks.files import cache_dir, write_text_atomic

log = logging.getLogger("kiln.fetch")

HUB_PAGE = "https://huggingface.co"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{20,}")
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")
_GIT_SHA1_LIMIT = 64 * 1024 * 1024  # non-LFS files are small; never sha1 a big file twice


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

# --------------------------------------------------------------------------- downloaded files against the Hub's hashes


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
    check_gguf_complete(folder / name, f"{ref.id}@{ref.revision}: {name}")
    return folder, record


def _cached_snapshot_folder(ref: SourceRef, env: _HubEnv) -> Path:
    folder = _hub_cache_root(env) / _repo_folder(ref.id) / "snapshots" / str(ref.revision)
    if not folder.is_dir():
        raise HubUnreachable(
            f"{ref.id}@{ref.revision}: offline (HF_HUB_OFFLINE=1) and the cache {_hub_cache_root(env)} does not "
            "hold this commit. Run once with the network to fill it, or unset HF_HUB_OFFLINE."
        )
    return folder

# --------------------------------------------------------------------------- Hub model metadata


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

