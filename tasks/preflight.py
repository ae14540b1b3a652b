"""Preflight: every refusal that can be made before a weight byte is read.

Reads only `config.json` and the tokenizer files. The architecture and
pre-tokenizer are checked by asking the pinned converter itself: a vocab-only
conversion of a stub folder (config + tokenizer + an empty safetensors) runs the
converter's own architecture lookup and pre-tokenizer hash, and the GGUF it
writes says what the real conversion will write.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from registry.models import Check, ExportRequest
from registry.spec import BaseModelSpec
from tasks import settings
from tasks.adapter import AdapterInfo
from tasks.convert import run_converter
from tasks.errors import (
    ArchitectureUnsupported,
    ConversionFailed,
    KilnError,
    NotEnoughDisk,
    OutputDirInvalid,
    PreTokenizerUnknown,
    RequantizeRefused,
    SourceInvalid,
    SpecMismatch,
)
from tasks.fetch import (
    METADATA_PATTERNS,
    SourceRef,
    check_safetensors,
    model_files,
    planned_weight_bytes,
    read_config,
)
from tasks.files import cache_dir, sha256_file, sha256_text, write_text_atomic
from tasks.memory import check_memory, estimate_memory, gguf_source_memory
from tasks.progress import log_in_run
from tasks.quantize import (
    BITS_PER_WEIGHT,
    FLOAT_TYPES,
    check_quant_types,
    estimated_size,
    known_quant_types,
)
from tasks.split import check_split_fits, check_split_for_config, largest_tensor, split_extra_bytes
from tasks.step import step
from tasks.toolchain import Toolchain, registered_architectures
from templates import registered_dialects

# Room for temporaries and logs on top of the estimate.
DISK_MARGIN = 1.10
AUTO = "auto"  # --quant auto: measure candidates, keep the best within --max-size / --max-kl
# Any of these means the folder has a tokenizer (the converter decides whether it can read it).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
_CHKHSH_RE = re.compile(r"chkhsh:\s*([0-9a-f]{64})")


class ConverterProbe(BaseModel):
    """What the pinned converter writes for this model's config and tokenizer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gguf_arch: str
    tokenizer_model: str | None
    tokenizer_pre: str | None
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    chat_template: str | None


class DialectChoice(BaseModel):
    """The Modelfile's chat side, settled before any heavy work."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dialect: str = Field(description="the dialect whose Go template is used; for format 'jinja' the closest one "
                                     "(its stops and sampling defaults still apply)")
    verified: bool
    system: str | None
    detail: str
    format: Literal["template", "jinja", "renderer"] = Field(
        "template", description="template: a Go TEMPLATE (verified, or chosen with --dialect); jinja: no Go dialect "
                                "is exact, so Ollama renders the GGUF's own Jinja chat template (no TEMPLATE)")
    date_policy: Literal["none", "fixed"] = Field(
        "none", description="fixed: the model's template prints today's date and the Go TEMPLATE prints the fixed "
                            "date of the dialect (Ollama's currentDate has one format only, 2006-01-02)")
    mismatches: list[str] = Field(default_factory=list,
                                  description="matrix cases the chosen (or closest) dialect renders differently")


class PreflightReport(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: str
    probe: ConverterProbe | None = Field(None, description="None until the converter has been asked")
    params: int
    estimated_bytes: int
    checks: list[Check]
    chat: DialectChoice | None = None
    adapter: AdapterInfo | None = None
    quants: list[str] | None = Field(
        None, description="the quant types to make, where preflight narrowed the request's (a prebuilt GGUF)")
    skipped: dict[str, str] = Field(default_factory=dict, description="requested quant types not made, and why")


def choose_dialect(template_source: Path, wanted: str | None, hint: str | None = None) -> DialectChoice | None:
    """How Ollama will format chats for this model, from its own chat template.

    `wanted` (--dialect) asks for that dialect's Go template: used when exact or near, refused
    otherwise. `hint` (the registry entry's dialect) is preferred when it is exact, but a search
    over every dialect decides. With no exact dialect and nothing asked for, the choice is
    format "jinja": Ollama renders the GGUF's own Jinja template (the closest dialect still gives
    the stops). A source with no chat template gets the asked-for or hinted dialect unverified,
    and with neither no Modelfile: None.
    """
    from tasks.template_check import GoToolchainMissing, NoChatTemplate, check_template, outcome_lines

    try:
        check = check_template(template_source, dialect=wanted, prefer=None if wanted else hint)
    except NoChatTemplate:
        if hint is None:
            return None
        return DialectChoice(dialect=hint, verified=False, system=None,
                             detail=f"{hint}: the registry's dialect; the source has no chat template to check it with")
    except GoToolchainMissing as exc:
        if wanted is None and hint is None:
            raise
        name = wanted or hint
        assert name is not None
        return DialectChoice(dialect=name, verified=False, system=None, detail=f"{name}: not verified: {exc}")
    assert check.dialect is not None
    return DialectChoice(
        dialect=check.dialect, verified=check.verified, system=check.system,
        detail=" ".join(outcome_lines(check)[:1] + [f"(Ollama format: {check.ollama_format})"]),
        format=check.ollama_format, date_policy=check.date_policy, mismatches=list(check.mismatches),
    )


def check_output_dir(out_dir: Path) -> None:
    """The output folder is a folder, or can be made, and is writable; nothing is created here.

    The folder itself is made when the first output is placed (`tasks.files.atomic_path`), so a
    refused export leaves no empty folder behind. Writability is tried on the nearest folder that
    exists: a test file there, removed at once (access(2) says yes to root on /proc).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirInvalid(f"output folder {out_dir} is a file; pass a folder with --out")
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputDirInvalid(f"output folder {out_dir} cannot be made: {existing} is a file; choose another --out")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".kiln-write-test-"):
            pass
    except OSError as exc:
        raise OutputDirInvalid(f"output folder {out_dir} is not writable ({exc.strerror}); choose another --out") from None


