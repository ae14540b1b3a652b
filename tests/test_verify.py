"""Verify in bounded memory: the streamed transformers forward, the memory budget, the refusals.

Tiny models only: the demo model (tied head) and a few-MB synthetic Llama from bench/scale.py
(untied head, sharded safetensors), so the suite stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tasks.errors import KilnError
from tests.support.kiln_cli import run_kiln

REPO = Path(__file__).resolve().parent.parent
SEQUENCES = [[1, 50, 60, 70, 80, 90, 100, 110], [1, 200, 300, 400], [1, 9, 2]]


@pytest.fixture(scope="module")
def synthetic_model(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from bench.scale import make_model

    folder = tmp_path_factory.mktemp("synthetic") / "tiny"
    make_model(folder, "tiny")
    return folder


def _whole_model_argmax(folder: Path) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([seq])).logits[0].argmax(-1).tolist() for seq in SEQUENCES]


@pytest.mark.parametrize("which", ["demo", "synthetic"])
def test_streamed_forward_agrees_with_the_whole_model(which: str, demo_model_dir: Path, synthetic_model: Path) -> None:
    from tasks.hf_stream import StreamedCausalLM

    folder = demo_model_dir if which == "demo" else synthetic_model
    streamed = StreamedCausalLM(folder)
    try:
        tops = [t.tolist() for t in streamed.argmax_logits(SEQUENCES)]
    finally:
        streamed.close()
    assert tops == _whole_model_argmax(folder)
    if which == "synthetic":
        # The synthetic model ends every turn at once: <|im_end|> (id 2) at every position.
        assert all(set(t) == {2} for t in tops)


def test_streamed_forward_holds_one_block_at_a_time(demo_model_dir: Path) -> None:
    from tasks.hf_stream import StreamedCausalLM

    streamed = StreamedCausalLM(demo_model_dir)
    model = streamed.model
    most = 0

    def count(_module, _args, _output=None) -> None:
        nonlocal most
        held = sum(p.numel() for p in model.parameters() if not p.is_meta)
        most = max(most, held)

    # Registered after the streamer's hooks: each pre-hook sees its layer loaded, each forward hook
    # sees it unloaded again.
    for layer in model.model.layers:
        layer.register_forward_pre_hook(count)
        layer.register_forward_hook(count)
    streamed.argmax_logits(SEQUENCES[:1])
    streamed.close()
    layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
    # Inside any layer: that layer alone, nothing left over from the others or the embedding.
    assert most == layer_params
    assert all(p.is_meta for p in model.parameters())


def test_comparison_refused_over_the_budget_names_the_numbers(demo_model_dir: Path) -> None:
    from tasks.verify import ComparisonOverBudget, _hf_argmax

    with pytest.raises(ComparisonOverBudget, match=r"needs about [0-9.]+ GB .* memory budget of 0\.01 GB.*--memory-budget"):
        _hf_argmax(demo_model_dir, SEQUENCES, budget=10_000_000)


def test_memory_budget_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks import settings

    monkeypatch.setenv("KILN_MEMORY_BUDGET", "12GB")
    assert settings.memory_budget_bytes() == 12 * 10**9
    monkeypatch.setenv("KILN_MEMORY_BUDGET", "800MiB")
    assert settings.memory_budget_bytes() == 800 * 2**20
    monkeypatch.setenv("KILN_MEMORY_BUDGET", "plenty")
    with pytest.raises(KilnError, match="KILN_MEMORY_BUDGET='plenty' is not a size"):
        settings.memory_budget_bytes()
    monkeypatch.delenv("KILN_MEMORY_BUDGET")
    assert settings.memory_budget_bytes() > 0
    # The quantizations share the one budget unless the older variable names their own.
    from flows.convert_quantize import quant_memory_budget

    monkeypatch.setenv("KILN_MEMORY_BUDGET", "3GB")
    assert quant_memory_budget() == 3 * 10**9
    monkeypatch.setenv("KILN_QUANT_MEMORY_GB", "1")
    assert quant_memory_budget() == 1 << 30


def test_memory_estimate_grows_with_the_model_but_not_verify_transformers_side() -> None:
    from tasks.memory import estimate_memory

    small = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 49152}
    deep = {**small, "num_hidden_layers": 64}
    one = estimate_memory(1_170_000_000, "f16", small, verify=True, report=True)
    four = estimate_memory(4_300_000_000, "f16", deep, verify=True, report=True)
    assert set(one.steps) == {"convert", "quantize", "verify", "report"}
    assert one.peak_step in ("verify", "report")
    # The float GGUF that llama.cpp runs grows with the model; a quantization (one tensor) does not.
    assert four.steps["verify"] > one.steps["verify"] + 5e9
    assert four.steps["quantize"] == one.steps["quantize"]
    off = estimate_memory(4_300_000_000, "f16", deep, verify=False, report=False)
    assert set(off.steps) == {"convert", "quantize"}


def test_disk_estimate_counts_auto_candidates_and_the_merge() -> None:
    from registry.models import ExportRequest
    from tasks.preflight import estimate_bytes

    params = 1_000_000_000
    plain = estimate_bytes(params, ExportRequest(source="demo", quants=["q4_k_m"]), base_cached=False)
    auto = estimate_bytes(params, ExportRequest(source="demo", quants=["auto"], max_kl=0.1), base_cached=False)
    # f16 and q4_k_m (4.9 bits: 0.61 GB) in the cache and copied to the outputs, with a 10 % margin ...
    assert 5.6e9 < plain < 5.9e9
    # ... or, with the outputs on the cache's filesystem, hard links that cost nothing.
    linked = estimate_bytes(params, ExportRequest(source="demo", quants=["q4_k_m"]), base_cached=False,
                            outputs_linked=True)
    assert 2.8e9 < linked < 2.95e9
    # `auto` keeps six candidates until it chooses: far more than one quant type.
    assert auto > plain + 3e9


def test_cli_refuses_an_export_over_the_memory_budget(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_kiln("export", "demo", "--out", str(out), "--memory-budget", "300MB", timeout=300)
    assert result.returncode != 0
    err = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert "over the memory budget of 0.30 GB" in err[-1]
    assert "--memory-budget" in err[-1] and "--no-verify" in err[-1]
    assert not out.exists()


def test_cli_rejects_a_memory_budget_it_cannot_read(tmp_path: Path) -> None:
    result = run_kiln("export", "demo", "--out", str(tmp_path / "o"), "--memory-budget", "lots", timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "cannot read 'lots' as a size" in result.stderr
    result = run_kiln("export", "demo", "--out", str(tmp_path / "o"), env={"KILN_MEMORY_BUDGET": "lots"}, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "KILN_MEMORY_BUDGET='lots' is not a size" in result.stderr.strip().splitlines()[-1]


def test_synthetic_model_is_sharded_with_an_index(synthetic_model: Path) -> None:
    index = json.loads((synthetic_model / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in synthetic_model.glob("*.safetensors")}
    assert "lm_head.weight" in index["weight_map"]


def test_report_refused_over_the_budget(demo_f16_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.report import ReportError, measure_quants

    monkeypatch.setenv("KILN_MEMORY_BUDGET", "50MB")
    with pytest.raises(ReportError, match=r"needs about 0\.[0-9]+ GB .* memory budget of 0\.05 GB; raise --memory-budget"):
        measure_quants(demo_f16_gguf, {})


def test_verify_prompts_as_ollama_will_where_the_dialect_differs_from_the_models_own_template() -> None:
    """A --dialect near the model's template but not exact ships its Go TEMPLATE: verify renders that;
    an exact one (or Ollama's own Jinja, format "jinja") leaves the model's Jinja, which renders the same."""
    from tasks.preflight import DialectChoice
    from tasks.verify import render_prompt

    meta = {"chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                             "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            "bos_token": None, "eos_token": "<|im_end|>", "add_bos": False}
    near = DialectChoice(dialect="llama3", verified=False, system=None, detail="near", mismatches=["system turn"])
    exact = DialectChoice(dialect="chatml", verified=True, system=None, detail="exact")
    jinja = DialectChoice(dialect="llama3", verified=False, system=None, detail="closest", format="jinja")
    assert "<|start_header_id|>user<|end_header_id|>" in render_prompt(meta, "Hi", near)
    for chat in (exact, jinja, None):
        assert render_prompt(meta, "Hi", chat) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_a_near_dialect_is_held_against_transformers_through_the_text_that_ships(demo_f16_gguf, demo_model_dir) -> None:
    """SmolLM2's own template with the qwen2.5 dialect (near it, not exact): the GGUF is prompted
    through the dialect's Go template, and transformers tokenizes that same text (no Jinja of
    the dialect's needed)."""
    from tasks.preflight import DialectChoice
    from tasks.verify import run_gguf, top1_agreement

    near = DialectChoice(dialect="qwen2.5", verified=False, system=None, detail="near", mismatches=["default system"])
    run = run_gguf(demo_f16_gguf, prompts=("What is the capital of France?",), budget=8, chat=near)
    # The dialect's TEMPLATE with no SYSTEM: not SmolLM2's own Jinja, which writes its default system prompt.
    assert run.generations[0].prompt_text == ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                              "<|im_start|>assistant\n")
    agreement, same_tokens, positions = top1_agreement(demo_f16_gguf, demo_model_dir, run, chat=near)
    assert same_tokens and positions > 20 and agreement >= 0.95


def test_outputs_beside_the_cache_are_known_to_be_links(tmp_path: Path) -> None:
    from tasks.preflight import same_filesystem

    assert same_filesystem(tmp_path / "out" / "not-made-yet", tmp_path / "cache")
    assert not same_filesystem(Path("/proc/self"), tmp_path)
