"""The heavy subflow: one float conversion of the base, then every quant type from it.

Where it runs is the request's `placement`:

- `local`: inline, in the export flow's own process (what `kiln export` does);
- `cpu` / `gpu`: the export flow starts the `convert-quantize/<placement>` deployment
  (`deployments/prefect.yaml`) with `run_deployment` and waits; a worker of that work pool runs it.
  On the `gpu` pool the run holds one slot of the `gpu` tag's concurrency limit
  (`prefect concurrency-limit create gpu 1`: one job a GPU).

Caching has two layers, keyed the same way:

- on disk, `tasks.convert.cached_build`: the GGUF under `KILN_CACHE_DIR/gguf/`, named by
  (source content key, variant, toolchain key), with a sha256 stamp and a file lock;
- in Prefect, each conversion and quantization task run is cached by the name of the cache file it
  produces (so by the same content key, outtype or quant type, and toolchain key) plus the task's
  source, with its result persisted. A later run (another export, another batch, another process)
  finds the record, reports the task run `Cached` and does no work at all, not even a re-hash. A
  cached result whose file is gone, or was modified after it was stamped, is built again.

The records live in Prefect's result storage (`PREFECT_LOCAL_STORAGE_PATH`, by default
`$PREFECT_HOME/storage`, or the block named by `PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK`); see
docs/deployments.md for workers on several machines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from registry.models import ExportRequest, ImatrixRecord, ResolvedSource
from tasks import settings
from tasks.adapter import AdapterInfo, apply_adapter
from tasks.convert import cache_entry_intact, conversion_key, convert_to_gguf, gguf_cache_path, gguf_model_name
from tasks.errors import KilnError, ToolchainError
from tasks.files import content_key
from tasks.memory import quant_job_memory
from tasks.progress import progress_reporter
from tasks.quantize import quantize_gguf
from tasks.recipe import check_recipe_against, load_recipe, quant_label
from tasks.toolchain import Toolchain, current_toolchain

FLOW_NAME = "convert-quantize"
POOLS = ("cpu", "gpu")
_QUANT_MIN_THREADS = 2


class PlacementFailed(KilnError):
    """The convert-quantize run on a work pool could not start, failed, or left files this worker cannot see."""


def _was_cached(state: Any) -> bool:
    return state is not None and state.name == "Cached"


def _config(source: ResolvedSource) -> dict[str, Any]:
    path = Path(source.path) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- memory budget


def quant_memory_budget() -> int:
    """Bytes the parallel quantizations may use together: the memory budget (`--memory-budget`,
    `KILN_MEMORY_BUDGET`), unless the older `KILN_QUANT_MEMORY_GB` names one for them alone.

    The quantizations are the only step running while they run (verify and the report come after),
    so they may have the whole budget.
    """
    explicit = settings.quant_memory_gib()
    if explicit is not None:
        return int(explicit * (1 << 30))
    return settings.memory_budget_bytes()


def quant_parallelism(n_jobs: int, per_job: int, budget: int, parallel: int | None = None) -> tuple[int, int]:
    """(parallel quantizations, threads each): bounded by the jobs, the memory budget, and the cores.

    A libllama quantization leaves its threads idle while it validates the input rows and writes
    the output (one thread does both), so jobs side by side keep the cores busier than one job
    with every thread: four types of SmolLM2-135M on 2 cores took 4.9-5.0 s as two jobs of two
    threads each, 5.3-5.6 s one after another with both threads (bench/quant_parallel.py).
    Each job gets at least `_QUANT_MIN_THREADS`, the cores shared out beyond that.
    """
    cores = os.cpu_count() or 1
    by_memory = max(1, budget // max(1, per_job))
    workers = max(1, min(parallel or n_jobs or 1, cores, by_memory))
    return workers, max(_QUANT_MIN_THREADS, cores // workers)


# ---------------------------------------------------------------- the work


def convert_and_quantize(
    source: ResolvedSource,
    request: ExportRequest,
    toolchain: Toolchain,
    adapter: AdapterInfo | None = None,
    parallel: int | None = None,
    imatrix: ImatrixRecord | None = None,
) -> dict[str, Path]:
    """The heavy part: one cached float conversion, the adapter applied (merge/peft), then every quant type.

    Returns cache paths, the float GGUF first. In adapter mode the base is quantized as is
    (the GGUF LoRA ships beside it); in merge/peft mode the merged float GGUF is.
    """
    from tasks.preflight import gguf_file_type

    logger = get_run_logger()
    key = conversion_key(source)  # the model name is written into every GGUF made from it
    config = _config(source)
    if source.kind == "gguf":
        base, base_label = Path(source.path), gguf_file_type(Path(source.path))
        logger.info("prebuilt %s GGUF: no conversion", base_label)
    else:
        base_label = request.outtype
        task = convert_to_gguf.task  # publishes its own progress artifact while converting (tasks/convert.py)
        args = (Path(source.path), key, request.outtype, toolchain, gguf_model_name(source))
        state = task(*args, return_state=True)
        base, reused = state.result()
        if _was_cached(state) and not cache_entry_intact(base):
            logger.warning("cached conversion %s is gone or changed since stamped; converting again", base.name)
            state = task.with_options(refresh_cache=True)(*args, return_state=True)
            base, reused = state.result()
        how = "cached (Prefect)" if _was_cached(state) else "reused from disk cache" if reused else "converted"
        logger.info("base %s GGUF %s: %s", base_label, how, base.name)
    if adapter is not None and request.adapter_mode != "adapter":
        applied = apply_adapter.task(adapter, request.adapter_mode, base_dir=Path(source.path), base_gguf=base,
                                     base_key=key, toolchain=toolchain, outtype=request.outtype,
                                     model_name=gguf_model_name(source))
        logger.info("adapter %s (%s): %s", adapter.sha256[:12], request.adapter_mode,
                    "reused" if applied.reused else f"applied in {applied.seconds:g} s")
        if request.adapter_mode == "merge" and applied.lora_gguf:
            logger.warning("the adapter's place in the base could not be read off the base's conversion; "
                           "it went through convert_lora_to_gguf.py (%s)", Path(applied.lora_gguf).name)
        base = Path(applied.gguf)
        # Quantizations of a merged model are cache entries of their own.
        key = f"{key}-{adapter.sha256[:16]}"
    results = {base_label: base}

    todo = [q for q in request.quants if q != base_label]
    if not todo:
        return results
    recipe = load_recipe(request.recipe) if request.recipe else None
    if recipe is not None:
        check_recipe_against(recipe, base, f"recipe {request.recipe}")  # the first moment the tensor names are known
    quant_kwargs: dict[str, Any] = {"recipe": recipe} if recipe is not None else {}
    if imatrix is not None:  # every type made with the export's matrix: cache entries of their own
        quant_kwargs["imatrix"] = Path(imatrix.path)
        key = f"{key}-imat{imatrix.sha256[:12]}"

    def label(quant: str) -> str:
        return quant_label(quant, imatrix is not None, recipe)

    def cache_path(quant: str) -> Path:
        # A recipe's quantization is a cache entry of its own, named by what the recipe does.
        variant = quant if recipe is None else f"{label(quant)}-{recipe.sha256[:12]}"
        return gguf_cache_path(key, variant, toolchain)
    per_job = quant_job_memory(base, config)
    budget = quant_memory_budget()
    workers, threads = quant_parallelism(len(todo), per_job, budget, parallel)
    logger.info("quantizing %s: %d at a time, %d thread(s) each (memory budget %.1f GB, %.2f GB a job)",
                ", ".join(todo), workers, threads, budget / 1e9, per_job / 1e9)
    progress = progress_reporter(f"quantize {source.id}: {', '.join(todo)}", key="kiln-quantize")
    task = quantize_gguf.task
    done = 0

    def finish(quant: str, future: Any) -> None:
        nonlocal done
        path = future.result()
        if _was_cached(future.state) and not cache_entry_intact(path):
            logger.warning("cached %s quantization %s is gone or changed since stamped; quantizing again", quant, path.name)
            path = task.with_options(refresh_cache=True)(base, cache_path(quant), quant, threads, workers,
                                                         **quant_kwargs)
        results[quant] = path
        done += 1
        progress(done / len(todo))

    # All submitted at once; inside, `workers` run libllama together (the memory budget), the rest wait.
    running = [(quant, task.submit(base, cache_path(quant), quant, threads, workers, **quant_kwargs))
               for quant in todo]
    for quant, future in running:
        finish(quant, future)
    return {base_label: base, **{label(q): results[q] for q in todo}}


def accelerators() -> dict[str, bool]:
    """What this worker can offload to: llama.cpp's GPU backend, torch's CUDA."""
    found = {"llama.cpp GPU offload": False, "torch CUDA": False}
    try:
        import llama_cpp

        found["llama.cpp GPU offload"] = bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:
        pass
    try:
        import torch

        found["torch CUDA"] = bool(torch.cuda.is_available())
    except Exception:
        pass
    return found


@contextmanager
def gpu_slot(placement: str) -> Iterator[None]:
    """On the gpu pool, hold one slot of the `gpu` tag's concurrency limit for the whole job.

    The limit is created with `prefect concurrency-limit create gpu N` (N = GPUs); with none
    defined the job runs at once. Tasks inside must not carry the `gpu` tag themselves (they
    would wait for the slot their own flow run holds).
    """
    if placement != "gpu":
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency("tag:gpu", occupy=1, strict=False):
        yield


def ensure_local_source(source: ResolvedSource, request: ExportRequest) -> ResolvedSource:
    """The source as this machine sees it: as given when its path exists here, else fetched again here.

    A worker on another machine re-fetches a Hub source into its own Hugging Face cache (pinned
    revision, hashes checked) or rebuilds the demo folder; the content must be byte-identical.
    """
    if Path(source.path).exists():
        return source
    from tasks.fetch import fetch_source, locate_metadata, source_ref

    ref = source_ref(request)
    metadata, derived_from = locate_metadata(ref)
    local = fetch_source(ref, metadata, derived_from)
    if content_key(local.files) != content_key(source.files):
        raise PlacementFailed(
            f"{source.id} on this worker differs from what the export fetched ({source.path}): "
            "the files' hashes do not match; pin the revision or share the source folder"
        )
    return local


def _run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    source, request = params.get("source", {}), params.get("request", {})
    sid = source.get("id") if isinstance(source, dict) else getattr(source, "id", "?")
    quants = request.get("quants") if isinstance(request, dict) else getattr(request, "quants", [])
    return f"{sid}: {', '.join(quants or [])}"


@flow(name=FLOW_NAME, persist_result=True, flow_run_name=_run_name)
def convert_quantize(source: ResolvedSource, request: ExportRequest, toolchain_key: str | None = None,
                     adapter: AdapterInfo | None = None, imatrix: ImatrixRecord | None = None) -> dict[str, str]:
    """Convert the base to a float GGUF (cached) and make every quant type from it; returns quant → GGUF path.

    Started by the export flow for `placement: cpu | gpu`; the paths are in this worker's
    KILN_CACHE_DIR, which the export's worker must see too (same machine, or shared storage).
    """
    from tasks.policy import enforce_on_convert
    from tasks.secrets import load_secrets

    enforce_on_convert(source, request)  # its form is in the UI too: the operator's policy on deployment runs
    load_secrets()
    logger = get_run_logger()
    toolchain = current_toolchain()
    if toolchain_key and toolchain.cache_key != toolchain_key:
        raise ToolchainError(
            f"this worker's llama.cpp toolchain (llama-cpp-python {toolchain.llama_cpp_python}, converter "
            f"{toolchain.converter_sha256[:12]}…) differs from the export's ({toolchain_key}); install the same "
            "llama-cpp-python version on every worker"
        )
    if request.placement == "gpu":
        logger.info("accelerators on this worker: %s",
                    ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in accelerators().items()))
    source = ensure_local_source(source, request)
    with gpu_slot(request.placement):
        paths = convert_and_quantize(source, request, toolchain, adapter, imatrix=imatrix)
    return {quant: str(path) for quant, path in paths.items()}


# ---------------------------------------------------------------- dispatch from the export flow


def _check_pool(pool: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            work_pool = client.read_work_pool(pool)
        except ObjectNotFound:
            raise PlacementFailed(
                f"placement {pool!r}: the Prefect server has no {pool!r} work pool; create it with "
                f"`prefect work-pool create {pool} --type process` (docs/deployments.md), or use placement local"
            ) from None
    status = str(getattr(work_pool.status, "value", work_pool.status) or "").upper()
    if work_pool.is_paused or status == "PAUSED":
        raise PlacementFailed(f"placement {pool!r}: the {pool!r} work pool is paused; resume it or use another placement")
    if status != "READY":
        raise PlacementFailed(
            f"placement {pool!r}: no worker is polling the {pool!r} work pool; start one with "
            f"`prefect worker start --pool {pool}`, or use another placement"
        )


def run_placed(source: ResolvedSource, request: ExportRequest, toolchain: Toolchain,
               adapter: AdapterInfo | None = None, imatrix: ImatrixRecord | None = None) -> dict[str, Path]:
    """Conversion and quantization where the request says: inline, or on a `cpu`/`gpu` worker and wait."""
    if request.placement == "local":
        return convert_and_quantize(source, request, toolchain, adapter, imatrix=imatrix)
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    pool = request.placement
    name = f"{FLOW_NAME}/{pool}"
    _check_pool(pool)
    logger = get_run_logger()
    logger.info("running %s on the %s pool and waiting for it", name, pool)
    try:
        child = run_deployment(
            name,
            parameters={"source": source.model_dump(mode="json"), "request": request.model_dump(mode="json"),
                        "toolchain_key": toolchain.cache_key,
                        "adapter": adapter.model_dump(mode="json") if adapter else None,
                        "imatrix": imatrix.model_dump(mode="json") if imatrix else None},
            timeout=None,
            poll_interval=settings.placement_poll_seconds(),
        )
    except ObjectNotFound:
        raise PlacementFailed(
            f"placement {pool!r}: no {name!r} deployment on the Prefect server; deploy them with "
            "`prefect deploy --all --prefect-file deployments/prefect.yaml`, or use placement local"
        ) from None
    state = child.state
    if state is None or not state.is_completed():
        raise PlacementFailed(
            f"{name} (flow run {child.name}) ended {state.name if state else 'without a state'}"
            + (f": {state.message}" if state is not None and state.message else "")
        )
    try:
        paths = {quant: Path(p) for quant, p in state.result().items()}
    except Exception as exc:
        raise PlacementFailed(
            f"{name} completed but its result could not be read here ({exc}); workers on several machines "
            "need shared result storage (PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK, docs/deployments.md)"
        ) from None
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise PlacementFailed(
            f"{name} wrote {', '.join(missing)}, which this worker cannot see; point KILN_CACHE_DIR on every "
            "worker at the same shared folder (docs/deployments.md)"
        )
    return paths
