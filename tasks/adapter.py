"""LoRA adapters: validate against the base, then merge by streaming, ship as a GGUF LoRA, or merge with peft.

Three modes (`AdapterMode`):

- `merge` (default): `W + scale · B @ A` is streamed into a copy of the base's cached float GGUF,
  one tensor at a time from memory-mapped inputs (peak memory: a few tensors). The LoRA must land
  on the GGUF tensors exactly as llama.cpp's converter would put it: under the converter's names,
  with lora_B's rows permuted the way it permutes the base's (llama's Q/K). Both are read off the
  converter's own output for this base (`learn_lora_layout`): each adapted HF weight is found in
  the base GGUF by gguf-py's name map and verified row by row against its bytes there, and the
  peft adapter is merged from its safetensors directly (`merge_peft_adapter`). Only where that
  cannot be learned (`LoraLayoutUnknown`) does the pinned `convert_lora_to_gguf.py` run, and its
  GGUF LoRA is merged instead (`merge_lora_gguf`): it imports torch, which costs more memory than
  the whole streaming merge.
- `adapter`: the base GGUF plus the GGUF LoRA by `convert_lora_to_gguf.py`, which the Modelfile
  names on an `ADAPTER` line: the shipped file is the converter's own.
- `peft`: the reference: transformers + peft `merge_and_unload`, save, convert. It covers what the
  GGUF LoRA format cannot carry (DoRA, `modules_to_save`, a resized vocabulary, bias terms).

Scaling. llama.cpp (and so Ollama, and `merge_lora_gguf`) applies a GGUF LoRA as
`W + (alpha / r) · B @ A`, with `alpha` the file's single `adapter.lora.alpha` and `r` each tensor's
own rank (`lora_b`'s inner dimension); `alpha == 0` means scale 1. peft's scale is
`alpha_i / r_i`, or `alpha_i / sqrt(r_i)` with `use_rslora`, where `alpha_pattern` may give a
module its own alpha. `merge_peft_adapter` applies peft's own scale. Where the two differ
(rslora, an `alpha_pattern`), `convert_adapter_to_gguf` converts a staged copy whose `lora_B`
carries the ratio, so the GGUF LoRA means exactly what peft means, in `adapter` mode as in the
`merge` mode's fallback.

Everything here is plain Python; the heavy imports (torch, transformers, peft) happen only inside
the `peft` mode, the converter subprocess, and when a base folder holds no weights to read shapes from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from registry.models import SourceFile
from registry.spec import BaseModelSpec
from tasks.convert import cached_build, gguf_cache_path, run_converter
from tasks.errors import ConversionFailed, KilnError
from tasks.fetch import fingerprint, model_files, read_config
from tasks.files import (
    TEMP_PREFIX,
    atomic_path,
    cache_dir,
    read_json_object,
    write_text_atomic,
)
from tasks.progress import progress_reporter
from tasks.step import step
from tasks.toolchain import Toolchain

AdapterMode = Literal["merge", "adapter", "peft"]
ADAPTER_MODES: tuple[AdapterMode, ...] = ("merge", "adapter", "peft")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Tokenizer files an adapter that added tokens ships beside its weights.
ADAPTER_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
)
_PEFT_PREFIX = "base_model.model."
_LORA_RE = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")
_DORA_RE = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.weight)?$")
_LORA_GGUF_SUFFIXES = (".lora_a", ".lora_b")

logger = logging.getLogger(__name__)


class AdapterIncompatible(KilnError):
    """The adapter does not fit the base (another base, another vocabulary, targets it lacks)."""


class AdapterModeUnsupported(KilnError):
    """The adapter is valid, but the chosen `--adapter-mode` cannot apply it; the message names one that can."""


class MergeFailed(KilnError):
    """A streaming merge met GGUF files that do not belong together."""


class LoraLayoutUnknown(KilnError):
    """The base's own conversion does not show where an adapter's tensors go in its GGUF (the reason says why).

    Internal: `apply_adapter` answers it by running `convert_lora_to_gguf.py` instead.
    """


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


class AdapterInfo(BaseModel):
    """What validation learned about an adapter; the manifest stores it (sha256 and files)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    sha256: str = Field(
        ..., description="The adapter's identity: sha256 over its files (config in canonical form), wherever the folder is."
    )
    files: list[SourceFile]
    base_model_name_or_path: str | None
    rank: int
    alpha: float
    ranks: list[int] = Field(..., description="Every rank the adapter's tensors have (several with rank_pattern).")
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    scale_rule: Literal["alpha/r", "alpha/sqrt(r)"]
    target_modules: list[str] = Field(..., description="Leaf module names the adapter's weights adapt.")
    adapted_weights: int = Field(..., description="How many weight matrices the adapter changes.")
    modules_to_save: list[str] = Field(default_factory=list)
    full_tensors: list[str] = Field(default_factory=list, description="Tensors the adapter replaces whole.")
    base_vocab_size: int
    adapter_vocab_size: int | None = Field(None, description="Embedding rows the adapter brings, if it brings any.")
    adapter_tokenizer_size: int | None = Field(None, description="Tokens in the adapter's own tokenizer, if it ships one.")
    ships_tokenizer: bool = False
    unsupported: dict[str, str] = Field(
        default_factory=dict, description="Mode -> why that mode cannot apply this adapter; absent modes can."
    )
    needs_scale_fold: bool = Field(
        False, description="peft's scale differs from llama.cpp's alpha/r (rslora, alpha_pattern); folded into lora_B."
    )
    notes: list[str] = Field(default_factory=list)

    @property
    def supported_modes(self) -> list[AdapterMode]:
        return [m for m in ADAPTER_MODES if m not in self.unsupported]

    @property
    def vocab_resized(self) -> bool:
        return self.adapter_vocab_size is not None and self.adapter_vocab_size != self.base_vocab_size

    def check_mode(self, mode: AdapterMode) -> None:
        """Raise `AdapterModeUnsupported` when `mode` cannot apply this adapter."""
        if mode not in ADAPTER_MODES:
            raise AdapterModeUnsupported(f"unknown adapter mode {mode!r}; use one of {', '.join(ADAPTER_MODES)}")
        if mode in self.unsupported:
            others = [m for m in self.supported_modes]
            hint = f" Use --adapter-mode {' or '.join(others)}." if others else ""
            raise AdapterModeUnsupported(
                f"--adapter-mode {mode} cannot apply the adapter {self.path}: {self.unsupported[mode]}.{hint}"
            )


class AdapterOutput(BaseModel):
    """What one adapter mode produced, for the flow and the manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: AdapterMode
    adapter_sha256: str
    gguf: str = Field(..., description="merge/peft: the merged float GGUF that quantization starts from; adapter: the base GGUF.")
    lora_gguf: str | None = Field(
        None, description="The GGUF LoRA (adapter mode: the Modelfile's ADAPTER; merge: its input, when the converter ran)."
    )
    reused: bool = Field(False, description="The result came from the cache.")
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------
# Reading shapes without loading weights
# --------------------------------------------------------------------------------------------


def safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensor table of a .safetensors file (name -> dtype, shape, offsets), read from its header only."""
    return _safetensors_table(path)[0]


