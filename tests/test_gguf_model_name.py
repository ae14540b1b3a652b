"""The name Kiln has the converter write as general.name (`--model-name`), and the cache key it is part of.

libllama keys tokenizer rules on general.name: Phi-3's chat tokens strip the whitespace after them
only where the lowercased name contains "phi-3" or "phi3" (src/llama-vocab.cpp). The converter's own
titling ("Phi 3.5 Mini Instruct") loses the hyphen, so Kiln passes the publisher's spelling.
tests/test_families.py checks the name in the GGUFs of every stand-in exported from the Hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from registry import get_base, load_registry
from registry.models import ResolvedSource, SourceFile
from tasks.convert import conversion_key, folder_model_name, gguf_model_name

FILES = [SourceFile(path="model.safetensors", size=1, sha256="0" * 64)]


def _folder(tmp_path: Path, name: str, config: dict | None) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_hub_source_or_registry_key_is_named_by_its_repository():
    spec = get_base("phi-3.5-mini-instruct")
    for kind in ("hf", "registry"):
        source = ResolvedSource(kind=kind, id=spec.hf_id, path="/cache/snapshots/2fe19245", files=FILES)
        assert gguf_model_name(source) == "Phi-3.5-mini-instruct"


def test_every_phi3_registry_base_gets_a_name_libllamas_phi3_rule_matches():
    """The rule libllama applies: lowercase general.name contains "phi-3" or "phi3"."""
    phi3_vocab = [s for s in load_registry().values() if s.gguf_arch == "phi3" and s.tokenizer_pre == "default"]
    assert phi3_vocab, "no Phi-3 base with the Phi-3 SentencePiece vocabulary in the registry"
    for spec in phi3_vocab:
        name = gguf_model_name(ResolvedSource(kind="registry", id=spec.hf_id, path="/x", files=FILES)).lower()
        assert "phi-3" in name or "phi3" in name, spec.key


@pytest.mark.parametrize("declared, expected", [
    ("Phi-3.5-mini-instruct", "Phi-3.5-mini-instruct"),  # as microsoft/Phi-3.5-mini-instruct's config says
    ("microsoft/Phi-3-mini-4k-instruct", "Phi-3-mini-4k-instruct"),
    ("/home/me/runs/checkpoint-500", "downloaded"),  # a path names no model: the folder
    ("./out", "downloaded"),
    ("runs/a/b", "downloaded"),
    ("", "downloaded"),
    (None, "downloaded"),  # transformers 5 no longer saves _name_or_path
])
def test_a_local_folder_is_named_by_config_name_or_path_else_by_the_folder(tmp_path: Path, declared, expected):
    config = {"architectures": ["Phi3ForCausalLM"]}
    if declared is not None:
        config["_name_or_path"] = declared
    folder = _folder(tmp_path, "downloaded", config)
    assert folder_model_name(folder) == expected
    assert gguf_model_name(ResolvedSource(kind="local", id=str(folder), path=str(folder), files=FILES)) == expected


def test_a_folder_without_a_readable_config_is_named_by_the_folder(tmp_path: Path):
    assert folder_model_name(_folder(tmp_path, "no-config", None)) == "no-config"
    broken = _folder(tmp_path, "broken", None)
    (broken / "config.json").write_text("[not json")
    assert folder_model_name(broken) == "broken"


def test_the_name_is_part_of_the_conversion_cache_key(tmp_path: Path):
    """Equal files under two names are two conversions: each GGUF carries its name."""
    a = _folder(tmp_path, "model-a", {"architectures": ["LlamaForCausalLM"]})
    b = _folder(tmp_path, "model-b", {"architectures": ["LlamaForCausalLM"]})
    key_a = conversion_key(ResolvedSource(kind="local", id=str(a), path=str(a), files=FILES))
    key_b = conversion_key(ResolvedSource(kind="local", id=str(b), path=str(b), files=FILES))
    assert key_a != key_b
    assert key_a == conversion_key(ResolvedSource(kind="local", id=str(a), path=str(a), files=FILES))


def test_the_converter_writes_the_name_kiln_passes(demo_f16_gguf: Path, demo_model_dir: Path):
    """The demo's conversion (the session's, the same cache entry the demo export uses) carries its folder's name."""
    from tasks.gguf_file import read_metadata

    assert read_metadata(demo_f16_gguf, ("general.name",))["general.name"] == folder_model_name(demo_model_dir)


def _tokenizer(folder: Path, rstrip: bool) -> None:
    (folder / "tokenizer.json").write_text(json.dumps({"added_tokens": [
        {"id": 32000, "content": "<|endoftext|>", "special": True, "rstrip": False},
        {"id": 32007, "content": "<|end|>", "special": True, "rstrip": rstrip},
    ]}))


@pytest.mark.parametrize("architecture, rstrip, name, expected", [
    ("Phi3ForCausalLM", True, "my-ft", "my-ft-phi3"),  # a Phi-3 fine-tune: the rule libllama keys on the name
    ("Phi3ForCausalLM", True, "Phi-3.5-mini-instruct", "Phi-3.5-mini-instruct"),  # says phi-3 already
    ("Phi3ForCausalLM", True, "tiny-phi3-sft", "tiny-phi3-sft"),
    ("Phi3ForCausalLM", False, "Phi-4-mini-instruct", "Phi-4-mini-instruct"),  # Phi-4-mini: nothing strips
    ("LlamaForCausalLM", True, "my-ft", "my-ft"),  # libllama's rule would strip after all its special tokens
])
def test_a_phi3_tokenizer_under_another_name_gets_phi3_in_its_name(tmp_path: Path, architecture, rstrip, name,
                                                                    expected):
    folder = _folder(tmp_path, name, {"architectures": [architecture]})
    _tokenizer(folder, rstrip)
    assert gguf_model_name(ResolvedSource(kind="local", id=str(folder), path=str(folder), files=FILES)) == expected