def architecture_of(config: dict, folder: Path) -> str:
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise SourceInvalid(f"{folder}/config.json has no `architectures` list, so the converter cannot pick a model class")
    return archs[0]


def check_architecture(architecture: str, toolchain: Toolchain) -> None:
    known = registered_architectures(Path(toolchain.converter_dir))
    if architecture not in known:
        raise ArchitectureUnsupported(
            f"architecture {architecture!r} is not one the pinned converter ({toolchain.converter_source}) "
            f"can convert. Use a llama.cpp that supports it via LLAMA_CPP_DIR, or a supported base."
        )


def local_weight_params(folder: Path, allow_pickle: bool = False) -> int:
    """Whole, present weights in a local folder; returns a parameter estimate (16-bit weights assumed)."""
    weights = [p for p in model_files(folder, allow_pickle=allow_pickle) if p.suffix != ".json" and p.name not in METADATA_PATTERNS]
    if not weights:
        raise SourceInvalid(f"{folder} has no *.safetensors weights")
    for path in weights:
        if path.suffix == ".safetensors":
            check_safetensors(path, path.name)
    return sum(p.stat().st_size for p in weights) // 2


def _probe_cache_key(folder: Path, toolchain: Toolchain) -> str:
    parts = [toolchain.cache_key]
    for name in METADATA_PATTERNS:
        f = folder / name
        if f.is_file():
            parts.append(f"{name}:{sha256_file(f)}")
    return sha256_text("\n".join(parts))[:24]


def probe_cache_file(folder: Path, toolchain: Toolchain) -> Path:
    return cache_dir() / "probe" / f"{_probe_cache_key(folder, toolchain)}.json"


