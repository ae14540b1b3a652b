"""The records that cross step boundaries: the export request, the resolved source, the manifest.

All strict (`extra="forbid"`) so a typo in a parameter or catalogue is refused
with the field's name instead of being silently ignored.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tasks.recipe import AppliedRecipe
from tasks.toolchain import Toolchain

QUANT_NAME_RE = re.compile(r"^[a-z0-9_]+$")

# How a LoRA adapter is applied (tasks/adapter): streamed in, shipped beside, or merged by peft.
AdapterMode = Literal["merge", "adapter", "peft"]


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
    # Titles: the deployment form in Prefect's UI shows them (it would make "Quants", "Out Dir", "Max Kl").
    quants: list[str] = Field(
        default_factory=lambda: ["q8_0", "q4_k_m"],
        title="Quant types",
        description=(
            "Quant types to produce besides the float base, e.g. q8_0, q6_k, q5_k_m, q4_k_m, q4_0; "
            "or `auto` alone (with max_size or max_kl) to measure and pick one."
        ),
    )
    outtype: Literal["f16", "bf16", "f32"] = Field(
        "f16", title="Float type", description="Float type of the base conversion every quant type is made from."
    )
    out_dir: str = Field("kiln-out", title="Output folder", description="Folder the GGUF files and manifest.json are written to. On a shared server it must lie under the operator's output roots (KILN_POLICY_FILE).")
    placement: Literal["local", "cpu", "gpu"] = Field(
        "local",
        description=(
            "Where conversion, merge and quantization run: `local` in the export's own process; `cpu` or `gpu` "
            "on a worker of that Prefect work pool (the `convert-quantize/<pool>` deployment; the export waits)."
        ),
    )
    name: str | None = Field(
        None, title="File name stem", description="File-name stem for outputs; defaults to the model's name.",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
    )
    verify: bool = Field(True, description="Run every GGUF and compare the f16 file with the Hugging Face model.")
    report: bool = Field(True, description="Measure each quant type against f16: KL divergence, top-1, perplexity, speed.")
    accept_license: bool = Field(False, description="Accept the base's licence where it requires acceptance.")
    resolve_revision: bool = Field(False, description="Resolve a Hub branch or tag to its commit SHA once, and record it.")
    allow_pickle: bool = Field(False, description="Allow pickled *.bin/*.pt weights (they can run code when loaded). On a shared server, refused unless the operator's policy allows it.")
    trust_remote_code: bool = Field(False, description="Allow a model whose config asks for custom code (not registry keys: their spec decides). On a shared server, refused unless the operator's policy allows it.")
    allow_requantize: bool = Field(
        False,
        description=(
            "A prebuilt quantized GGUF: also make the requested types with fewer bits than it (quality loss: the "
            "second quantization's error adds to the first's). Types with more bits are never made."
        ),
    )
    dialect: str | None = Field(None, description="Chat-template dialect for the Modelfile when the model's own template is not recognised.")
    ollama_name: str | None = Field(None, description="Register the outputs with Ollama under this name (tag = quant type unless given).")
    adapter: str | None = Field(None, description="A PEFT LoRA adapter folder to apply to the base.")
    adapter_mode: AdapterMode = Field(
        "merge",
        description=(
            "merge: fold the adapter into the base GGUF tensor by tensor (streaming); adapter: ship a GGUF LoRA "
            "with an ADAPTER line; peft: the transformers+peft reference merge."
        ),
    )
    max_size: str | None = Field(None, description="With quants [auto]: the largest acceptable file, e.g. 500MB.")
    max_kl: float | None = Field(None, gt=0, title="Max KL",
                                 description="With quants [auto]: the largest acceptable mean KL divergence from f16.")
    split_max_size: str | None = Field(
        None, title="Split max size",
        description=(
            "Split every output GGUF larger than this into shards NAME-00001-of-0000N.gguf, as llama.cpp's "
            "gguf-split --split-max-size does (a whole number of M or G, e.g. 2G). Ollama cannot import shards: "
            "a split output gets no Modelfile, and ollama_name is refused with it."
        ),
    )

    recipe: str | None = Field(
        None, title="Recipe",
        description=(
            "A per-tensor recipe file (YAML: tensor-name regex → ggml type, output and token-embedding types, as "
            "llama-quantize's --tensor-type) applied to every quant type; outputs are labelled TYPE-RECIPE and the "
            "recipe is recorded in the manifest. With quants [auto]: one more candidate of the search."
        ),
    )
    search_budget: str | None = Field(
        None, title="Search budget",
        description="With quants [auto]: stop the search after this long (e.g. 10m, 90s) and export the best "
                    "candidate measured so far.",
    )
    imatrix: str | None = Field(
        None, title="Importance matrix",
        description=(
            "Quantize with an importance matrix: `auto` (computed on Kiln's calibration text), a text PATH.txt "
            "to compute it on, or a matrix PATH.gguf / PATH.dat from llama-imatrix. Outputs are labelled "
            "`<type>-imat`; types such as iq2_xs and q2_k_s need one."
        ),
    )

    @model_validator(mode="after")
    def _auto_needs_a_bound(self) -> ExportRequest:
        if "auto" in self.quants:
            if self.quants != ["auto"]:
                raise ValueError("quants: `auto` picks one quant type by itself; give it alone")
            if self.max_size is None and self.max_kl is None:
                raise ValueError("quants [auto] needs a bound to choose by: max_size (e.g. 500MB) or max_kl (e.g. 0.05)")
        elif self.max_size is not None or self.max_kl is not None:
            raise ValueError("max_size and max_kl only apply to quants [auto]")
        elif self.search_budget is not None:
            raise ValueError("search_budget only applies to quants [auto] (it bounds the search's time)")
        if self.max_size is not None:
            from tasks.errors import KilnError
            from tasks.units import parse_size

            try:
                parse_size(self.max_size)
            except KilnError as exc:
                raise ValueError(f"max_size: {exc}") from None
        return self

    @field_validator("search_budget")
    @classmethod
    def _budget_is_a_duration(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from tasks.errors import KilnError
        from tasks.units import parse_duration

        try:
            parse_duration(value)
        except KilnError as exc:
            raise ValueError(f"search_budget: {exc}") from None
        return value.strip()

    @model_validator(mode="after")
    def _recipe_needs_a_quantized_type(self) -> ExportRequest:
        if self.recipe is not None and not [q for q in self.quants if q not in ("f32", "f16", "bf16")]:
            raise ValueError("recipe: a recipe sets the types of a quantization; give a quant type (e.g. q4_k_m) "
                             "or auto with it")
        return self

    @field_validator("split_max_size")
    @classmethod
    def _gguf_split_size(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from tasks.errors import KilnError
        from tasks.split import normal_split_size

        try:
            return normal_split_size(value)
        except KilnError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _ollama_takes_whole_files(self) -> ExportRequest:
        if self.split_max_size is not None and self.ollama_name is not None:
            raise ValueError("Ollama cannot import split GGUFs, so --split-max-size and --ollama-name do not go "
                             "together; export for Ollama without --split-max-size (a second export reuses the "
                             "cached conversion)")
        return self

    @field_validator("imatrix")
    @classmethod
    def _imatrix_kind(cls, value: str | None) -> str | None:
        if value is not None:
            from tasks.errors import KilnError
            from tasks.imatrix import imatrix_kind

            try:
                imatrix_kind(value)
            except KilnError as exc:
                raise ValueError(str(exc)) from None
        return value

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

    @field_validator("source", "out_dir", "dialect", "recipe")
    @classmethod
    def _plain_text(cls, value: str | None, info: ValidationInfo) -> str | None:
        # "" would mean the current folder; a NUL or newline is no path or name anyone means.
        if value is not None:
            if not value.strip():
                raise ValueError(f"{info.field_name} is empty; give a value (see `kiln export --help`)")
            bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
            if bad is not None:
                raise ValueError(f"{info.field_name} contains the control character {bad!r}; remove it")
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
    shard: int | None = Field(None, description="Which shard of a split output this file is (1-based; --split-max-size).")
    shards: int | None = Field(None, description="How many shards the split output has.")


class ImatrixRecord(BaseModel):
    """The manifest's record of the importance matrix an export quantized with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["auto", "user-text", "file"] = Field(description="auto: Kiln's calibration text; user-text: "
                                                         "the user's .txt; file: a matrix the user gave")
    path: str = Field(description="the matrix file used (a cache entry when computed)")
    sha256: str
    entries: int = Field(description="tensors the matrix covers")
    text: str | None = Field(None, description="name of the calibration text it was computed on")
    text_sha256: str | None = None
    chunks: int | None = Field(None, description="at most this many chunks of `ctx` tokens were used")
    ctx: int | None = None
    computed_s: float | None = Field(None, description="seconds llama-imatrix took (when it was computed)")
    reused: bool = Field(False, description="taken from Kiln's cache, not computed in this export")


