"""LoRA adapters: every refusal of validation, and the three modes on a real peft adapter.

The equivalence test is the contract of `--adapter-mode merge`: on SmolLM2-135M-Instruct with a
rank-16 adapter over the seven projections (lora_B random, not zero), the streamed merge's
tensors equal the peft reference's within f16 rounding, and both generate the same greedy tokens
in llama.cpp. The merge places the adapter by the layout learned from the base's own conversion;
its file is byte for byte the one the converter's GGUF LoRA gives (SmolLM2 is a llama: Q and K
rows are permuted), and where the layout cannot be learned the converter runs instead.
"""

from __future__ import annotations

import filecmp
import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from registry import get_base
from tasks import gguf_file
from tasks.adapter import (
    AdapterIncompatible,
    AdapterModeUnsupported,
    LoraLayoutUnknown,
    MergeFailed,
    apply_adapter,
    convert_adapter_to_gguf,
    fold_scale_into_lora_b,
    learn_lora_layout,
    lora_layout_cache_path,
    merge_lora_gguf,
    merge_peft_adapter,
    read_gguf_layout,
    validate_adapter,
)

SPEC_KEY = "smollm2-135m-instruct"
BASE_VOCAB = 49152
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def spec():
    return get_base(SPEC_KEY)


def variant(src: Path, dest: Path, weights: Path | None = None, extra_files: dict[str, str] | None = None,
            **config_changes) -> Path:
    """A copy of the adapter with its config edited (weights linked, or replaced by `weights`)."""
    dest.mkdir(parents=True)
    config = json.loads((src / "adapter_config.json").read_text())
    for key, value in config_changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    (dest / "adapter_config.json").write_text(json.dumps(config))
    os.symlink(weights or (src / "adapter_model.safetensors"), dest / "adapter_model.safetensors")
    for name, text in (extra_files or {}).items():
        (dest / name).write_text(text)
    return dest


def tokenizer_with(base_dir: Path, n_added: int) -> str:
    """The base's tokenizer.json with `n_added` new tokens appended after its vocabulary."""
    data = json.loads((base_dir / "tokenizer.json").read_text())
    for i in range(n_added):
        data["added_tokens"].append({
            "id": BASE_VOCAB + i, "content": f"<|kiln_{i}|>", "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": True,
        })
    return json.dumps(data)


