"""The export flow: preflight → fetch → convert → quantize × N → verify → outputs + manifest.

Flows only wire steps together; each step's logic is a plain function in `tasks/`.
The re-run check (`tasks.manifest.find_up_to_date`) runs in the CLI before this module is imported.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from registry.models import Check, ExportRequest, Manifest, OutputFile, ResolvedSource
from tasks.convert import gguf_cache_path, place_output
from tasks.fetch import display_name, parse_source
from tasks.files import remove_stale_temporaries, safe_child, sha256_file
from tasks.manifest import KILN_VERSION, content_key, now_iso, request_key, write_manifest
from tasks.toolchain import Toolchain, current_toolchain


def output_name(stem: str, quant: str) -> str:
    return f"{stem}-{quant}.gguf"


def convert_and_quantize(
    source: ResolvedSource,
    request: ExportRequest,
    toolchain: Toolchain,
    parallel: int | None = None,
) -> dict[str, Path]:
    """The heavy part: one cached float conversion, then every quant type from it. Returns cache paths."""
    from tasks.convert import convert_to_gguf
    from tasks.quantize import quantize_gguf

    logger = get_run_logger()
    key = content_key(source.files)
    base, reused = convert_to_gguf.task(Path(source.path), key, request.outtype, toolchain)
    logger.info("base %s GGUF %s", request.outtype, "reused from cache" if reused else "converted")
    results = {request.outtype: base}
    todo = [q for q in request.quants if q != request.outtype]
    workers = max(1, min(parallel or len(todo) or 1, os.cpu_count() or 1))
    threads = max(1, (os.cpu_count() or 1) // workers)
    futures = {}
    for quant in todo:
        target = gguf_cache_path(key, quant, toolchain)
        if target.is_file():
            results[quant] = target
            continue
        futures[quant] = quantize_gguf.task.submit(base, target, quant, threads)
    for quant, future in futures.items():
        results[quant] = future.result()
    return results


def run_export(request: ExportRequest) -> Manifest:
    """Every step of an export, in order; runs inside the `export` flow."""
    from tasks.fetch import fetch_source, locate_metadata
    from tasks.preflight import check_weights, run_preflight
    from tasks.verify import verify_outputs

    timings: dict[str, float] = {}
    started = time.perf_counter()

    def lap(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 3)

    out_dir = Path(request.out_dir)
    t0 = time.perf_counter()
    toolchain = current_toolchain()
    ref = parse_source(request.source)
    metadata_folder, derived_from = locate_metadata(ref)
    report = run_preflight.task(ref, metadata_folder, request, toolchain)
    lap("preflight", t0)

    t0 = time.perf_counter()
    source = fetch_source(ref, metadata_folder, derived_from)
    check_weights(Path(source.path))
    lap("fetch", t0)

    t0 = time.perf_counter()
    cached = convert_and_quantize(source, request, toolchain)
    lap("convert_quantize", t0)

    checks: list[Check] = list(report.checks)
    if request.verify:
        t0 = time.perf_counter()
        hf_dir = Path(source.path) if source.kind != "gguf" else None
        checks += verify_outputs.task(cached, hf_dir, request.outtype)
        lap("verify", t0)

    t0 = time.perf_counter()
    stem = request.name or display_name(ref)
    remove_stale_temporaries(out_dir)
    outputs = []
    for quant, path in cached.items():
        final = safe_child(out_dir, output_name(stem, quant))
        place_output(path, final)
        outputs.append(OutputFile(path=final.name, quant=quant, size=final.stat().st_size, sha256=sha256_file(final)))
    lap("outputs", t0)
    timings["total"] = round(time.perf_counter() - started, 3)

    manifest = Manifest(
        kiln_version=KILN_VERSION,
        request=request,
        request_key=request_key(request, source.files, toolchain),
        source=source,
        toolchain=toolchain,
        outputs=outputs,
        checks=checks,
        timings=timings,
        created_at=now_iso(),
    )
    write_manifest(out_dir, manifest)
    publish_summary(manifest)
    return manifest


def summary_markdown(manifest: Manifest) -> str:
    lines = [
        f"# Kiln export: {manifest.source.id}",
        "",
        f"Source: {manifest.source.kind} `{manifest.source.id}`"
        + (f" @ `{manifest.source.revision}`" if manifest.source.revision else ""),
        f"Toolchain: llama-cpp-python {manifest.toolchain.llama_cpp_python}, "
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
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in manifest.timings.items())]
    return "\n".join(lines)


def publish_summary(manifest: Manifest) -> None:
    create_markdown_artifact(markdown=summary_markdown(manifest), key="kiln-export-summary",
                             description="Kiln export: outputs, sizes, checks")


@flow(name="export")
def export(request: ExportRequest) -> Manifest:
    """Export a model to GGUF: preflight, fetch, convert, quantize, verify, manifest."""
    return run_export(request)
