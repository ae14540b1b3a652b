"""`manifest.json`: what was exported from what, with which tools, and what was checked.

A re-run with the same inputs reads it, re-hashes the outputs, and does nothing
when everything matches. That check runs before the orchestration engine is
imported, so an up-to-date export answers in about a second.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from pydantic import ValidationError

from registry.models import ExportRequest, Manifest, OutputFile, SourceFile
from tasks.errors import KilnError
from tasks.fetch import SourceRef, fingerprint, model_files, source_ref
from tasks.files import content_key, safe_child, sha256_file, write_text_atomic
from tasks.toolchain import Toolchain, current_toolchain

MANIFEST_NAME = "manifest.json"
KILN_VERSION = "0.1.0"

# Raised whenever Kiln writes other bytes for the same request, source and toolchain, so that an
# export made before counts as out of date. 2: the converter is given the publisher's spelling of
# the model's name (`general.name`, which libllama reads for Phi-3's tokenization).
WRITER_GENERATION = 2

# Request fields that do not change what is written.
_NON_OUTPUT_FIELDS = {"out_dir", "verify", "accept_license", "placement"}


def request_key(request: ExportRequest, files: list[SourceFile], toolchain: Toolchain, extra: str = "") -> str:
    """Everything that determines the outputs: the request's output fields, the source content, the toolchain, Kiln's writer."""
    fields = request.model_dump(exclude=_NON_OUTPUT_FIELDS)
    payload = json.dumps({"request": fields, "content": content_key(files), "toolchain": toolchain.cache_key,
                          "extra": extra, "writer": WRITER_GENERATION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def inputs_beyond_source(request: ExportRequest) -> str:
    """What else decides the outputs besides the source files: the adapter's identity, the recipe's content."""
    extra = []
    if request.adapter:
        from tasks.adapter import adapter_identity

        extra.append(f"adapter:{adapter_identity(Path(request.adapter))}")
    if request.recipe:
        from tasks.recipe import load_recipe

        recipe = load_recipe(request.recipe)  # a recipe edited since the last export makes other files
        extra.append(f"recipe:{recipe.name}:{recipe.sha256}")
    if request.imatrix:
        from tasks.imatrix import imatrix_input_sha256

        # The calibration text's or matrix file's content: the same path edited makes other files.
        extra.append(f"imatrix:{imatrix_input_sha256(request.imatrix)}")
    return " ".join(extra)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_manifest(out_dir: Path, manifest: Manifest) -> Path:
    path = out_dir / MANIFEST_NAME
    write_text_atomic(path, manifest.model_dump_json(indent=2) + "\n")
    return path


def read_manifest(out_dir: Path) -> Manifest | None:
    """The manifest in `out_dir`, or None when there is none or it is not one of ours."""
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return Manifest.model_validate_json(path.read_text(encoding="utf-8"))
    except (ValidationError, UnicodeDecodeError):
        return None


def outputs_intact(out_dir: Path, outputs: list[OutputFile]) -> list[str]:
    """Problems with the recorded outputs (missing, resized, re-hashed differently); empty when all match."""
    problems = []
    for out in outputs:
        path = safe_child(out_dir, out.path)
        if not path.is_file():
            problems.append(f"{out.path} is missing")
        elif path.stat().st_size != out.size:
            problems.append(f"{out.path} has size {path.stat().st_size}, manifest says {out.size}")
        elif sha256_file(path) != out.sha256:
            problems.append(f"{out.path} does not match its recorded sha256")
    return problems


def _current_source_files(ref: SourceRef, manifest: Manifest) -> list[SourceFile] | None:
    """The recorded source's files fingerprinted where they lie now; None when they are gone or moved.

    Works the same for every source kind because the manifest says where each file was;
    a Hub source is found in the cache without asking the network.
    """
    src = manifest.source
    if (ref.id, ref.revision) != (src.id, src.revision) or not src.files:
        return None
    if ref.kind == "demo":
        from tasks.demo import ensure_demo_model

        if ensure_demo_model()[1] != src.derived_from:
            return None
    root = Path(src.path)
    if src.kind == "gguf":
        root = root.parents[len(Path(src.files[0].path).parts) - 1]
    try:
        # A local folder may have gained or lost files; every other source is exactly what was recorded.
        paths = model_files(root, allow_pickle=ref.allow_pickle) if src.kind == "local" else [
            root / f.path for f in src.files]
    except KilnError:
        return None  # let the export's preflight say what is wrong with it
    if not all(p.is_file() for p in paths):
        return None
    return fingerprint(paths, root, src.files)


def find_up_to_date(request: ExportRequest) -> tuple[Manifest | None, str]:
    """The existing manifest when the outputs are exactly what this request would write, and why not otherwise."""
    out_dir = Path(request.out_dir)
    manifest = read_manifest(out_dir)
    if manifest is None:
        return None, "no manifest yet"
    # Where the folder lies and whether checks ran do not change what the files are.
    ignored = {"verify", "out_dir", "placement"}
    same_request = manifest.request.model_dump(exclude=ignored) == request.model_dump(exclude=ignored)
    if not same_request:
        return None, "the request differs from the last export"
    files = _current_source_files(source_ref(request), manifest)
    if files is None:
        return None, "the source is not where the last export found it"
    if request_key(request, files, current_toolchain(), inputs_beyond_source(request)) != manifest.request_key:
        return None, "the source, the toolchain or Kiln's writer changed"
    problems = outputs_intact(out_dir, manifest.outputs)
    if problems:
        return None, "; ".join(problems)
    return manifest, "up to date"