def weights_with_embedding(src: Path, dest: Path, rows: int) -> Path:
    """One LoRA pair of the adapter plus a full embed_tokens of `rows` rows (what modules_to_save writes)."""
    from safetensors.numpy import load_file, save_file

    tensors = {k: v for k, v in load_file(src / "adapter_model.safetensors").items() if ".layers.0.self_attn.q_proj." in k}
    tensors["base_model.model.model.embed_tokens.weight"] = np.zeros((rows, 576), dtype=np.float16)
    save_file(tensors, str(dest))
    return dest


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def test_validate_reads_the_adapter(adapter_info, peft_adapter, demo_model_dir):
    info = adapter_info
    assert (info.rank, info.alpha, info.scale_rule) == (16, 32.0, "alpha/r")
    assert info.target_modules == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert info.adapted_weights == 30 * 7
    assert info.supported_modes == ["merge", "adapter", "peft"]
    assert len(info.sha256) == 64 and {f.path for f in info.files} == {"adapter_config.json", "adapter_model.safetensors"}
    assert info.base_vocab_size == BASE_VOCAB and info.adapter_vocab_size is None
    # The same content elsewhere has the same sha256: the manifest names the adapter, not the folder;
    # peft writes target_modules from a set, and their order does not change the adapter either.
    moved = Path(str(peft_adapter) + "-moved")
    shutil.copytree(peft_adapter, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["target_modules"] = list(reversed(config["target_modules"]))
    (moved / "adapter_config.json").write_text(json.dumps(config, indent=4))
    try:
        assert validate_adapter(moved, demo_model_dir, None).sha256 == info.sha256
        config["lora_alpha"] = 16
        (moved / "adapter_config.json").write_text(json.dumps(config))
        assert validate_adapter(moved, demo_model_dir, None).sha256 != info.sha256
    finally:
        shutil.rmtree(moved)


def test_refuses_an_adapter_for_another_base(peft_adapter, demo_model_dir, spec, tmp_path):
    other = variant(peft_adapter, tmp_path / "a", base_model_name_or_path="Qwen/Qwen2.5-0.5B-Instruct")
    with pytest.raises(AdapterIncompatible, match=r"made for 'Qwen/Qwen2.5-0.5B-Instruct'.*HuggingFaceTB/SmolLM2-135M-Instruct"):
        validate_adapter(other, demo_model_dir, spec)


def test_accepts_the_base_by_hub_id_or_cache_path(peft_adapter, demo_model_dir, spec, tmp_path):
    by_id = variant(peft_adapter, tmp_path / "id", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert validate_adapter(by_id, demo_model_dir, spec).notes == []
    cache = "/home/u/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/" + "a" * 40
    by_cache = variant(peft_adapter, tmp_path / "cache", base_model_name_or_path=cache)
    assert validate_adapter(by_cache, demo_model_dir, spec).notes == []


def test_refuses_targets_the_spec_does_not_list(peft_adapter, demo_model_dir, spec):
    narrow = spec.model_copy(update={"target_modules": ["q_proj", "v_proj"]})
    with pytest.raises(AdapterIncompatible, match=r"targets down_proj, gate_proj, k_proj, o_proj, up_proj.*does not list"):
        validate_adapter(peft_adapter, demo_model_dir, narrow)


def test_refuses_targets_the_architecture_lacks(peft_adapter, demo_model_dir, spec, tmp_path):
    odd = variant(peft_adapter, tmp_path / "a", target_modules=["q_proj", "query_key_value"])
    with pytest.raises(AdapterIncompatible, match=r"query_key_value, which LlamaForCausalLM does not have"):
        validate_adapter(odd, demo_model_dir, spec)


def test_refuses_tied_lm_head(peft_adapter, demo_model_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = dict(load_file(peft_adapter / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.lora_A.weight"] = np.zeros((16, 576), np.float32)
    tensors["base_model.model.lm_head.lora_B.weight"] = np.zeros((BASE_VOCAB, 16), np.float32)
    save_file(tensors, str(tmp_path / "w.safetensors"))
    head = variant(peft_adapter, tmp_path / "a", weights=tmp_path / "w.safetensors")
    with pytest.raises(AdapterIncompatible, match=r"lm_head.*ties lm_head to the token embeddings"):
        validate_adapter(head, demo_model_dir, None)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"r": ...}, r"r must be a positive integer, got None"),
        ({"r": 0}, r"r must be positive, got 0"),
        ({"lora_alpha": -8}, r"lora_alpha must be positive, got -8"),
        ({"lora_alpha": "32"}, r"lora_alpha must be a positive number"),
        ({"r": 8}, r"the weights have rank 16, but .* says r=8"),
        ({"peft_type": "IA3"}, r"peft_type is IA3"),
    ],
)
def test_refuses_bad_rank_alpha_or_type(peft_adapter, demo_model_dir, tmp_path, changes, message):
    bad = variant(peft_adapter, tmp_path / "a", **changes)
    with pytest.raises(AdapterIncompatible, match=message):
        validate_adapter(bad, demo_model_dir, None)


def test_refuses_a_folder_that_is_not_an_adapter(demo_model_dir, tmp_path):
    with pytest.raises(AdapterIncompatible, match="no adapter_config.json"):
        validate_adapter(tmp_path, demo_model_dir, None)


def test_refuses_another_model_size_before_any_weight_is_read(peft_adapter, demo_model_dir, tmp_path):
    """A base folder with config and tokenizer only (preflight): shapes come from a meta-device skeleton."""
    # Same folder name as the base the adapter names, elsewhere: matched by name, checked by shape.
    meta = tmp_path / "meta" / demo_model_dir.name
    meta.mkdir(parents=True)
    config = json.loads((demo_model_dir / "config.json").read_text())
    shutil.copy(demo_model_dir / "tokenizer.json", meta / "tokenizer.json")
    (meta / "config.json").write_text(json.dumps(config))
    assert validate_adapter(peft_adapter, meta, None).adapted_weights == 210  # same model, no weights: fine
    smaller = tmp_path / "smaller" / demo_model_dir.name
    smaller.mkdir(parents=True)
    (smaller / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 20}))
    with pytest.raises(AdapterIncompatible, match=r"layers\.20\..*which the base does not have \(it has 20 layers\)"):
        validate_adapter(peft_adapter, smaller, None)
    narrower = tmp_path / "narrower" / demo_model_dir.name
    narrower.mkdir(parents=True)
    (narrower / "config.json").write_text(json.dumps({**config, "intermediate_size": 1024}))
    with pytest.raises(AdapterIncompatible, match=r"down_proj: .*imply a \[576, 1536\] weight, but the base.s is \[576, 1024\]"):
        validate_adapter(peft_adapter, narrower, None)


