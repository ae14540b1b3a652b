"""Register an exported GGUF with an Ollama server through the official client.

Order of work, each step safe to repeat:

1. check the model name against Ollama's grammar (before any I/O);
2. `GET /api/version`: reachable, and new enough for the JSON create API;
3. for each blob (the GGUF, and the adapter GGUF if any): hash it, ask
   `HEAD /api/blobs/sha256:…`, upload with `Client.create_blob` only when the
   server lacks it, check the digest the client computed while uploading, and
   ask HEAD again, so `create` never names a blob the server does not hold;
4. `Client.create(…, files={name: digest}, stream=True)`, forwarding the
   server's progress lines, requiring a final `success`. A Modelfile with
   RENDERER, PARSER or REQUIRES (tasks/ollama_format.py) needs fields that
   ollama-python 0.6.3's `create()` cannot carry: the same request body the
   client builds, plus `renderer`/`parser`/`requires`, goes through the
   client's own request path (`_request`), so streaming, errors and retries
   are unchanged. A server older than REQUIRES is refused before any upload:
   Ollama's JSON decoding ignores fields it does not know, so an old server
   would create the model without them and format its chats differently;
5. `POST /api/show` to confirm the model exists with our TEMPLATE (or
   RENDERER/PARSER/REQUIRES; the client's ShowResponse drops those, so the
   raw answer is read).

Connection failures, timeouts and 5xx answers are retried with bounded
exponential backoff. A server that stays unreachable raises
`OllamaUnreachable`: the export keeps its files and tells the user to run
`kiln register DIR` later. A 4xx answer is final and explained. A second
registration of the same files uploads nothing (step 3 skips present blobs).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import httpx
import ollama
from ollama._types import CreateRequest  # create()'s own body; see _create
from pydantic import BaseModel, ConfigDict

from registry.models import OllamaPlan
from tasks.errors import KilnError
from tasks.files import sha256_file
from tasks.modelfile import Modelfile
from tasks.ollama_name import parse_model_name
from tasks.step import step

# The JSON create API (`files`/`adapters`/`template`… instead of a Modelfile
# body) that ollama-python 0.6 speaks arrived in Ollama 0.5.5.
MIN_OLLAMA_VERSION: Final = (0, 5, 5)
DEFAULT_TIMEOUT: Final = httpx.Timeout(connect=10.0, read=600.0, write=600.0, pool=10.0)


class RegistrationError(KilnError):
    """Registering the model with Ollama failed; the exported files are intact."""


class OllamaUnreachable(RegistrationError):
    """No usable answer from the Ollama server (refused, dropped, timed out)."""


class OllamaVersionUnsupported(RegistrationError):
    """The server is older than the create API Kiln uses."""


class OllamaRejected(RegistrationError):
    """The server refused a request (4xx, or an error line in the create stream)."""


class OllamaAdaptersUnsupported(OllamaRejected):
    """The server no longer accepts LoRA adapters in create requests."""


class OllamaServerError(RegistrationError):
    """The server kept answering 5xx after every retry."""


class BlobDigestMismatch(RegistrationError):
    """A blob's digest changed between hashing and upload, or the server disagreed."""


@dataclass(frozen=True)
class RegistrationEvent:
    """One progress report: `phase` is version, hash, blob, upload, create or show."""

    phase: Literal["version", "hash", "blob", "upload", "create", "show", "retry"]
    message: str
    digest: str | None = None
    completed: int | None = None
    total: int | None = None


ProgressCallback = Callable[[RegistrationEvent], None]


class BlobRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    role: Literal["model", "adapter"]
    path: str
    file_name: str
    digest: str
    size: int
    uploaded: bool


class RegistrationResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    host: str
    server_version: str
    blobs: tuple[BlobRecord, ...]
    statuses: tuple[str, ...]
    retries: int

    @property
    def uploaded_bytes(self) -> int:
        return sum(b.size for b in self.blobs if b.uploaded)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff: `attempts` tries in all per request."""

    attempts: int = 4
    first_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def delays(self) -> Iterator[float]:
        delay = self.first_delay_s
        for _ in range(self.attempts - 1):
            yield delay
            delay = min(delay * 2, self.max_delay_s)


# Failures that say nothing about the request itself: try again.
_TRANSIENT_HTTPX: Final = (httpx.TransportError,)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, httpx.UnsupportedProtocol):
        return False  # a bad OLLAMA_HOST, not a flaky network
    if isinstance(exc, (ConnectionError, *_TRANSIENT_HTTPX)):
        return True
    return isinstance(exc, ollama.ResponseError) and exc.status_code >= 500


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ollama.ResponseError):
        return f"HTTP {exc.status_code}: {exc.error}" if exc.status_code > 0 else str(exc.error)
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if isinstance(exc, httpx.HTTPError) else text


T = TypeVar("T")


def _parse_version(text: str) -> tuple[int, int, int] | None:
    core = text.strip().lstrip("v").split("-", 1)[0].split("+", 1)[0]
    parts = core.split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:3]):
        return None
    numbers = [int(p) for p in parts[:3]] + [0] * (3 - len(parts[:3]))
    return numbers[0], numbers[1], numbers[2]


class _Session:
    """One registration's client, retry loop and progress reporting."""

    def __init__(self, host: str | None, progress: ProgressCallback | None, retry: RetryPolicy,
                 timeout: httpx.Timeout | float, sleep: Callable[[float], None]) -> None:
        self.client = ollama.Client(host=host, timeout=timeout)
        # The ollama client has no version() or HEAD; its httpx client carries
        # the same base URL and headers, so raw requests go through it.
        self.http: httpx.Client = self.client._client
        self.host = str(self.http.base_url).rstrip("/")
        self.progress = progress
        self.retry = retry
        self.sleep = sleep
        self.retries = 0

    def report(self, event: RegistrationEvent) -> None:
        if self.progress is not None:
            self.progress(event)

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run `fn`, retrying transient failures; translate the final failure.

        A 4xx (or an error line in a stream) is the server refusing, not failing: no retry.
        """
        delays = self.retry.delays()
        while True:
            try:
                return fn()
            except Exception as exc:
                if not _is_transient(exc):
                    if isinstance(exc, ollama.ResponseError):
                        raise _rejected(what, exc) from None
                    raise
                delay = next(delays, None)
                if delay is None:
                    raise self._give_up(what, exc) from None
                self.retries += 1
                self.report(RegistrationEvent("retry", f"{what}: {_describe(exc)}; retrying in {delay:g} s"))
                self.sleep(delay)

    def _give_up(self, what: str, exc: BaseException) -> RegistrationError:
        tries = self.retry.attempts
        if isinstance(exc, ollama.ResponseError):
            return OllamaServerError(
                f"Ollama at {self.host} kept failing while {what} ({_describe(exc)}, {tries} tries). "
                "The exported files are complete; run `kiln register DIR` once the server is healthy."
            )
        return OllamaUnreachable(
            f"Ollama at {self.host} is not reachable while {what} ({_describe(exc)}, {tries} tries). "
            "The exported files are complete; start Ollama (or set OLLAMA_HOST) and run `kiln register DIR`."
        )

    def raw(self, method: str, path: str) -> httpx.Response:
        response = self.http.request(method, path)
        if response.status_code >= 500:
            raise ollama.ResponseError(response.text, response.status_code)
        return response


def _rejected(what: str, exc: ollama.ResponseError) -> RegistrationError:
    message = str(exc.error)
    if "adapter" in message.lower() and "no longer supported" in message.lower():
        return OllamaAdaptersUnsupported(
            f"this Ollama server refuses LoRA adapters ({message}); export with the adapter merged "
            "(Kiln's default) instead of shipping it as an ADAPTER"
        )
    if "digest mismatch" in message.lower():
        return BlobDigestMismatch(f"Ollama refused a blob while {what}: {message}")
    return OllamaRejected(f"Ollama refused {what}: {_describe(exc)}")


def _check_version(session: _Session) -> str:
    response = session.call("asking its version", lambda: session.raw("GET", "/api/version"))
    if response.status_code != 200:
        raise OllamaRejected(f"GET /api/version answered HTTP {response.status_code}: {response.text.strip()}")
    try:
        version = response.json()["version"]
    except (ValueError, KeyError, TypeError):
        version = None
    if not isinstance(version, str) or not version.strip():
        raise OllamaRejected(f"{session.host} answered /api/version without a version; is it an Ollama server?")
    parsed = _parse_version(version)
    # Development builds report 0.0.0; let them through.
    if parsed is not None and parsed != (0, 0, 0) and parsed < MIN_OLLAMA_VERSION:
        minimum = ".".join(map(str, MIN_OLLAMA_VERSION))
        raise OllamaVersionUnsupported(
            f"Ollama {version} at {session.host} is too old: Kiln registers through the create API "
            f"of Ollama {minimum} or newer; upgrade Ollama and run `kiln register DIR`"
        )
    session.report(RegistrationEvent("version", f"Ollama {version} at {session.host}"))
    return version


def _check_requires(version: str, modelfile: Modelfile, host: str) -> None:
    """Refuse a server older than the Modelfile's REQUIRES (development builds, 0.0.0, pass)."""
    if not modelfile.requires:
        return
    parsed = _parse_version(version)
    needed = _parse_version(modelfile.requires)
    if parsed is None or parsed == (0, 0, 0) or needed is None or parsed >= needed:
        return
    how = (f"its built-in renderer {modelfile.renderer!r}" if modelfile.renderer
           else "the GGUF's own Jinja chat template (no TEMPLATE)")
    raise OllamaVersionUnsupported(
        f"Ollama {version} at {host} is older than {modelfile.requires}, which this model REQUIRES: it formats "
        f"chats with {how}, and an older server would ignore that and prompt the model differently. "
        "Upgrade Ollama and run `kiln register DIR`"
    )


