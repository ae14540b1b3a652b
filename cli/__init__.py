"""The `kiln` command: one click group, a command a README usage (`kiln export`, `kiln demo`, ...).

Heavy imports (Prefect, torch, llama.cpp) happen inside the commands that need
them, so `kiln export` on an up-to-date folder answers before any of them load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError
from rich.markup import escape

from cli.console import (
    console,
    fail_cleanly,
    print_summary,
    quiet_kiln_tracebacks,
    terminal_progress,
)
from tasks.errors import KilnError, SpecInvalid

DEMO_QUANTS = ("q8_0", "q4_k_m")




def build_request(**fields: Any):
    from registry import format_validation_error
    from registry.models import ExportRequest

    try:
        return ExportRequest(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise SpecInvalid(f"invalid request: {format_validation_error(exc)}") from None


def preflight_before_prefect(request) -> Callable[[], None]:
    """Every refusal preflight can make, before the Prefect server's start-up is paid.

    The flow runs preflight again as its first step (for UI and scheduled runs); the
    converter probe is cached by then, so the second pass costs about a second. Except where
    the flow can convert beside the probe (weights on this machine, probe not cached:
    `conversion_can_start_early`): there the probe (seconds of the converter's imports) is left
    to the flow, which runs it beside the conversion and cancels that on a refusal, rather than
    paid here before anything starts (bench/pre_prefect.py).

    Returns the source hashing that fetch would do, to run while the Prefect server boots.
    """
    from tasks.fetch import locate_metadata, remember_local_hashes, source_ref
    from tasks.preflight import check_request, conversion_can_start_early, run_preflight
    from tasks.recipe import check_recipe_request
    from tasks.toolchain import current_toolchain

    check_recipe_request(request)  # the file alone; its rows against the tensors once the flow has the model
    ref = source_ref(request)
    check_request(request, ref)
    folder, _ = locate_metadata(ref)
    toolchain = current_toolchain()
    early = conversion_can_start_early(ref, folder, request, toolchain)
    report = run_preflight(ref, folder, request, toolchain, ask_converter=not early)
    for quant, why in report.skipped.items():
        console.print(f"[yellow]skipped[/] {escape(quant)}: {escape(why)}", soft_wrap=True, highlight=False)
    for check in report.checks:
        if check.name == "requantize":  # a prebuilt quantized GGUF requantized down: --allow-requantize
            console.print(f"[yellow]warning:[/] {escape(check.detail or '')}", soft_wrap=True, highlight=False)
    return lambda: remember_local_hashes(ref, folder)


def run_export_command(request, as_json: bool, force: bool) -> None:
    from tasks.manifest import find_up_to_date

    manifest, why = (None, "--force given") if force else find_up_to_date(request)
    if manifest is not None:
        status = f"outputs in {request.out_dir} are up to date (hashes match the manifest); nothing to do"
    else:
        hash_sources = preflight_before_prefect(request)
        console.print(f"exporting ({why})", markup=False)
        from flows.local_server import prefect_api

        def while_the_server_starts() -> None:
            hash_sources()
            import flows.export  # noqa: F401  Prefect's and the flow's imports: seconds of the same wait

        with prefect_api(meanwhile=while_the_server_starts):
            from flows.export import export
            from flows.heartbeats import without_heartbeats

            quiet_kiln_tracebacks()
            with without_heartbeats(), terminal_progress():
                manifest = export(request, force=force)
        status = f"exported to {request.out_dir}"
        for check in manifest.checks:
            if check.name == "split outputs":  # what became of each file, and that Ollama cannot take shards
                console.print(f"split: {check.detail}", markup=False, highlight=False, soft_wrap=True)
    if as_json:
        click.echo(manifest.model_dump_json(indent=2))
        console.print(status, markup=False)
    else:
        print_summary(manifest, status)


@click.group()
@click.version_option(package_name="kiln")
def cli() -> None:
    """Kiln: Hugging Face models and LoRA adapters to checked GGUF files and Ollama models."""


def _set_memory_budget(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """`--memory-budget` is `KILN_MEMORY_BUDGET` for this command: every step, in this process or a child, reads it there."""
    if value is not None:
        from tasks.units import parse_size

        try:
            if parse_size(value) <= 0:
                raise click.BadParameter("must be more than zero")
        except KilnError as exc:
            raise click.BadParameter(str(exc)) from None
        os.environ["KILN_MEMORY_BUDGET"] = value
    return value


memory_budget_option = click.option(
    "--memory-budget", expose_value=False, callback=_set_memory_budget,
    help="Memory every step together may use, e.g. 12GB (default: KILN_MEMORY_BUDGET, else the available memory less a reserve).")


def export_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        memory_budget_option,
        click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Output folder."),
        click.option("--outtype", type=click.Choice(["f16", "bf16", "f32"]), help="Float type of the base GGUF."),
        click.option("--name", help="File-name stem for the outputs (default: the model's name)."),
        click.option("--no-verify", is_flag=True, help="Skip running the outputs and the transformers comparison."),
        click.option("--accept-license", is_flag=True, help="Accept the base's licence where it requires acceptance."),
        click.option("--force", is_flag=True, help="Export again even when the outputs are up to date."),
        click.option("--dialect", help="Use this dialect's Go TEMPLATE for Ollama: required for a GGUF without a chat "
                                       "template; otherwise accepted when it renders the model's template exactly or "
                                       "near (refused when far off). Without it Kiln picks the exact dialect, or has "
                                       "Ollama render the model's own Jinja."),
        click.option("--no-report", is_flag=True, help="Skip measuring each quant type against f16."),
        click.option("--ollama-name", help="Register with Ollama (OLLAMA_HOST) under this name."),
        click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON on stdout."),
        click.option("--split-max-size", help="Split each output GGUF larger than this into NAME-00001-of-0000N.gguf "
                                              "shards, as llama.cpp's gguf-split (e.g. 2G or 500M; Ollama cannot "
                                              "import shards, so a split output gets no Modelfile)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@cli.command("export")
@click.argument("source")
@click.option("--quant", "quants", default="q8_0,q4_k_m", show_default=True,
              help="Comma-separated quant types, e.g. q4_k_m,q8_0; or `auto` with --max-size / --max-kl.")
@click.option("--max-size", help="With --quant auto: the largest acceptable file, e.g. 500MB.")
@click.option("--max-kl", type=float, help="With --quant auto: the largest acceptable mean KL divergence from f16.")
@click.option("--recipe", help="A per-tensor recipe file (YAML: tensor-name regex → ggml type, output and "
                                "token-embedding types) for every quant type; outputs are labelled TYPE-RECIPE.")
@click.option("--search-budget", help="With --quant auto: stop searching after this long (e.g. 10m, 90s) and export "
                                      "the best candidate measured so far.")
@export_options
@fail_cleanly
@click.option("--placement", type=click.Choice(["local", "cpu", "gpu"]), default="local", show_default=True,
              help="Where conversion and quantization run: here, or the cpu/gpu work pool's workers.")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False), help="A PEFT LoRA adapter folder to apply.")
@click.option("--adapter-mode", type=click.Choice(["merge", "adapter", "peft"]), default="merge", show_default=True,
              help="merge: streamed into the base GGUF; adapter: a GGUF LoRA with an ADAPTER line; peft: reference merge.")
@click.option("--resolve-revision", is_flag=True, help="Resolve a Hub branch or tag to its commit once, and record it.")
@click.option("--allow-pickle", is_flag=True,
              help="Allow pickled *.bin/*.pt weights. Dangerous: unpickling can run arbitrary code.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a model whose config asks for its own code.")
@click.option("--allow-requantize", is_flag=True,
              help="A prebuilt quantized GGUF: also make the types with fewer bits than it (quality loss). "
                   "Types with more bits are never made.")
@click.option("--imatrix", help="Quantize with an importance matrix: `auto` (Kiln's calibration text), your text "
                                "PATH.txt, or a llama-imatrix matrix PATH.gguf / PATH.dat. Outputs are labelled "
                                "TYPE-imat; iq2_xs, iq1_s, q2_k_s and the like need one.")
def export_command(source: str, quants: str, out_dir: Path | None, outtype: str | None, name: str | None,
                   no_verify: bool, accept_license: bool, force: bool, dialect: str | None, no_report: bool,
                   ollama_name: str | None, as_json: bool, resolve_revision: bool, allow_pickle: bool,
                   trust_remote_code: bool, max_size: str | None, max_kl: float | None, placement: str,
                   adapter: str | None, adapter_mode: str, allow_requantize: bool, split_max_size: str | None,
                   recipe: str | None = None, search_budget: str | None = None, imatrix: str | None = None) -> None:
    """Export SOURCE to GGUF: a registry key, a local Hugging Face folder or GGUF file,
    hf:ORG/NAME@SHA, hf:ORG/NAME@SHA#PATTERN.gguf (a prebuilt GGUF), or `demo`."""
    request = build_request(
        source=source, quants=[q for q in quants.split(",") if q.strip()], out_dir=str(out_dir) if out_dir else None,
        outtype=outtype, name=name, verify=not no_verify, accept_license=accept_license, dialect=dialect,
        ollama_name=ollama_name, resolve_revision=resolve_revision, allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code, report=not no_report, max_size=max_size, max_kl=max_kl,
        placement=placement, adapter=adapter, adapter_mode=adapter_mode, allow_requantize=allow_requantize,
        split_max_size=split_max_size, recipe=recipe, search_budget=search_budget, imatrix=imatrix,
    )
    run_export_command(request, as_json, force)


@cli.command("demo")
@export_options
@fail_cleanly
def demo_command(out_dir: Path | None, outtype: str | None, name: str | None, no_verify: bool,
                 accept_license: bool, force: bool, dialect: str | None, no_report: bool,
                 ollama_name: str | None, as_json: bool, split_max_size: str | None) -> None:
    """Export the embedded SmolLM2-135M-Instruct to f16, Q8_0 and Q4_K_M, run each, and summarise. No network."""
    request = build_request(
        source="demo", quants=list(DEMO_QUANTS), out_dir=str(out_dir or "kiln-demo"), outtype=outtype, name=name,
        verify=not no_verify, accept_license=accept_license, dialect=dialect, ollama_name=ollama_name,
        report=not no_report, split_max_size=split_max_size,
    )
    run_export_command(request, as_json, force)


@cli.command("batch")
@click.argument("catalogue", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out-root", help="Folder each item's outputs go under (<out-root>/<item>/); overrides the catalogue.")
@click.option("--check", is_flag=True, help="Validate the catalogue and list its items; export nothing.")
@click.option("--force", is_flag=True, help="Export items again even when their folders are up to date.")
@memory_budget_option
@fail_cleanly
def batch_command(catalogue: Path, out_root: str | None, check: bool, force: bool) -> None:
    """Export every item of a catalogue (bases × adapters × quant types); a failed item does not stop the others."""
    from flows.batch import load_catalogue

    items = load_catalogue(catalogue, out_root)
    for item in items:
        console.print(f"{item.name}: {item.request.source} → {item.request.out_dir} ({', '.join(item.request.quants)})",
                      highlight=False, markup=False)
    if check:
        console.print(f"[green]✓[/] {len(items)} catalogue items valid")
        return
    from flows.batch import batch_export
    from flows.heartbeats import without_heartbeats
    from flows.local_server import prefect_api

    with prefect_api(), without_heartbeats(), terminal_progress():
        batch_export(str(catalogue), out_root, force)


@cli.command("report")
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@fail_cleanly
def report_command(out_dir: Path, as_json: bool) -> None:
    """The quality, size and speed of each quant type in an export, measured against its float GGUF.

    Uses the report in the manifest; measures now (and records it) when the export was made with --no-report.
    """
    from tasks.manifest import read_manifest, write_manifest
    from tasks.report import (
        measure_quants,
        report_markdown,
        rich_table,
        write_report_files,
    )

    manifest = read_manifest(out_dir)
    if manifest is None:
        raise KilnError(f"{out_dir} holds no Kiln export (no manifest.json)")
    if manifest.report is None:
        if any(o.shard for o in manifest.outputs):
            raise KilnError(f"the outputs in {out_dir} are split (--split-max-size) and the report measures whole "
                            "files; export again with the report on (without --no-report): it measures before splitting")
        ggufs = {o.quant: out_dir / o.path for o in manifest.outputs if o.path.endswith(".gguf")}
        float_label = next((q for q in ("f32", "f16", "bf16") if q in ggufs), None)
        if float_label is None or len(ggufs) < 2:
            raise KilnError(f"{out_dir} needs a float GGUF and at least one quant type to compare")
        manifest.report = measure_quants(ggufs.pop(float_label), ggufs, reference_name=float_label)
        write_report_files(manifest.report, out_dir, manifest.choice)
        write_manifest(out_dir, manifest)
    if as_json:
        click.echo(manifest.report.model_dump_json(indent=2))
    else:
        console.print(rich_table(manifest.report, manifest.choice))
        console.print(report_markdown(manifest.report, manifest.choice).splitlines()[-1], highlight=False, markup=False)


@cli.command("setup")
@click.option("--sdist", type=click.Path(exists=True, path_type=Path),
              help="A llama-cpp-python source distribution already on disk (else pip fetches it).")
@fail_cleanly
def setup_command(sdist: Path | None) -> None:
    """Fetch and build what exports need once (the converter source, llama.cpp's tools, the demo model),
    so later runs need no network."""
    from tasks.demo import ensure_demo_model
    from tasks.llama_tools import TOOLS, build_llama_tools, tools_built
    from tasks.toolchain import current_toolchain, ensure_converter_source

    ensure_converter_source(sdist)
    toolchain = current_toolchain()
    console.print(f"converter: {toolchain.converter_source} (sha256 {toolchain.converter_sha256[:16]}…)", markup=False)
    if not tools_built():
        console.print(f"building llama.cpp's {', '.join(TOOLS)} from the same source (once; a few minutes)…",
                      markup=False)
    console.print(f"llama.cpp tools: {build_llama_tools(sdist)}", markup=False)
    folder, derived = ensure_demo_model()
    console.print(f"demo model: {folder}\n  derived from {derived}", markup=False)


@cli.group("template")
def template_group() -> None:
    """Chat templates and dialects."""


@template_group.command("check")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--dialect", help="Ask for this dialect's Go template: reported exact or near, or refused (with the "
                                "dialect that fits, if one does).")
@click.option("--bos-token", help="The model's BOS token, for a bare .jinja file that uses bos_token "
                                  "(a model folder or a GGUF names its own).")
@click.option("--eos-token", help="The model's EOS token, for a bare .jinja file that uses eos_token.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@fail_cleanly
def template_check_command(source: Path, dialect: str | None, bos_token: str | None, eos_token: str | None,
                           as_json: bool) -> None:
    """Which dialect fits SOURCE's chat template (a .jinja file, a model folder or a GGUF), and is it exact?

    The outcome is one of: exact; exact apart from the date (the model's template prints today's
    date, the Go template a fixed one); near (the closest dialect differs on a few named cases);
    no dialect is exact. Without an exact dialect, `kiln export` has Ollama render the model's own
    Jinja template (ollama_format "jinja") unless --dialect asks for a Go template.
    """
    from tasks.template_check import check_template, outcome_lines

    check = check_template(source, dialect=dialect, bos_token=bos_token, eos_token=eos_token)
    if as_json:
        click.echo(check.model_dump_json(indent=2))
        return
    console.print(f"dialect: [bold]{escape(str(check.dialect))}[/]  verified: {'yes' if check.verified else 'no'}  "
                  f"ollama format: {check.ollama_format}")
    for line in outcome_lines(check):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    for warning in check.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)


@cli.command("register")
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--ollama-name", help="Name to register under, when the export was made without one.")
@click.option("--host", help="Ollama server (default: OLLAMA_HOST).")
@fail_cleanly
def register_command(out_dir: Path, ollama_name: str | None, host: str | None) -> None:
    """Register an export's GGUF files with Ollama from their Modelfiles (blobs already there are skipped)."""
    from tasks.manifest import read_manifest, write_manifest
    from tasks.ollama_name import ollama_names_for
    from tasks.register import register_outputs

    manifest = read_manifest(out_dir)
    if manifest is None or manifest.ollama is None:
        raise KilnError(f"{out_dir} holds no Kiln export with Modelfiles (no manifest.json with an `ollama` section)")
    plan = manifest.ollama
    if ollama_name:
        names = ollama_names_for(ollama_name, [m.quant for m in plan.models])
        for model in plan.models:
            model.name = names.get(model.quant)
    if not any(m.name for m in plan.models):
        raise KilnError("no Ollama name recorded for this export; pass --ollama-name NAME")

    def progress(event) -> None:
        if event.phase != "upload" or event.completed == event.total:
            console.print(f"  {event.phase}: {event.message}", highlight=False, markup=False)

    results = register_outputs(out_dir, plan, host, progress=progress)
    write_manifest(out_dir, manifest)
    for result in results:
        console.print(f"[green]registered[/] {escape(result.name)} ({result.uploaded_bytes / 1e6:.1f} MB uploaded)")


@cli.group("registry")
def registry_group() -> None:
    """The curated base models."""


@registry_group.command("list")
@fail_cleanly
def registry_list() -> None:
    """List the curated bases."""
    from registry import load_registry

    specs = list(load_registry().values())
    width = max(len(s.key) for s in specs)
    id_width = max(len(s.hf_id) for s in specs)
    for spec in specs:
        gated = "  requires licence acceptance" if spec.requires_acceptance else ""
        standin = "stand-in verified" if spec.verified_by_standin else "unverified"
        click.echo(f"{spec.key:<{width}}  {spec.hf_id:<{id_width}}  {spec.template:<13}  "
                   f"{spec.params / 1e9:5.2f}B  {standin:<17}  {spec.license_spdx}{gated}")
    unverified = [s.key for s in specs if not s.verified_by_standin]
    if unverified:
        console.print(f"unverified: no faithful stand-in exports end to end in the tests; "
                      f"`kiln registry show KEY` says why ({', '.join(unverified)})", highlight=False, markup=False)


@registry_group.command("show")
@click.argument("key")
@fail_cleanly
def registry_show(key: str) -> None:
    """Print one base's full spec as JSON."""
    from registry import get_base

    click.echo(json.dumps(get_base(key).model_dump(), indent=2))


@registry_group.command("check")
@fail_cleanly
def registry_check() -> None:
    """Validate every registry entry (schema and validators)."""
    from registry import BASES_DIR, load_spec_file

    problems = []
    count = 0
    for path in sorted(BASES_DIR.glob("*.yaml")):
        count += 1
        try:
            load_spec_file(path)
        except KilnError as exc:
            problems.append(str(exc))
    for problem in problems:
        console.print(f"[red]✗[/] {escape(problem)}", highlight=False)
    if problems:
        raise SpecInvalid(f"{len(problems)} of {count} registry entries are invalid")
    console.print(f"[green]✓[/] {count} registry entries valid")


def main() -> None:
    # Prefect's temporary server would report usage to its makers: on a machine without network
    # that logs an error at every start, and its heartbeat contends for the SQLite database.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    cli(prog_name="kiln")


if __name__ == "__main__":
    main()
