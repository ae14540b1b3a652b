"""The `kiln` command.

Heavy imports (Prefect, torch, llama.cpp) happen inside the commands that need
them, so `kiln export` on an up-to-date folder answers before any of them load.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from tasks.errors import KilnError, SpecInvalid

console = Console(stderr=True)
DEMO_QUANTS = ("q8_0", "q4_k_m")


def fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a `KilnError` as one line and exit non-zero; anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KilnError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)

    return wrapper


def build_request(**fields: Any):
    from registry import format_validation_error
    from registry.models import ExportRequest

    try:
        return ExportRequest(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise SpecInvalid(f"invalid request: {format_validation_error(exc)}") from None


def print_summary(manifest, status: str) -> None:
    table = Table(title=f"{manifest.source.kind} {manifest.source.id} → {manifest.request.out_dir}")
    for col in ("file", "quant", "size (MB)", "sha256"):
        table.add_column(col, justify="right" if col == "size (MB)" else "left")
    for out in manifest.outputs:
        table.add_row(out.path, out.quant, f"{out.size / 1e6:.1f}", out.sha256[:16] + "…")
    console.print(table)
    checks = Table(title="checks")
    for col in ("check", "target", "result", "detail"):
        checks.add_column(col)
    for check in manifest.checks:
        checks.add_row(check.name, check.target, "[green]pass[/]" if check.passed else "[red]FAIL[/]", check.detail)
    console.print(checks)
    if manifest.timings:
        console.print("times (s): " + ", ".join(f"{k} {v:g}" for k, v in manifest.timings.items()))
    console.print(f"[bold green]{status}[/]")


def run_export_command(request, as_json: bool, force: bool) -> None:
    from tasks.manifest import find_up_to_date

    manifest, why = (None, "--force given") if force else find_up_to_date(request)
    if manifest is not None:
        status = f"outputs in {request.out_dir} are up to date (hashes match the manifest); nothing to do"
    else:
        from tasks.fetch import source_ref
        from tasks.preflight import check_request

        check_request(request, source_ref(request))
        console.print(f"exporting ({why})")
        from flows.export import export

        manifest = export(request)
        status = f"exported to {request.out_dir}"
    if as_json:
        click.echo(manifest.model_dump_json(indent=2))
        console.print(status)
    else:
        print_summary(manifest, status)


@click.group()
@click.version_option(package_name="kiln")
def cli() -> None:
    """Kiln: Hugging Face models and LoRA adapters to checked GGUF files and Ollama models."""


def export_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Output folder."),
        click.option("--outtype", type=click.Choice(["f16", "bf16", "f32"]), help="Float type of the base GGUF."),
        click.option("--name", help="File-name stem for the outputs (default: the model's name)."),
        click.option("--no-verify", is_flag=True, help="Skip running the outputs and the transformers comparison."),
        click.option("--accept-license", is_flag=True, help="Accept the base's licence where it requires acceptance."),
        click.option("--force", is_flag=True, help="Export again even when the outputs are up to date."),
        click.option("--dialect", help="Chat-template dialect when the model's own template is not recognised."),
        click.option("--ollama-name", help="Register with Ollama (OLLAMA_HOST) under this name."),
        click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON on stdout."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@cli.command("export")
@click.argument("source")
@click.option("--quant", "quants", default="q8_0,q4_k_m", show_default=True,
              help="Comma-separated quant types, e.g. q4_k_m,q8_0.")
@export_options
@fail_cleanly
@click.option("--resolve-revision", is_flag=True, help="Resolve a Hub branch or tag to its commit once, and record it.")
@click.option("--allow-pickle", is_flag=True,
              help="Allow pickled *.bin/*.pt weights. Dangerous: unpickling can run arbitrary code.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a model whose config asks for its own code.")
def export_command(source: str, quants: str, out_dir: Path | None, outtype: str | None, name: str | None,
                   no_verify: bool, accept_license: bool, force: bool, dialect: str | None, ollama_name: str | None,
                   as_json: bool, resolve_revision: bool, allow_pickle: bool, trust_remote_code: bool) -> None:
    """Export SOURCE to GGUF: a registry key, a local Hugging Face folder or GGUF file,
    hf:ORG/NAME@SHA, hf:ORG/NAME@SHA#PATTERN.gguf (a prebuilt GGUF), or `demo`."""
    request = build_request(
        source=source, quants=[q for q in quants.split(",") if q.strip()], out_dir=str(out_dir) if out_dir else None,
        outtype=outtype, name=name, verify=not no_verify, accept_license=accept_license, dialect=dialect,
        ollama_name=ollama_name, resolve_revision=resolve_revision, allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    )
    run_export_command(request, as_json, force)


@cli.command("demo")
@export_options
@fail_cleanly
def demo_command(out_dir: Path | None, outtype: str | None, name: str | None, no_verify: bool,
                 accept_license: bool, force: bool, dialect: str | None, ollama_name: str | None,
                 as_json: bool) -> None:
    """Export the embedded SmolLM2-135M-Instruct to f16, Q8_0 and Q4_K_M, run each, and summarise. No network."""
    request = build_request(
        source="demo", quants=list(DEMO_QUANTS), out_dir=str(out_dir or "kiln-demo"), outtype=outtype, name=name,
        verify=not no_verify, accept_license=accept_license, dialect=dialect, ollama_name=ollama_name,
    )
    run_export_command(request, as_json, force)


@cli.command("setup")
@click.option("--sdist", type=click.Path(exists=True, path_type=Path),
              help="A llama-cpp-python source distribution already on disk (else pip fetches it).")
@fail_cleanly
def setup_command(sdist: Path | None) -> None:
    """Fetch what exports need once (the converter source, the demo model), so later runs need no network."""
    from tasks.demo import ensure_demo_model
    from tasks.toolchain import current_toolchain, ensure_converter_source

    ensure_converter_source(sdist)
    toolchain = current_toolchain()
    console.print(f"converter: {toolchain.converter_source} (sha256 {toolchain.converter_sha256[:16]}…)")
    folder, derived = ensure_demo_model()
    console.print(f"demo model: {folder}\n  derived from {derived}")


@cli.group("registry")
def registry_group() -> None:
    """The curated base models."""


@registry_group.command("list")
@fail_cleanly
def registry_list() -> None:
    """List the curated bases."""
    from registry import load_registry

    table = Table()
    for col in ("key", "hf_id", "dialect", "params", "licence", "gated"):
        table.add_column(col)
    for spec in load_registry().values():
        table.add_row(spec.key, spec.hf_id, spec.template, f"{spec.params / 1e9:.2f}B", spec.license_spdx,
                      "yes" if spec.requires_acceptance else "")
    Console().print(table)


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
        console.print(f"[red]✗[/] {problem}", highlight=False)
    if problems:
        raise SpecInvalid(f"{len(problems)} of {count} registry entries are invalid")
    console.print(f"[green]✓[/] {count} registry entries valid")


def main() -> None:
    cli(prog_name="kiln")


if __name__ == "__main__":
    main()
