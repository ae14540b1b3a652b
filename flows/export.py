"""The export flow: preflight → fetch → convert → quantize × N → verify → outputs + manifest.

Flows only wire steps together; each step's logic is a plain function in `tasks/`.
The re-run check (`tasks.manifest.find_up_to_date`) runs in the CLI before this module is imported.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.convert_quantize import run_placed
from registry.models import (
    Check,
    ExportRequest,
    ImatrixRecord,
    Manifest,
    OllamaPlan,
    QuantChoice,
    QuantReport,
    ResolvedSource,
)
from tasks.adapter import AdapterInfo
from tasks.convert import ConversionAhead, conversion_key, gguf_model_name, warm_converter
from tasks.errors import KilnError
from tasks.fetch import SourceRef, display_name, source_ref
from tasks.files import cache_dir, sha256_text
from tasks.manifest import (
    KILN_VERSION,
    find_up_to_date,
    inputs_beyond_source,
    now_iso,
    request_key,
    write_manifest,
)
from tasks.outputs import (
    drop_split_modelfiles,
    place_outputs,
    record_output,
    record_placed,
    ship_adapter_lora,
    split_check,
    split_outputs,
)
from tasks.recipe import applied as applied_recipe
from tasks.toolchain import Toolchain, current_toolchain


def export_lock_path(out_dir: Path, cache_root: Path | None = None) -> Path:
    """The lock every export into `out_dir` holds: in Kiln's cache, named after the folder's resolved path.

    Not in the folder itself, because it is taken before anything is known about the export, and a
    refused export must leave no folder behind (the folder is made when the first output is placed).
    Exports into one shared folder from machines with different caches are not serialised by it.
    """
    path = (cache_root or cache_dir()) / "locks" / f"export-{sha256_text(str(out_dir.resolve()))[:24]}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def warm_converter_ahead(request: ExportRequest) -> None:
    """Start the converter's import now where `run_export` will convert beside the probe.

    A batch calls this before it starts an item's export subflow, so that the import (seconds
    of torch) overlaps the subflow's start as well as preflight. Anything wrong with the
    request is left for the export itself to report.
    """
    from tasks.fetch import locate_metadata
    from tasks.preflight import conversion_can_start_early

    try:
        ref = source_ref(request)
        if ref.kind not in ("local", "demo"):  # the only kinds that convert early; Hub metadata costs a download
            return
        toolchain = current_toolchain()
        metadata_folder, _ = locate_metadata(ref)
        if conversion_can_start_early(ref, metadata_folder, request, toolchain):
            warm_converter(toolchain)
    except (KilnError, ValueError, OSError):
        pass


class StepTimes:
    """Seconds each step took, for the manifest: `with times("verify"): ...`."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t0, 3)

    def total(self) -> dict[str, float]:
        return {**self.timings, "total": round(time.perf_counter() - self.started, 3)}