def _blob_present(session: _Session, digest: str) -> bool:
    response = session.call(f"checking blob {digest}", lambda: session.raw("HEAD", f"/api/blobs/{digest}"))
    if response.status_code == 200:
        return True
    if response.status_code == 404:
        return False
    raise OllamaRejected(f"HEAD /api/blobs/{digest} answered HTTP {response.status_code}")


def _create_file_name(path: Path, role: str) -> str:
    """The relative name the create request gives the blob: Ollama refuses
    names that are not plain relative paths or that hold ':' or '\\'."""
    name = path.name.replace(":", "_").replace("\\", "_")
    return name if name not in ("", ".", "..") else f"{role}.gguf"


def _ensure_blob(session: _Session, path: Path, role: Literal["model", "adapter"]) -> BlobRecord:
    size = path.stat().st_size
    file_name = _create_file_name(path, role)
    session.report(RegistrationEvent("hash", f"hashing {path.name}", total=size))
    digest = f"sha256:{sha256_file(path)}"
    if _blob_present(session, digest):
        session.report(RegistrationEvent("blob", f"{path.name} already on the server", digest=digest))
        return BlobRecord(role=role, path=str(path), file_name=file_name, digest=digest, size=size, uploaded=False)

    session.report(RegistrationEvent("upload", f"uploading {path.name}", digest=digest, completed=0, total=size))

    sent = session.call(f"uploading {path.name}", lambda: session.client.create_blob(path))
    if sent != digest:
        raise BlobDigestMismatch(
            f"{path} changed while it was being registered (hashed {digest}, uploaded {sent}); "
            "re-run the export step that writes it"
        )
    if not _blob_present(session, digest):
        raise BlobDigestMismatch(f"Ollama accepted {path.name} but does not hold blob {digest} afterwards")
    session.report(RegistrationEvent("upload", f"uploaded {path.name}", digest=digest, completed=size, total=size))
    return BlobRecord(role=role, path=str(path), file_name=file_name, digest=digest, size=size, uploaded=True)


def _create(session: _Session, name: str, model_blob: BlobRecord, adapter_blob: BlobRecord | None,
            modelfile: Modelfile) -> tuple[str, ...]:
    kwargs: dict[str, Any] = {
        "model": name,
        "files": {model_blob.file_name: model_blob.digest},
        "template": modelfile.template,
        "system": modelfile.system,
        "license": list(modelfile.license) or None,
        "parameters": modelfile.ollama_parameters() or None,
        "messages": [m.model_dump() for m in modelfile.messages] or None,
    }
    if adapter_blob is not None:
        kwargs["adapters"] = {adapter_blob.file_name: adapter_blob.digest}
    beyond_client = {k: getattr(modelfile, k) for k in ("renderer", "parser", "requires") if getattr(modelfile, k)}

    def stream() -> Iterator[ollama.ProgressResponse]:
        if not beyond_client:
            return session.client.create(stream=True, **kwargs)
        # ollama-python 0.6.3's create() has no renderer/parser/requires: the body it would
        # send, plus those fields, on the same request path.
        body = CreateRequest(stream=True, **kwargs).model_dump(exclude_none=True) | beyond_client
        return session.client._request(ollama.ProgressResponse, "POST", "/api/create", json=body, stream=True)

    def attempt() -> tuple[str, ...]:
        statuses: list[str] = []
        for update in stream():
            status = update.status or ""
            statuses.append(status)
            session.report(RegistrationEvent(
                "create", status, digest=update.digest, completed=update.completed, total=update.total
            ))
        if not statuses or statuses[-1] != "success":
            # A stream cut short without an error line: the server went away.
            raise httpx.RemoteProtocolError(f"the create stream ended after {statuses[-1:] or 'nothing'}")
        return tuple(statuses)

    return session.call(f"creating {name}", attempt)


