"""Registration with Ollama through the official client, against OllamaStandIn
(a stand-in server speaking Ollama's REST API; no Ollama binary exists here),
including faults: the server must end up with a complete model or none."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import ollama
import pytest

from tasks.modelfile import Modelfile, ModelfileMessage, build_modelfile
from tasks.ollama_name import InvalidModelName
from tasks.register import (
    BlobDigestMismatch,
    OllamaAdaptersUnsupported,
    OllamaRejected,
    OllamaServerError,
    OllamaUnreachable,
    OllamaVersionUnsupported,
    RegistrationError,
    RegistrationEvent,
    RetryPolicy,
    register_model,
)
from tests.support.ollama_standin import OllamaStandIn, closed_port

NAME = "smollm2-135m-instruct:q4_k_m"


class Sleeps(list):
    """Records backoff delays instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def modelfile() -> Modelfile:
    return build_modelfile(
        from_="./model.gguf",
        dialect="chatml",
        system="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        stop=("<|im_end|>", "<|im_start|>"),
        num_ctx=2048,
        license="Apache-2.0",
        messages=[ModelfileMessage(role="user", content="Hi"), ModelfileMessage(role="assistant", content="Hello!")],
    )


def register(server: OllamaStandIn, gguf: Path, modelfile: Modelfile, **kwargs):
    kwargs.setdefault("sleep", Sleeps())
    kwargs.setdefault("retry", RetryPolicy(attempts=4, first_delay_s=0.05))
    return register_model(kwargs.pop("name", NAME), gguf, modelfile, host=server.url, **kwargs)


def assert_no_model_points_at_a_missing_blob(server: OllamaStandIn) -> None:
    for record in server.models.values():
        request = record["request"]
        for digest in list((request.get("files") or {}).values()) + list((request.get("adapters") or {}).values()):
            assert digest in server.blobs, f"{record['name']} points at missing blob {digest}"


