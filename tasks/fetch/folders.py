"""Local model folders: which files conversion reads, their fingerprints, config.json, and checks on the files.

Shared by local sources and by Hub snapshots (a snapshot is a folder too).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from registry.models import SourceFile
from tasks import safetensors_file
from tasks.errors import PickleRefused, RemoteCodeRefused, SourceCorrupt, SourceInvalid
from tasks.fetch.ref import SourceRef, display_source
from tasks.files import read_json_object
from tasks.source_hashes import remembered_sha256

log = logging.getLogger("kiln.fetch")

# What conversion reads from a Hugging Face folder besides the weights; everything else is ignored.
METADATA_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
WEIGHT_PATTERNS = ("*.safetensors", SAFETENSORS_INDEX)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
PICKLE_DANGER = (
    "pickle files (*.bin, *.pt, *.pth) can run arbitrary code when they are loaded: unpickling executes "
    "whatever the file embeds, with your user's rights on this machine"
)
DEFAULT_BOS_TOKEN_ID = 1
DEFAULT_EOS_TOKEN_ID = 2


# --------------------------------------------------------------------------- folder plumbing


def safe_relpath(name: str, where: str) -> str:
    """`name` as a plain relative POSIX path, or SourceCorrupt when it would leave its folder."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise SourceCorrupt(f"{where}: file path {name!r} is not a plain relative path; refusing it")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or name.startswith("~"):
        raise SourceCorrupt(f"{where}: file path {name!r} escapes the model folder; refusing it")
    return pure.as_posix()


def _folder_names(folder: Path) -> set[str]:
    """Relative paths of the files in `folder` (symlinks to blobs count as files)."""
    names = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            rel = Path(dirpath, f).relative_to(folder).as_posix()
            names.add(rel)
    return names


def read_index(folder: Path, name: str = SAFETENSORS_INDEX) -> dict[str, str]:
    """The index's weight_map (tensor -> shard path), every shard path checked not to escape the folder."""
    data = read_json_object(folder / name, SourceCorrupt, "the shard index is damaged: re-download it")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceCorrupt(f"{folder / name}: no weight_map; the index names no shard")
    return {str(t): safe_relpath(s, f"{name} in {folder}") for t, s in weight_map.items()}


def plan_weights(names: set[str], folder: Path | None, *, allow_pickle: bool, where: str) -> list[str]:
    """The weight files conversion reads, given the files a repo or folder has.

    With a safetensors index: the index and exactly the shards it names (every
    one must exist). Else the top-level `*.safetensors`. Else pickles, only with
    `allow_pickle`. `folder` holds the index (it is downloaded with the metadata).
    """
    if SAFETENSORS_INDEX in names:
        if folder is None or not (folder / SAFETENSORS_INDEX).is_file():
            raise SourceCorrupt(f"{where}: {SAFETENSORS_INDEX} is listed but was not fetched")
        shards = sorted(set(read_index(folder, SAFETENSORS_INDEX).values()))
        missing = [s for s in shards if s not in names]
        if missing:
            raise SourceCorrupt(
                f"{where}: {SAFETENSORS_INDEX} names shard(s) {', '.join(missing)}, which it does not hold; "
                "the model is incomplete, refusing it before conversion"
            )
        return [SAFETENSORS_INDEX, *shards]
    top = sorted(n for n in names if "/" not in n and n.endswith(".safetensors"))
    if top:
        return top
    pickles = sorted(n for n in names if "/" not in n and n.endswith(PICKLE_SUFFIXES))
    if pickles:
        if not allow_pickle:
            raise PickleRefused(
                f"{where} has no safetensors weights, only pickles ({', '.join(pickles)}); {PICKLE_DANGER}. "
                "Kiln does not download or read them unless you pass --allow-pickle (allow_pickle=True), and then "
                "only for a source you trust. A revision or fork with *.safetensors is the safe choice."
            )
        log.warning("%s: using pickle weights %s because allow_pickle is set: %s", where, ", ".join(pickles),
                    PICKLE_DANGER)
        if PICKLE_INDEX in names and folder is not None and (folder / PICKLE_INDEX).is_file():
            shards = sorted(set(read_index(folder, PICKLE_INDEX).values()))
            missing = [s for s in shards if s not in names]
            if missing:
                raise SourceCorrupt(f"{where}: {PICKLE_INDEX} names missing shard(s) {', '.join(missing)}")
            return [PICKLE_INDEX, *shards]
        return [n for n in pickles if n.startswith("pytorch_model")] or pickles
    raise SourceInvalid(f"{where} holds no weights: no *.safetensors (and no pickle weights)")


def model_files(folder: Path, *, allow_pickle: bool = False) -> list[Path]:
    """The files of `folder` that conversion reads, in a stable order.

    The metadata files present, plus the weights `plan_weights` picks: with an
    index, only the shards it names (a stray `consolidated.safetensors` is not
    hashed or read).
    """
    names = _folder_names(folder)
    metadata = [n for n in METADATA_PATTERNS if n in names]
    try:
        weights = plan_weights(names, folder, allow_pickle=allow_pickle, where=str(folder))
    except SourceInvalid:
        weights = []
    return sorted({folder / n for n in (*metadata, *weights)}, key=lambda p: p.relative_to(folder).as_posix())


def fingerprint(paths: list[Path], root: Path, previous: list[SourceFile] | None = None) -> list[SourceFile]:
    """sha256 of every file used; a file whose size and mtime match `previous` keeps its recorded hash.

    Trusting size+mtime is what lets an unchanged re-run answer in a second
    (the same bargain git's index makes); the output files are always re-hashed.
    """
    known = {f.path: f for f in previous or ()}
    records = []
    for path in paths:
        stat = path.stat()
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        old = known.get(rel)
        if old and old.size == stat.st_size and old.mtime_ns == stat.st_mtime_ns:
            records.append(old)
        else:
            records.append(SourceFile(path=rel, size=stat.st_size, sha256=remembered_sha256(path),
                                      mtime_ns=stat.st_mtime_ns))
    return records