def test_dora_is_understood_and_only_peft_applies_it(peft_adapter, demo_model_dir, spec, tmp_path):
    dora = variant(peft_adapter, tmp_path / "a", use_dora=True)
    info = validate_adapter(dora, demo_model_dir, spec)
    assert info.use_dora and info.supported_modes == ["peft"]
    for mode in ("merge", "adapter"):
        with pytest.raises(AdapterModeUnsupported, match=r"DoRA.*Use --adapter-mode peft"):
            validate_adapter(dora, demo_model_dir, spec, mode=mode)
    validate_adapter(dora, demo_model_dir, spec, mode="peft")


def test_rslora_is_folded_into_lora_b(peft_adapter, demo_model_dir, tmp_path):
    """llama.cpp scales by alpha/r; rslora means alpha/sqrt(r): lora_B carries sqrt(r) = 4 in the converted copy."""
    from safetensors.numpy import load_file

    rs = variant(peft_adapter, tmp_path / "a", use_rslora=True)
    info = validate_adapter(rs, demo_model_dir, None)
    assert info.scale_rule == "alpha/sqrt(r)" and info.needs_scale_fold and info.supported_modes == ["merge", "adapter", "peft"]
    fold_scale_into_lora_b(rs, tmp_path / "folded", info)
    before = load_file(peft_adapter / "adapter_model.safetensors")
    after = load_file(tmp_path / "folded" / "adapter_model.safetensors")
    for name, value in before.items():
        factor = math.sqrt(16) if "lora_B" in name else 1.0
        np.testing.assert_allclose(after[name], value * factor, rtol=1e-6)


def test_refuses_a_resized_vocabulary_without_its_tokenizer(peft_adapter, demo_model_dir, tmp_path):
    weights = weights_with_embedding(peft_adapter, tmp_path / "w.safetensors", rows=BASE_VOCAB + 8)
    resized = variant(peft_adapter, tmp_path / "a", weights=weights, modules_to_save=["embed_tokens"])
    with pytest.raises(AdapterIncompatible, match=r"embeddings have 49160 rows, the base's vocabulary has 49152.*no tokenizer"):
        validate_adapter(resized, demo_model_dir, None)


def test_refuses_added_tokens_without_embeddings(peft_adapter, demo_model_dir, tmp_path):
    tok = variant(peft_adapter, tmp_path / "a", extra_files={"tokenizer.json": tokenizer_with(demo_model_dir, 8)})
    with pytest.raises(AdapterIncompatible, match=r"tokenizer has 49160 tokens, the base's vocabulary has 49152"):
        validate_adapter(tok, demo_model_dir, None)