def test_registration_uploads_then_creates_with_every_field(
    ollama_standin: OllamaStandIn, make_gguf: Callable[..., Path], modelfile: Modelfile  # noqa: F811
) -> None:
    gguf = make_gguf()
    events: list[RegistrationEvent] = []
    result = register(ollama_standin, gguf, modelfile, progress=events.append)

    assert result.name == NAME and result.server_version == "0.33.0" and result.retries == 0
    (blob,) = result.blobs
    assert blob.uploaded and blob.file_name == "model.gguf" and blob.size == gguf.stat().st_size
    assert ollama_standin.blobs[blob.digest] == gguf.read_bytes()
    assert result.statuses[-1] == "success"

    request = ollama_standin.model(NAME)["request"]
    assert request["files"] == {"model.gguf": blob.digest}
    assert request["template"] == modelfile.template
    assert request["system"] == modelfile.system
    assert request["parameters"] == {"temperature": 0.7, "top_p": 0.9, "num_ctx": 2048,
                                     "stop": ["<|im_end|>", "<|im_start|>"]}
    assert request["license"] == ["Apache-2.0"]
    assert request["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert "adapters" not in request

    phases = [e.phase for e in events]
    assert phases[0] == "version" and "upload" in phases and phases[-1] == "show"
    assert [e.message for e in events if e.phase == "create"][-1] == "success"
    # The client's ordinary calls see it too.
    listed = ollama.Client(host=ollama_standin.url).list()
    assert [m.model for m in listed.models] == ["registry.ollama.ai/library/smollm2-135m-instruct:q4_k_m"]


def test_second_registration_uploads_nothing(
    ollama_standin: OllamaStandIn, make_gguf: Callable[..., Path], modelfile: Modelfile  # noqa: F811
) -> None:
    gguf = make_gguf()
    first = register(ollama_standin, gguf, modelfile)
    uploads_before = len(ollama_standin.requests("POST", "/api/blobs"))
    second = register(ollama_standin, gguf, modelfile)
    assert first.uploaded_bytes == gguf.stat().st_size
    assert second.uploaded_bytes == 0 and not second.blobs[0].uploaded
    assert len(ollama_standin.requests("POST", "/api/blobs")) == uploads_before == 1
    # Another tag of the same file: still no upload.
    register(ollama_standin, gguf, modelfile, name="smollm2-135m-instruct:again")
    assert len(ollama_standin.requests("POST", "/api/blobs")) == 1


def test_adapter_is_uploaded_and_named(
    ollama_standin: OllamaStandIn, make_gguf: Callable[..., Path], modelfile: Modelfile  # noqa: F811
) -> None:
    base, adapter = make_gguf("base.gguf"), make_gguf("lora.gguf", marker="lora", adapter=True)
    result = register(ollama_standin, base, modelfile, adapter_path=adapter)
    roles = {b.role: b for b in result.blobs}
    assert set(roles) == {"model", "adapter"} and all(b.uploaded for b in result.blobs)
    assert ollama_standin.model(NAME)["request"]["adapters"] == {"lora.gguf": roles["adapter"].digest}


def test_servers_that_refuse_adapters_get_a_merge_hint(
    make_gguf: Callable[..., Path], modelfile: Modelfile  # noqa: F811
) -> None:
    with OllamaStandIn(version="0.40.0", accept_adapters=False) as server:
        with pytest.raises(OllamaAdaptersUnsupported, match="merged"):
            register(server, make_gguf("base.gguf"), modelfile, adapter_path=make_gguf("lora.gguf", marker="l"))
        assert server.models == {}


def test_invalid_name_is_refused_before_any_request(
    ollama_standin: OllamaStandIn, make_gguf: Callable[..., Path], modelfile: Modelfile  # noqa: F811
) -> None:
    with pytest.raises(InvalidModelName, match="tag"):
        register(ollama_standin, make_gguf(), modelfile, name="smollm2:q4+k")
    assert ollama_standin.log == []


def test_unreachable_server_raises_the_specific_error_after_bounded_backoff(
    make_gguf: Callable[..., Path], modelfile: Modelfile  # noqa: F811
) -> None:
    sleeps = Sleeps()
    with pytest.raises(OllamaUnreachable) as info:
        register_model(NAME, make_gguf(), modelfile, host=f"127.0.0.1:{closed_port()}", sleep=sleeps,
                       retry=RetryPolicy(attempts=4, first_delay_s=0.5, max_delay_s=1.5))
    assert "kiln register" in str(info.value) and "not reachable" in str(info.value)
    assert sleeps == [0.5, 1.0, 1.5]  # exponential, capped, then give up
    assert isinstance(info.value, RegistrationError)


def test_ollama_host_from_the_environment(
    ollama_standin: OllamaStandIn, make_gguf: Callable[..., Path], modelfile: Modelfile,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{ollama_standin.port}")
    result = register_model(NAME, make_gguf(), modelfile, sleep=Sleeps())
    assert result.host == ollama_standin.url


def test_uploads_interrupted_by_500_are_retried(
    ollama_standin: OllamaStandIn, make_gguf: Callable[..., Path], modelfile: Modelfile  # noqa: F811
) -> None:
    ollama_standin.fail_uploads = 2
    gguf = make_gguf()
    result = register(ollama_standin, gguf, modelfile)
    assert result.retries == 2
    assert [status for _, _, status in ollama_standin.requests("POST", "/api/blobs")] == [500, 500, 201]
    assert ollama_standin.blobs[result.blobs[0].digest] == gguf.read_bytes()
    assert_no_model_points_at_a_missing_blob(ollama_standin)


def test_uploads_that_keep_failing_stop_without_creating_a_model(
    ollama_standin: OllamaStandIn, make_gguf: Callable[..., Path], modelfile: Modelfile  # noqa: F811
) -> None:
    ollama_standin.fail_uploads = 10
    with pytest.raises(OllamaServerError, match="kiln register"):
        register(ollama_standin, make_gguf(), modelfile)
    assert ollama_standin.models == {} and ollama_standin.requests("POST", "/api/create") == []


@pytest.mark.parametrize("route", ["GET /api/version", "HEAD /api/blobs", "POST /api/blobs", "POST /api/create", "POST /api/show"])
def test_dropped_connections_are_retried(
    route: str, ollama_standin: OllamaStandIn, make_gguf: Callable[..., Path], modelfile: Modelfile  # noqa: F811
) -> None:
    ollama_standin.drop = {route: 1}
    result = register(ollama_standin, make_gguf(), modelfile)
    assert result.retries == 1 and ollama_standin.model(NAME) is not None
    assert_no_model_points_at_a_missing_blob(ollama_standin)


def test_a_create_stream_cut_short_is_retried(
    ollama_standin: OllamaStandIn, make_gguf: Callable[..., Path], modelfile: Modelfile  # noqa: F811
) -> None:
    ollama_standin.cut_create_streams = 1
    result = register(ollama_standin, make_gguf(), modelfile)
    assert result.retries == 1 and result.statuses[-1] == "success"


def test_an_error_line_in_the_create_stream_is_final(
    ollama_standin: OllamaStandIn, make_gguf: Callable[..., Path], modelfile: Modelfile  # noqa: F811
) -> None:
    ollama_standin.create_error = "unsupported architecture \"frobnicator\""
    with pytest.raises(OllamaRejected, match="frobnicator"):
        register(ollama_standin, make_gguf(), modelfile)
    assert len(ollama_standin.requests("POST", "/api/create")) == 1 and ollama_standin.models == {}


def test_a_server_stopped_mid_registration_leaves_no_model_and_a_later_run_completes(
    make_gguf: Callable[..., Path], modelfile: Modelfile  # noqa: F811
) -> None:
    server = OllamaStandIn().start()
    gguf = make_gguf()

    def stop_when_uploading(event: RegistrationEvent) -> None:
        if event.phase == "upload" and event.completed == 0:
            server.stop()

    with pytest.raises(OllamaUnreachable, match="uploading model.gguf"):
        register(server, gguf, modelfile, progress=stop_when_uploading)
    assert server.models == {} and server.blobs == {}

    server.start()  # same port, same (empty) store: `kiln register DIR` later
    try:
        result = register(server, gguf, modelfile)
        assert result.blobs[0].uploaded and server.model(NAME) is not None
        assert_no_model_points_at_a_missing_blob(server)
    finally:
        server.stop()


def test_slow_server_beyond_the_timeout_is_unreachable_within_it_fine(
    ollama_standin: OllamaStandIn, make_gguf: Callable[..., Path], modelfile: Modelfile  # noqa: F811
) -> None:
    ollama_standin.delay_s = 0.3
    with pytest.raises(OllamaUnreachable, match="Timeout"):
        register(ollama_standin, make_gguf(), modelfile, timeout=0.1, retry=RetryPolicy(attempts=2, first_delay_s=0.01))
    ollama_standin.delay_s = 0.05
    assert register(ollama_standin, make_gguf(), modelfile, timeout=2.0).statuses[-1] == "success"


def test_file_changed_during_registration_is_a_digest_mismatch(
    ollama_standin: OllamaStandIn, make_gguf: Callable[..., Path], modelfile: Modelfile  # noqa: F811
) -> None:
    gguf = make_gguf()

    def rewrite_before_upload(event: RegistrationEvent) -> None:
        if event.phase == "upload" and event.completed == 0:
            gguf.write_bytes(gguf.read_bytes() + b"changed")

    with pytest.raises(BlobDigestMismatch, match="changed while it was being registered"):
        register(ollama_standin, gguf, modelfile, progress=rewrite_before_upload)
    assert ollama_standin.models == {}


@pytest.mark.parametrize(("version", "ok"), [("0.5.4", False), ("0.5.5", True), ("0.33.0-rc2", True), ("0.0.0", True)])
def test_server_version_gate(version: str, ok: bool, make_gguf: Callable[..., Path], modelfile: Modelfile) -> None:  # noqa: F811
    with OllamaStandIn(version=version) as server:
        if ok:
            assert register(server, make_gguf(), modelfile).server_version == version
        else:
            with pytest.raises(OllamaVersionUnsupported, match="0.5.5"):
                register(server, make_gguf(), modelfile)
            assert server.requests("HEAD") == []


def test_a_server_that_is_not_ollama_is_refused(make_gguf: Callable[..., Path], modelfile: Modelfile) -> None:  # noqa: F811
    with OllamaStandIn() as server:
        server.version = None  # type: ignore[assignment]  # answers {"version": null}
        with pytest.raises(OllamaRejected, match="version"):
            register(server, make_gguf(), modelfile)


def test_missing_gguf_is_refused_before_contacting_the_server(
    ollama_standin: OllamaStandIn, tmp_path: Path, modelfile: Modelfile
) -> None:
    with pytest.raises(RegistrationError, match="does not exist"):
        register(ollama_standin, tmp_path / "nope.gguf", modelfile)
    assert ollama_standin.log == []


# -- the stand-in behaves like Ollama where registration depends on it --------


def test_standin_blob_and_create_refusals(ollama_standin: OllamaStandIn) -> None:  # noqa: F811
    http = httpx.Client(base_url=ollama_standin.url)
    good = "sha256:" + "0" * 64
    assert http.head(f"/api/blobs/{good}").status_code == 404
    assert http.head("/api/blobs/sha256:xyz").status_code == 400
    mismatch = http.post(f"/api/blobs/{good}", content=b"data")
    assert mismatch.status_code == 400 and mismatch.json()["error"].startswith(f"digest mismatch, expected {good}, got sha256:")
    import hashlib
    digest = "sha256:" + hashlib.sha256(b"GGUFdata").hexdigest()
    assert http.post(f"/api/blobs/{digest}", content=b"GGUFdata").status_code == 201
    assert http.post(f"/api/blobs/{digest}", content=b"GGUFdata").status_code == 200

    def create(body: dict) -> httpx.Response:
        return http.post("/api/create", content=json.dumps(body))

    assert create({"model": "bad name!", "files": {"m.gguf": digest}}).json() == {"error": "invalid model name"}
    for path in ("/abs/m.gguf", "../m.gguf", "a/../m.gguf", "c:m.gguf"):
        refused = create({"model": "ok", "files": {path: digest}})
        assert refused.status_code == 400 and "file path must be relative" in refused.json()["error"]
    assert create({"model": "ok", "files": {"m.gguf": ""}}).json() == {"error": "invalid digest format"}
    missing = create({"model": "ok", "files": {"m.gguf": good}})
    assert missing.status_code == 400 and "blob not found" in missing.json()["error"]
    assert http.post("/api/create", content=b"{not json").status_code == 400
    streamed = create({"model": "ok", "files": {"m.gguf": digest}, "template": "{{ .Prompt }}"})
    lines = [json.loads(line) for line in streamed.text.splitlines()]
    assert streamed.status_code == 200 and lines[-1] == {"status": "success"}
    client = ollama.Client(host=ollama_standin.url)
    assert client.show("ok").template == "{{ .Prompt }}"
    with pytest.raises(ollama.ResponseError) as info:
        client.show("absent")
    assert info.value.status_code == 404
    assert client.delete("ok").status == "success"
    assert http.request("DELETE", "/api/delete", content=json.dumps({"model": "ok"})).status_code == 404


@pytest.fixture
def jinja_modelfile() -> Modelfile:
    """chat format jinja: no TEMPLATE, REQUIRES the llama-server engine's first release."""
    return build_modelfile(from_="./model.gguf", dialect="chatml", stop=("<|im_end|>",), chat_format="jinja",
                           requires="0.30.0")


@pytest.fixture
def renderer_modelfile() -> Modelfile:
    return build_modelfile(from_="./model.gguf", dialect="gemma2", stop=("<turn|>",), chat_format="renderer",
                           renderer="gemma4", parser="gemma4", requires="0.20.0")


def test_renderer_parser_and_requires_travel_on_the_create_request(
    ollama_standin: OllamaStandIn, make_gguf: Callable[..., Path], renderer_modelfile: Modelfile  # noqa: F811
) -> None:
    # ollama-python 0.6.3's create() cannot carry these: they go on the same REST call it makes.
    assert "renderer" not in ollama.Client.create.__code__.co_varnames
    register(ollama_standin, make_gguf(), renderer_modelfile)
    request = ollama_standin.model(NAME)["request"]
    assert (request["renderer"], request["parser"], request["requires"]) == ("gemma4", "gemma4", "0.20.0")
    assert "template" not in request and request["stream"] is True
    assert request["parameters"]["stop"] == ["<turn|>"]
    shown = httpx.post(f"{ollama_standin.url}/api/show", json={"model": NAME}).json()
    assert (shown["renderer"], shown["parser"], shown["requires"]) == ("gemma4", "gemma4", "0.20.0")


def test_a_modelfile_without_the_new_fields_still_goes_through_the_client(
    ollama_standin: OllamaStandIn, make_gguf: Callable[..., Path], modelfile: Modelfile  # noqa: F811
) -> None:
    register(ollama_standin, make_gguf(), modelfile)
    request = ollama_standin.model(NAME)["request"]
    assert not {"renderer", "parser", "requires"} & set(request)


@pytest.mark.parametrize("unknown_fields", ["ignore", "reject"])
@pytest.mark.parametrize(("version", "ok"), [("0.29.9", False), ("0.11.4", False), ("0.30.0", True), ("0.0.0", True)])
def test_a_server_older_than_requires_is_refused_before_any_upload(
    version: str, ok: bool, unknown_fields: str, make_gguf: Callable[..., Path],  # noqa: F811
    jinja_modelfile: Modelfile,
) -> None:
    with OllamaStandIn(version=version, unknown_fields=unknown_fields) as server:
        if ok:
            register(server, make_gguf(), jinja_modelfile)
            assert server.ignored_fields == []
            return
        with pytest.raises(OllamaVersionUnsupported, match=r"older than 0\.30\.0.*Jinja chat template"):
            register(server, make_gguf(), jinja_modelfile)
        assert server.requests("HEAD") == [] and server.models == {}


def test_the_standin_in_old_version_mode_drops_or_refuses_fields_it_does_not_know(
    make_gguf: Callable[..., Path],  # noqa: F811
) -> None:
    gguf = make_gguf()
    digest = "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()
    body = {"model": "m", "files": {"m.gguf": digest}, "renderer": "gemma4", "requires": "0.20.0", "stream": False}
    with OllamaStandIn(version="0.11.4") as old:
        httpx.post(f"{old.url}/api/blobs/{digest}", content=gguf.read_bytes())
        assert httpx.post(f"{old.url}/api/create", json=body).status_code == 200
        assert old.ignored_fields == ["renderer", "requires"] and "renderer" not in old.model("m")["request"]
    with OllamaStandIn(version="0.12.0", unknown_fields="reject") as strict:
        httpx.post(f"{strict.url}/api/blobs/{digest}", content=gguf.read_bytes())
        refused = httpx.post(f"{strict.url}/api/create", json=body)
        assert refused.status_code == 400 and "requires" in refused.json()["error"]
