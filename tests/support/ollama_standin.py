"""OllamaStandIn: a STAND-IN for an Ollama server, for Kiln's tests only.

This is not Ollama and runs no model. No Ollama binary can be installed on
the machines these tests run on, so this small threaded HTTP server speaks
the part of Ollama's documented REST API that model registration uses (as
described in shared OLLAMA.md and Ollama's server/create.go), with the same
status codes and `{"error": "..."}` bodies:

- GET /api/version
- HEAD /api/blobs/sha256:<hex>   200 present, 404 missing, 400 bad digest
- POST /api/blobs/sha256:<hex>   200 already present, 201 stored, 400 digest mismatch
- POST /api/create               400 before streaming for bad JSON, an invalid
  name, a non-relative file name, an empty or malformed digest, a blob that
  was never uploaded, adapters (when `accept_adapters` is off); then NDJSON
  status lines ending with `success`, or an `{"error": ...}` line
- POST /api/show (with `renderer`, `parser`, `requires` when the model has them),
  GET /api/tags, DELETE /api/delete

Create fields as of Ollama v0.33 (`api/types.go` CreateRequest), including `renderer` and
`parser` (since v0.12.0) and `requires` (since v0.14.0). Old-version mode: construct it with
an older `version`, and the fields that version does not know are, as `unknown_fields` says,
ignored (what a real Ollama does: Go's JSON decoding drops unknown fields, so the model is
created without them) or refused with a 400 naming the field (`unknown_fields="reject"`), so a
test can show that a client never sends them there. `ignored_fields` records what was dropped.

Fault knobs (set them on the instance between requests):
- `stop()`: the port refuses connections, open keep-alive connections are cut;
- `fail_uploads = N`: the next N blob uploads answer 500 after reading half the body;
- `drop = {"POST /api/create": N, ...}`: close the next N such connections
  without answering (keys are "METHOD /route" with the digest left out);
- `cut_create_streams = N`: the next N creates send one status line and then
  drop the connection;
- `create_error = "..."`: creates stream one status line and then this error line;
- `delay_s`: sleep before answering every request (slow server).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_PART = {
    "host": (350, re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*")),
    "namespace": (80, re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")),
    "model": (80, re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")),
    "tag": (80, re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")),
}


def _full_name(name: str) -> str | None:
    """Today's Ollama name rules, written independently of Kiln's parser."""
    rest, tag = name, "latest"
    if rest.rfind(":") > rest.rfind("/"):
        rest, tag = rest.rsplit(":", 1)
    pieces = rest.split("/")
    if len(pieces) > 3 or "" in pieces:
        return None
    host, namespace, model = (["registry.ollama.ai", "library"][: 3 - len(pieces)] + pieces)[-3:]
    for kind, value in (("host", host), ("namespace", namespace), ("model", model), ("tag", tag)):
        limit, pattern = _PART[kind]
        if not (1 <= len(value) <= limit and pattern.fullmatch(value)):
            return None
    return f"{host}/{namespace}/{model}:{tag}".lower()


# Create fields newer than the JSON create API, with the first release that reads them.
CREATE_FIELDS_SINCE = {"renderer": "0.12.0", "parser": "0.12.0", "requires": "0.14.0"}


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("-")[0].split(".") if p.isdigit())


def _valid_relative(path: str) -> bool:
    # Go's fs.ValidPath, plus Ollama's refusal of '\' and ':'.
    if path in ("", ".") or "\\" in path or ":" in path or path.startswith("/") or path.endswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class OllamaStandIn:
    """A stand-in for an Ollama server (see the module docstring). Not Ollama."""

    def __init__(self, version: str = "0.33.0", *, accept_adapters: bool = True,
                 unknown_fields: str = "ignore") -> None:
        self.version = version
        self.accept_adapters = accept_adapters
        self.unknown_fields = unknown_fields
        self.ignored_fields: list[str] = []
        self.blobs: dict[str, bytes] = {}
        self.models: dict[str, dict[str, Any]] = {}
        self.log: list[tuple[str, str, int]] = []
        self.fail_uploads = 0
        self.drop: dict[str, int] = {}
        self.cut_create_streams = 0
        self.create_error: str | None = None
        self.delay_s = 0.0
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    # -- lifecycle -------------------------------------------------------

    def start(self) -> OllamaStandIn:
        standin = self

        class Handler(_Handler):
            owner = standin

        self._server = _Server(("127.0.0.1", self.port or 0), Handler)
        self.port = self._server.server_address[1]
        server = self._server
        # A short poll interval keeps stop() quick (shutdown waits for one poll).
        self._thread = threading.Thread(
            target=lambda: server.serve_forever(poll_interval=0.02), name="ollama-standin", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection: the port now refuses."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._connections.clear()
        self._server = None

    def __enter__(self) -> OllamaStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- what tests look at ----------------------------------------------

    def requests(self, method: str | None = None, route: str | None = None) -> list[tuple[str, str, int]]:
        with self._lock:
            return [
                entry for entry in self.log
                if (method is None or entry[0] == method) and (route is None or entry[1].startswith(route))
            ]

    def model(self, name: str) -> dict[str, Any] | None:
        full = _full_name(name)
        return self.models.get(full) if full else None

    # -- fault bookkeeping -----------------------------------------------

    def _take(self, attr: str) -> bool:
        with self._lock:
            left = getattr(self, attr)
            if left > 0:
                setattr(self, attr, left - 1)
                return True
            return False

    def _take_drop(self, key: str) -> bool:
        with self._lock:
            left = self.drop.get(key, 0)
            if left > 0:
                self.drop[key] = left - 1
                return True
            return False


class _Handler(BaseHTTPRequestHandler):
    owner: OllamaStandIn
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx uses it

    def setup(self) -> None:
        super().setup()
        # Small NDJSON writes would otherwise wait on delayed ACKs (~40 ms each).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.owner._lock:
            self.owner._connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.owner._lock:
                self.owner._connections.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    # -- plumbing --------------------------------------------------------

    def _route_key(self) -> str:
        path = self.path.split("?", 1)[0]
        if path.startswith("/api/blobs/"):
            path = "/api/blobs"
        return f"{self.command} {path}"

    def _record(self, status: int) -> None:
        with self.owner._lock:
            self.owner.log.append((self.command, self.path, status))

    def _read_body(self, limit: int | None = None) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
                if limit is not None and len(out) >= limit:
                    return bytes(out)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length if limit is None else min(length, limit))

    def _send_json(self, status: int, payload: Any, *, close: bool = False) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._record(status)

    def _error(self, status: int, message: str, *, close: bool = False) -> None:
        self._send_json(status, {"error": message}, close=close)

    def _drop_connection(self) -> None:
        self._record(0)
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _dispatch(self) -> None:
        owner = self.owner
        if owner.delay_s:
            time.sleep(owner.delay_s)
        key = self._route_key()
        if owner._take_drop(key):
            self._drop_connection()
            return
        handler = {
            "GET /api/version": self._version,
            "HEAD /api/blobs": self._head_blob,
            "POST /api/blobs": self._post_blob,
            "POST /api/create": self._create,
            "POST /api/show": self._show,
            "GET /api/tags": self._tags,
            "DELETE /api/delete": self._delete,
        }.get(key)
        if handler is None:
            self._read_body()
            self._error(404, "404 page not found")
            return
        handler()

    do_GET = do_HEAD = do_POST = do_DELETE = _dispatch

    def _json_body(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self._read_body() or b"null")
        except json.JSONDecodeError as exc:
            self._error(400, f"invalid JSON: {exc}")
            return None
        if not isinstance(data, dict):
            self._error(400, "missing request body")
            return None
        return data

    # -- routes ----------------------------------------------------------

    def _version(self) -> None:
        self._send_json(200, {"version": self.owner.version})

    def _digest(self) -> str | None:
        digest = self.path.split("?", 1)[0][len("/api/blobs/"):]
        return digest if _DIGEST_RE.fullmatch(digest) else None

    def _head_blob(self) -> None:
        digest = self._digest()
        if digest is None:
            self._error(400, "invalid digest format")
        elif digest in self.owner.blobs:
            self._send_json(200, {})
        else:
            self._error(404, f'blob "{digest}" not found')

    def _post_blob(self) -> None:
        digest = self._digest()
        if digest is None:
            self._read_body()
            self._error(400, "invalid digest format")
            return
        if digest in self.owner.blobs:
            self._read_body()  # drained so the keep-alive connection stays usable
            self._send_json(200, {})
            return
        if self.owner._take("fail_uploads"):
            length = int(self.headers.get("Content-Length") or 2)
            self._read_body(limit=max(1, length // 2))
            self._error(500, "stand-in fault: upload interrupted", close=True)
            return
        data = self._read_body()
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            self._error(400, f"digest mismatch, expected {digest}, got {actual}")
            return
        with self.owner._lock:
            self.owner.blobs[digest] = data
        self._send_json(201, {})

    def _check_files(self, files: Any, what: str) -> str | None:
        if files is None:
            return None
        if not isinstance(files, dict):
            return f"{what} must be an object of file name to digest"
        for path, digest in files.items():
            if not _valid_relative(path):
                return f"file path must be relative: {path}"
            if not digest:
                return "invalid digest format"
            if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
                return f"invalid digest for {path}: invalid digest format"
            if digest not in self.owner.blobs:
                return f"blob not found for {path} (digest {digest}): file does not exist"
        return None

    def _create(self) -> None:
        req = self._json_body()
        if req is None:
            return
        full = _full_name(str(req.get("model") or ""))
        if full is None:
            self._error(400, "invalid model name")
            return
        files, adapters = req.get("files"), req.get("adapters")
        if adapters and not self.owner.accept_adapters:
            self._error(400, "LoRA adapters are no longer supported")
            return
        for value, what in ((files, "files"), (adapters, "adapters")):
            problem = self._check_files(value, what)
            if problem:
                self._error(400, problem)
                return
        if not files and not req.get("from"):
            self._error(400, "neither 'from' or 'files' was specified")
            return
        server = _version_tuple(self.owner.version)
        unknown = [f for f, since in CREATE_FIELDS_SINCE.items()  # 0.0.0: a development build knows them all
                   if f in req and server != (0, 0, 0) and server < _version_tuple(since)]
        if unknown and self.owner.unknown_fields == "reject":
            self._error(400, f"json: unknown field {unknown[0]!r}")
            return
        for field in unknown:
            req.pop(field)
            self.owner.ignored_fields.append(field)

        # Streaming starts here: errors now arrive as an error line in a 200.
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._record(200)

        def line(payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode() + b"\n"
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        line({"status": "parsing GGUF"})
        if self.owner._take("cut_create_streams"):
            self._drop_connection()
            return
        if self.owner.create_error:
            line({"error": self.owner.create_error})
            self.wfile.write(b"0\r\n\r\n")
            return
        layers = []
        for digest in list((files or {}).values()) + list((adapters or {}).values()):
            if not self.owner.blobs[digest].startswith(b"GGUF"):
                line({"error": "supplied file was not in GGUF format"})
                self.wfile.write(b"0\r\n\r\n")
                return
            line({"status": f"using existing layer {digest}"})
            layers.append(digest)
        for field in ("template", "system", "license", "parameters", "messages"):
            if req.get(field):
                layer = "sha256:" + hashlib.sha256(json.dumps(req[field], sort_keys=True).encode()).hexdigest()
                line({"status": f"creating new layer {layer}"})
                layers.append(layer)
        line({"status": "writing manifest"})
        manifest = json.dumps(layers).encode()
        record = {
            "name": full,
            "request": req,
            "layers": layers,
            "digest": hashlib.sha256(manifest).hexdigest(),
            "size": sum(len(self.owner.blobs.get(d, b"")) for d in layers),
            "modified_at": datetime.now(timezone.utc).isoformat(),
        }
        with self.owner._lock:
            self.owner.models[full] = record
        line({"status": "success"})
        self.wfile.write(b"0\r\n\r\n")

    def _find_or_404(self) -> dict[str, Any] | None:
        """The named model's record; None once the error (a bad body, or 404) has been answered."""
        req = self._json_body()
        if req is None:
            return None
        name = str(req.get("model") or req.get("name") or "")
        full = _full_name(name)
        record = self.owner.models.get(full) if full else None
        if record is None:
            self._error(404, f"model '{name}' not found")
        return record

    def _show(self) -> None:
        record = self._find_or_404()
        if record is None:
            return
        req = record["request"]
        params = req.get("parameters") or {}
        parameter_lines = []
        for key, value in params.items():
            for item in value if isinstance(value, list) else [value]:
                parameter_lines.append(f"{key:<30} {json.dumps(item) if isinstance(item, str) else item}")
        license_value = req.get("license")
        self._send_json(200, {
            "license": "\n".join(license_value) if isinstance(license_value, list) else (license_value or ""),
            "modelfile": f"# stand-in: no real Modelfile\nFROM {record['name']}\n",
            "parameters": "\n".join(parameter_lines),
            "template": req.get("template") or "",
            "system": req.get("system") or "",
            **{k: req[k] for k in CREATE_FIELDS_SINCE if req.get(k)},
            "details": {"format": "gguf", "family": "llama", "families": ["llama"],
                        "parameter_size": "", "quantization_level": ""},
            "model_info": {},
            "capabilities": ["completion"],
            "modified_at": record["modified_at"],
        })

    def _tags(self) -> None:
        models = [
            {"name": r["name"], "model": r["name"], "modified_at": r["modified_at"], "size": r["size"],
             "digest": r["digest"], "details": {"format": "gguf"}}
            for r in self.owner.models.values()
        ]
        self._send_json(200, {"models": models})

    def _delete(self) -> None:
        record = self._find_or_404()
        if record is None:
            return
        with self.owner._lock:
            del self.owner.models[record["name"]]
        self._send_json(200, {})


def closed_port() -> int:
    """A loopback port with nothing listening (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