def _show(session: _Session, name: str) -> dict[str, Any]:
    """`POST /api/show` as a dict: the client's ShowResponse (0.6.3) drops renderer, parser and requires."""
    response = session.http.post("/api/show", json={"model": name})
    if response.status_code >= 400:
        try:
            error = response.json().get("error", response.text)
        except ValueError:
            error = response.text
        raise ollama.ResponseError(error, response.status_code)
    return response.json()


def register_model(
    name: str,
    gguf_path: Path,
    modelfile: Modelfile,
    host: str | None = None,
    adapter_path: Path | None = None,
    progress: ProgressCallback | None = None,
    *,
    retry: RetryPolicy = RetryPolicy(),
    timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
    sleep: Callable[[float], None] = time.sleep,
) -> RegistrationResult:
    """Register `gguf_path` as Ollama model `name` with the Modelfile's TEMPLATE,
    SYSTEM, PARAMETERs, LICENSE and MESSAGEs.

    `host` defaults to `OLLAMA_HOST` (then the client's default,
    127.0.0.1:11434). `modelfile.from_`/`adapter` are not used for the upload:
    the files are `gguf_path` and `adapter_path`.
    """
    parsed = parse_model_name(name)  # refused before any network traffic
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise RegistrationError(f"{gguf_path} does not exist; nothing to register")
    if adapter_path is not None and not Path(adapter_path).is_file():
        raise RegistrationError(f"the adapter {adapter_path} does not exist")

    session = _Session(host or os.environ.get("OLLAMA_HOST"), progress, retry, timeout, sleep)
    try:
        version = _check_version(session)
        _check_requires(version, modelfile, session.host)
        model_blob = _ensure_blob(session, gguf_path, "model")
        adapter_blob = _ensure_blob(session, Path(adapter_path), "adapter") if adapter_path is not None else None
        statuses = _create(session, name, model_blob, adapter_blob, modelfile)

        shown = session.call(f"checking {name} after creating it", lambda: _show(session, name))
        if modelfile.template and (shown.get("template") or "") != modelfile.template:
            raise OllamaRejected(f"Ollama created {name} but reports a different TEMPLATE than the one sent")
        for field_name, sent in (("renderer", modelfile.renderer), ("parser", modelfile.parser),
                                 ("requires", modelfile.requires)):
            if sent and shown.get(field_name) != sent:
                raise OllamaRejected(f"Ollama created {name} but reports {field_name} {shown.get(field_name)!r}, "
                                     f"not the {sent!r} sent")
        session.report(RegistrationEvent("show", f"{parsed.display_shortest()} is ready: ollama run {name}"))
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        raise RegistrationError(f"the Ollama host {session.host!r} is not a usable URL ({exc}); check OLLAMA_HOST") from None
    finally:
        session.client.close()
    return RegistrationResult(
        name=name,
        host=session.host,
        server_version=version,
        blobs=tuple(b for b in (model_blob, adapter_blob) if b is not None),
        statuses=statuses,
        retries=session.retries,
    )


def ollama_server_version(host: str | None = None, *, timeout: float = 5.0) -> str:
    """The server's version, for preflight; raises OllamaUnreachable/OllamaVersionUnsupported."""
    session = _Session(host or os.environ.get("OLLAMA_HOST"), None, RetryPolicy(attempts=1), timeout, time.sleep)
    try:
        return _check_version(session)
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        raise RegistrationError(f"the Ollama host {session.host!r} is not a usable URL ({exc}); check OLLAMA_HOST") from None
    finally:
        session.client.close()


# ---------------------------------------------------------------------------
# The export step


@step(name="register", tags=["ollama"])
def register_outputs(out_dir: Path, plan: OllamaPlan, host: str | None = None,
                     progress: ProgressCallback | None = None) -> list[RegistrationResult]:
    """Register every named model of `plan` from its Modelfile; marks each registered in `plan`.

    Raises `OllamaUnreachable` untouched so the caller can finish the export and
    tell the user to run `kiln register DIR` later.
    """
    from tasks.files import safe_child
    from tasks.modelfile import parse_modelfile

    results = []
    for model in plan.models:
        if not model.name:
            continue
        modelfile_path = safe_child(out_dir, model.modelfile)
        if not modelfile_path.is_file():
            raise RegistrationError(f"{modelfile_path} is missing; export again to rewrite it (kiln export ... --force)")
        modelfile = parse_modelfile(modelfile_path.read_text(encoding="utf-8"))
        adapter = safe_child(out_dir, modelfile.adapter) if modelfile.adapter else None
        results.append(register_model(model.name, safe_child(out_dir, model.gguf), modelfile, host,
                                      adapter_path=adapter, progress=progress))
        model.registered = True
    return results
