"""The records that cross step boundaries: the export request, the resolved source, the manifest.

All strict (`extra="forbid"`) so a typo in a parameter or catalogue is refused
with the field's name instead of being silently ignored.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.toolchain import Toolchain

QUANT_NAME_RE = re.compile(r"^[a-z0-9_]+$")


def normalise_quant(name: str) -> str:
    """`Q4_K_M`, `q4_k_m` and ` q4_k_m ` all mean the same quant type."""
    return name.strip().lower()


class ExportRequest(BaseModel):
    """What a user asks for: the same record from the CLI, a deployment form or a catalogue line."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(
        "demo",
        description=(
            "What to export: a registry key (`kiln registry list`), a local Hugging Face "
            "folder, hf:ORG/NAME@<40-hex>, or `demo` for the embedded SmolLM2-135M-Instruct."
        ),
    )
    quants: list[str] = Field(
        default_factory=lambda: ["q8_0", "q4_k_m"],
        description="Quant types to produce besides the f16 base, e.g. q4_k_m, q8_0, q5_k_m.",
    )
    outtype: Literal["f16", "bf16", "f32"] = Field(
        "f16", description="Float type of the base conversion every quant type is made from."
    )
    out_dir: str = Field("kiln-out", description="Folder the GGUF files and manifest.json are written to.")
    name: str | None = Field(
        None, description="File-name stem for outputs; defaults to the model's name.", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
    )
    verify: bool = Field(True, description="Run every GGUF and compare the f16 file with the Hugging Face model.")
    accept_license: bool = Field(False, description="Accept the base's licence where it requires acceptance.")
    resolve_revision: bool = Field(False, description="Resolve a Hub branch or tag to its commit SHA once, and record it.")
    allow_pickle: bool = Field(False, description="Allow pickled *.bin/*.pt weights (they can run code when loaded).")
    trust_remote_code: bool = Field(False, description="Allow a model whose config asks for custom code (not registry keys: their spec decides).")
    dialect: str | None = Field(None, description="Chat-template dialect for the Modelfile when the model's own template is not recognised.")
    ollama_name: str | None = Field(None, description="Register the outputs with Ollama under this name (tag = quant type unless given).")
    placement: Literal["local", "cpu", "gpu"] = Field(
        "local",
        description=(
            "Where conversion, merge and quantization run: `local` in the export's own process; `cpu` or `gpu` "
            "on a worker of that Prefect work pool (the `convert-quantize/<pool>` deployment; the export waits)."
        ),
    )

    @field_validator("ollama_name")
    @classmethod
    def _valid_ollama_name(cls, value: str | None) -> str | None:
        if value is not None:
            from tasks.errors import KilnError
            from tasks.ollama_name import parse_model_name

            try:
                parse_model_name(value)
            except KilnError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("quants")
    @classmethod
    def _normalise_quants(cls, value: list[str]) -> list[str]:
        out: list[str] = []
        for q in value:
            q = normalise_quant(q)
            if not QUANT_NAME_RE.fullmatch(q):
                raise ValueError(f"quant type {q!r} is not a quant type name (letters, digits, _)")
            if q not in out:
                out.append(q)
        return out


class SourceFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    size: int
    sha256: str
    mtime_ns: int = Field(0, description="Lets a re-run trust the recorded sha256 when size and mtime are unchanged.")


class ResolvedSource(BaseModel):
    """Every source kind resolves to this one record; the manifest stores it as is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["registry", "hf", "local", "gguf", "demo"]
    id: str = Field(..., description="Registry key, Hub repo id, or the local path.")
    revision: str | None = Field(None, description="Hub commit SHA where the weights come from the Hub.")
    path: str = Field(..., description="Local folder (or GGUF file) that conversion reads.")
    registry_key: str | None = None
    derived_from: str | None = Field(
        None, description="Where a rebuilt folder came from (the demo: the packaged GGUF and its sha256)."
    )
    files: list[SourceFile] = Field(default_factory=list)
    # Optional, appended by tasks/fetch.py: what config.json says, and the branch a SHA was resolved from.
    requested_revision: str | None = Field(
        None, description="The branch or tag given with --resolve-revision; `revision` is the commit it named then."
    )
    architecture: str | None = Field(None, description="config.json `architectures[0]` (None for a GGUF source).")
    bos_token_id: int | None = Field(None, description="config.json `bos_token_id`, 1 where it gives none.")
    eos_token_id: int | list[int] | None = Field(None, description="config.json `eos_token_id`, 2 where it gives none.")


class Check(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    target: str = Field(..., description="What was checked: a file, the source, the request.")
    passed: bool
    detail: str = ""
    value: float | None = None


class OutputFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(..., description="Relative to the output folder.")
    quant: str
    size: int
    sha256: str


class OllamaModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    quant: str
    gguf: str = Field(..., description="GGUF file, relative to the output folder.")
    modelfile: str = Field(..., description="Modelfile, relative to the output folder.")
    name: str | None = Field(None, description="The Ollama name to register it under.")
    registered: bool = False


class OllamaPlan(BaseModel):
    """The chat side of an export: which dialect, whether it was verified, the stops, the Modelfiles."""

    model_config = ConfigDict(extra="forbid")

    dialect: str
    verified: bool
    system: str | None
    stops: list[str]
    warnings: list[str] = Field(default_factory=list)
    models: list[OllamaModel] = Field(default_factory=list)


class Manifest(BaseModel):
    """`manifest.json`: enough to reproduce an export and to tell that it is up to date."""

    model_config = ConfigDict(extra="forbid")

    kiln_version: str
    request: ExportRequest
    request_key: str = Field(..., description="Hash of everything that determines the outputs.")
    source: ResolvedSource
    toolchain: Toolchain
    outputs: list[OutputFile]
    checks: list[Check]
    timings: dict[str, float] = Field(default_factory=dict)
    created_at: str
    ollama: OllamaPlan | None = None