class QuantMetrics(BaseModel):
    """One GGUF's row of the report. The reference row has KL 0 and top-1 agreement 1 by definition."""

    quant: str
    file: str
    is_reference: bool = False
    size_bytes: int = Field(description="file size on disk")
    n_params: int
    bits_per_weight: float = Field(description="tensor bytes × 8 / parameters, as llama.cpp prints BPW")
    kl_mean: float = Field(description="mean KL(f16 ‖ this) per scored token of the evaluation text, nats")
    kl_p99: float
    kl_max: float
    top1_agreement: float = Field(description="fraction of scored tokens whose argmax equals f16's")
    ppl: float = Field(description="perplexity on the evaluation text (scored halves of the chunks)")
    ppl_ratio: float = Field(description="PPL(this) / PPL(f16)")
    chat_kl_mean: float | None = None
    chat_top1_agreement: float | None = None
    prompt_tps: float = Field(description="prompt processing tokens/s (batch n_ctx/2, no logits)")
    gen_tps: float = Field(description="greedy generation tokens/s, one token a decode")
    eval_seconds: float = Field(description="wall time spent measuring this file")
    quantize_seconds: float | None = Field(default=None, description="time to quantize it, when measured")


class QuantReport(BaseModel):
    """Everything `measure_quants` measured; embedded in the manifest as is."""

    schema_version: int = 1
    reference: str = "f16"
    eval_text: str
    eval_text_sha256: str
    n_ctx: int
    n_chunks: int
    scored_tokens: int
    chat_prompts: int
    chat_tokens: int
    n_threads: int
    load_average: float = Field(description="1-minute load average when the measurement started")
    machine: str
    llama_cpp_python: str
    measure_seconds: float
    quantize_seconds: float | None = Field(
        default=None, description="total time spent quantizing candidates for `--quant auto`"
    )
    rows: list[QuantMetrics]

    def row(self, quant: str) -> QuantMetrics:
        for r in self.rows:
            if r.quant == quant:
                return r
        raise KeyError(quant)

    def by_size(self) -> list[QuantMetrics]:
        """Rows largest first (the reference, usually, then best quality to smallest)."""
        return sorted(self.rows, key=lambda r: (-r.size_bytes, r.kl_mean))