def test_refuses_a_tokenizer_larger_than_the_new_embeddings(peft_adapter, demo_model_dir, tmp_path):
    weights = weights_with_embedding(peft_adapter, tmp_path / "w.safetensors", rows=BASE_VOCAB + 4)
    both = variant(peft_adapter, tmp_path / "a", weights=weights, modules_to_save=["embed_tokens"],
                   extra_files={"tokenizer.json": tokenizer_with(demo_model_dir, 8)})
    with pytest.raises(AdapterIncompatible, match=r"tokenizer has 49160 tokens but its embeddings have 49156 rows"):
        validate_adapter(both, demo_model_dir, None)


def test_a_consistent_resized_vocabulary_goes_to_peft_only(peft_adapter, demo_model_dir, tmp_path):
    weights = weights_with_embedding(peft_adapter, tmp_path / "w.safetensors", rows=BASE_VOCAB + 8)
    both = variant(peft_adapter, tmp_path / "a", weights=weights, modules_to_save=["embed_tokens"],
                   extra_files={"tokenizer.json": tokenizer_with(demo_model_dir, 8)})
    info = validate_adapter(both, demo_model_dir, None)
    assert info.vocab_resized and (info.adapter_vocab_size, info.adapter_tokenizer_size) == (49160, 49160)
    assert info.supported_modes == ["peft"]
    with pytest.raises(AdapterModeUnsupported, match=r"resized the vocabulary from 49152 to 49160"):
        info.check_mode("merge")


def test_peft_mode_carries_a_resized_vocabulary(peft_adapter, demo_model_dir, demo_base_key, toolchain, tmp_path):
    """Added tokens with their embedding rows (modules_to_save) and tokenizer: peft mode exports them."""
    from llama_cpp import Llama
    from safetensors.numpy import load_file, save_file

    weights = weights_with_embedding(peft_adapter, tmp_path / "w.safetensors", rows=BASE_VOCAB + 8)
    tensors = load_file(weights)
    base_embedding = load_file(demo_model_dir / "model.safetensors")["model.embed_tokens.weight"]
    new_rows = np.random.default_rng(0).standard_normal((8, 576)).astype(np.float16) * np.float16(0.02)
    tensors["base_model.model.model.embed_tokens.weight"] = np.concatenate([base_embedding, new_rows])
    save_file(tensors, str(weights))
    resized = variant(peft_adapter, tmp_path / "a", weights=weights, modules_to_save=["embed_tokens"],
                      extra_files={"tokenizer.json": tokenizer_with(demo_model_dir, 8)})
    shutil.copy(demo_model_dir / "tokenizer_config.json", resized / "tokenizer_config.json")
    info = validate_adapter(resized, demo_model_dir, None, mode="peft")
    out = apply_adapter(info, "peft", base_dir=demo_model_dir, base_gguf=None, base_key=demo_base_key, toolchain=toolchain)
    layout = read_gguf_layout(Path(out.gguf))
    tokens = gguf_file.read_metadata(Path(out.gguf), ["tokenizer.ggml.tokens"])["tokenizer.ggml.tokens"]
    assert len(tokens) == BASE_VOCAB + 8
    assert [t.shape for t in layout.tensors if t.name == "token_embd.weight"] == [(BASE_VOCAB + 8, 576)]
    llm = Llama(model_path=out.gguf, n_ctx=128, n_threads=1, verbose=False)
    assert llm.n_vocab() == BASE_VOCAB + 8
    assert llm.tokenize(b"<|kiln_3|>", add_bos=False, special=True) == [BASE_VOCAB + 3]
    llm.close()


