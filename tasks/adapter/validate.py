"""Validating a PEFT adapter against its base: shapes read without loading weights, then every check."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

from registry.models import SourceFile
from registry.spec import BaseModelSpec
from tasks import safetensors_file
from tasks.adapter.records import (
    _DORA_RE,
    _LORA_RE,
    _PEFT_PREFIX,
    ADAPTER_CONFIG,
    ADAPTER_TOKENIZER_FILES,
    ADAPTER_WEIGHTS,
    AdapterIncompatible,
    AdapterInfo,
    AdapterMode,
)
from tasks.fetch import fingerprint, read_config
from tasks.files import (
    read_json_object,
)

# --------------------------------------------------------------------------------------------
# Reading shapes without loading weights
# --------------------------------------------------------------------------------------------


def safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensor table of a .safetensors file (name -> dtype, shape, offsets), read from its header only."""
    return _safetensors_table(path)[0]


def _safetensors_table(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """The tensor table of a .safetensors file and the file offset its data_offsets count from."""
    try:
        header = safetensors_file.read_header(path)
    except safetensors_file.SafetensorsFileError as exc:
        raise AdapterIncompatible(str(exc)) from None
    return header.tensors, header.data_start


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