def read_config(folder: Path) -> dict:
    """`config.json` as a dict, or an error that says what is wrong with it."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SourceInvalid(
            f"{folder} has no config.json, so it is not a Hugging Face model folder. "
            "Point SOURCE at the folder that holds config.json, the tokenizer files and *.safetensors."
        )
    return read_json_object(config_path, SourceInvalid, "re-download or fix it")


@dataclass(frozen=True)
class ModelFamily:
    """What `config.json` says about the model (seed 004): architecture, BOS and EOS ids."""

    architecture: str | None
    bos_token_id: int
    eos_token_id: int | list[int]


def model_family(config: dict) -> ModelFamily:
    """`architectures[0]`, and the BOS/EOS ids with the defaults 1 and 2 where config.json gives none."""
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}

    def pick(key: str, default: int):
        for where in (config, text):
            value = where.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
                return value if len(value) > 1 else value[0]
        return default

    bos = pick("bos_token_id", DEFAULT_BOS_TOKEN_ID)
    if isinstance(bos, list):
        bos = bos[0]
    return ModelFamily(architecture=arch, bos_token_id=bos, eos_token_id=pick("eos_token_id", DEFAULT_EOS_TOKEN_ID))


def check_remote_code(folder: Path, ref: SourceRef) -> None:
    """Refuse a model that needs custom code (`auto_map`) unless its spec trusts remote code."""
    needing = []
    for name in ("config.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(data, dict) and data.get("auto_map"):
                    if name == "config.json" and _transformers_ships(data):
                        continue
                    mapping = data["auto_map"]
                    modules = sorted({str(v).split(".")[0] for v in _flat(mapping) if "." in str(v)})
                    needing.append(f"{name} auto_map → {', '.join(modules) or mapping}")
    if needing and not ref.trust_remote_code:
        raise RemoteCodeRefused(
            f"{display_source(ref)} needs custom Python code from the repository ({'; '.join(needing)}). "
            "Running it means executing the author's code on this machine, so Kiln refuses unless the model's "
            "registry spec says `trust_remote_code: true` (a curator read the code)."
        )


def _transformers_ships(config: dict) -> bool:
    """Whether transformers has its own classes for this config's model type and architecture.

    Then `auto_map` is never used: Kiln loads models without `trust_remote_code`, so transformers
    takes its own implementation (Phi-3.5 and Phi-4-mini still ship `auto_map` from before
    transformers had Phi3). Custom code is refused only where it would be needed.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    return (model_type in CONFIG_MAPPING_NAMES and len(architectures) == 1
            and MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) == architectures[0])


def _flat(value) -> list:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flat(v)]
    if isinstance(value, list):
        return [x for v in value for x in _flat(v)]
    return [value]


# --------------------------------------------------------------------------- checks on the files


def check_safetensors(path: Path, name: str) -> list[str]:
    """Tensor names in a safetensors file; SourceCorrupt when the header's data_offsets disagree with its size."""
    try:
        header = safetensors_file.read_header(path)
        safetensors_file.check_whole(header, path)
    except safetensors_file.SafetensorsFileError as exc:
        # Named as the source names it (a repo path), not by its place in the Hub cache.
        raise SourceCorrupt(str(exc).replace(str(path), name, 1)) from None
    return list(header.tensors)


def check_gguf_magic(path: Path, name: str) -> None:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise SourceCorrupt(f"{name}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")


def check_gguf_complete(path: Path, name: str) -> None:
    """A GGUF whose tensor table fits its size: magic, readable header, every tensor's data inside the file.

    What libllama finds only when it loads the file ("data is not within the file bounds"), seconds
    into quantization; here it costs one pass over the header (tasks.gguf_file.read_layout).
    """
    from tasks.gguf_file import GGUFFileError, read_layout

    check_gguf_magic(path, name)
    try:
        layout = read_layout(path)
    except GGUFFileError as exc:
        raise SourceCorrupt(f"{name}: the GGUF header cannot be read ({exc}); the file is truncated or damaged, "
                            "download or convert it again") from None
    end, last = layout.data_offset, None
    for tensor in layout.tensors:
        # A type gguf-py does not know has no size (-1): its start must still lie inside the file.
        tensor_end = layout.data_offset + tensor.offset + max(tensor.nbytes, 0)
        if tensor_end > end:
            end, last = tensor_end, tensor.name
    if layout.file_size < end:
        raise SourceCorrupt(f"{name}: truncated: its tensor table describes {end} bytes (up to the end of tensor "
                            f"{last!r}) but the file has {layout.file_size}; download or convert it again")


def check_weights(folder: Path, weights: list[str], where: str) -> None:
    """Every safetensors shard's header against its size, and the index's tensors against the shards."""
    holds: dict[str, set[str]] = {}
    for rel in weights:
        if rel.endswith(".safetensors"):
            holds[rel] = set(check_safetensors(folder / rel, f"{where}: {rel}"))
    if SAFETENSORS_INDEX in weights:
        for tensor, shard in read_index(folder, SAFETENSORS_INDEX).items():
            if tensor not in holds.get(shard, ()):
                raise SourceCorrupt(f"{where}: {SAFETENSORS_INDEX} puts tensor {tensor!r} in {shard}, which does "
                                    "not hold it; the index and shards come from different checkpoints")