def run_export(request: ExportRequest) -> Manifest:
    """Every step of an export, in order; runs inside the `export` flow."""
    from tasks.fetch import fetch_source, locate_metadata
    from tasks.ollama_plan import embed_chat_template, write_modelfiles
    from tasks.preflight import (
        confirm_with_converter,
        conversion_can_start_early,
        run_preflight,
    )
    from tasks.report import measure_quants, write_report_files
    from tasks.verify import verify_outputs

    times = StepTimes()
    out_dir = Path(request.out_dir)
    asked = request  # what the manifest records; `request` below may carry the type `auto` chose

    with times("preflight"):
        toolchain = current_toolchain()
        ref = source_ref(request)
        metadata_folder, derived_from = locate_metadata(ref)
        early = conversion_can_start_early(ref, metadata_folder, request, toolchain)
        if early:
            warm_converter(toolchain)  # its import overlaps the checks below
        report = run_preflight.task(ref, metadata_folder, request, toolchain, ask_converter=not early)
        if report.quants is not None:  # a prebuilt GGUF: never up to more bits, down only when allowed
            request = request.model_copy(update={"quants": report.quants})

    with times("fetch"):
        source = fetch_source.task(ref, metadata_folder, derived_from)

    if early:
        # Weights on disk and the probe not cached: convert while the converter is asked, not after.
        with times("probe beside conversion"):
            ahead = ConversionAhead(Path(source.path), conversion_key(source), request.outtype, toolchain,
                                    gguf_model_name(source))
            try:
                report = confirm_with_converter.task(report, ref, metadata_folder, toolchain)
            except BaseException:
                ahead.cancel()
                raise

    with times("convert_quantize"):
        choice = auto_report = None
        if request.quants == ["auto"]:
            request, choice, auto_report = choose_quant_by_measuring(source, request, toolchain, report.adapter)
        # placement: inline here, or the convert-quantize deployment on a cpu/gpu worker (flows/convert_quantize.py).
        imatrix = importance_matrix(source, request, toolchain, report.adapter) if request.imatrix else None
        cached = run_placed(source, request, toolchain, report.adapter, imatrix=imatrix)
    float_label = next(iter(cached))

    checks: list[Check] = list(report.checks)
    if request.verify:
        with times("verify"):
            hf_dir = Path(source.path) if source.kind != "gguf" else None
            checks += verify_outputs.task(cached, hf_dir, float_label if hf_dir else None, chat=report.chat)

    quant_report = auto_report
    if choice is None and request.report and len(cached) > 1:
        with times("report"):
            quant_report = measure_quants.task(cached[float_label], {q: p for q, p in cached.items() if q != float_label},
                                               reference_name=float_label)

    with times("outputs"):
        stem = request.name or display_name(ref)
        placed = place_outputs.task(out_dir, stem, cached, request.quants)
        rewritten: list[str] = []
        if source.kind == "gguf" and request.dialect and report.chat is not None and (
                not report.chat.verified or report.chat.mismatches):
            # The GGUF's own template is not the dialect's: it gets the dialect's Jinja (tasks/ollama_plan.py).
            rewritten = embed_chat_template.task(out_dir, placed, report.chat.dialect)
        lora_name, shipped = None, []
        if report.adapter is not None and request.adapter_mode == "adapter":
            lora_name, lora_gguf = ship_adapter_lora.task(out_dir, stem, Path(request.adapter), Path(source.path),
                                                          toolchain, report.adapter)
            shipped = [record_output(out_dir, lora_name, "lora", lora_gguf)]
        ollama = None
        if report.chat is not None:
            ollama = write_modelfiles.task(out_dir, placed, report.chat, licence_line(ref), request.ollama_name,
                                           lora_name, template_source=Path(source.path) if source.kind != "gguf" else None,
                                           prove=request.verify)
        split: dict[str, list[str]] = {}
        if request.split_max_size:
            # After the stops were proven on the whole files: every step before this one reads single files.
            split = split_outputs.task(out_dir, placed, request.split_max_size)
            if ollama is not None:
                ollama = drop_split_modelfiles(out_dir, ollama, split)
            checks.append(split_check(split, request.split_max_size, ollama))
        outputs = [*record_placed(out_dir, placed, cached, rewritten, split), *shipped]
        if ollama is not None:
            outputs += [record_output(out_dir, m.modelfile, m.quant) for m in ollama.models]
        report_files = write_report_files(quant_report, out_dir, choice) if quant_report is not None else {}

    if ollama is not None and request.ollama_name:
        with times("register"):
            checks.append(register_or_defer(out_dir, ollama))

    manifest = Manifest(
        kiln_version=KILN_VERSION,
        request=asked,
        request_key=request_key(asked, source.files, toolchain, inputs_beyond_source(asked)),
        source=source,
        toolchain=toolchain,
        outputs=outputs,
        checks=checks,
        timings=times.total(),
        created_at=now_iso(),
        ollama=ollama,
        report=quant_report,
        choice=choice,
        recipe=applied_recipe(request.recipe) if request.recipe else None,
        imatrix=imatrix,
    )
    write_manifest(out_dir, manifest)
    publish_summary(manifest, report_files.get("plot"))
    return manifest