def probe_converter(folder: Path, toolchain: Toolchain) -> ConverterProbe:
    """Ask the pinned converter what it would write, from config and tokenizer files alone (cached)."""
    cache_file = probe_cache_file(folder, toolchain)
    if cache_file.is_file():
        return ConverterProbe.model_validate_json(cache_file.read_text())
    with tempfile.TemporaryDirectory(prefix="kiln-probe-") as tmp:
        stub = Path(tmp) / "model"
        stub.mkdir()
        for name in METADATA_PATTERNS:
            if (folder / name).is_file():
                os.symlink((folder / name).resolve(), stub / name)
        # An empty tensor table: the converter indexes weights on start-up, and the probe must not read any.
        header = b"{}"
        (stub / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
        out = Path(tmp) / "vocab.gguf"
        lines: list[str] = []
        try:
            run_converter("convert_hf_to_gguf.py", ["--vocab-only", "--outtype", "f16", "--outfile", str(out), str(stub)],
                          toolchain, lines.append)
        except ConversionFailed as exc:
            text = "\n".join(lines)
            if "pre-tokenizer was not recognized" in text:
                found = _CHKHSH_RE.search(text)
                raise PreTokenizerUnknown(
                    f"the pinned converter does not know this tokenizer's pre-tokenizer "
                    f"(chkhsh {found.group(1) if found else 'unknown'}); llama.cpp would tokenize it wrongly. "
                    "Use a llama.cpp that lists it (LLAMA_CPP_DIR) or a tokenizer it knows."
                ) from None
            if "is not supported" in text or "not supported!" in text:
                raise ArchitectureUnsupported(f"the pinned converter refuses this model: {exc}") from None
            raise
        probe = read_gguf_probe(out)
    write_text_atomic(cache_file, probe.model_dump_json())
    return probe


def read_gguf_probe(path: Path) -> ConverterProbe:
    """What a GGUF file says about itself, in the same record a conversion probe gives."""
    from tasks.gguf_file import GGUFFileError, read_metadata

    keys = ("general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
            "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template")
    try:
        meta = read_metadata(path, keys)
    except GGUFFileError as exc:
        raise SourceInvalid(f"{path.name} is not a readable GGUF file ({exc})") from None
    return ConverterProbe(
        gguf_arch=meta.get("general.architecture") or "unknown",
        tokenizer_model=meta.get("tokenizer.ggml.model"),
        tokenizer_pre=meta.get("tokenizer.ggml.pre"),
        vocab_size=len(meta.get("tokenizer.ggml.tokens") or ()),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
    )


def check_spec(spec: BaseModelSpec, probe: ConverterProbe) -> None:
    """The registry's claims must be what the converter really writes."""
    if spec.gguf_arch != probe.gguf_arch:
        raise SpecMismatch(
            f"registry entry {spec.key!r} says gguf_arch {spec.gguf_arch!r}, "
            f"but the pinned converter writes {probe.gguf_arch!r}; fix the entry"
        )
    if spec.tokenizer_pre != (probe.tokenizer_pre or "default"):
        raise SpecMismatch(
            f"registry entry {spec.key!r} says tokenizer_pre {spec.tokenizer_pre!r}, "
            f"but the pinned converter writes {probe.tokenizer_pre!r}; fix the entry"
        )


def check_license(spec: BaseModelSpec | None, accepted: bool) -> None:
    if spec is not None and spec.requires_acceptance and not accepted:
        where = f" ({spec.license_url})" if spec.license_url else ""
        raise KilnError(
            f"base {spec.key!r} is under {spec.license_spdx}{where}, which must be accepted before use: "
            "read it, then pass --accept-license"
        )


def disk_needs(params: int, request: ExportRequest, base_cached: bool) -> tuple[int, int, int]:
    """Bytes the export writes, with the margin: (into the cache, outputs that are copies, split shards).

    The cache holds the float GGUF, every quantization and a merged adapter's second float GGUF.
    The outputs are hard links to those entries on the cache's filesystem (tasks/outputs.py) and
    copies across filesystems; the shards of --split-max-size are new files either way.
    """
    from tasks.report import AUTO_CANDIDATES

    base = 0 if base_cached else estimated_size(params, request.outtype)
    # `--quant auto` holds every candidate until one is chosen.
    quants = list(AUTO_CANDIDATES) if request.quants == ["auto"] else request.quants
    made = [estimated_size(params, q) for q in quants]
    merged = estimated_size(params, request.outtype) if request.adapter and request.adapter_mode != "adapter" else 0
    sizes = [estimated_size(params, request.outtype), *made]
    return (int((base + sum(made) + merged) * DISK_MARGIN), int(sum(sizes) * DISK_MARGIN),
            int(split_extra_bytes(sizes, request.split_max_size) * DISK_MARGIN))


def estimate_bytes(params: int, request: ExportRequest, base_cached: bool, outputs_linked: bool = False) -> int:
    """Disk the export writes in all; `outputs_linked`: the outputs are hard links on the cache's filesystem."""
    cache, copies, split = disk_needs(params, request, base_cached)
    return cache + (0 if outputs_linked else copies) + split


def check_export_disk(params: int, request: ExportRequest, base_cached: bool) -> int:
    """Refuse an export whose files do not fit, each filesystem for its own part; the bytes it writes."""
    out, cache = Path(request.out_dir), cache_dir()
    cache_bytes, copies, split = disk_needs(params, request, base_cached)
    if same_filesystem(out, cache):
        check_disk([out], cache_bytes + split)
        return cache_bytes + split
    check_disk([cache], cache_bytes)
    check_disk([out], copies + split)
    return cache_bytes + copies + split


def _nearest_existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def same_filesystem(a: Path, b: Path) -> bool:
    """Whether `a` and `b` (or, where they do not exist yet, the folders they will be made in) share a filesystem."""
    return _nearest_existing(a).stat().st_dev == _nearest_existing(b).stat().st_dev


def check_disk(paths: list[Path], need: int) -> None:
    """Free space on the filesystem(s) written to covers `need` bytes."""
    existing = [_nearest_existing(p) for p in paths]
    free = min(shutil.disk_usage(p).free for p in existing)
    if free < need:
        raise NotEnoughDisk(
            f"this export needs about {need / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free under "
            f"{existing[0]}; free space, or point --out / KILN_CACHE_DIR at a larger disk"
        )


def check_request(request: ExportRequest, ref: SourceRef) -> None:
    """The checks that need nothing but the request: the CLI makes them before Prefect even starts."""
    # `auto` is not a type: the request model has checked that it stands alone, with a bound.
    check_quant_types([q for q in request.quants if q != AUTO], have_imatrix=request.imatrix is not None)
    if request.imatrix is not None:
        from tasks.imatrix import check_imatrix_value

        check_imatrix_value(request.imatrix)  # the text or matrix file alone; the model's fit after conversion
    check_license(ref.spec, request.accept_license)
    check_output_dir(Path(request.out_dir))


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


@step(name="preflight")
def run_preflight(
    ref: SourceRef,
    metadata_folder: Path,
    request: ExportRequest,
    toolchain: Toolchain,
    base_cached: bool = False,
    ask_converter: bool = True,
) -> PreflightReport:
    """Every check that needs no weights; raises the first refusal with its cause and fix.

    The converter probe comes last, after every check that costs nothing. With
    `ask_converter=False` it is left out (`probe` is None): the export flow then starts the base
    conversion and runs `confirm_with_converter` beside it (see `conversion_can_start_early`).
    """
    check_request(request, ref)
    chat = choose_dialect(metadata_folder, request.dialect, hint=ref.spec.template if ref.spec else None)
    if ref.is_gguf:
        return _preflight_gguf(metadata_folder, request, chat)
    config = read_config(metadata_folder)
    architecture = architecture_of(config, metadata_folder)
    check_architecture(architecture, toolchain)
    if ref.spec is not None and ref.spec.architecture != architecture:
        raise SpecMismatch(
            f"registry entry {ref.spec.key!r} says architecture {ref.spec.architecture!r}, "
            f"but config.json says {architecture!r}; fix the entry"
        )
    if chat is None and request.verify and _has_tokenizer(metadata_folder):
        # After the architecture (the more basic refusal); without any tokenizer file the
        # converter's probe refuses with the more basic reason too.
        raise _no_chat_template(ref)
    if ref.kind in ("local", "demo"):
        params = local_weight_params(metadata_folder, ref.allow_pickle)
    elif ref.spec is not None:
        params = ref.spec.params
    else:
        # Hub weights are not here yet: their sizes from the Hub's file list at the pinned commit.
        params = (planned_weight_bytes(ref, metadata_folder) or 0) // 2
    need = check_export_disk(params, request, base_cached)
    memory = estimate_memory(params, request.outtype, config, verify=request.verify, report=request.report,
                             adapter_mode=request.adapter_mode if request.adapter else None,
                             imatrix=_computes_imatrix(request))
    budget = settings.memory_budget_bytes()
    check_memory(memory, budget)
    check_split_for_config(request.split_max_size, config, request.outtype)
    checks = [
        Check(name="quant types", target="request", passed=True, detail=", ".join(request.quants) or "none"),
        Check(name="disk", target="request", passed=True, detail=f"needs about {need / 1e6:.0f} MB"),
        Check(name="memory", target="request", passed=True,
              detail=f"peak about {memory.peak_bytes / 1e9:.2f} GB ({memory.peak_step}) of a {budget / 1e9:.2f} GB budget"),
        _chat_check(chat),
    ]
    adapter = None
    if request.adapter:
        from tasks.adapter import validate_adapter

        adapter = validate_adapter(Path(request.adapter), metadata_folder, ref.spec, request.adapter_mode)
        checks.append(Check(name="adapter", target=Path(request.adapter).name, passed=True,
                            detail=f"rank {adapter.rank}, alpha {adapter.alpha:g}, {adapter.adapted_weights} weights "
                                   f"over {', '.join(adapter.target_modules)}; mode {request.adapter_mode}"))
    report = PreflightReport(architecture=architecture, probe=None, params=params, estimated_bytes=need,
                             checks=checks, chat=chat, adapter=adapter)
    return confirm_with_converter(report, ref, metadata_folder, toolchain) if ask_converter else report


@step(name="probe converter")
def confirm_with_converter(report: PreflightReport, ref: SourceRef, metadata_folder: Path,
                           toolchain: Toolchain) -> PreflightReport:
    """Preflight's last check: what the pinned converter writes, and that a registry entry says the same."""
    probe = probe_converter(metadata_folder, toolchain)
    checks = [Check(name="architecture", target="source", passed=True, detail=f"{report.architecture} -> {probe.gguf_arch}"),
              Check(name="pre-tokenizer", target="source", passed=True, detail=str(probe.tokenizer_pre))]
    if ref.spec is not None:
        check_spec(ref.spec, probe)
        checks.append(Check(name="spec matches converter", target=ref.spec.key, passed=True,
                            detail=f"gguf_arch={ref.spec.gguf_arch}, tokenizer_pre={ref.spec.tokenizer_pre}"))
    return report.model_copy(update={"probe": probe, "checks": checks + report.checks})


def conversion_can_start_early(ref: SourceRef, metadata_folder: Path, request: ExportRequest,
                               toolchain: Toolchain) -> bool:
    """Whether the export may start the base conversion while the converter probe runs.

    Only where nothing is lost by it: the weights are already on this machine (so the probe saves
    no download), the conversion runs here, every other check has passed first, and the probe is
    not cached yet (a cached one answers at once). A refusal from the probe cancels the conversion;
    the converter itself reaches the same refusals on the same files before reading any weight.
    """
    return (ref.kind in ("local", "demo") and ref.spec is None and request.placement == "local"
            and not (request.adapter and request.adapter_mode == "peft")
            and not probe_cache_file(metadata_folder, toolchain).is_file())


def _computes_imatrix(request: ExportRequest) -> bool:
    """Whether llama-imatrix will run: --imatrix auto or a calibration text (a matrix file is only read)."""
    from tasks.imatrix import imatrix_kind

    return request.imatrix is not None and imatrix_kind(request.imatrix) != "file"


def _chat_check(chat: DialectChoice | None) -> Check:
    if chat is None:
        return Check(name="chat template", target="source", passed=True,
                     detail="no chat template and no --dialect: GGUF files only, no Modelfile")
    return Check(name="chat template", target="source", passed=True, detail=chat.detail)


def _no_chat_template(ref: SourceRef) -> KilnError:
    """A Hugging Face source with no chat template and no --dialect, to be verified: refused here, not in verify.

    Verification prompts the model through its chat template, and the Modelfile needs one. With
    --no-verify such a folder (a base model, say) still converts: GGUF files only, no Modelfile.
    """
    from tasks.fetch import display_source
    from tasks.template_check import NoChatTemplate

    return NoChatTemplate(
        f"{display_source(ref)} has no chat template (neither chat_template.jinja nor tokenizer_config.json's "
        f"chat_template), so Kiln can neither prompt it to verify it nor write its Modelfile; pass --dialect NAME "
        f"to choose the chat format (one of: {', '.join(registered_dialects())}), add the model's chat_template "
        f"to tokenizer_config.json or as chat_template.jinja, or pass --no-verify for GGUF files only (no Modelfile)"
    )


def gguf_file_type(path: Path) -> str:
    """The quant type a GGUF's tensors are mostly in (`general.file_type`), by Kiln's name for it."""
    from tasks.gguf_file import read_file_type

    code = read_file_type(path) or 1
    names = {v: k for k, v in known_quant_types().items()}
    return names.get(code, "f16" if code == 1 else f"ftype{code}")


def _preflight_gguf(path: Path, request: ExportRequest, chat: DialectChoice | None) -> PreflightReport:
    """A prebuilt GGUF skips conversion: check what it says about itself and what requantizing it costs."""
    if request.adapter:
        raise SourceInvalid("a LoRA adapter needs the base as a Hugging Face folder, not a prebuilt GGUF")
    if chat is None:
        # Verification prompts the model through a chat template, and the Modelfile needs one:
        # refused here, before any quantization, not when verify finds none.
        from tasks.template_check import NoChatTemplate

        raise NoChatTemplate(
            f"{path.name} carries no chat template (tokenizer.chat_template), so Kiln can neither prompt it "
            f"to verify it nor write its Modelfile; pass --dialect NAME to choose the chat format "
            f"(one of: {', '.join(registered_dialects())})"
        )
    probe = read_gguf_probe(path)
    label = gguf_file_type(path)
    quants, skipped = plan_requantization(path.name, label, request.quants, request.allow_requantize)
    params = int(path.stat().st_size * 8 / BITS_PER_WEIGHT.get(label, 8.0))
    sizes = [estimated_size(params, q) for q in quants]
    need = int((sum(sizes) + split_extra_bytes(sizes, request.split_max_size)) * DISK_MARGIN)
    check_disk([Path(request.out_dir), cache_dir()], need)
    memory = gguf_source_memory(path, requantizes=any(q != label for q in quants), verify=request.verify,
                                report=request.report, imatrix=_computes_imatrix(request))
    budget = settings.memory_budget_bytes()
    check_memory(memory, budget)
    if request.split_max_size:
        tensor, nbytes = largest_tensor(path)
        check_split_fits(request.split_max_size, nbytes, f"{tensor} of {path.name}")
    checks = [
        Check(name="gguf source", target="source", passed=True,
              detail=f"{probe.gguf_arch}, {label}, pre-tokenizer {probe.tokenizer_pre}"),
        Check(name="quant types", target="request", passed=True, detail=", ".join(quants) or "none"),
        Check(name="disk", target="request", passed=True, detail=f"needs about {need / 1e6:.0f} MB"),
        Check(name="memory", target="request", passed=True,
              detail=f"peak about {memory.peak_bytes / 1e9:.2f} GB ({memory.peak_step}) of a {budget / 1e9:.2f} GB budget"),
    ]
    checks += [Check(name="quant type skipped", target=quant, passed=True, detail=why) for quant, why in skipped.items()]
    for quant, why in skipped.items():
        log_in_run("quant type %s skipped: %s", quant, why)
    if label not in FLOAT_TYPES and any(q != label for q in quants):
        checks.append(Check(name="requantize", target="source", passed=True,
                            detail=f"--allow-requantize: {', '.join(q for q in quants if q != label)} made from the "
                                   f"{label} source lose more than they would from f16 (two quantizations' errors)"))
    checks.append(_chat_check(chat))
    return PreflightReport(architecture=probe.gguf_arch, probe=probe, params=params, estimated_bytes=need,
                           checks=checks, chat=chat, quants=quants, skipped=skipped)


def plan_requantization(name: str, source_type: str, quants: list[str],
                        allow_requantize: bool) -> tuple[list[str], dict[str, str]]:
    """Which requested types a prebuilt GGUF of `source_type` is quantized to; the others with the reason.

    Never to more bits per weight than the source has: the file grows and keeps the quality of the
    source. A quantized source goes down only with `allow_requantize` (llama-quantize's
    --allow-requantize): the second quantization's error adds to the first's. The source's own type
    is the source itself, placed as it is. Where nothing requested is left, the export is refused.
    """
    if quants == [AUTO]:
        if source_type in FLOAT_TYPES:
            return quants, {}
        raise RequantizeRefused(
            f"{name} is already {source_type}: --quant auto measures its candidates against a float GGUF, so it "
            f"needs an f16/bf16/f32 source; name the types to make instead (fewer bits than {source_type}, "
            "with --allow-requantize)")
    source_bits = BITS_PER_WEIGHT.get(source_type)
    kept: list[str] = []
    skipped: dict[str, str] = {}
    for quant in quants:
        bits = BITS_PER_WEIGHT.get(quant)
        if quant == source_type:
            kept.append(quant)
        elif source_bits is not None and bits is not None and bits > source_bits:
            skipped[quant] = (f"more bits per weight ({bits:g}) than the {source_type} source ({source_bits:g}): "
                              f"a bigger file with the quality of the {source_type} it came from")
        elif source_type in FLOAT_TYPES or allow_requantize:
            kept.append(quant)
        else:
            skipped[quant] = (f"the source is already quantized ({source_type}); requantizing adds a second "
                              "quantization's error to the first. Pass --allow-requantize to make it anyway")
    if quants and not kept:
        up = [q for q, why in skipped.items() if why.startswith("more bits")]
        down = [q for q in skipped if q not in up]
        reasons = ([f"{', '.join(up)} would have more bits than the source"] if up else []) + (
            [f"{', '.join(down)} would requantize it down"] if down else [])
        fixes = (["--allow-requantize to requantize it down anyway (quality loss)"] if down else []) + (
            [f"--quant {source_type} to export the GGUF as it is"] if source_type in known_quant_types() else [])
        raise RequantizeRefused(
            f"{name} is already {source_type}, so none of the requested types is made: {'; '.join(reasons)}. "
            f"Pass {' or '.join(fixes)}")
    return kept, skipped