def test_accepts_a_legacy_bin_adapter(peft_adapter, demo_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    legacy = tmp_path / "bin"
    legacy.mkdir()
    shutil.copy(peft_adapter / "adapter_config.json", legacy)
    torch.save(load_file(peft_adapter / "adapter_model.safetensors"), legacy / "adapter_model.bin")
    info = validate_adapter(legacy, demo_model_dir, None)
    assert info.adapted_weights == 210 and any(f.path == "adapter_model.bin" for f in info.files)


# --------------------------------------------------------------------------------------------
# The modes
# --------------------------------------------------------------------------------------------


def _tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF as a memory-mapped numpy view (f32/f16 typed, others as raw bytes).

    (gguf's GGUFReader would parse the 49k-token vocabulary into numpy objects: seconds per file.)
    """
    mm = np.memmap(path, mode="r")
    dtypes = {0: np.float32, 1: np.float16}
    out = {}
    for t in read_gguf_layout(path).tensors:
        raw = mm[t.offset: t.offset + t.nbytes]
        out[t.name] = raw.view(dtypes[t.ggml_type]).reshape(t.shape) if t.ggml_type in dtypes else raw
    return out


def _greedy(model: Path, lora: Path | None = None, n_tokens: int = 16) -> list[list[int]]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=512, n_threads=1, n_threads_batch=1,
                seed=0, verbose=False)
    runs = []
    for prompt in PROMPTS:
        tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        out: list[int] = []
        for token in llm.generate(tokens, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            if token == llm.token_eos() or len(out) == n_tokens:
                break
            out.append(token)
        runs.append(out)
    llm.close()
    return runs


def test_lora_gguf_layout(lora_gguf):
    layout = read_gguf_layout(lora_gguf)
    assert layout.metadata["general.type"] == "adapter" and layout.metadata["adapter.type"] == "lora"
    assert layout.metadata["adapter.lora.alpha"] == 32.0
    names = {t.name for t in layout.tensors}
    assert len(names) == 2 * 210 and "blk.0.attn_q.weight.lora_a" in names and "blk.29.ffn_down.weight.lora_b" in names


def test_merge_equals_peft_within_f16_rounding(merged_gguf, peft_output, demo_f16_gguf):
    """The streamed merge and the peft reference agree tensor by tensor; the adapter changed every target."""
    merged, reference, base = _tensors(merged_gguf), _tensors(Path(peft_output.gguf)), _tensors(demo_f16_gguf)
    assert merged.keys() == reference.keys() == base.keys()
    changed = 0
    worst_ulps = 0.0
    for name, m in merged.items():
        r, b = reference[name], base[name]
        assert m.dtype == r.dtype == b.dtype and m.shape == r.shape
        if np.array_equal(b, m):
            np.testing.assert_array_equal(m, r, err_msg=f"{name}: not adapted, yet peft's differs")
            continue
        changed += 1
        assert m.dtype == np.float16
        ulp = np.spacing(np.maximum(np.abs(m), np.abs(r))).astype(np.float32)
        ulps = np.abs(m.astype(np.float32) - r.astype(np.float32)) / ulp
        worst_ulps = max(worst_ulps, float(ulps.max()))
        assert ulps.max() <= 1.0, f"{name}: {ulps.max()} f16 ulps from the peft reference"
    assert changed == 210, f"expected the 210 adapted projections to change, {changed} did"
    # Same metadata as the base: the merged file is the base with new weights.
    assert read_gguf_layout(merged_gguf).metadata == read_gguf_layout(demo_f16_gguf).metadata
    print(f"merge vs peft: worst {worst_ulps} f16 ulps over {changed} adapted tensors")


def test_merge_and_peft_generate_the_same_tokens(merged_gguf, peft_output, demo_f16_gguf):
    merged = _greedy(merged_gguf)
    assert merged == _greedy(Path(peft_output.gguf))
    assert all(len(run) > 0 for run in merged)
    assert merged != _greedy(demo_f16_gguf), "the adapter should change what the model says"


def test_adapter_mode_matches_the_merge_in_llama_cpp(merged_gguf, lora_gguf, demo_f16_gguf):
    """The GGUF LoRA applied at run time (Ollama's ADAPTER) says what the merged file says."""
    assert _greedy(demo_f16_gguf, lora=lora_gguf) == _greedy(merged_gguf)


def test_shared_intermediates(adapter_info, peft_adapter, demo_model_dir, demo_f16_gguf, demo_base_key, toolchain,
                              lora_gguf, tmp_path):
    """Modes and adapters on one base share the cached base conversion and the cached GGUF LoRA."""
    base_stat = demo_f16_gguf.stat()
    first = apply_adapter(adapter_info, "merge", base_dir=demo_model_dir, base_gguf=demo_f16_gguf,
                          base_key=demo_base_key, toolchain=toolchain)
    assert first.lora_gguf is None and first.adapter_sha256 == adapter_info.sha256  # no converter needed
    again = apply_adapter(adapter_info, "merge", base_dir=demo_model_dir, base_gguf=demo_f16_gguf,
                          base_key=demo_base_key, toolchain=toolchain)
    assert again.reused and again.gguf == first.gguf
    shipped = apply_adapter(adapter_info, "adapter", base_dir=demo_model_dir, base_gguf=demo_f16_gguf,
                            base_key=demo_base_key, toolchain=toolchain)
    assert shipped.reused and shipped.gguf == str(demo_f16_gguf) and shipped.lora_gguf == str(lora_gguf)
    assert shipped.model_dump()["mode"] == "adapter"

    # A second adapter (rslora: same weights, another meaning) on the same base: its own merged file,
    # the same base GGUF, untouched; its delta is sqrt(16) = 4 times the first one's.
    rs = variant(peft_adapter, tmp_path / "rslora", use_rslora=True)
    rs_info = validate_adapter(rs, demo_model_dir, get_base(SPEC_KEY))
    second = apply_adapter(rs_info, "merge", base_dir=demo_model_dir, base_gguf=demo_f16_gguf,
                           base_key=demo_base_key, toolchain=toolchain)
    assert second.gguf != first.gguf
    assert demo_f16_gguf.stat().st_mtime_ns == base_stat.st_mtime_ns
    from tasks.convert import convert_to_gguf

    assert convert_to_gguf(demo_model_dir, demo_base_key, "f16", toolchain)[1] is True  # the base: converted once
    base, plain, scaled = (_tensors(p) for p in (demo_f16_gguf, Path(first.gguf), Path(second.gguf)))
    for name in ("blk.0.attn_v.weight", "blk.17.ffn_down.weight"):
        w = base[name].astype(np.float32)
        d_plain = plain[name].astype(np.float32) - w
        d_scaled = scaled[name].astype(np.float32) - w
        # Each merged value is rounded once to f16: half an ulp for `scaled`, four halves for 4 × `plain`.
        magnitude = np.maximum(np.abs(scaled[name]), np.abs(plain[name]))
        tolerance = 2.5 * np.spacing(magnitude).astype(np.float32)
        assert np.all(np.abs(d_scaled - 4 * d_plain) <= tolerance), name


def test_merge_refuses_mismatched_files(lora_gguf, demo_f16_gguf, tmp_path):
    with pytest.raises(MergeFailed, match="not a GGUF LoRA adapter"):
        merge_lora_gguf(demo_f16_gguf, demo_f16_gguf, tmp_path / "x.gguf")
    with pytest.raises(MergeFailed, match="not a readable GGUF file"):
        (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 4)
        merge_lora_gguf(tmp_path / "junk.gguf", lora_gguf, tmp_path / "y.gguf")
    assert not list(tmp_path.glob("x.gguf*")) and not (tmp_path / "y.gguf").exists()


def test_modes_refuse_what_they_cannot_apply(peft_adapter, demo_model_dir, toolchain, tmp_path):
    dora = variant(peft_adapter, tmp_path / "a", use_dora=True)
    info = validate_adapter(dora, demo_model_dir, None)
    with pytest.raises(AdapterModeUnsupported, match="DoRA"):
        convert_adapter_to_gguf(dora, demo_model_dir, toolchain, info=info)


# --------------------------------------------------------------------------------------------
# The layout learned from the base's own conversion
# --------------------------------------------------------------------------------------------

PROJECTIONS = [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
ADAPTED = [f"model.layers.{i}.{p}.weight" for i in range(30) for p in PROJECTIONS]


def llama_rows(n_head: int, head_dim: int = 64) -> list[int]:
    """The converter's Q/K row order (LlamaModel.permute) as GGUF row -> HF row."""
    return np.arange(n_head * head_dim).reshape(n_head, 2, head_dim // 2).swapaxes(1, 2).reshape(-1).tolist()


def test_layout_merge_is_the_converter_merge_byte_for_byte(merged_gguf, converter_merged_gguf, demo_f16_gguf):
    """No convert_lora_to_gguf.py, yet the very file its GGUF LoRA gives, permuted Q/K rows included."""
    assert filecmp.cmp(merged_gguf, converter_merged_gguf, shallow=False)
    merged, base = _tensors(merged_gguf), _tensors(demo_f16_gguf)
    assert not np.array_equal(merged["blk.0.attn_q.weight"], base["blk.0.attn_q.weight"])


def test_layout_is_learned_from_the_base_conversion_and_cached(demo_model_dir, demo_f16_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    layout = learn_lora_layout(demo_model_dir, demo_f16_gguf, ADAPTED)
    assert sorted(layout.targets) == sorted(ADAPTED)
    q, k = layout.targets["model.layers.3.self_attn.q_proj.weight"], layout.targets["model.layers.3.self_attn.k_proj.weight"]
    assert (q.gguf_name, q.perm) == ("blk.3.attn_q.weight", llama_rows(9))  # 9 heads
    assert (k.gguf_name, k.perm) == ("blk.3.attn_k.weight", llama_rows(3))  # 3 key/value heads
    assert {n for n, t in layout.targets.items() if t.perm is not None} == {
        n for n in ADAPTED if n.endswith(("q_proj.weight", "k_proj.weight"))}
    assert layout.targets["model.layers.29.mlp.down_proj.weight"].gguf_name == "blk.29.ffn_down.weight"
    assert lora_layout_cache_path(demo_f16_gguf, ADAPTED).is_file()

    # Asked again (in any order), the cache answers: the base's weights are not read any more.
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    assert learn_lora_layout(no_weights, demo_f16_gguf, list(reversed(ADAPTED))) == layout
    # Another set of weights is another entry, learned from the weights.
    with pytest.raises(LoraLayoutUnknown, match=r"model\.layers\.0\.mlp\.down_proj\.weight: no safetensors file"):
        learn_lora_layout(no_weights, demo_f16_gguf, ADAPTED[:7])


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("model.layers.0.self_attn.qkv_proj.weight", r"qkv_proj\.weight: gguf-py's llama tensor map has no GGUF name"),
        ("model.layers.0.input_layernorm.weight", r"input_layernorm\.weight -> blk\.0\.attn_norm\.weight: a 1-D tensor"),
    ],
)
def test_layout_refuses_what_the_base_conversion_does_not_show(name, message, demo_model_dir, demo_f16_gguf, tmp_path,
                                                               monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(LoraLayoutUnknown, match=message):
        learn_lora_layout(demo_model_dir, demo_f16_gguf, [name])


def test_merge_falls_back_to_the_converter(adapter_info, demo_model_dir, demo_f16_gguf, merged_gguf, toolchain,
                                           tmp_path, monkeypatch, caplog):
    """A base GGUF whose rows are not the HF rows: the layout is refused, the converter's GGUF LoRA merged."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))  # nothing reused: the fallback really runs
    altered = tmp_path / "altered-f16.gguf"
    shutil.copyfile(demo_f16_gguf, altered)
    v = next(t for t in read_gguf_layout(altered).tensors if t.name == "blk.5.attn_v.weight")
    row_bytes = v.nbytes // v.shape[0]
    mm = np.memmap(altered, mode="r+")
    mm[v.offset + 7 * row_bytes: v.offset + 8 * row_bytes].view(np.uint16)[:] ^= 1  # row 7: every value 1 ulp off
    mm.flush()
    del mm
    with pytest.raises(LoraLayoutUnknown, match=r"layers\.5\.self_attn\.v_proj\.weight -> blk\.5\.attn_v\.weight: GGUF row 7 "):
        learn_lora_layout(demo_model_dir, altered, ADAPTED)

    with caplog.at_level(logging.WARNING, logger="tasks.adapter"):
        out = apply_adapter(adapter_info, "merge", base_dir=demo_model_dir, base_gguf=altered, base_key="altered",
                            toolchain=toolchain)
    assert "blk.5.attn_v.weight" in caplog.text and "convert_lora_to_gguf.py" in caplog.text
    assert out.lora_gguf is not None and read_gguf_layout(Path(out.lora_gguf)).metadata["adapter.type"] == "lora"
    got, want, base = _tensors(Path(out.gguf)), _tensors(merged_gguf), _tensors(demo_f16_gguf)
    assert got.keys() == want.keys()
    for name in want:
        if name != v.name:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    np.testing.assert_array_equal(np.delete(got[v.name], 7, axis=0), np.delete(want[v.name], 7, axis=0))
    # Row 7: the base's one-ulp change, plus at most one ulp of the merged value's rounding.
    row, reference = got[v.name][7], want[v.name][7]
    tolerance = np.spacing(np.abs(base[v.name][7])).astype(np.float32) + np.spacing(
        np.maximum(np.abs(row), np.abs(reference))).astype(np.float32)
    assert np.all(np.abs(row.astype(np.float32) - reference.astype(np.float32)) <= tolerance)
    assert not np.array_equal(row, base[v.name][7])  # the adapter reached the altered row too


@pytest.mark.parametrize(
    ("changes", "exact"),
    [
        ({"use_rslora": True}, True),
        ({"alpha_pattern": {"q_proj": 24, "down_proj": 8}}, True),
        ({"lora_alpha": 24, "alpha_pattern": {"q_proj": 20}}, False),
    ],
    ids=["rslora", "alpha_pattern", "alpha_pattern-alpha24"],
)
def test_scaled_adapters_merge_as_the_converter_merges(changes, exact, peft_adapter, demo_model_dir, demo_f16_gguf,
                                                       toolchain, tmp_path):
    """peft's own scale, applied directly, against the converter's folded lora_B.

    With alpha 32 and r 16, llama.cpp's scale alpha/r = 2 is a power of two, so folding the ratio
    into lora_B rounds nothing and the files are identical. With alpha 24 (scale 1.5) the fold's
    extra float32 rounding of lora_B can move a merged value by one f16 ulp.
    """
    scaled = variant(peft_adapter, tmp_path / "a", **changes)
    info = validate_adapter(scaled, demo_model_dir, None)
    assert info.needs_scale_fold
    direct = merge_peft_adapter(scaled, demo_model_dir, demo_f16_gguf, tmp_path / "direct.gguf", info)
    lora, _ = convert_adapter_to_gguf(scaled, demo_model_dir, toolchain, info=info)
    converted = merge_lora_gguf(demo_f16_gguf, lora, tmp_path / "converted.gguf")
    if exact:
        assert filecmp.cmp(direct, converted, shallow=False)
        return
    a, b, base = _tensors(direct), _tensors(converted), _tensors(demo_f16_gguf)
    for name in a:
        if np.array_equal(a[name], b[name]):
            continue
        assert not np.array_equal(a[name], base[name]), f"{name}: merged differently, yet not adapted"
        ulps = np.abs(a[name].astype(np.float32) - b[name].astype(np.float32)) / np.spacing(
            np.maximum(np.abs(a[name]), np.abs(b[name]))).astype(np.float32)
        assert ulps.max() <= 1.0, f"{name}: {ulps.max()} f16 ulps between the direct and the converter's merge"