def choose_quant_by_measuring(
    source: ResolvedSource, request: ExportRequest, toolchain: Toolchain, adapter: AdapterInfo | None
) -> tuple[ExportRequest, QuantChoice, QuantReport]:
    """`--quant auto`: search the candidates against the float GGUF (tasks/report/search.py), keep the best within bounds.

    The cost is visible: every candidate is quantized and measured once (their times are in the
    report), then only the chosen one is exported, with its recipe and matrix.
    """
    import tempfile

    from tasks.files import cache_dir
    from tasks.recipe import builtin_recipes, check_recipe_against, load_recipe
    from tasks.report.search import search_quants
    from tasks.units import parse_duration, parse_size

    base_only = request.model_copy(update={"quants": []})
    float_gguf = next(iter(run_placed(source, base_only, toolchain, adapter).values()))
    recipes = builtin_recipes()
    if request.recipe:  # the user's own recipe must fit the model (a built-in one that does not is left out)
        mine = load_recipe(request.recipe)
        check_recipe_against(mine, float_gguf, f"recipe {request.recipe}")
        recipes.append((Path(request.recipe), mine))
    matrix = search_imatrix(request, float_gguf, toolchain)
    with tempfile.TemporaryDirectory(prefix="kiln-auto-", dir=cache_dir()) as work:
        measured, choice, chosen = search_quants(
            float_gguf, Path(work), parse_size(request.max_size) if request.max_size else None, request.max_kl,
            recipes=recipes, imatrix=matrix,
            budget_seconds=parse_duration(request.search_budget) if request.search_budget else None,
            on_progress=get_run_logger().info)
    get_run_logger().info("--quant auto chose %s: %s", choice.quant, choice.reason)
    # The winner is exported by the ordinary path: its type, its recipe, the matrix only if it used one.
    update = {"quants": [chosen.quant], "recipe": chosen.recipe_path,
              "imatrix": request.imatrix if chosen.imatrix else None}
    return request.model_copy(update=update), choice, measured


def search_imatrix(request: ExportRequest, float_gguf: Path, toolchain: Toolchain) -> Path | None:
    """The importance matrix the search's variants use: only the one the user asked for (--imatrix)."""
    if request.imatrix is None:
        return None
    from tasks.imatrix import resolve_imatrix

    return Path(resolve_imatrix(request.imatrix, float_gguf, toolchain.cache_key).path)


def importance_matrix(source: ResolvedSource, request: ExportRequest, toolchain: Toolchain,
                      adapter: AdapterInfo | None) -> ImatrixRecord:
    """`--imatrix`: the matrix of the float GGUF the types are made from (converted first, both cached).

    Between conversion and quantization, so a matrix for another model is refused before anything
    is quantized with it.
    """
    from tasks.imatrix import resolve_imatrix

    base_only = request.model_copy(update={"quants": []})
    float_gguf = next(iter(run_placed(source, base_only, toolchain, adapter).values()))
    record = resolve_imatrix.task(request.imatrix, float_gguf, toolchain.cache_key)
    get_run_logger().info("importance matrix (%s): %s, %d tensors%s", record.source, Path(record.path).name,
                          record.entries, "" if record.computed_s is None else
                          f", computed in {record.computed_s:g} s" + (" (reused)" if record.reused else ""))
    return record


def licence_line(ref: SourceRef) -> str | None:
    spec = ref.spec
    if spec is None:
        return None
    return f"{spec.license_spdx}" + (f" ({spec.license_url})" if spec.license_url else "")


