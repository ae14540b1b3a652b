"""A fault-injecting stand-in that sits between huggingface_hub and the olah mirror, for tests only.

olah is a real Hub mirror, but it ignores `Range` (so a resumed download cannot
be shown against it) and never fails on purpose. This proxy forwards every
request to olah unchanged, except where a test asked for a fault:

- `drop_once(name, after)`: the first GET of file `name` sends `after` bytes of
  the body and then closes the connection, as a flaky network would;
- `corrupt(name)`: every GET of `name` has one byte flipped (same length);
- `fail(name, status)`: GETs of `name` answer `status`;
- `gate(repo_id, status)`: everything about `repo_id` answers 401/403 with the
  Hub's `X-Error-Code: GatedRepo`, and (as a careless server might) echoes the
  request's Authorization header in the error body, so tests can prove the
  token never reaches a Kiln message. `gate(repo_id, status, token=T)`: only a
  request carrying `Authorization: Bearer T` gets through, as the Hub lets an
  account that accepted the licence download.

It serves `Range: bytes=N-` itself (206 with the tail of olah's full body), the
way the Hub's CDN does, and records every request so tests can count them.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server", "content-encoding"}
_RANGE = re.compile(r"^bytes=(\d+)-$")
_CHUNK = 256 * 1024


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    range: str | None
    status: int
    authorization: bool


class FaultProxy:
    """HTTP proxy on 127.0.0.1 (ephemeral port) in front of `upstream` (olah's base URL)."""

    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream = upstream.rstrip("/")
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self._lock = threading.Lock()
        self.requests: list[Seen] = []
        self.reset()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-faults-proxy", daemon=True)

    # --- lifecycle
    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- faults
    def reset(self) -> None:
        with self._lock:
            self.requests = []
            self._drop: dict[str, int] = {}
            self._corrupt: set[str] = set()
            self._fail: dict[str, int] = {}
            self._gated: dict[str, int] = {}
            self._gate_tokens: dict[str, str] = {}

    def drop_once(self, name: str, after: int) -> None:
        with self._lock:
            self._drop[name] = after

    def corrupt(self, name: str) -> None:
        with self._lock:
            self._corrupt.add(name)

    def fail(self, name: str, status: int = 500) -> None:
        with self._lock:
            self._fail[name] = status

    def gate(self, repo_id: str, status: int = 401, token: str | None = None) -> None:
        with self._lock:
            self._gated[repo_id] = status
            if token is not None:
                self._gate_tokens[repo_id] = token

    def seen(self, name: str | None = None, method: str | None = None) -> list[Seen]:
        with self._lock:
            return [r for r in self.requests
                    if (name is None or r.path.split("?")[0].endswith("/" + name))
                    and (method is None or r.method == method)]

    # --- internals used by the handler
    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.requests.append(seen)

    def _armed(self, name: str) -> bool:
        with self._lock:
            return name in self._drop or name in self._corrupt

    def _take_drop(self, name: str) -> int | None:
        with self._lock:
            return self._drop.pop(name, None)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - quiet test output
        pass

    def do_HEAD(self):  # noqa: N802
        self._handle("HEAD")

    def do_GET(self):  # noqa: N802
        self._handle("GET")

    def _handle(self, method: str) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        path = self.path
        plain = path.split("?")[0]
        rng = self.headers.get("Range")
        auth = self.headers.get("Authorization")
        name = plain.rsplit("/", 1)[-1] if "/resolve/" in plain else None

        for repo, status in dict(proxy._gated).items():
            if repo in proxy._gate_tokens and auth == f"Bearer {proxy._gate_tokens[repo]}":
                continue
            if f"/{repo}/" in plain + "/":
                message = (f"Access to model {repo} is restricted. You must have access to it and be "
                           "authenticated to access it. Please log in.")
                body = json.dumps({"error": f"{message} (request carried Authorization: {auth})"}).encode()
                proxy._record(Seen(method, path, rng, status, bool(auth)))
                self._reply(status, {"X-Error-Code": "GatedRepo", "X-Error-Message": message,
                                     "Content-Type": "application/json"}, body, method)
                return
        if name is not None and method == "GET" and name in proxy._fail:
            status = proxy._fail[name]
            proxy._record(Seen(method, path, rng, status, bool(auth)))
            self._reply(status, {"Content-Type": "text/plain"}, b"injected failure", method)
            return

        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("host", "range", "accept-encoding", "connection")}
        headers["Accept-Encoding"] = "identity"
        conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=120)
        try:
            conn.request(method, path, headers=headers)
            resp = conn.getresponse()
            out = {k: v for k, v in resp.getheaders() if k.lower() not in _HOP}
            if "location" in {k.lower() for k in out}:
                out = {k: (v.replace(proxy.upstream, proxy.url) if k.lower() == "location" else v)
                       for k, v in out.items()}
            length = resp.getheader("Content-Length")
            if method == "GET" and name is not None and resp.status == 200 and not rng and not proxy._armed(name):
                self._pass_through(proxy, resp, out, path, bool(auth))
                return
            if method == "GET" and name is not None and resp.status == 200:
                # olah answers file GETs chunked and ignores Range: take the whole body, then serve it as
                # the Hub's CDN would (Content-Length, Range), with any armed fault applied.
                self._serve_file(proxy, resp.read(), out, name, rng, path, bool(auth))
                return
            body = b"" if method == "HEAD" else resp.read()
            if method == "HEAD" and length is not None:
                out["Content-Length"] = length
            proxy._record(Seen(method, path, rng, resp.status, bool(auth)))
            self._reply(resp.status, out, body, method, keep_length=method == "HEAD" and length is not None)
        finally:
            conn.close()

    def _pass_through(self, proxy: FaultProxy, resp, out: dict, path: str, auth: bool) -> None:
        """No fault armed: relay olah's chunked body as it arrives (a big file must not wait for a buffer)."""
        proxy._record(Seen("GET", path, None, 200, auth))
        self.send_response(200)
        for k, v in out.items():
            self.send_header(k, v)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        while chunk := resp.read1(_CHUNK):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _serve_file(self, proxy: FaultProxy, body: bytes, out: dict, name: str, rng: str | None,
                    path: str, auth: bool) -> None:
        total = len(body)
        start, status = 0, 200
        match = _RANGE.match(rng or "")
        if match and int(match[1]) < total:
            start, status = int(match[1]), 206
            out["Content-Range"] = f"bytes {start}-{total - 1}/{total}"
        proxy._record(Seen("GET", path, rng, status, auth))
        if name in proxy._corrupt:
            flip = total // 2
            body = body[:flip] + bytes([body[flip] ^ 0xFF]) + body[flip + 1:]
        payload = body[start:]
        drop_after = proxy._take_drop(name)
        self.send_response(status)
        for k, v in out.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if drop_after is not None and drop_after < len(payload):
            self.wfile.write(payload[:drop_after])
            self.wfile.flush()
            # Cut the connection mid-body: the client sees fewer bytes than Content-Length promised.
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        for i in range(0, len(payload), _CHUNK):
            self.wfile.write(payload[i:i + _CHUNK])
        self.wfile.flush()

    def _reply(self, status: int, headers: dict, body: bytes, method: str, keep_length: bool = False) -> None:
        self.send_response(status)
        for k, v in headers.items():
            if k.lower() == "content-length" and not keep_length:
                continue
            self.send_header(k, v)
        if not keep_length:
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if method != "HEAD" and body:
            self.wfile.write(body)
