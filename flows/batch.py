"""The batch export: every item of a catalogue (bases × adapters × quant types × Ollama names).

The catalogue (`deployments/catalogue.yaml`) is validated as a whole before the first item
runs: its shape (strict pydantic models), then each item's export request, quant types,
licence and output folder; every problem is reported at once, naming the item and the field.
Items then run one after another as `export` subflows; a failed item does not stop the others.
The run ends with a table artifact of every item's outcome, and fails if any item failed.

A second run over the same catalogue does no conversion work: an item whose folder is up to
date does nothing, and one that must be written again (`force`, a new `out_root`, a changed
Ollama name) finds its conversion and quantizations in the cross-run cache
(flows/convert_quantize.py). One base with three adapters and four quant types converts the
base once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from registry import load_yaml
from registry.models import ExportRequest, Manifest
from tasks.errors import KilnError, SpecInvalid
from tasks.policy import DeploymentPolicy, PolicyRefused, enforce_on_batch, item_refusals
from tasks.secrets import load_secrets

ITEM_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
# Catalogue keys an item sets through its own fields; everything else of ExportRequest goes in `options`.
_ITEM_FIELDS = ("quants", "outtype", "ollama_name", "accept_license", "verify", "dialect", "placement")


class _ItemFields(BaseModel):
    """What a catalogue level may set for the items below it (None: inherit)."""

    model_config = ConfigDict(extra="forbid")

    quants: list[str] | None = Field(None, description="Quant types, e.g. [q8_0, q4_k_m].")
    outtype: Literal["f16", "bf16", "f32"] | None = Field(None, description="Float type of the base conversion.")
    ollama_name: str | None = Field(None, description="Register with Ollama under this name.")
    accept_license: bool | None = Field(None, description="Accept the base's licence where it requires acceptance.")
    verify: bool | None = Field(None, description="Run every GGUF and compare with transformers.")
    dialect: str | None = Field(None, description="Chat-template dialect for the Modelfile.")
    placement: Literal["local", "cpu", "gpu"] | None = Field(None, description="Where conversion runs.")
    options: dict[str, Any] = Field(default_factory=dict, description="Any other ExportRequest field.")

    def overrides(self) -> dict[str, Any]:
        fields = {k: getattr(self, k) for k in _ITEM_FIELDS if getattr(self, k) is not None}
        return {**self.options, **fields}


class CatalogueAdapter(_ItemFields):
    """One adapter of a base: one more item, named `<base name>-<adapter name>`."""

    name: str = Field(..., pattern=ITEM_NAME, description="The adapter's short name (item and file names).")
    path: str = Field(..., description="The PEFT adapter: a folder, or hf:ORG/NAME@<40-hex>.")


class CatalogueBase(_ItemFields):
    """One base model: an item of its own (unless `include_base: false`) and one per adapter."""

    source: str = Field(..., description="A registry key, a local folder, hf:ORG/NAME@<40-hex>, or `demo`.")
    name: str | None = Field(None, pattern=ITEM_NAME, description="Item and file-name stem; default: the model's name.")
    include_base: bool = Field(True, description="Export the base alone as well as with each adapter.")
    adapters: list[CatalogueAdapter] = Field(default_factory=list)


class Catalogue(BaseModel):
    """`deployments/catalogue.yaml`."""

    model_config = ConfigDict(extra="forbid")

    out_root: str = Field("kiln-batch", description="Each item writes to <out_root>/<item name>/.")
    defaults: _ItemFields = Field(default_factory=_ItemFields, description="Applied to every item.")
    bases: list[CatalogueBase] = Field(..., min_length=1)


class CatalogueItem(BaseModel):
    """One export of the batch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    where: str = Field(..., description="Where it comes from in the catalogue, e.g. bases[0].adapters[1].")
    adapter: str | None = None
    request: ExportRequest


class ItemOutcome(BaseModel):
    """One row of the batch's table artifact."""

    model_config = ConfigDict(extra="forbid")

    item: str
    source: str
    adapter: str = ""
    quants: str
    status: Literal["completed", "up to date", "failed"]
    files: int = 0
    size_mb: float = 0.0
    seconds: float = 0.0
    out_dir: str
    detail: str = ""


class BatchItemsFailed(KilnError):
    """Some items of a batch failed; the others ran, and the outcome table says which is which."""


# ---------------------------------------------------------------- loading and validation


def _describe_loc(raw: Any, loc: tuple[Any, ...]) -> tuple[str, str]:
    """(`bases[0] (demo) adapters[1] (pirate)`, `quants`) for a pydantic error location."""
    where: list[str] = []
    node = raw
    i = 0
    while i < len(loc):
        part = loc[i]
        if isinstance(part, str) and i + 1 < len(loc) and isinstance(loc[i + 1], int) and part in ("bases", "adapters"):
            index = loc[i + 1]
            item = node.get(part, [])[index] if isinstance(node, dict) and isinstance(node.get(part), list) \
                and index < len(node.get(part)) else None
            label = None
            if isinstance(item, dict):
                label = item.get("name") or item.get("source")
            where.append(f"{part}[{index}]" + (f" ({label})" if label else ""))
            node = item
            i += 2
            continue
        break
    field = ".".join(str(p) for p in loc[i:]) or "(the entry itself)"
    return " ".join(where) or "catalogue", field


