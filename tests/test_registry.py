"""The curated registry loads, and `BaseModelSpec` refuses what it should."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from registry import BASES_DIR, get_base, load_registry, load_spec_file
from registry.spec import BaseModelSpec
from tasks.errors import SpecInvalid, UnknownBaseModel

EXPECTED_KEYS = {
    "smollm2-135m-instruct",
    "qwen2.5-0.5b-instruct",
    "qwen3-0.6b",
    "gemma-2-2b-it",
    "smollm3-3b",
    "llama-3.2-1b-instruct",
    "phi-3.5-mini-instruct",
    "phi-4-mini-instruct",
    "mistral-7b-instruct-v0.3",
}

# What the pinned converter writes for each architecture (conversion/__init__.py + the
# model class's `model_arch`); a registry entry must agree.
ARCH_TO_GGUF = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "SmolLM3ForCausalLM": "smollm3",
    "Phi3ForCausalLM": "phi3",
}

SHA = "12fd25f77366fa6b3b4b768ec3050bf629380bac"


def _fields(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "key": "tiny",
        "hf_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "revision": SHA,
        "architecture": "LlamaForCausalLM",
        "params": 134_515_008,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "template": "chatml",
        "gguf_arch": "llama",
        "tokenizer_pre": "smollm",
        "license_spdx": "Apache-2.0",
        "redistributable": True,
        "size_gb_fp16": 0.27,
        "context_length": 8192,
        "recommended_seq_len": 2048,
    }
    base.update(overrides)
    return base


def _spec(**overrides: object) -> BaseModelSpec:
    return BaseModelSpec(**_fields(**overrides))


# --- the curated entries ------------------------------------------------------------


def test_every_entry_loads_and_the_expected_keys_are_there() -> None:
    registry = load_registry()
    assert EXPECTED_KEYS <= set(registry)
    for key, spec in registry.items():
        assert isinstance(spec, BaseModelSpec)
        assert spec.key == key


def test_every_yaml_file_is_an_entry() -> None:
    files = sorted(BASES_DIR.glob("*.yaml"))
    assert {p.stem for p in files} == set(load_registry())


@pytest.mark.parametrize("key", sorted(EXPECTED_KEYS))
def test_entry_is_consistent(key: str) -> None:
    spec = get_base(key)
    assert re.fullmatch(r"[0-9a-f]{40}", spec.revision)
    assert ARCH_TO_GGUF[spec.architecture] == spec.gguf_arch
    assert spec.modality == "text"
    assert spec.vl_preprocessor_plan is None and spec.audio_preprocessor_plan is None
    assert spec.trust_remote_code is False
    assert spec.recommended_seq_len <= spec.effective_context_length
    # size_gb_fp16 is two bytes a parameter, to within rounding.
    assert spec.size_gb_fp16 == pytest.approx(spec.params * 2 / 1e9, abs=0.01)
    if spec.architecture == "Phi3ForCausalLM":
        assert spec.target_modules == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    else:
        assert spec.target_modules == [
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
        ]


def test_entry_files_record_where_the_revision_came_from() -> None:
    for path in sorted(BASES_DIR.glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        assert text.startswith("#"), f"{path.name}: no provenance comment at the top"
        header = text.split("\nkey:", 1)[0]
        assert load_spec_file(path).revision in header, f"{path.name}: header does not name the revision"


def test_smollm2_entry() -> None:
    spec = get_base("smollm2-135m-instruct")
    assert spec.hf_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert spec.revision == SHA
    assert spec.architecture == "LlamaForCausalLM"
    assert (spec.gguf_arch, spec.tokenizer_pre, spec.template) == ("llama", "smollm", "chatml")
    assert spec.params == 134_515_008
    assert spec.context_length == 8192
    assert spec.license_spdx == "Apache-2.0"
    assert spec.redistributable and not spec.requires_acceptance


def test_gated_bases_require_acceptance() -> None:
    for key in ("gemma-2-2b-it", "llama-3.2-1b-instruct"):
        spec = get_base(key)
        assert spec.requires_acceptance
        assert not spec.redistributable


def test_reasoning_bases_run_cooler() -> None:
    qwen3 = get_base("qwen3-0.6b")
    assert qwen3.template == "qwen3thinking"
    assert qwen3.reasoning_tuned
    assert qwen3.suggested_prompt_temperature == 0.6
    assert get_base("smollm2-135m-instruct").suggested_prompt_temperature == 0.7


def test_get_base_unknown_key_lists_the_known_keys() -> None:
    with pytest.raises(UnknownBaseModel) as info:
        get_base("no-such-base")
    message = str(info.value)
    assert "no-such-base" in message
    for key in load_registry():
        assert key in message


# --- the loader ---------------------------------------------------------------------


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_loader_refuses_a_key_that_is_not_the_file_name(tmp_path: Path) -> None:
    source = (BASES_DIR / "smollm2-135m-instruct.yaml").read_text(encoding="utf-8")
    path = _write(tmp_path, "other-name.yaml", source)
    with pytest.raises(SpecInvalid, match="must equal the file name"):
        load_spec_file(path)


def test_loader_names_the_bad_field(tmp_path: Path) -> None:
    source = (BASES_DIR / "smollm2-135m-instruct.yaml").read_text(encoding="utf-8")
    path = _write(tmp_path, "smollm2-135m-instruct.yaml", source.replace(SHA, "main"))
    with pytest.raises(SpecInvalid, match="revision"):
        load_spec_file(path)


def test_loader_refuses_non_mapping_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(SpecInvalid, match="mapping"):
        load_spec_file(_write(tmp_path, "a.yaml", "- just\n- a list\n"))
    with pytest.raises(SpecInvalid, match="YAML"):
        load_spec_file(_write(tmp_path, "b.yaml", "key: [unclosed\n"))


# --- BaseModelSpec validators -------------------------------------------------------


def test_a_valid_spec_builds() -> None:
    spec = _spec()
    assert spec.effective_context_length == 8192
    assert spec.suggested_prompt_temperature == 0.7


@pytest.mark.parametrize(
    "revision",
    [
        "main",
        "v1.0",
        SHA[:39],  # 39 hex
        SHA + "0",  # 41 hex
        SHA.upper(),  # uppercase hex
        "g" * 40,  # not hex
        "",
    ],
)
def test_revision_must_be_a_40_lowercase_hex_sha(revision: str) -> None:
    with pytest.raises(ValidationError, match="revision"):
        _spec(revision=revision)


@pytest.mark.parametrize(
    "hf_id", ["SmolLM2-135M-Instruct", "/SmolLM2", "HuggingFaceTB/", "a/b/c", "/", "a//b"]
)
def test_hf_id_must_be_org_slash_name(hf_id: str) -> None:
    with pytest.raises(ValidationError, match="hf_id"):
        _spec(hf_id=hf_id)


def test_target_modules_must_be_non_empty_names() -> None:
    with pytest.raises(ValidationError):
        _spec(target_modules=[])
    with pytest.raises(ValidationError, match="empty"):
        _spec(target_modules=["q_proj", ""])


def test_unknown_dialect_is_refused() -> None:
    with pytest.raises(ValidationError, match="template"):
        _spec(template="alpaca")


@pytest.mark.parametrize("field", ["params", "size_gb_fp16", "context_length", "recommended_seq_len"])
def test_sizes_must_be_positive(field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        _spec(**{field: 0})


def test_context_length_effective_cannot_exceed_context_length() -> None:
    with pytest.raises(ValidationError, match="context_length_effective"):
        _spec(context_length=8192, context_length_effective=8193)
    ok = _spec(context_length=8192, context_length_effective=4096)
    assert ok.effective_context_length == 4096
    assert _spec(context_length=8192, context_length_effective=8192).effective_context_length == 8192


VL_PLAN = {"target_size": (224, 224), "image_token": "<image>", "num_image_tokens": 256}
AUDIO_PLAN = {
    "sample_rate": 16_000,
    "max_length_seconds": 30.0,
    "audio_token": "<|AUDIO|>",
    "num_audio_tokens": 750,
}


def test_vision_language_needs_a_vl_plan_and_no_audio_plan() -> None:
    with pytest.raises(ValidationError, match="vl_preprocessor_plan"):
        _spec(modality="vision-language")
    with pytest.raises(ValidationError, match="audio_preprocessor_plan"):
        _spec(modality="vision-language", vl_preprocessor_plan=VL_PLAN, audio_preprocessor_plan=AUDIO_PLAN)
    spec = _spec(modality="vision-language", vl_preprocessor_plan=VL_PLAN)
    assert spec.vl_preprocessor_plan is not None
    assert spec.vl_preprocessor_plan.target_size == (224, 224)
    assert spec.vl_preprocessor_plan.resize_policy == "fixed"


def test_audio_language_needs_an_audio_plan_and_no_vl_plan() -> None:
    with pytest.raises(ValidationError, match="audio_preprocessor_plan"):
        _spec(modality="audio-language")
    with pytest.raises(ValidationError, match="vl_preprocessor_plan"):
        _spec(modality="audio-language", audio_preprocessor_plan=AUDIO_PLAN, vl_preprocessor_plan=VL_PLAN)
    spec = _spec(modality="audio-language", audio_preprocessor_plan=AUDIO_PLAN)
    assert spec.audio_preprocessor_plan is not None
    assert spec.audio_preprocessor_plan.sample_rate == 16_000


@pytest.mark.parametrize("modality", ["text", "text-moe"])
def test_text_bases_take_no_plan(modality: str) -> None:
    assert _spec(modality=modality).modality == modality
    with pytest.raises(ValidationError, match="vl_preprocessor_plan"):
        _spec(modality=modality, vl_preprocessor_plan=VL_PLAN)
    with pytest.raises(ValidationError, match="audio_preprocessor_plan"):
        _spec(modality=modality, audio_preprocessor_plan=AUDIO_PLAN)


def test_unknown_modality_is_refused() -> None:
    with pytest.raises(ValidationError, match="modality"):
        _spec(modality="video")


@pytest.mark.parametrize(
    "plan",
    [
        {**VL_PLAN, "target_size": (0, 224)},
        {**VL_PLAN, "target_size": (224, -1)},
        {**VL_PLAN, "num_image_tokens": 0},
        {**VL_PLAN, "image_token": ""},
        {**VL_PLAN, "resize_policy": "stretch"},
        {**VL_PLAN, "extra": 1},
    ],
)
def test_vl_plan_validation(plan: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        _spec(modality="vision-language", vl_preprocessor_plan=plan)


@pytest.mark.parametrize(
    "plan",
    [
        {**AUDIO_PLAN, "sample_rate": 0},
        {**AUDIO_PLAN, "max_length_seconds": 0.0},
        {**AUDIO_PLAN, "audio_token": ""},
        {**AUDIO_PLAN, "num_audio_tokens": 0},
    ],
)
def test_audio_plan_validation(plan: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        _spec(modality="audio-language", audio_preprocessor_plan=plan)


def test_provenance_url_and_text_come_together() -> None:
    with pytest.raises(ValidationError, match="set together"):
        _spec(provenance_url="https://example.com/announcement")
    with pytest.raises(ValidationError, match="set together"):
        _spec(provenance_match_text="official marker")
    spec = _spec(provenance_url="https://example.com/announcement", provenance_match_text="official marker")
    assert spec.provenance_url == "https://example.com/announcement"


def test_skipping_the_hub_gating_check_needs_a_provenance_probe() -> None:
    with pytest.raises(ValidationError, match="refresh_check_hf_gating=False"):
        _spec(refresh_check_hf_gating=False)
    spec = _spec(
        refresh_check_hf_gating=False,
        provenance_url="https://example.com/announcement",
        provenance_match_text="official marker",
    )
    assert spec.refresh_check_hf_gating is False


def test_extra_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="extra"):
        BaseModelSpec(**_fields(licence="Apache-2.0"))


def test_required_fields_are_required() -> None:
    fields = _fields()
    del fields["redistributable"]
    with pytest.raises(ValidationError, match="redistributable"):
        BaseModelSpec(**fields)


def test_spec_is_frozen() -> None:
    spec = _spec()
    with pytest.raises(ValidationError):
        spec.revision = "b" * 40  # type: ignore[misc]
    with pytest.raises(ValidationError):
        spec.key = "other"  # type: ignore[misc]
    assert spec.revision == SHA


def test_reasoning_tuned_lowers_the_suggested_temperature() -> None:
    assert _spec(reasoning_tuned=True).suggested_prompt_temperature == 0.6
    assert _spec(reasoning_tuned=False).suggested_prompt_temperature == 0.7