def register_or_defer(out_dir: Path, plan: OllamaPlan) -> Check:
    """Register with Ollama; with no server reachable the export still succeeds and says how to finish."""
    from tasks.register import OllamaUnreachable, register_outputs

    try:
        results = register_outputs.task(out_dir, plan)
    except OllamaUnreachable as exc:
        return Check(name="ollama registration", target="ollama", passed=True,
                     detail=f"deferred: {exc}. Register later with: kiln register {out_dir}")
    names = ", ".join(r.name for r in results)
    uploaded = sum(r.uploaded_bytes for r in results)
    return Check(name="ollama registration", target="ollama", passed=True,
                 detail=f"registered {names} ({uploaded / 1e6:.1f} MB uploaded)")


def summary_markdown(manifest: Manifest) -> str:
    lines = [
        f"# Kiln export: {manifest.source.id}",
        "",
        f"- Source: {manifest.source.kind} `{manifest.source.id}`"
        + (f" @ `{manifest.source.revision}`" if manifest.source.revision else ""),
        f"- Toolchain: llama-cpp-python {manifest.toolchain.llama_cpp_python}, "
        f"converter sha256 `{manifest.toolchain.converter_sha256[:16]}…`",
        "",
        "| file | quant | size (MB) | sha256 |",
        "| --- | --- | ---: | --- |",
    ]
    for out in manifest.outputs:
        lines.append(f"| {out.path} | {out.quant} | {out.size / 1e6:.1f} | `{out.sha256[:16]}…` |")
    lines += ["", "| check | target | result | detail |", "| --- | --- | --- | --- |"]
    for check in manifest.checks:
        lines.append(f"| {check.name} | {check.target} | {'pass' if check.passed else 'FAIL'} | {check.detail} |")
    if manifest.report is not None:
        lines += ["", "Quality, size and speed of each quant type: the `kiln-quant-report` artifact."]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in manifest.timings.items())]
    return "\n".join(lines)


def quant_report_markdown(report: QuantReport, choice: QuantChoice | None, plot: Path | None) -> str:
    """The report's table and its size-against-quality plot, inline: the UI cannot fetch files from a worker's disk."""
    import base64

    from tasks.report import report_markdown

    lines = [report_markdown(report, choice)]
    if plot is not None and plot.is_file():
        # Prefect's UI renders `data:image/...` sources in Markdown artifacts (its sanitiser allows them).
        encoded = base64.b64encode(plot.read_bytes()).decode("ascii")
        lines += ["", f"![size against quality]({'data:image/png;base64,' + encoded})"]
    return "\n".join(lines)


def publish_summary(manifest: Manifest, plot: Path | None = None) -> None:
    """The run's artifacts: the summary (outputs, checks, timings) and, when measured, the quant report with its plot."""
    create_markdown_artifact(markdown=summary_markdown(manifest), key="kiln-export-summary",
                             description="Kiln export: outputs, sizes, checks")
    if manifest.report is not None:
        create_markdown_artifact(markdown=quant_report_markdown(manifest.report, manifest.choice, plot),
                                 key="kiln-quant-report", description="Kiln quant report: quality, size, speed")


@flow(name="export")
def export(request: ExportRequest, force: bool = False) -> Manifest:
    """Export a model to GGUF: preflight, fetch, convert, quantize, verify, manifest.

    `force` exports again even when the folder's manifest says the outputs are up to date.
    """
    from tasks.policy import enforce_on_export
    from tasks.secrets import load_secrets

    enforce_on_export(request)  # a deployment run: the operator's policy, before anything is written
    load_secrets()
    out_dir = Path(request.out_dir)
    # Two exports into one folder: the second waits, then finds the first one's outputs.
    with FileLock(str(export_lock_path(out_dir))):
        manifest, _ = (None, "") if force else find_up_to_date(request)
        if manifest is not None:
            get_run_logger().info("outputs in %s are up to date; nothing to do", out_dir)
            return manifest
        return run_export(request)