def _format_errors(raw: Any, exc: ValidationError, prefix: str = "") -> list[str]:
    problems = []
    for err in exc.errors():
        where, field = _describe_loc(raw, tuple(err["loc"]))
        problems.append(f"{prefix}{where}: field `{field}`: {err['msg']}")
    return problems


def _default_name(source: str) -> str:
    from tasks.fetch import display_name, source_ref

    try:
        return display_name(source_ref(ExportRequest(source=source)))
    except (KilnError, ValidationError, ValueError):
        stem = Path(source.split("@")[0].split("#")[0].rstrip("/")).name
        return "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).lstrip("._-") or "item"


def expand(catalogue: Catalogue, out_root: str | None = None) -> tuple[list[CatalogueItem], list[str]]:
    """Every item's export request, and every problem found building them (naming the item and field)."""
    root = Path(out_root or catalogue.out_root)
    has_adapter_field = "adapter" in ExportRequest.model_fields
    items: list[CatalogueItem] = []
    problems: list[str] = []
    for b, base in enumerate(catalogue.bases):
        base_name = base.name or _default_name(base.source)
        entries: list[tuple[str, str, CatalogueAdapter | None]] = []
        if base.include_base:
            entries.append((base_name, f"bases[{b}]", None))
        for a, adapter in enumerate(base.adapters):
            entries.append((f"{base_name}-{adapter.name}", f"bases[{b}].adapters[{a}]", adapter))
        if not entries:
            problems.append(f"bases[{b}] ({base_name}): `include_base` is false and it lists no adapters: nothing to export")
        for name, where, adapter in entries:
            fields: dict[str, Any] = {
                **catalogue.defaults.overrides(),
                **base.overrides(),
                **(adapter.overrides() if adapter else {}),
                "source": base.source,
                "name": name,
                "out_dir": str(root / name),
            }
            if adapter is not None:
                if not has_adapter_field:
                    problems.append(f"item {name!r} ({where}): field `path`: this Kiln's export request has no "
                                    "`adapter` field, so adapters cannot be exported yet")
                    continue
                fields["adapter"] = adapter.path
            try:
                request = ExportRequest(**fields)
            except ValidationError as exc:
                for err in exc.errors():
                    field = ".".join(str(p) for p in err["loc"]) or "(request)"
                    problems.append(f"item {name!r} ({where}): field `{field}`: {err['msg']}")
                continue
            items.append(CatalogueItem(name=name, where=where, adapter=adapter.path if adapter else None,
                                       request=request))
    problems += _duplicates(items)
    return items, problems


def _duplicates(items: list[CatalogueItem]) -> list[str]:
    problems = []
    seen: dict[str, str] = {}
    for item in items:
        if item.name in seen:
            problems.append(f"item {item.name!r} ({item.where}): field `name`: the same item name as {seen[item.name]}; "
                            "give the base or adapter another `name`")
        seen.setdefault(item.name, item.where)
    owners: dict[str, str] = {}
    for item in items:
        ollama = item.request.ollama_name
        if ollama:
            if ollama in owners:
                problems.append(f"item {item.name!r} ({item.where}): field `ollama_name`: {ollama!r} is also item "
                                f"{owners[ollama]!r}'s; each item needs its own Ollama name")
            owners.setdefault(ollama, item.name)
    return problems


def check_items(items: list[CatalogueItem]) -> list[str]:
    """The checks `kiln export` makes before Prefect starts (quant types, licence, output folder), per item."""
    from tasks.fetch import source_ref
    from tasks.preflight import check_request

    problems = []
    for item in items:
        try:
            check_request(item.request, source_ref(item.request))
        except KilnError as exc:
            problems.append(f"item {item.name!r} ({item.where}): {exc}")
    return problems


