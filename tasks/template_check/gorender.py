"""Go templates, as Ollama renders them: the Go renderer process."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import templates
from tasks.files import cache_dir
from tasks.template_check.errors import GoRendererFailed, GoToolchainMissing, TemplateCheckError
from tasks.template_check.matrix import ChatMessage

_GORENDER_FILES: Final = ("main.go", "go.mod")
_GO_BUILD_TIMEOUT_S: Final = 300
_GO_RENDER_TIMEOUT_S: Final = 120


@dataclass(frozen=True)
class GoRenderJob:
    """One render: a TEMPLATE plus what a chat request would carry."""

    template: str
    messages: tuple[ChatMessage, ...]
    system: str | None = None
    modelfile_messages: tuple[ChatMessage, ...] = ()
    tools: tuple[Mapping[str, Any], ...] | None = None
    think: bool | str | None = None
    # Pins currentDate/yesterdayDate ("YYYY-MM-DD"); None means the clock.
    today: str | None = None
    # Instead of a render: the tag Ollama's tool-call parser derives from the template,
    # or the tags its thinking parser does.
    tool_tag: bool = False
    think_tags: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "template": self.template,
            "system": self.system or "",
            "modelfile_messages": [m.for_ollama() for m in self.modelfile_messages],
            "messages": [m.for_ollama() for m in self.messages],
            "tools": list(self.tools) if self.tools is not None else None,
            "think": self.think,
            "today": self.today or "",
            "tool_tag": self.tool_tag,
            "think_tags": self.think_tags,
        }


@dataclass(frozen=True)
class GoRenderError:
    """A template that failed to parse or execute (Ollama would fail the request)."""

    message: str


def _gorender_source_digest(source: Path) -> str:
    digest = hashlib.sha256()
    for name in _GORENDER_FILES:
        path = source / name
        if not path.is_file():
            raise GoRendererFailed(f"the Go renderer source {path} is missing; the Kiln installation is incomplete")
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


class GoRenderer:
    """Builds (once, cached by source hash) and runs the Go template renderer."""

    def __init__(self, cache_root: Path | None = None, source: Path | None = None) -> None:
        self.source = source or templates.GORENDER_DIR
        self._cache_root = cache_root
        self._binary: Path | None = None

    @property
    def cache_root(self) -> Path:
        return self._cache_root if self._cache_root is not None else cache_dir()

    def binary(self) -> Path:
        """Path to the built renderer, building it with `go build` when missing."""
        if self._binary is not None and self._binary.is_file():
            return self._binary
        key = _gorender_source_digest(self.source)[:16]
        target_dir = self.cache_root / "gorender" / key
        target = target_dir / "gorender"
        if not target.is_file():
            self._build(target)
        self._binary = target
        return target

    def _build(self, target: Path) -> None:
        go = shutil.which("go")
        if go is None:
            raise GoToolchainMissing(
                "Go is needed to render Ollama templates (Kiln builds a small renderer with `go build`); "
                "install it (Debian/Ubuntu: apt-get install golang-go) or put `go` on PATH"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        # Offline, standard library only: never reach for a module proxy or a
        # newer toolchain, and need no C compiler.
        env.update({"GO111MODULE": "on", "GOPROXY": "off", "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"})
        if not any(env.get(k) for k in ("GOCACHE", "XDG_CACHE_HOME", "HOME")):
            env["GOCACHE"] = str(self.cache_root / "go-build")
        with tempfile.TemporaryDirectory(prefix=".kiln-tmp-gorender-", dir=target.parent) as work:
            work_dir = Path(work)
            for name in _GORENDER_FILES:
                shutil.copyfile(self.source / name, work_dir / name)
            built = work_dir / "gorender.bin"
            try:
                proc = subprocess.run(
                    [go, "build", "-trimpath", "-o", str(built), "."],
                    cwd=work_dir,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=_GO_BUILD_TIMEOUT_S,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise GoRendererFailed(f"`go build` of the template renderer took over {_GO_BUILD_TIMEOUT_S} s") from None
            if proc.returncode != 0:
                raise GoRendererFailed(
                    "`go build` of the template renderer failed:\n" + (proc.stderr or proc.stdout).strip()
                )
            # Atomic: a concurrent build or a killed one never leaves half a binary.
            os.replace(built, target)

    def render_many(self, jobs: Sequence[GoRenderJob]) -> list[str | GoRenderError]:
        """Render every job in one renderer process; results in job order."""
        if not jobs:
            return []
        payload = json.dumps({"jobs": [job.to_json() for job in jobs]})
        try:
            proc = subprocess.run(
                [str(self.binary())],
                input=payload,
                capture_output=True,
                text=True,
                timeout=_GO_RENDER_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise GoRendererFailed(f"the Go template renderer did not answer within {_GO_RENDER_TIMEOUT_S} s") from None
        if proc.returncode != 0:
            raise GoRendererFailed(f"the Go template renderer failed: {proc.stderr.strip()}")
        results = json.loads(proc.stdout)["results"]
        if len(results) != len(jobs):
            raise GoRendererFailed(f"the Go template renderer answered {len(results)} results for {len(jobs)} jobs")
        return [r["render"] if "render" in r else GoRenderError(r.get("error", "unknown error")) for r in results]

    def tool_tag(self, template: str) -> str:
        """The text Ollama's tool-call parser waits for in a reply before it reads tool calls, as Ollama
        derives it from `template` (tools/template.go parseTag); "{" means a reply that starts with JSON."""
        return self.render(GoRenderJob(template=template, messages=(), tool_tag=True))

    def think_tags(self, template: str) -> tuple[str, str]:
        """The (opening, closing) tags Ollama's thinking parser infers from `template`
        (thinking/template.go InferTags); ("", "") when it finds none and leaves thinking in the reply."""
        opening, closing = self.render(GoRenderJob(template=template, messages=(), think_tags=True)).split("\n")
        return opening, closing

    def render(self, job: GoRenderJob) -> str:
        """Render one job; a template error becomes a TemplateCheckError."""
        (result,) = self.render_many([job])
        if isinstance(result, GoRenderError):
            raise TemplateCheckError(f"the Go template failed to render: {result.message}")
        return result


def render_go_template(
    template: str,
    messages: Sequence[ChatMessage],
    *,
    system: str | None = None,
    think: bool | str | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    renderer: GoRenderer | None = None,
) -> str:
    """The prompt Ollama would build from `template` for a chat request."""
    job = GoRenderJob(
        template=template,
        messages=tuple(messages),
        system=system,
        think=think,
        tools=tuple(tools) if tools is not None else None,
    )
    return (renderer or GoRenderer()).render(job)