def _safetensors_table(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """The tensor table of a .safetensors file and the file offset its data_offsets count from."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise AdapterIncompatible(f"{path} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * 1024 * 1024:
            raise AdapterIncompatible(f"{path} is not a safetensors file (header length {length})")
        try:
            header = json.loads(fh.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterIncompatible(f"{path}: unreadable safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise AdapterIncompatible(f"{path}: unreadable safetensors header (not an object)")
    header.pop("__metadata__", None)
    return header, 8 + length


def _adapter_weights_file(adapter_dir: Path) -> Path:
    for name in ADAPTER_WEIGHTS:
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    raise AdapterIncompatible(
        f"{adapter_dir} holds no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}); "
        "point --adapter at the folder peft's save_pretrained wrote"
    )


def adapter_tensor_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in the adapter's weights file."""
    if weights.suffix == ".safetensors":
        return {k: tuple(v["shape"]) for k, v in safetensors_header(weights).items()}
    import torch  # a legacy pickle: torch reads it, memory-mapped and without executing code

    state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    return {k: tuple(v.shape) for k, v in state.items()}


def base_weight_shapes(base_dir: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every weight of the base: from safetensors headers, else from a meta-device skeleton.

    At preflight a Hub base has only config.json and the tokenizer locally; the skeleton
    (transformers on torch's meta device) gives the exact names and shapes without a weight byte.
    """
    index = base_dir / "model.safetensors.index.json"
    shards: list[Path] = []
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        shards = [base_dir / name for name in sorted(set(weight_map.values()))]
        if not all(p.is_file() for p in shards):
            shards = []
    else:
        shards = sorted(base_dir.glob("*.safetensors"))
    if shards:
        shapes: dict[str, tuple[int, ...]] = {}
        for shard in shards:
            shapes.update({k: tuple(v["shape"]) for k, v in safetensors_header(shard).items()})
        return shapes
    return _skeleton_shapes(base_dir)


def _skeleton_shapes(base_dir: Path) -> dict[str, tuple[int, ...]]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # transformers raises many kinds for a config it cannot build
        raise AdapterIncompatible(
            f"cannot read the base's weight shapes: {base_dir} has no *.safetensors and transformers "
            f"cannot build its architecture from config.json ({exc})"
        ) from None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _tokenizer_size(folder: Path) -> int | None:
    """Token count of a tokenizer.json (largest id + 1 over vocabulary and added tokens)."""
    path = folder / "tokenizer.json"
    ids: list[int] = []
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        vocab = (data.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            ids.extend(int(v) for v in vocab.values())
        elif isinstance(vocab, list):
            ids.append(len(vocab) - 1)
        ids.extend(int(t["id"]) for t in data.get("added_tokens") or [] if "id" in t)
    added = folder / "added_tokens.json"
    if added.is_file():
        ids.extend(int(v) for v in json.loads(added.read_text(encoding="utf-8")).values())
    return max(ids) + 1 if ids else None


def _vocab_size(config: dict) -> int:
    for cfg in (config, config.get("text_config") or {}):
        if isinstance(cfg.get("vocab_size"), int):
            return cfg["vocab_size"]
    raise AdapterIncompatible("the base's config.json has no vocab_size; cannot check the adapter's vocabulary")


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def adapter_files(adapter_dir: Path) -> list[Path]:
    """The files that define an adapter: its config, its weights, and its tokenizer if it ships one."""
    files = [adapter_dir / ADAPTER_CONFIG, _adapter_weights_file(adapter_dir)]
    files += [adapter_dir / n for n in ADAPTER_TOKENIZER_FILES if (adapter_dir / n).is_file()]
    return sorted(files, key=lambda p: p.name)


def adapter_sha256(files: list[SourceFile], config: dict[str, Any]) -> str:
    """The adapter's identity: its files' sha256, with adapter_config.json taken in canonical form.

    peft writes target_modules from a set, so the same adapter saved twice can list them in
    another order; key order and that list's order do not change what the adapter means.
    """
    canonical = dict(config)
    if isinstance(canonical.get("target_modules"), list):
        canonical["target_modules"] = sorted(str(t) for t in canonical["target_modules"])
    config_digest = hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path):
        digest.update(f"{f.path}\0{config_digest if f.path == ADAPTER_CONFIG else f.sha256}\n".encode())
    return digest.hexdigest()


def adapter_identity(adapter_dir: Path) -> str:
    """The adapter's sha256 without validating it against a base: cheap enough for the up-to-date check."""
    adapter_dir = Path(adapter_dir)
    files = fingerprint(adapter_files(adapter_dir), adapter_dir)
    return adapter_sha256(files, read_adapter_config(adapter_dir))


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    if not adapter_dir.is_dir():
        raise AdapterIncompatible(f"adapter {adapter_dir}: no such folder")
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterIncompatible(
            f"{adapter_dir} has no {ADAPTER_CONFIG}, so it is not a peft adapter folder "
            "(point --adapter at the folder peft's save_pretrained wrote)"
        )
    return read_json_object(path, AdapterIncompatible, "save the adapter again with peft")


def _positive_number(config: dict, key: str, path: Path, integer: bool) -> float:
    value = config.get(key)
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if value is None or isinstance(value, bool) or not ok_type:
        kind = "a positive integer" if integer else "a positive number"
        raise AdapterIncompatible(f"{path}: {key} must be {kind}, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise AdapterIncompatible(f"{path}: {key} must be positive, got {value!r}")
    return value


def _hf_id_from_cache_path(name: str) -> str | None:
    """`.../models--ORG--NAME/snapshots/<sha>` (a Hub cache path) -> `ORG/NAME`."""
    match = re.search(r"models--([^/\\]+?)--([^/\\]+)", name)
    return f"{match[1]}/{match[2]}" if match else None


def _check_base_name(declared: str | None, base_dir: Path, spec: BaseModelSpec | None, config_path: Path) -> list[str]:
    """Refuse an adapter whose base_model_name_or_path names another model; return notes."""
    if not declared:
        return [f"{config_path} names no base_model_name_or_path; only the tensor shapes confirm the base"]
    expected: list[str] = []
    if spec is not None:
        expected.append(spec.hf_id)
    expected.append(str(base_dir))
    candidate = declared.strip()
    lowered = candidate.lower().rstrip("/")
    if spec is not None and lowered == spec.hf_id.lower():
        return []
    # A path: the base folder itself, a Hub cache snapshot of the spec's repo, or a local clone of it.
    as_path = Path(candidate).expanduser()
    try:
        if as_path.exists() and as_path.resolve() == base_dir.resolve():
            return []
    except OSError:
        pass
    from_cache = _hf_id_from_cache_path(candidate)
    if from_cache and spec is not None and from_cache.lower() == spec.hf_id.lower():
        return []
    leaf = as_path.name.lower()
    leaves = {base_dir.name.lower()}
    if spec is not None:
        leaves.add(spec.hf_id.split("/")[1].lower())
    is_hub_id = candidate.count("/") == 1 and not candidate.startswith((".", "/", "~")) and not as_path.exists()
    if is_hub_id and spec is not None:
        pass  # another org/name than the spec's: refused below
    elif leaf in leaves:
        return [f"base_model_name_or_path {declared!r} matched the base by folder name"]
    raise AdapterIncompatible(
        f"the adapter was made for {declared!r}, but the base is {' / '.join(expected)}. "
        "A LoRA only means something on the exact base it was trained on. Export with that base, or, "
        "if it is the same model under another name, set base_model_name_or_path in "
        f"{config_path} to {expected[0]!r}."
    )


def _module_leaf(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's `get_pattern_key`: the first pattern key that matches the module name's tail."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def validate_adapter(
    adapter_dir: Path,
    base_dir: Path,
    spec: BaseModelSpec | None = None,
    mode: AdapterMode | None = None,
) -> AdapterInfo:
    """Check a peft LoRA adapter against the base before any heavy work; refuse with the reason.

    Reads adapter_config.json, the safetensors headers of the adapter and the base (or, for a
    base folder without weights, a meta-device skeleton), and the tokenizer files. With `mode`,
    also refuses a mode that cannot apply the adapter (`AdapterModeUnsupported`).
    """
    adapter_dir = Path(adapter_dir)
    base_dir = Path(base_dir)
    config = read_adapter_config(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG
    weights = _adapter_weights_file(adapter_dir)

    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterIncompatible(
            f"{config_path}: peft_type is {peft_type}; Kiln applies LoRA adapters only (peft_type LORA)"
        )
    rank = int(_positive_number(config, "r", config_path, integer=True))
    alpha = float(_positive_number(config, "lora_alpha", config_path, integer=False))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    for name, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(pattern, dict):
            raise AdapterIncompatible(f"{config_path}: {name} must be an object, got {pattern!r}")
        for key, value in pattern.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise AdapterIncompatible(f"{config_path}: {name}[{key!r}] must be positive, got {value!r}")
    use_rslora = bool(config.get("use_rslora", False))
    use_dora = bool(config.get("use_dora", False))

    notes = _check_base_name(config.get("base_model_name_or_path"), base_dir, spec, config_path)

    base_config = read_config(base_dir)
    base_shapes = base_weight_shapes(base_dir)
    base_vocab = _vocab_size(base_config)
    tie = base_config.get("tie_word_embeddings", (base_config.get("text_config") or {}).get("tie_word_embeddings"))
    tied = bool(tie) if tie is not None else not any(k.endswith("lm_head.weight") for k in base_shapes)
    base_leaves = {_module_leaf(k.rsplit(".", 1)[0]) for k in base_shapes if k.endswith(".weight")}

    # The adapter's tensors: LoRA pairs, DoRA magnitudes, and whole tensors (modules_to_save, biases, ...).
    shapes = adapter_tensor_shapes(weights)
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    dora_modules: set[str] = set()
    full: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        key = name.removeprefix(_PEFT_PREFIX)
        if m := _LORA_RE.match(key):
            pairs.setdefault(m["module"], {})[m["part"]] = shape
        elif m := _DORA_RE.match(key):
            dora_modules.add(m["module"])
        else:
            full[key.replace(".modules_to_save.default", "")] = shape
    if not pairs and not full:
        raise AdapterIncompatible(f"{weights} holds no LoRA tensors (lora_A/lora_B)")

    # Target modules: named by the spec, and present in the base with the right shapes.
    ranks: set[int] = set()
    leaves: set[str] = set()
    embedding_rows: set[int] = set()
    for module, parts in sorted(pairs.items()):
        leaf = _module_leaf(module)
        leaves.add(leaf)
        is_embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a = parts.get("lora_embedding_A" if is_embedding else "lora_A")
        b = parts.get("lora_embedding_B" if is_embedding else "lora_B")
        if a is None or b is None:
            raise AdapterIncompatible(f"{weights}: {module} has only one of lora_A / lora_B; the adapter is damaged")
        if leaf == "lm_head" and tied:
            raise AdapterIncompatible(
                "the adapter adapts lm_head, but the base ties lm_head to the token embeddings: a merge "
                "would change the embeddings too, and llama.cpp's converter drops lm_head for tied models "
                "(llama.cpp issue 9065). Retrain without lm_head in target_modules."
            )
        base_key = f"{module}.weight"
        if base_key not in base_shapes:
            raise AdapterIncompatible(
                f"the adapter adapts {module}, which the base does not have "
                f"({_describe_missing(module, base_shapes)}): it was made for another model"
            )
        base_shape = base_shapes[base_key]
        if len(a) != 2 or len(b) != 2 or len(base_shape) != 2:
            raise AdapterIncompatible(f"{module}: LoRA on a {len(base_shape)}-D weight is not supported")
        if is_embedding:  # peft: A [r, num_embeddings], B [embedding_dim, r]
            r_a, rows = a
            dim, r_b = b
            expected_rows, expected_dim = base_shape
            embedding_rows.add(rows)
            if dim != expected_dim or r_a != r_b:
                raise AdapterIncompatible(
                    f"{module}: adapter embedding LoRA A{list(a)} B{list(b)} does not fit the base's {list(base_shape)}"
                )
        else:  # A [r, in], B [out, r]
            r_a, fan_in = a
            fan_out, r_b = b
            if r_a != r_b or [fan_out, fan_in] != list(base_shape):
                raise AdapterIncompatible(
                    f"{module}: the adapter's lora_A {list(a)} / lora_B {list(b)} imply a "
                    f"[{fan_out}, {fan_in}] weight, but the base's is {list(base_shape)}: "
                    "it was made for another model size"
                )
        ranks.add(r_a)
        expected_rank = int(_pattern_value(rank_pattern, module, rank))
        if r_a != expected_rank:
            raise AdapterIncompatible(
                f"{module}: the weights have rank {r_a}, but {config_path} says r={expected_rank}; the config does not "
                "belong to these weights"
            )
    if spec is not None:
        outside = sorted(leaves - set(spec.target_modules))
        if outside:
            raise AdapterIncompatible(
                f"the adapter targets {', '.join(outside)}, which the registry spec {spec.key!r} does not list "
                f"as LoRA targets ({', '.join(spec.target_modules)})"
            )
    declared = config.get("target_modules")
    if isinstance(declared, list):
        unknown = sorted(t for t in declared if _module_leaf(str(t)) not in base_leaves)
        if unknown:
            raise AdapterIncompatible(
                f"{config_path}: target_modules names {', '.join(unknown)}, which "
                f"{(base_config.get('architectures') or ['this architecture'])[0]} does not have "
                f"(its weights: {', '.join(sorted(base_leaves)[:12])}, ...)"
            )
        if spec is not None:
            outside = sorted(t for t in declared if str(t) not in spec.target_modules and _module_leaf(str(t)) not in spec.target_modules)
            if outside:
                raise AdapterIncompatible(
                    f"{config_path}: target_modules names {', '.join(outside)}, which the registry spec "
                    f"{spec.key!r} does not list ({', '.join(spec.target_modules)})"
                )

    # Whole tensors (modules_to_save and the like), and what they say about the vocabulary.
    adapter_rows = set(embedding_rows)
    embed_keys = [k for k, s in base_shapes.items() if len(s) == 2 and s[0] == base_vocab and not k.endswith("lm_head.weight")]
    for key, shape in full.items():
        if key not in base_shapes and tied and key.endswith("lm_head.weight") and embed_keys:
            key = embed_keys[0]  # a tied lm_head is the embedding: peft saves it under lm_head's name
        if key not in base_shapes:
            if key.endswith(".bias") and config.get("bias", "none") != "none":
                continue  # a bias LoRA training added to a module that had none
            if "trainable_tokens" in key or "token_adapter" in key:
                continue
            raise AdapterIncompatible(f"the adapter brings a tensor {key} that the base does not have")
        base_shape = base_shapes[key]
        if tuple(shape) == tuple(base_shape):
            continue
        if len(shape) == 2 and len(base_shape) == 2 and shape[1] == base_shape[1] and base_shape[0] == base_vocab:
            adapter_rows.add(shape[0])
            continue
        raise AdapterIncompatible(
            f"the adapter's {key} has shape {list(shape)}, the base's {list(base_shape)}: made for another model"
        )
    if len(adapter_rows) > 1:
        raise AdapterIncompatible(
            f"the adapter's embedding tensors disagree on the vocabulary size: {sorted(adapter_rows)} rows"
        )
    adapter_vocab = next(iter(adapter_rows)) if adapter_rows else None
    ships_tokenizer = any((adapter_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "added_tokens.json"))
    tok_size = _tokenizer_size(adapter_dir) if ships_tokenizer else None
    if adapter_vocab is not None and adapter_vocab != base_vocab:
        if not ships_tokenizer:
            raise AdapterIncompatible(
                f"the adapter resized the vocabulary: its embeddings have {adapter_vocab} rows, the base's "
                f"vocabulary has {base_vocab}, and the adapter ships no tokenizer for the new tokens. "
                "Save the tokenizer with the adapter (tokenizer.save_pretrained(adapter_dir))."
            )
        if tok_size is not None and tok_size > adapter_vocab:
            raise AdapterIncompatible(
                f"the adapter's tokenizer has {tok_size} tokens but its embeddings have {adapter_vocab} rows "
                f"(the base's vocabulary has {base_vocab}): tokenizer and embeddings do not match"
            )
        if not tied:
            brought = {k for k, s in full.items() if len(s) == 2 and s[0] == adapter_vocab}
            if len(brought) < 2 and any(k.endswith("lm_head.weight") for k in base_shapes):
                raise AdapterIncompatible(
                    f"the adapter resized the vocabulary from {base_vocab} to {adapter_vocab} but brings only "
                    f"{', '.join(sorted(brought)) or 'no embedding'}; the untied "
                    "input embedding and lm_head must both come with it (modules_to_save)"
                )
    elif tok_size is not None and tok_size > base_vocab:
        raise AdapterIncompatible(
            f"the adapter's tokenizer has {tok_size} tokens, the base's vocabulary has {base_vocab} "
            "embedding rows, and the adapter brings no resized embedding (modules_to_save embed_tokens / "
            "lm_head): the added tokens would have no embeddings"
        )

    # What each mode can do with it.
    gguf_lora_limits: list[str] = []
    if use_dora or dora_modules:
        gguf_lora_limits.append("it is a DoRA adapter (use_dora), which the GGUF LoRA format and llama.cpp do not carry")
    if adapter_vocab is not None and adapter_vocab != base_vocab:
        gguf_lora_limits.append(
            f"it resized the vocabulary from {base_vocab} to {adapter_vocab}, and the base GGUF keeps the base's vocabulary"
        )
    elif full:
        gguf_lora_limits.append(
            f"it replaces whole tensors ({', '.join(sorted(full)[:4])}{', ...' if len(full) > 4 else ''}: "
            "modules_to_save, biases or trainable tokens), which convert_lora_to_gguf.py cannot carry"
        )
    for key, label in (
        ("fan_in_fan_out", "fan_in_fan_out weights"),
        ("lora_bias", "lora_bias"),
        ("layer_replication", "layer_replication"),
        ("target_parameters", "target_parameters (LoRA on raw parameters)"),
        ("trainable_token_indices", "trainable_token_indices"),
        ("use_qalora", "QA-LoRA"),
        ("use_bdlora", "BD-LoRA"),
    ):
        if config.get(key):
            gguf_lora_limits.append(f"it uses {label}, which convert_lora_to_gguf.py does not convert")
    if config.get("bias", "none") not in ("none", None):
        gguf_lora_limits.append(f"it trains biases (bias={config.get('bias')!r}), which the GGUF LoRA format does not carry")
    unsupported: dict[str, str] = {}
    if gguf_lora_limits:
        reason = "; ".join(gguf_lora_limits)
        unsupported["merge"] = reason
        unsupported["adapter"] = reason
    if config.get("alora_invocation_tokens") or config.get("invocation_string"):
        why = "it is an activated LoRA (aLoRA), which applies only after its invocation tokens and cannot be merged"
        unsupported["merge"] = why
        unsupported["peft"] = why

    info = AdapterInfo(
        path=str(adapter_dir),
        sha256="",
        files=[],
        base_model_name_or_path=config.get("base_model_name_or_path"),
        rank=rank,
        alpha=alpha,
        ranks=sorted(ranks),
        rank_pattern={str(k): int(v) for k, v in rank_pattern.items()},
        alpha_pattern={str(k): float(v) for k, v in alpha_pattern.items()},
        use_rslora=use_rslora,
        use_dora=use_dora or bool(dora_modules),
        scale_rule="alpha/sqrt(r)" if use_rslora else "alpha/r",
        target_modules=sorted(leaves),
        adapted_weights=len(pairs),
        modules_to_save=[str(m) for m in config.get("modules_to_save") or []],
        full_tensors=sorted(full),
        base_vocab_size=base_vocab,
        adapter_vocab_size=adapter_vocab,
        adapter_tokenizer_size=tok_size,
        ships_tokenizer=ships_tokenizer,
        unsupported=unsupported,
        needs_scale_fold=use_rslora or bool(alpha_pattern),
        notes=notes,
    )
    if mode is not None:
        info.check_mode(mode)
    # Hash last: a refused adapter costs no hashing.
    files = fingerprint(adapter_files(adapter_dir), adapter_dir)
    return info.model_copy(update={"sha256": adapter_sha256(files, config), "files": files})


def _describe_missing(module: str, base_shapes: dict[str, tuple[int, ...]]) -> str:
    layer = re.search(r"\.(\d+)\.", module)
    if layer:
        indices = {int(m[1]) for k in base_shapes if (m := re.search(r"\.(\d+)\.", k))}
        if indices and int(layer[1]) > max(indices):
            return f"it has {max(indices) + 1} layers"
    return "no weight of that name"


# --------------------------------------------------------------------------------------------
# The adapter as a GGUF LoRA
# --------------------------------------------------------------------------------------------


def adapter_gguf_cache_path(info: AdapterInfo, base_dir: Path, toolchain: Toolchain, outtype: str = "f32") -> Path:
    """Cache entry of the GGUF LoRA: (adapter content, base config, outtype, toolchain)."""
    base_cfg = hashlib.sha256((Path(base_dir) / "config.json").read_bytes()).hexdigest()[:8]
    return gguf_cache_path(f"lora{info.sha256[:16]}-{base_cfg}", f"lora-{outtype}", toolchain)


def convert_adapter_to_gguf(
    adapter_dir: Path,
    base_dir: Path,
    toolchain: Toolchain,
    info: AdapterInfo | None = None,
    outtype: Literal["f32", "f16", "bf16", "q8_0"] = "f32",
    on_line: Callable[[str], None] | None = None,
) -> tuple[Path, bool]:
    """The adapter as a GGUF LoRA by the pinned `convert_lora_to_gguf.py`; returns (path, reused).

    Cached by (adapter sha256, base config, outtype, toolchain). Where peft's scale is not
    llama.cpp's alpha/r (rslora, alpha_pattern), a staged copy with the ratio folded into
    lora_B is converted instead, so the file means what peft means.
    """
    adapter_dir = Path(adapter_dir)
    base_dir = Path(base_dir)
    if info is None:
        info = validate_adapter(adapter_dir, base_dir)
    reason = info.unsupported.get("adapter")
    if reason:
        raise AdapterModeUnsupported(f"the adapter {adapter_dir} cannot become a GGUF LoRA: {reason}. Use --adapter-mode peft.")
    final = adapter_gguf_cache_path(info, base_dir, toolchain, outtype)

    def build(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="kiln-lora-") as staging_root:
            source = adapter_dir
            if info.needs_scale_fold:
                source = Path(staging_root) / "adapter"
                fold_scale_into_lora_b(adapter_dir, source, info)
            run_converter(
                "convert_lora_to_gguf.py",
                ["--outtype", outtype, "--base", str(base_dir), "--outfile", str(tmp), str(source)],
                toolchain,
                on_line,
            )
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise ConversionFailed(f"convert_lora_to_gguf.py exited cleanly but wrote nothing for {adapter_dir}")

    return cached_build(final, build)


_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
_ST_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


def _as_f32(raw: np.ndarray, dtype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    """Raw safetensors bytes (a uint8 array, e.g. a memory-mapped slice) as a new float32 array of `shape`.

    Exact for bf16, f16 and f32: the widening the converter does before it writes a tensor.
    """
    if dtype == "BF16":
        arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif dtype in _ST_DTYPES:
        arr = raw.view(_ST_DTYPES[dtype]).astype(np.float32)
    else:
        raise AdapterIncompatible(f"{where} has dtype {dtype}; expected a float type")
    return arr.reshape(shape)


def _st_tensor_f32(mm: np.memmap, data_start: int, name: str, meta: dict[str, Any], path: Path) -> np.ndarray:
    """One tensor of a memory-mapped safetensors file as float32; its pages are released after the copy."""
    start, end = (data_start + int(o) for o in meta["data_offsets"])
    arr = _as_f32(mm[start:end], meta["dtype"], tuple(meta["shape"]), f"{path}: tensor {name}")
    _release(mm, start, end - start)
    return arr


def _read_safetensors_f32(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as float32 numpy (bf16 included), without torch."""
    header, data_start = _safetensors_table(path)
    mm = np.memmap(path, mode="r")
    try:
        return {name: _st_tensor_f32(mm, data_start, name, meta, path) for name, meta in header.items()}
    finally:
        del mm


def _peft_scale(info: AdapterInfo, module: str, rank: int) -> float:
    """peft's scale for one module: alpha_i / r, or alpha_i / sqrt(r) with use_rslora (peft's LoraLayer)."""
    alpha_i = float(_pattern_value(info.alpha_pattern, module, info.alpha))
    return alpha_i / (math.sqrt(rank) if info.use_rslora else rank)


def fold_scale_into_lora_b(adapter_dir: Path, dest: Path, info: AdapterInfo) -> None:
    """Write a copy of the adapter whose lora_B carries peft's scale / llama.cpp's (alpha / r) scale.

    llama.cpp reads one alpha and each tensor's rank, so it can express alpha_i / r_i only for a
    single alpha, and never alpha / sqrt(r). Keeping the config's global lora_alpha and scaling
    lora_B by (peft scale) / (alpha / r_i) makes `alpha / r_i · B' @ A` equal peft's delta.
    """
    from safetensors.numpy import save_file

    weights = _adapter_weights_file(adapter_dir)
    if weights.suffix != ".safetensors":
        raise AdapterModeUnsupported(
            f"{weights}: an rslora/alpha_pattern adapter must be in safetensors form to be rescaled; "
            "re-save it with save_pretrained(safe_serialization=True), or use --adapter-mode peft"
        )
    tensors = _read_safetensors_f32(weights)
    for name in list(tensors):
        m = _LORA_RE.match(name.removeprefix(_PEFT_PREFIX))
        if not m or m["part"] not in ("lora_B", "lora_embedding_B"):
            continue
        r = tensors[name].shape[1]
        llama_scale = info.alpha / r
        tensors[name] = np.ascontiguousarray(tensors[name] * np.float32(_peft_scale(info, m["module"], r) / llama_scale))
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest / "adapter_model.safetensors"))
    shutil.copyfile(adapter_dir / ADAPTER_CONFIG, dest / ADAPTER_CONFIG)
    readme = adapter_dir / "README.md"
    if readme.is_file():
        shutil.copyfile(readme, dest / "README.md")


# --------------------------------------------------------------------------------------------
# The streaming merge
#
# The merged file has the base's layout exactly: same metadata, same tensor infos and offsets
# (every merged tensor keeps its type and shape), only the adapted tensors' bytes differ. So
# header, metadata and tensor-info block are copied as raw bytes, unchanged tensors are copied
# by the kernel (copy_file_range), and each adapted tensor is computed from memory-mapped
# inputs and written in its place. gguf's GGUFReader/GGUFWriter are not used for the base:
# GGUFReader turns every vocabulary string into numpy objects (2 s and 160 MB for SmolLM2's
# 49k tokens, more for 150k-token vocabularies), and re-encoding the metadata could only lose
# fidelity.
# --------------------------------------------------------------------------------------------

_GGUF_MAGIC = b"GGUF"
# GGUF value types -> fixed size in bytes (8 = string, 9 = array are variable).
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class GGUFTensorInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    ne: tuple[int, ...] = Field(..., description="ggml dimensions, fastest first (numpy shape reversed)")
    ggml_type: int
    offset: int = Field(..., description="absolute file offset of the data")
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.ne))


class GGUFLayout(BaseModel):
    """Where everything sits in a GGUF file: metadata scalars and strings, tensor infos, data start."""

    model_config = ConfigDict(frozen=True)

    version: int
    metadata: dict[str, Any] = Field(..., description="scalar and string values; arrays as their length")
    tensors: list[GGUFTensorInfo]
    data_start: int
    alignment: int
    file_size: int


def read_gguf_layout(path: Path) -> GGUFLayout:
    """Parse a GGUF file's header, metadata and tensor infos without materialising arrays."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != _GGUF_MAGIC:
            raise MergeFailed(f"{path} is not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
        if version not in (2, 3):
            raise MergeFailed(f"{path}: GGUF version {version} (or a big-endian file) is not supported")
        pos = 24

        def string() -> str:
            nonlocal pos
            (n,) = struct.unpack_from("<Q", mm, pos)
            value = mm[pos + 8: pos + 8 + n].decode("utf-8", errors="replace")
            pos += 8 + n
            return value

        def skip_value(vtype: int) -> Any:
            nonlocal pos
            if vtype == 8:
                return string()
            if vtype == 9:
                sub, count = struct.unpack_from("<IQ", mm, pos)
                pos += 12
                if sub in _GGUF_SCALAR_SIZES:
                    pos += _GGUF_SCALAR_SIZES[sub] * count
                else:
                    for _ in range(count):
                        skip_value(sub)
                return count
            if vtype not in _GGUF_SCALAR_FORMATS:
                raise MergeFailed(f"{path}: unknown GGUF value type {vtype}")
            (value,) = struct.unpack_from(_GGUF_SCALAR_FORMATS[vtype], mm, pos)
            pos += _GGUF_SCALAR_SIZES[vtype]
            return value

        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            (vtype,) = struct.unpack_from("<I", mm, pos)
            pos += 4
            metadata[key] = skip_value(vtype)
        raw_infos = []
        for _ in range(n_tensors):
            name = string()
            (n_dims,) = struct.unpack_from("<I", mm, pos)
            ne = struct.unpack_from(f"<{n_dims}Q", mm, pos + 4)
            ggml_type, offset = struct.unpack_from("<IQ", mm, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            raw_infos.append((name, tuple(int(d) for d in ne), int(ggml_type), int(offset)))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = pos + (-pos % alignment)
    tensors = []
    for name, ne, ggml_type, offset in raw_infos:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise MergeFailed(f"{path}: tensor {name} has unknown ggml type {ggml_type}") from None
        nbytes = math.prod(ne) * type_size // block
        tensors.append(GGUFTensorInfo(name=name, ne=ne, ggml_type=ggml_type, offset=data_start + offset, nbytes=nbytes))
        if data_start + offset + nbytes > size:
            raise MergeFailed(f"{path} is truncated: tensor {name} ends past the end of the file")
    return GGUFLayout(version=version, metadata=metadata, tensors=tensors, data_start=data_start,
                      alignment=alignment, file_size=size)


# The kernel maps pages around a faulting one too ("fault-around", 64 KiB by default), so pages of a
# neighbouring tensor become resident without being read; releases reach this far past each range.
_FAULT_AROUND = 256 * 1024


def _release(mm: np.memmap, offset: int, nbytes: int) -> None:
    """Drop a memory-mapped range (and its fault-around margin) from this process's resident set.

    The page cache keeps the pages; a later read of the same range simply maps them again. The
    kernel may also map pages well beyond the margin while it reads ahead of a sequential pass
    (large folios), so the readers here also map a file afresh for each tensor and let that
    mapping go with the tensor: whatever it mapped leaves with it.
    """
    raw = getattr(mm, "_mmap", None)
    if raw is None or nbytes <= 0 or not hasattr(raw, "madvise"):
        return
    start = max(0, offset - _FAULT_AROUND)
    start -= start % mmap.PAGESIZE
    end = min(offset + nbytes + _FAULT_AROUND, len(raw))
    try:
        raw.madvise(mmap.MADV_DONTNEED, start, end - start)
    except (OSError, ValueError):
        pass


def _tensor_f32(mm: np.memmap, info: GGUFTensorInfo) -> np.ndarray:
    """A (small) tensor as float32, e.g. a lora_a or lora_b."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType(info.ggml_type)
    raw = mm[info.offset: info.offset + info.nbytes]
    if qtype == GGMLQuantizationType.F32:
        return np.array(raw.view(np.float32).reshape(info.shape))
    if qtype == GGMLQuantizationType.F16:
        return raw.view(np.float16).reshape(info.shape).astype(np.float32)
    rows = math.prod(info.shape[:-1])
    return quants.dequantize(raw.reshape(rows, -1), qtype).reshape(info.shape).astype(np.float32, copy=False)


_ROW_CHUNK = 1024
# The base tensor types the merge reads and writes itself; a quantized base would be requantized.
_FLOAT_QTYPES = (0, 1, 30)  # GGMLQuantizationType F32, F16, BF16

# One adapted tensor's LoRA, in the converter's convention: lora_a [r, in], lora_b [out, r] (for
# token_embd, lora_a [n_vocab, r] and lora_b [n_embd, r]), float32, and the scale of `lora_b @ lora_a`.
LoraPair = tuple[np.ndarray, np.ndarray, float]


def _write_merged(out: Any, mm: np.memmap, info: GGUFTensorInfo, lora_a: np.ndarray, lora_b: np.ndarray,
                  scale: float, embedding: bool) -> None:
    """Write `W + scale · delta` for one base tensor, in its own type, a block of rows at a time."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType(info.ggml_type)
    if qtype not in _FLOAT_QTYPES:
        raise MergeFailed(
            f"{info.name} is {qtype.name} in the base GGUF; the streaming merge needs a float base "
            "(f32, f16 or bf16) and quantizes afterwards"
        )
    if len(info.shape) != 2:
        raise MergeFailed(f"{info.name}: LoRA on a {len(info.shape)}-D tensor is not supported by the streaming merge")
    rows, cols = info.shape
    rank = lora_b.shape[1]
    if embedding:  # token_embd: lora_a [n_vocab, r] (the converter transposes it), lora_b [n_embd, r]
        ok = lora_a.shape == (rows, rank) and lora_b.shape == (cols, rank)
    else:  # lora_a [r, in], lora_b [out, r]
        ok = lora_a.shape == (rank, cols) and lora_b.shape == (rows, rank)
    if not ok:
        raise MergeFailed(
            f"{info.name}: LoRA a{list(lora_a.shape)} b{list(lora_b.shape)} does not fit the base's [{rows}, {cols}]"
        )
    factor = np.float32(scale)
    if embedding:
        left, right = lora_a * factor, lora_b.T
    else:
        left, right = lora_b * factor, lora_a
    row_bytes = info.nbytes // rows
    for r0 in range(0, rows, _ROW_CHUNK):
        r1 = min(rows, r0 + _ROW_CHUNK)
        raw = mm[info.offset + r0 * row_bytes: info.offset + r1 * row_bytes]
        if qtype == GGMLQuantizationType.F16:
            w = raw.view(np.float16).reshape(r1 - r0, cols).astype(np.float32)
        elif qtype == GGMLQuantizationType.F32:
            w = raw.view(np.float32).reshape(r1 - r0, cols).copy()
        else:
            w = quants.dequantize(raw.reshape(r1 - r0, row_bytes), qtype)
        w += left[r0:r1] @ right
        if qtype == GGMLQuantizationType.F16:
            block = w.astype(np.float16)  # one rounding, to nearest even
        elif qtype == GGMLQuantizationType.F32:
            block = w
        else:
            block = quants.quantize(w, qtype)
        assert block.nbytes == (r1 - r0) * row_bytes
        out.write(memoryview(np.ascontiguousarray(block)).cast("B"))
        _release(mm, info.offset + r0 * row_bytes, (r1 - r0) * row_bytes)


def _copy_range(src: Any, dst: Any, start: int, length: int) -> None:
    """Copy `length` bytes of `src` from `start` to `dst`'s current position, in the kernel where possible."""
    dst.flush()
    src_fd, dst_fd = src.fileno(), dst.fileno()
    offset = start
    remaining = length
    if hasattr(os, "copy_file_range"):
        try:
            while remaining > 0:
                n = os.copy_file_range(src_fd, dst_fd, min(remaining, 1 << 30), offset)
                if n <= 0:
                    break
                offset += n
                remaining -= n
        except OSError:
            pass  # e.g. across file systems on old kernels: fall back to reads
    dst.seek(0, os.SEEK_END)
    while remaining > 0:
        chunk = os.pread(src_fd, min(remaining, 8 << 20), offset)
        if not chunk:
            raise MergeFailed("the base GGUF ended early while copying")
        dst.write(chunk)
        offset += len(chunk)
        remaining -= len(chunk)


def _stream_merge(
    base_gguf: Path,
    out_path: Path,
    loras: Mapping[str, Callable[[], LoraPair]],
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the base GGUF with `W + scale · lora_b @ lora_a` for each tensor `loras` names; returns `out_path`.

    `loras` maps a base tensor name to a loader of its `LoraPair`, called when the merge reaches
    that tensor, so only one pair is in memory at a time. The delta is computed in float32 from
    the memory-mapped base and rounded once to the tensor's type (`token_embd` takes
    `lora_a @ lora_b.T`, the converter's convention). Everything else is copied byte for byte.
    Peak memory is one block of rows plus one pair, whatever the model's size; the output is
    written under a temporary name and renamed when complete.
    """
    base_gguf, out_path = Path(base_gguf), Path(out_path)
    base = read_gguf_layout(base_gguf)
    base_by_name = {t.name: t for t in base.tensors}
    missing = sorted(n for n in loras if n not in base_by_name)
    if missing:
        raise MergeFailed(f"the LoRA adapts {', '.join(missing[:4])}, which the base GGUF {base_gguf.name} does not hold")
    adapted = sorted((base_by_name[n] for n in loras), key=lambda t: t.offset)
    with atomic_path(out_path) as tmp, open(base_gguf, "rb") as src, open(tmp, "wb") as out:
        cursor = 0
        for i, t in enumerate(adapted):
            _copy_range(src, out, cursor, t.offset - cursor)  # everything up to this tensor, as is
            lora_a, lora_b, scale = loras[t.name]()
            _write_merged(out, np.memmap(base_gguf, mode="r"), t, lora_a, lora_b, scale,
                          embedding=t.name.startswith("token_embd."))
            cursor = t.offset + t.nbytes
            if on_progress:
                on_progress(i + 1, len(adapted))
        _copy_range(src, out, cursor, base.file_size - cursor)
        out.flush()
        if out.tell() != base.file_size:
            raise MergeFailed(f"merged GGUF has {out.tell()} bytes, the base {base.file_size}: write failed")
    return out_path


def merge_lora_gguf(
    base_gguf: Path,
    lora_gguf: Path,
    out_path: Path,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Merge a GGUF LoRA into a float GGUF, tensor by tensor (`_stream_merge`); returns `out_path`.

    Each pair is scaled by llama.cpp's own rule, `alpha / r` with the file's single alpha and the
    tensor's rank (`alpha == 0`: 1), so the merged file says what the base plus the GGUF LoRA say
    in llama.cpp.
    """
    base_gguf, lora_gguf = Path(base_gguf), Path(lora_gguf)
    base = read_gguf_layout(base_gguf)
    lora = read_gguf_layout(lora_gguf)
    if lora.metadata.get("general.type") != "adapter" or lora.metadata.get("adapter.type") != "lora":
        raise MergeFailed(f"{lora_gguf} is not a GGUF LoRA adapter (general.type / adapter.type)")
    arch, lora_arch = base.metadata.get("general.architecture"), lora.metadata.get("general.architecture")
    if arch != lora_arch:
        raise MergeFailed(f"{lora_gguf} is a LoRA for architecture {lora_arch!r}, the base GGUF is {arch!r}")
    alpha = float(lora.metadata.get("adapter.lora.alpha") or 0.0)

    pairs: dict[str, dict[str, GGUFTensorInfo]] = {}
    for t in lora.tensors:
        suffix = next((s for s in _LORA_GGUF_SUFFIXES if t.name.endswith(s)), None)
        if suffix is None:
            raise MergeFailed(
                f"{lora_gguf} holds {t.name}, which is not a lora_a/lora_b tensor; the streaming merge "
                "applies LoRA pairs only (use --adapter-mode peft)"
            )
        pairs.setdefault(t.name[: -len(suffix)], {})[suffix] = t
    for name, pair in pairs.items():
        if len(pair) != 2:
            raise MergeFailed(f"{lora_gguf}: {name} lacks its {'lora_b' if '.lora_a' in pair else 'lora_a'}")

    def load(name: str) -> LoraPair:
        lora_mm = np.memmap(lora_gguf, mode="r")  # this pair's own mapping (see `_release`)
        lora_a, lora_b = _tensor_f32(lora_mm, pairs[name][".lora_a"]), _tensor_f32(lora_mm, pairs[name][".lora_b"])
        # llama.cpp: scale = alpha ? alpha / rank : 1, with rank = lora_b's ne[0].
        rank = lora_b.shape[-1]
        return lora_a, lora_b, (alpha / rank if alpha else 1.0)

    return _stream_merge(base_gguf, out_path, {name: (lambda n=name: load(n)) for name in pairs}, on_progress)


# --------------------------------------------------------------------------------------------
# Merging a peft adapter without the converter
#
# The converter's naming and row permutations still govern the merge; they are read off its own
# output for this base instead of being re-derived. The base GGUF was written by the pinned
# converter from the base folder's weights, so for each HF weight an adapter targets it holds a
# tensor whose rows are the HF rows, permuted or not: `W_gguf = W_hf[perm]`. The converter treats
# lora_B's rows (the output dimension) exactly as it treats the weight's, so the delta in GGUF
# space is `B[perm] @ A`. The candidate name comes from gguf-py's tensor name map (the table the
# converter maps names with), and the data decides: the HF tensor, cast to the GGUF tensor's type
# as the converter casts it, must equal the GGUF tensor byte for byte, either as is or row for
# row under one permutation. Anything else (a tensor the converter splits, fuses, transposes or
# rescales; a name the map lacks; duplicate rows that leave the permutation open) is
# `LoraLayoutUnknown`, and the converter runs after all.
# --------------------------------------------------------------------------------------------


class LoraTarget(BaseModel):
    """Where one HF weight sits in the base GGUF."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gguf_name: str
    perm: list[int] | None = Field(None, description="GGUF row i is HF row perm[i]; None: the rows are in HF order.")


class LoraLayout(BaseModel):
    """HF weight name -> its GGUF tensor, learned from one base GGUF and verified against its bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_gguf: str = Field(..., description="The base GGUF's file name (a cache entry's name: content, outtype, toolchain).")
    base_size: int
    base_mtime_ns: int
    targets: dict[str, LoraTarget]


def lora_layout_cache_path(base_gguf: Path, hf_weight_names: Iterable[str]) -> Path:
    """The cached layout of (base GGUF, set of HF weights); the base's cache name already names its content."""
    digest = hashlib.sha256("\n".join(sorted(set(hf_weight_names))).encode()).hexdigest()[:16]
    return cache_dir() / "lora-layout" / f"{Path(base_gguf).name}-{digest}.json"


def learn_lora_layout(base_dir: Path, base_gguf: Path, hf_weight_names: Iterable[str]) -> LoraLayout:
    """Where each HF weight of `base_dir` went in `base_gguf` (its name and row order), verified by data.

    Raises `LoraLayoutUnknown` naming the weight that cannot be placed. Reads one tensor at a time,
    memory-mapped and released as it goes. Cached as JSON per (base GGUF, weight names).
    """
    base_dir, base_gguf = Path(base_dir), Path(base_gguf)
    names = sorted(set(hf_weight_names))
    cache = lora_layout_cache_path(base_gguf, names)
    stat = base_gguf.stat()
    if cache.is_file():
        try:
            cached = LoraLayout.model_validate_json(cache.read_text(encoding="utf-8"))
        except ValueError:
            cached = None  # a damaged entry is learned again
        if (cached is not None and sorted(cached.targets) == names
                and (cached.base_size, cached.base_mtime_ns) == (stat.st_size, stat.st_mtime_ns)):
            return cached

    import gguf

    base = read_gguf_layout(base_gguf)
    arch_name = base.metadata.get("general.architecture")
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch_name)
    block_count = base.metadata.get(f"{arch_name}.block_count")
    if arch is None or not isinstance(block_count, int):
        raise LoraLayoutUnknown(
            f"{base_gguf.name}: architecture {arch_name!r} with block_count {block_count!r} is not in gguf-py's tensor map"
        )
    name_map = gguf.get_tensor_name_map(arch, block_count)
    base_by_name = {t.name: t for t in base.tensors}
    tables = _safetensors_tables(base_dir)
    targets: dict[str, LoraTarget] = {}
    for name in names:
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise LoraLayoutUnknown(f"{name}: gguf-py's {arch_name} tensor map has no GGUF name for it")
        if gguf_name not in base_by_name:
            raise LoraLayoutUnknown(f"{name}: the base GGUF {base_gguf.name} holds no {gguf_name}")
        if name not in tables:
            raise LoraLayoutUnknown(f"{name}: no safetensors file in {base_dir} holds it")
        path, data_start, meta = tables[name]
        # Each tensor on its own mappings of both files (see `_release`).
        perm = _learn_rows(f"{name} -> {gguf_name}", np.memmap(path, mode="r"), data_start, meta,
                           np.memmap(base_gguf, mode="r"), base_by_name[gguf_name])
        targets[name] = LoraTarget(gguf_name=gguf_name, perm=perm)
    seen: dict[str, str] = {}
    for name, target in targets.items():
        if target.gguf_name in seen:  # e.g. a tensor the converter shares between two weights
            raise LoraLayoutUnknown(f"{name} and {seen[target.gguf_name]} both map to {target.gguf_name}")
        seen[target.gguf_name] = name
    layout = LoraLayout(base_gguf=base_gguf.name, base_size=stat.st_size, base_mtime_ns=stat.st_mtime_ns, targets=targets)
    write_text_atomic(cache, layout.model_dump_json(exclude_defaults=True))
    return layout


def _safetensors_tables(base_dir: Path) -> dict[str, tuple[Path, int, dict[str, Any]]]:
    """HF weight name -> (safetensors file, its data start, the tensor's header entry), over every shard."""
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, LoraLayoutUnknown, "the converter reads the base instead").get("weight_map") or {}
        shards = [base_dir / str(n) for n in sorted(set(weight_map.values()))]
    else:
        shards = sorted(base_dir.glob("*.safetensors"))
    tables: dict[str, tuple[Path, int, dict[str, Any]]] = {}
    for shard in shards:
        if not shard.is_file():
            raise LoraLayoutUnknown(f"{base_dir}: the shard {shard.name} the index names is missing")
        header, data_start = _safetensors_table(shard)
        tables.update({name: (shard, data_start, meta) for name, meta in header.items()})
    return tables


def _learn_rows(label: str, st_mm: np.memmap, data_start: int, meta: dict[str, Any], base_mm: np.memmap,
                info: GGUFTensorInfo) -> list[int] | None:
    """The row permutation that takes the HF tensor to the GGUF one (None: identity), checked byte for byte.

    The HF rows are cast to the GGUF tensor's type the way the converter casts them, a block at a
    time, so both sides compare as bytes: kept as they are where the types agree (the converter
    hands f16 and f32 to numpy unchanged), else widened to float32 and put through gguf-py's
    `quants.quantize`.
    """
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType(info.ggml_type)
    if qtype not in _FLOAT_QTYPES:
        raise LoraLayoutUnknown(f"{label}: the base GGUF stores it as {qtype.name}, not a float type")
    shape = tuple(int(d) for d in meta["shape"])
    if len(shape) != 2:
        raise LoraLayoutUnknown(f"{label}: a {len(shape)}-D tensor")
    if shape != info.shape:
        raise LoraLayoutUnknown(f"{label}: shape {list(shape)} in the base folder, {list(info.shape)} in the base GGUF")
    dtype = meta["dtype"]
    if dtype not in _ST_ITEMSIZE:
        raise LoraLayoutUnknown(f"{label}: the base folder stores it as {dtype}, not a float type")
    rows, cols = shape
    src_start = data_start + int(meta["data_offsets"][0])
    src_row = cols * _ST_ITEMSIZE[dtype]
    dst_row = info.nbytes // rows

    same_type = (dtype, qtype) in (("F16", GGMLQuantizationType.F16), ("F32", GGMLQuantizationType.F32))

    def hf_block(r0: int, r1: int) -> np.ndarray:
        start = src_start + r0 * src_row
        raw = st_mm[start: start + (r1 - r0) * src_row]
        if same_type:
            block = np.array(raw).reshape(r1 - r0, dst_row)
        else:
            x = quants.quantize(_as_f32(raw, dtype, (r1 - r0, cols), label), qtype)
            block = np.ascontiguousarray(x).view(np.uint8).reshape(r1 - r0, dst_row)
        _release(st_mm, start, (r1 - r0) * src_row)
        return block

    def gguf_block(r0: int, r1: int) -> np.ndarray:
        """A copy, so the mapped pages can go at once."""
        start = info.offset + r0 * dst_row
        block = np.array(base_mm[start: start + (r1 - r0) * dst_row]).reshape(r1 - r0, dst_row)
        _release(base_mm, start, (r1 - r0) * dst_row)
        return block

    spans = [(r0, min(rows, r0 + _ROW_CHUNK)) for r0 in range(0, rows, _ROW_CHUNK)]
    if all(np.array_equal(hf_block(r0, r1), gguf_block(r0, r1)) for r0, r1 in spans):
        return None
    # Not in HF order: each GGUF row must be exactly one HF row, each HF row used once.
    hf_rows: dict[bytes, int] = {}
    for r0, r1 in spans:
        for i, row in enumerate(hf_block(r0, r1), start=r0):
            first = hf_rows.setdefault(row.tobytes(), i)
            if first != i:
                raise LoraLayoutUnknown(f"{label}: HF rows {first} and {i} are equal, so the row order is ambiguous")
    perm: list[int] = []
    for r0, r1 in spans:
        for i, row in enumerate(gguf_block(r0, r1), start=r0):
            j = hf_rows.pop(row.tobytes(), None)
            if j is None:
                raise LoraLayoutUnknown(f"{label}: GGUF row {i} is no row of the HF tensor (not a row permutation)")
            perm.append(j)
    return perm


def merge_peft_adapter(
    adapter_dir: Path,
    base_dir: Path,
    base_gguf: Path,
    out_path: Path,
    info: AdapterInfo | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Merge a peft LoRA adapter straight into the base's float GGUF (`_stream_merge`); returns `out_path`.

    Names and lora_B row orders come from `learn_lora_layout`; each module gets peft's own scale
    (`alpha_i / r`, or `alpha_i / sqrt(r)` with use_rslora). The adapter's safetensors are read
    memory-mapped, one pair at a time. Raises `LoraLayoutUnknown` (before writing anything) for
    what this path does not carry: a legacy .bin adapter, embedding LoRA, whole tensors, or a
    base whose conversion cannot be read back.
    """
    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    if info is None:
        info = validate_adapter(adapter_dir, base_dir)
    info.check_mode("merge")
    if info.full_tensors or info.modules_to_save or info.vocab_resized:
        raise LoraLayoutUnknown(f"the adapter brings whole tensors ({', '.join(info.full_tensors[:4]) or 'modules_to_save'})")
    weights = _adapter_weights_file(adapter_dir)
    if weights.suffix != ".safetensors":
        raise LoraLayoutUnknown(f"{weights.name} is a torch pickle, which only torch reads")
    header, data_start = _safetensors_table(weights)
    modules: dict[str, dict[str, str]] = {}
    for name in header:
        m = _LORA_RE.match(name.removeprefix(_PEFT_PREFIX))
        if m is None:
            raise LoraLayoutUnknown(f"{weights.name} holds {name}, which is not a lora_A/lora_B tensor")
        if m["part"] not in ("lora_A", "lora_B"):
            raise LoraLayoutUnknown(f"{name}: embedding LoRA, which the converter transposes its own way")
        modules.setdefault(m["module"], {})[m["part"]] = name
    layout = learn_lora_layout(base_dir, base_gguf, [f"{module}.weight" for module in modules])

    def load(module: str) -> LoraPair:
        parts = modules[module]
        mm = np.memmap(weights, mode="r")  # this pair's own mapping (see `_release`)
        lora_a, lora_b = (_st_tensor_f32(mm, data_start, parts[p], header[parts[p]], weights) for p in ("lora_A", "lora_B"))
        perm = layout.targets[f"{module}.weight"].perm
        if perm is not None:
            if len(perm) != lora_b.shape[0]:
                raise MergeFailed(f"{module}: lora_B has {lora_b.shape[0]} rows, the learned layout {len(perm)}")
            lora_b = lora_b[np.asarray(perm)]
        return lora_a, lora_b, _peft_scale(info, module, lora_b.shape[1])

    loras = {layout.targets[f"{module}.weight"].gguf_name: (lambda m=module: load(m)) for module in modules}
    return _stream_merge(base_gguf, out_path, loras, on_progress)


# --------------------------------------------------------------------------------------------
# The reference: transformers + peft
# --------------------------------------------------------------------------------------------

# Files beside the weights that the converter reads for the vocabulary and the chat template.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)


def peft_merge_to_gguf(
    adapter_dir: Path,
    base_dir: Path,
    toolchain: Toolchain,
    outtype: Literal["f16", "bf16", "f32"] = "f16",
    info: AdapterInfo | None = None,
    base_key: str | None = None,
    on_line: Callable[[str], None] | None = None,
) -> tuple[Path, bool]:
    """transformers + peft `merge_and_unload`, save, convert with the pinned converter; returns (path, reused).

    The base loads in its stored dtype (peft computes each delta in float32 on CPU). A resized
    vocabulary is applied to the base first, and the adapter's own tokenizer goes with the merged
    model. Cached by (base content, adapter sha256, outtype, toolchain).
    """
    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    if info is None:
        info = validate_adapter(adapter_dir, base_dir)
    info.check_mode("peft")
    if base_key is None:
        from tasks.manifest import content_key

        base_key = content_key(fingerprint(model_files(base_dir), base_dir))
    final = gguf_cache_path(f"{base_key}-peft{info.sha256[:16]}", outtype, toolchain)

    def build(tmp: Path) -> None:
        # Named like the entry's temporaries, so a killed run's folder is swept by the next builder.
        with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{final.name}.peft-", dir=final.parent) as staging:
            merged_dir = Path(staging) / "merged"
            _peft_merge_folder(adapter_dir, base_dir, merged_dir, info)
            run_converter("convert_hf_to_gguf.py", ["--outtype", outtype, "--outfile", str(tmp), str(merged_dir)],
                          toolchain, on_line)
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise ConversionFailed(f"the converter exited cleanly but wrote nothing for the peft merge of {adapter_dir}")

    return cached_build(final, build)


def _peft_merge_folder(adapter_dir: Path, base_dir: Path, out: Path, info: AdapterInfo) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with torch.inference_mode():
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
        if info.vocab_resized:
            model.resize_token_embeddings(info.adapter_vocab_size, mean_resizing=False)  # the adapter brings the rows
        model = PeftModel.from_pretrained(model, adapter_dir)
        model = model.merge_and_unload()
        model.save_pretrained(out)
        del model
    tokenizer_source = adapter_dir if info.ships_tokenizer else base_dir
    for name in _TOKENIZER_FILES:
        src = tokenizer_source / name
        if not src.is_file() and tokenizer_source is adapter_dir:
            src = base_dir / name  # e.g. a chat template the adapter did not re-save
        if src.is_file():
            shutil.copyfile(src, out / name)
    gen = base_dir / "generation_config.json"
    if gen.is_file() and not (out / "generation_config.json").is_file():
        shutil.copyfile(gen, out / "generation_config.json")


# --------------------------------------------------------------------------------------------
# One call for the flow
# --------------------------------------------------------------------------------------------


def merged_gguf_cache_path(base_key: str, info: AdapterInfo, outtype: str, toolchain: Toolchain) -> Path:
    return gguf_cache_path(f"{base_key}-merge{info.sha256[:16]}", outtype, toolchain)


@step(name="adapter")
def apply_adapter(
    info: AdapterInfo,
    mode: AdapterMode,
    *,
    base_dir: Path,
    base_gguf: Path | None,
    base_key: str,
    toolchain: Toolchain,
    outtype: Literal["f16", "bf16", "f32"] = "f16",
    on_line: Callable[[str], None] | None = None,
) -> AdapterOutput:
    """Run one adapter mode after `validate_adapter`; every result is cached and shared across runs.

    - merge: the peft adapter streamed into `base_gguf` (cached per base and adapter), placed by
      the layout learned from the base's own conversion (`merge_peft_adapter`). Where that layout
      cannot be learned, the GGUF LoRA by `convert_lora_to_gguf.py` (cached) is merged instead,
      and `lora_gguf` names it.
    - adapter: GGUF LoRA (cached); `gguf` is the base GGUF itself, to quantize as usual.
    - peft: the reference merge, converted (cached per base and adapter).
    """
    info.check_mode(mode)
    started = time.perf_counter()
    adapter_dir = Path(info.path)
    if mode == "peft":
        path, reused = peft_merge_to_gguf(adapter_dir, base_dir, toolchain, outtype, info=info, base_key=base_key, on_line=on_line)
        return AdapterOutput(mode=mode, adapter_sha256=info.sha256, gguf=str(path), reused=reused,
                             seconds=round(time.perf_counter() - started, 3))
    if base_gguf is None:
        raise KilnError(f"--adapter-mode {mode} needs the base's float GGUF")
    base_gguf = Path(base_gguf)
    if mode == "adapter":
        lora, lora_reused = convert_adapter_to_gguf(adapter_dir, base_dir, toolchain, info=info, on_line=on_line)
        return AdapterOutput(mode=mode, adapter_sha256=info.sha256, gguf=str(base_gguf), lora_gguf=str(lora),
                             reused=lora_reused, seconds=round(time.perf_counter() - started, 3))
    final = merged_gguf_cache_path(base_key, info, outtype, toolchain)
    lora: Path | None = None

    def build(tmp: Path) -> None:
        nonlocal lora
        report = progress_reporter(f"merge adapter {adapter_dir.name} into {base_gguf.name}")
        lora = merge_adapter_into_gguf(info, base_dir, base_gguf, tmp, toolchain, on_line=on_line,
                                       on_progress=lambda done, total: report(done / total))

    final, reused = cached_build(final, build)
    return AdapterOutput(mode=mode, adapter_sha256=info.sha256, gguf=str(final), lora_gguf=str(lora) if lora else None,
                         reused=reused, seconds=round(time.perf_counter() - started, 3))


def merge_adapter_into_gguf(
    info: AdapterInfo,
    base_dir: Path,
    base_gguf: Path,
    out_path: Path,
    toolchain: Toolchain,
    on_line: Callable[[str], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path | None:
    """`--adapter-mode merge` into `out_path`, uncached; returns the GGUF LoRA it merged, None when it needed none.

    The learned layout first (`merge_peft_adapter`); the converter, a torch process and the
    costliest part of the mode, runs only where the base's own conversion does not show where
    the adapter goes.
    """
    adapter_dir = Path(info.path)
    try:
        merge_peft_adapter(adapter_dir, base_dir, base_gguf, out_path, info, on_progress)
        return None
    except LoraLayoutUnknown as exc:
        logger.warning("adapter %s: cannot place it from the base's own conversion (%s); "
                       "converting it with convert_lora_to_gguf.py", adapter_dir.name, exc)
    lora, _ = convert_adapter_to_gguf(adapter_dir, base_dir, toolchain, info=info, on_line=on_line)
    merge_lora_gguf(base_gguf, lora, out_path, on_progress)
    return lora


def describe(info: AdapterInfo) -> Iterable[str]:
    """Human lines for logs and the run summary."""
    yield f"adapter {info.path} sha256 {info.sha256[:16]}"
    yield (f"rank {info.rank} alpha {info.alpha:g} ({info.scale_rule}), {info.adapted_weights} weights over "
           f"{', '.join(info.target_modules)}")
    for mode, why in info.unsupported.items():
        yield f"mode {mode}: unavailable ({why})"
    yield from info.notes