class QuantChoice(BaseModel):
    """What `--quant auto` picked, and why."""

    quant: str
    size_bytes: int
    kl_mean: float
    top1_agreement: float
    reason: str
    max_size_bytes: int | None = None
    max_kl: float | None = None
    considered: list[str]
    rejected: dict[str, str] = Field(default_factory=dict, description="quant → why it was not chosen")
    candidates: dict[str, str] = Field(
        default_factory=dict, description="label → what the candidate is (type, importance matrix, recipe)")
    unmeasured: list[str] = Field(
        default_factory=list, description="candidates the search budget left unmeasured (--search-budget)")
    budget_seconds: float | None = Field(None, description="--search-budget, in seconds")
    search_seconds: float | None = Field(None, description="time the search took: quantizing and measuring")


class OllamaModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    quant: str
    gguf: str = Field(..., description="GGUF file, relative to the output folder.")
    modelfile: str = Field(..., description="Modelfile, relative to the output folder.")
    name: str | None = Field(None, description="The Ollama name to register it under.")
    registered: bool = False


OllamaFormat = Literal["template", "renderer", "jinja"]


class StopProof(BaseModel):
    """Why a stop string is (or is not) in the Modelfile: where it came from, and the generation that proves it."""

    model_config = ConfigDict(extra="forbid")

    stop: str
    token_id: int | None = Field(None, description="its id when the stop is one token of the vocabulary")
    sources: list[str] = Field(description="generation_config.json eos, tokenizer eos, template end of turn, ...")
    in_modelfile: bool
    proven: bool = Field(description="a greedy generation on the exported GGUF ended its reply on this stop")
    prompt: str = ""
    reply: str = Field("", description="what the model wrote before the stop (cut to 200 characters)")
    reply_tokens: int = 0
    detail: str = ""


class OllamaPlan(BaseModel):
    """The chat side of an export: how Ollama formats chats, the stops and their proofs, the Modelfiles."""

    model_config = ConfigDict(extra="forbid")

    dialect: str
    verified: bool
    system: str | None
    stops: list[str]
    warnings: list[str] = Field(default_factory=list)
    models: list[OllamaModel] = Field(default_factory=list)
    format: OllamaFormat = Field(
        "template", description="template: the dialect's Go TEMPLATE; renderer: Ollama's built-in RENDERER/PARSER; "
                                "jinja: no TEMPLATE, Ollama renders the GGUF's own Jinja chat template")
    renderer: str | None = None
    parser: str | None = None
    requires: str | None = Field(None, description="the REQUIRES line: the first Ollama version that formats it so")
    format_detail: str = ""
    chat_template_sha256: str | None = Field(
        None, description="sha256 of the Jinja chat template every GGUF of the export carries")
    stop_proofs: list[StopProof] = Field(default_factory=list)


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
    report: QuantReport | None = Field(None, description="Quality, size and speed of each quant type against f16.")
    choice: QuantChoice | None = Field(None, description="What `--quant auto` picked, and why.")
    recipe: AppliedRecipe | None = Field(
        None, description="The per-tensor recipe the quantizations used (--recipe, or the one --quant auto chose).")
    imatrix: ImatrixRecord | None = Field(None, description="The importance matrix the quant types were made with.")