def load_catalogue(path: str | Path, out_root: str | None = None, check: bool = True,
                   policy: DeploymentPolicy | None = None) -> list[CatalogueItem]:
    """Read, validate and expand a catalogue; raise `SpecInvalid` listing every problem before anything runs.

    With a deployment run's `policy`, an item it refuses fails the whole catalogue (`PolicyRefused`,
    every such item named) before any item's output folder is made.
    """
    path = Path(path)
    try:
        raw = load_yaml(path, "catalogue")  # refuses a key given twice, as registry entries do
    except SpecInvalid as exc:
        raise SpecInvalid(f"catalogue {exc}") from None
    if not isinstance(raw, dict):
        raise SpecInvalid(f"catalogue {path}: expected a mapping with `bases:`, found {type(raw).__name__}")
    try:
        catalogue = Catalogue.model_validate(raw)
    except ValidationError as exc:
        problems = _format_errors(raw, exc)
        raise SpecInvalid(f"catalogue {path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems)) from None
    items, problems = expand(catalogue, out_root)
    if policy is not None:  # before check_items, which makes each item's output folder
        refused = item_refusals(items, policy)
        if refused:
            raise PolicyRefused(f"catalogue {path}: {len(refused)} item(s) refused by this server's policy: "
                                + "; ".join(refused))
    if check:
        problems += check_items(items)
    if problems:
        raise SpecInvalid(f"catalogue {path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return items


# ---------------------------------------------------------------- the flow


def up_to_date(request: ExportRequest) -> Manifest | None:
    """The item's manifest when its folder already holds exactly these outputs (hashes checked), else None.

    Checked here, under the export's own folder lock, so an up-to-date item costs one pass of
    hashing and no subflow run.
    """
    from filelock import FileLock

    from flows.export import export_lock_path
    from tasks.manifest import find_up_to_date

    out_dir = Path(request.out_dir)
    if not out_dir.is_dir():
        return None
    with FileLock(str(export_lock_path(out_dir))):
        return find_up_to_date(request)[0]


def run_item(item: CatalogueItem, force: bool) -> ItemOutcome:
    """One item: nothing when up to date, else an `export` subflow; its failure becomes a row, not an exception."""
    from flows.export import export, warm_converter_ahead
    from flows.heartbeats import without_heartbeats

    request = item.request
    row = dict(item=item.name, source=request.source, adapter=item.adapter or "", quants=", ".join(request.quants),
               out_dir=request.out_dir)
    t0 = time.perf_counter()
    try:
        current = None if force else up_to_date(request)
    except KilnError:
        current = None  # let the export itself say what is wrong
    if current is not None:
        return _row(row, "up to date", current, time.perf_counter() - t0)
    warm_converter_ahead(request)
    with without_heartbeats():  # it runs in this batch run's process, whose heartbeat covers it
        state = export.with_options(flow_run_name=item.name)(request, force=force, return_state=True)
    seconds = time.perf_counter() - t0
    if not state.is_completed():
        message = state.message or state.name
        try:
            state.result()
        except Exception as exc:  # the item's own error, e.g. a KilnError with its reason
            message = str(exc) or message
        return ItemOutcome(**row, status="failed", seconds=round(seconds, 2), detail=message)
    return _row(row, "completed", state.result(), seconds)


def _row(row: dict[str, Any], status: str, manifest: Manifest, seconds: float) -> ItemOutcome:
    ggufs = [o for o in manifest.outputs if o.path.endswith(".gguf")]
    return ItemOutcome(**row, status=status, files=len(manifest.outputs),  # type: ignore[arg-type]
                       size_mb=round(sum(o.size for o in ggufs) / 1e6, 1), seconds=round(seconds, 2),
                       detail=f"{len(ggufs)} GGUF, manifest of {manifest.created_at}")


def outcome_table(outcomes: list[ItemOutcome]) -> list[dict[str, Any]]:
    return [o.model_dump() for o in outcomes]


def _run_name() -> str:
    from prefect.runtime import flow_run

    return f"batch {Path(str(flow_run.parameters.get('catalogue', 'catalogue'))).name}"


@flow(name="batch-export", flow_run_name=_run_name, persist_result=True)
def batch_export(
    catalogue: str = "deployments/catalogue.yaml",
    out_root: str | None = None,
    force: bool = False,
) -> list[dict[str, Any]]:
    """Export every item of a catalogue; a failed item does not stop the others.

    catalogue: the catalogue file, relative to the repository (the deployment's working folder).
    out_root: overrides the catalogue's `out_root` (each item writes to <out_root>/<item>/).
    force: export items again even when their folders are up to date (conversions still come from the cache).
    """
    from prefect import get_run_logger
    from prefect.artifacts import create_table_artifact

    from tasks.progress import progress_reporter

    logger = get_run_logger()
    policy = enforce_on_batch(catalogue, out_root)  # a deployment run: the operator's policy, before any folder
    load_secrets()
    items = load_catalogue(catalogue, out_root, policy=policy)
    logger.info("catalogue %s: %d item(s): %s", catalogue, len(items), ", ".join(i.name for i in items))
    progress = progress_reporter(f"batch {catalogue}: items done", key="kiln-batch")
    outcomes: list[ItemOutcome] = []
    for n, item in enumerate(items, 1):
        outcome = run_item(item, force)
        outcomes.append(outcome)
        log = logger.error if outcome.status == "failed" else logger.info
        log("item %d/%d %s: %s%s", n, len(items), item.name, outcome.status,
            f" ({outcome.detail})" if outcome.status == "failed" else "")
        progress(n / len(items))
    table = outcome_table(outcomes)
    failed = [o.item for o in outcomes if o.status == "failed"]
    create_table_artifact(table=table, key="kiln-batch-outcomes",
                          description=f"Kiln batch over {catalogue}: {len(items) - len(failed)} of {len(items)} items succeeded")
    if failed:
        raise BatchItemsFailed(f"{len(failed)} of {len(items)} item(s) failed: {', '.join(failed)} "
                               "(see the kiln-batch-outcomes artifact)")
    return table
