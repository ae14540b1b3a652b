"""The operator's policy for deployment runs: where outputs go, what may be read, which switches may be on.

A Prefect deployment's form is open to whoever can reach the UI; a flow run executes on the
worker's machine, beside its GPU, cache and Hub token. So what a deployment run may do is set
by the operator on the worker's side (`KILN_POLICY_FILE`, a YAML file; `deployments/policy.yaml`
shows every key), never by the run's parameters:

- outputs are written only under `output_roots`; local sources, adapters, importance matrices,
  calibration texts, recipes and catalogues are read only from `source_roots` (a catalogue may also lie in the deployment's working folder);
- `allow_pickle` and `trust_remote_code` may be turned on only where the policy allows them
  (default: no; a registry base whose spec trusts remote code counts as turning it on);
- `registry_keys` / `hub_orgs`, when given, limit what may be exported.

Paths are compared after resolving symlinks and `..`, so a link or a `../..` cannot lead out
of a root. With no policy file, a deployment run gets the defaults: both roots are the flow
run's working folder (the checkout the deployment's pull step enters), both switches off.

The `kiln` command on a user's own machine is not a deployment run and keeps its freedom. A
deployment run is a flow run with a deployment, or any flow run in a process a worker started
for one (`PREFECT__FLOW_RUN_ID` is set): a batch's export subflows run in the batch's process.
Every check runs before the flow makes a folder; a refusal is one `PolicyRefused` line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks.errors import KilnError
from tasks.settings import policy_file

if TYPE_CHECKING:
    from flows.batch import CatalogueItem
    from registry.models import ExportRequest, ResolvedSource

_HF_REPO = re.compile(r"^hf:(?P<org>[^/@#\s]*)/")
POLICY_ENV = "KILN_POLICY_FILE"


class PolicyRefused(KilnError):
    """A deployment run asked for something the operator's policy does not allow."""


class DeploymentPolicy(BaseModel):
    """What a deployment run may do (`KILN_POLICY_FILE`); unset fields keep the safe defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output_roots: list[Path] = Field(
        default_factory=list,
        description="Absolute folders outputs may be written under; empty: the flow run's working folder.")
    source_roots: list[Path] = Field(
        default_factory=list,
        description="Absolute folders local sources, adapters and catalogues may be read from; empty: the working folder.")
    allow_pickle: bool = Field(False, description="Whether a run may set allow_pickle (unpickling runs code).")
    allow_trust_remote_code: bool = Field(
        False, description="Whether a run may execute a model's own code (trust_remote_code, or a registry spec that trusts it).")
    registry_keys: list[str] | None = Field(None, description="Registry keys that may be exported; unset: any.")
    hub_orgs: list[str] | None = Field(
        None, description="Hub organisations hf: sources, hf: adapters and registry bases may come from; unset: any.")

    @field_validator("output_roots", "source_roots")
    @classmethod
    def _absolute(cls, roots: list[Path]) -> list[Path]:
        for root in roots:
            if not root.expanduser().is_absolute():
                raise ValueError(f"{root} is not an absolute folder; write the whole path")
        # Resolved once: a root that is itself a symlink is the folder it points at.
        return [Path(os.path.realpath(root.expanduser())) for root in roots]

    def outputs(self) -> list[Path]:
        return self.output_roots or [Path.cwd().resolve()]

    def sources(self) -> list[Path]:
        return self.source_roots or [Path.cwd().resolve()]


def load_policy(path: Path | None) -> DeploymentPolicy:
    """The policy in `path` (YAML), or the defaults when None; `PolicyRefused` for a file Kiln cannot use."""
    from registry import format_validation_error, load_yaml
    from tasks.errors import SpecInvalid

    if path is None:
        return DeploymentPolicy()
    try:
        raw = load_yaml(path, "policy")
    except SpecInvalid as exc:
        raise PolicyRefused(f"{POLICY_ENV}: {exc}") from None
    if raw is None:
        return DeploymentPolicy()
    if not isinstance(raw, dict):
        raise PolicyRefused(f"{POLICY_ENV}: {path}: expected a mapping of policy keys, found {type(raw).__name__}")
    try:
        return DeploymentPolicy.model_validate(raw)
    except ValidationError as exc:
        raise PolicyRefused(f"{POLICY_ENV}: {path}: {format_validation_error(exc, DeploymentPolicy)}") from None


def is_deployment_run() -> bool:
    """True in a flow run started from a deployment, and in every flow of a process a worker started.

    Read from the run context and the variable the worker sets for the process it starts, not
    from `prefect.runtime` (whose values a run's own environment may override).
    """
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is not None and context.flow_run is not None and context.flow_run.deployment_id is not None:
        return True
    return bool(os.environ.get("PREFECT__FLOW_RUN_ID"))


def deployment_policy() -> DeploymentPolicy | None:
    """The operator's policy when this is a deployment run, else None (the `kiln` command's own runs)."""
    if not is_deployment_run():
        return None
    _refuse_per_run_override()
    return load_policy(policy_file())


def _refuse_per_run_override() -> None:
    """A run's own job variables (the UI's custom run) may not name another policy file."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    job_variables = (context.flow_run.job_variables or {}) if context is not None and context.flow_run else {}
    env = job_variables.get("env") if isinstance(job_variables, dict) else None
    if isinstance(env, dict) and any(str(name).startswith("KILN_POLICY") for name in env):
        raise PolicyRefused(f"this run's job variables set {POLICY_ENV}; the policy is the operator's, set where "
                            "the worker starts, not per run")


# ---------------------------------------------------------------- confinement


def resolved(path: str | Path) -> Path:
    """`path` made absolute against the working folder, symlinks and `..` resolved (the parts that exist)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def confine(path: str | Path, roots: list[Path], what: str, setting: str) -> Path:
    """The resolved `path` when it lies under one of `roots`; else `PolicyRefused` naming both."""
    real = resolved(path)
    if any(real == root or real.is_relative_to(root) for root in roots):
        return real
    shown = f"{path} (resolves to {real})" if str(real) != str(path) else str(path)
    allowed = ", ".join(str(r) for r in roots)
    raise PolicyRefused(f"{what} {shown} is outside the folders this server's policy allows ({allowed}); "
                        f"choose a folder under one of them, or ask the operator to add it to `{setting}`")


def _hub_org(org: str, policy: DeploymentPolicy, what: str) -> None:
    if policy.hub_orgs is not None and org not in policy.hub_orgs:
        raise PolicyRefused(f"{what} comes from the Hub organisation {org!r}, which this server's policy does not "
                            f"allow (allowed: {', '.join(policy.hub_orgs) or 'none'}); ask the operator to add it to `hub_orgs`")


def check_source(source: str, policy: DeploymentPolicy) -> None:
    """The source string: a folder or file under `source_roots`, an allowed registry key, or an allowed Hub org."""
    from registry import load_registry

    source = source.strip()
    if source == "demo":
        return
    if match := _HF_REPO.match(source):
        _hub_org(match["org"], policy, f"source {source!r}")
        return
    registry = load_registry()
    if not Path(source).expanduser().exists() and source in registry:
        spec = registry[source]
        if policy.registry_keys is not None and source not in policy.registry_keys:
            raise PolicyRefused(f"registry key {source!r} is not one this server's policy exports (allowed: "
                                f"{', '.join(policy.registry_keys) or 'none'}); ask the operator to add it to `registry_keys`")
        _hub_org(spec.hf_id.split("/")[0], policy, f"registry key {source!r} ({spec.hf_id})")
        if spec.trust_remote_code and not policy.allow_trust_remote_code:
            raise PolicyRefused(f"registry key {source!r} runs the model's own code (its spec trusts remote code), "
                                "which this server's policy does not allow (`allow_trust_remote_code`)")
        return
    if not Path(source).expanduser().exists() and "/" not in source and not source.startswith((".", "~")):
        return  # neither a folder nor a key: the export itself refuses it as an unknown registry key
    confine(source, policy.sources(), "source", "source_roots")


def check_switches(request: ExportRequest, policy: DeploymentPolicy) -> None:
    if request.allow_pickle and not policy.allow_pickle:
        raise PolicyRefused("allow_pickle is on, and this server's policy does not allow pickled weights (unpickling "
                            "runs code on the worker); export safetensors, or run `kiln export` on your own machine")
    if request.trust_remote_code and not policy.allow_trust_remote_code:
        raise PolicyRefused("trust_remote_code is on, and this server's policy does not allow a model's own code to run "
                            "on the worker; pick a model the converter supports, or run `kiln export` on your own machine")


def check_request(request: ExportRequest, policy: DeploymentPolicy, outputs: bool = True) -> None:
    """Every rule for one export request: switches, source, adapter, importance matrix, recipe and (with
    `outputs`) the output folder."""
    check_switches(request, policy)
    check_source(request.source, policy)
    if request.adapter:
        if match := _HF_REPO.match(request.adapter):
            _hub_org(match["org"], policy, f"adapter {request.adapter!r}")
        else:
            confine(request.adapter, policy.sources(), "adapter", "source_roots")
    # An importance matrix or calibration text and a recipe are files the run reads, as an adapter is.
    if request.imatrix and request.imatrix != "auto":
        confine(request.imatrix, policy.sources(), "importance matrix", "source_roots")
    if request.recipe:
        confine(request.recipe, policy.sources(), "recipe", "source_roots")
    if outputs:
        confine(request.out_dir, policy.outputs(), "output folder", "output_roots")


# ---------------------------------------------------------------- the flows' entry points


def enforce_on_export(request: ExportRequest) -> None:
    """At the start of the `export` flow, before its output folder exists: refuse what the policy does not allow."""
    policy = deployment_policy()
    if policy is not None:
        check_request(request, policy)


def enforce_on_batch(catalogue: str, out_root: str | None) -> DeploymentPolicy | None:
    """At the start of `batch-export`: the catalogue file and `out_root`; returns the policy for the items."""
    policy = deployment_policy()
    if policy is None:
        return None
    confine(catalogue, [*policy.sources(), Path.cwd().resolve()], "catalogue", "source_roots")
    if out_root is not None:
        confine(out_root, policy.outputs(), "out_root", "output_roots")
    return policy


def enforce_on_convert(source: ResolvedSource, request: ExportRequest) -> None:
    """At the start of `convert-quantize` (its form is in the UI too): switches, source and adapter.

    The output folder is the export's business (this flow writes only into the Kiln cache). The
    source is checked as the export resolved it: a local one under `source_roots`, a downloaded
    one in the Kiln or Hub cache, its registry key or Hub organisation as for an export.
    """
    from huggingface_hub import constants

    from tasks.fetch.hub import hub_env
    from tasks.settings import cache_root

    policy = deployment_policy()
    if policy is None:
        return
    check_request(request.model_copy(update={"source": "demo"}), policy, outputs=False)
    if source.kind == "registry" and source.registry_key:
        check_source(source.registry_key, policy)
    elif source.kind == "hf":
        _hub_org(source.id.split("/")[0], policy, f"source hf:{source.id}")
    where = policy.sources()
    if source.kind not in ("local", "gguf"):
        where = [*where, resolved(cache_root()), resolved(hub_env().cache_dir or constants.HF_HUB_CACHE)]
    confine(source.path, where, "source", "source_roots")


def item_refusals(items: Sequence[CatalogueItem], policy: DeploymentPolicy) -> list[str]:
    """Each catalogue item the policy refuses, as `item 'name' (where): reason` (all of them, not the first)."""
    refusals = []
    for item in items:
        try:
            check_request(item.request, policy)
        except PolicyRefused as exc:
            refusals.append(f"item {item.name!r} ({item.where}): {exc}")
    return refusals
