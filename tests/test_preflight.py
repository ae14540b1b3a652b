"""Preflight refusals: each bad input gets one clear error before any weight is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from registry import get_base
from registry.models import ExportRequest
from tasks.errors import (
    ArchitectureUnsupported,
    KilnError,
    NotEnoughDisk,
    OutputDirInvalid,
    PreTokenizerUnknown,
    QuantTypeUnknown,
    RevisionNotPinned,
    SourceInvalid,
    SpecMismatch,
    UnknownBaseModel,
)
from tasks.fetch import parse_source
from tasks.preflight import run_preflight
from tests.support.kiln_cli import reached_prefect, run_kiln
from tests.support.model_folders import demo_copy, give_unknown_pre_tokenizer

METADATA = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def preflight(folder: Path, out: Path, spec_key: str | None = None, **request_fields):
    request = ExportRequest(source=str(folder), out_dir=str(out), **request_fields)
    ref = parse_source(str(folder))
    if spec_key is not None:
        from dataclasses import replace

        ref = replace(ref, spec=get_base(spec_key) if isinstance(spec_key, str) else spec_key)
    from tasks.toolchain import current_toolchain

    return run_preflight(ref, folder, request, current_toolchain())


@pytest.fixture
def model_copy(demo_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the demo folder to break in one way per test."""
    return demo_copy(demo_model_dir, tmp_path / "model")


def test_the_demo_folder_passes_and_says_what_the_converter_writes(model_copy, tmp_path, toolchain):
    report = preflight(model_copy, tmp_path / "out")
    assert report.architecture == "LlamaForCausalLM"
    assert report.probe.gguf_arch == "llama" and report.probe.tokenizer_pre == "smollm"
    assert report.probe.vocab_size == 49152
    assert 100e6 < report.params < 200e6
    assert report.chat is not None and report.chat.dialect == "chatml" and report.chat.verified


def test_registry_spec_that_matches_the_converter_passes(model_copy, tmp_path):
    report = preflight(model_copy, tmp_path / "out", spec_key="smollm2-135m-instruct")
    assert any(c.name == "spec matches converter" for c in report.checks)


@pytest.mark.parametrize("field, wrong", [("gguf_arch", "qwen2"), ("tokenizer_pre", "llama-bpe"),
                                          ("architecture", "Qwen2ForCausalLM")])
def test_spec_that_disagrees_with_the_converter_is_refused(model_copy, tmp_path, field, wrong):
    spec = get_base("smollm2-135m-instruct").model_copy(update={field: wrong})
    with pytest.raises(SpecMismatch, match=field if field != "architecture" else "architecture"):
        preflight(model_copy, tmp_path / "out", spec_key=spec)


def test_folder_without_config_is_refused(model_copy, tmp_path):
    (model_copy / "config.json").unlink()
    with pytest.raises(SourceInvalid, match="no config.json"):
        preflight(model_copy, tmp_path / "out")


def test_config_that_is_not_json_is_refused(model_copy, tmp_path):
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(SourceInvalid, match="not valid JSON"):
        preflight(model_copy, tmp_path / "out")


def test_unknown_architecture_is_refused(model_copy, tmp_path):
    config = json.loads((model_copy / "config.json").read_text())
    config["architectures"] = ["FrobnicatorForCausalLM"]
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArchitectureUnsupported, match="FrobnicatorForCausalLM"):
        preflight(model_copy, tmp_path / "out")


def test_unknown_pre_tokenizer_is_refused(model_copy, tmp_path):
    give_unknown_pre_tokenizer(model_copy)
    with pytest.raises(PreTokenizerUnknown, match="chkhsh [0-9a-f]{64}"):
        preflight(model_copy, tmp_path / "out")


def test_truncated_safetensors_is_refused(model_copy, tmp_path):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(KilnError, match="model.safetensors"):
        preflight(model_copy, tmp_path / "out")


def test_unknown_quant_type_is_refused(model_copy, tmp_path):
    with pytest.raises(QuantTypeUnknown, match="q9_z"):
        preflight(model_copy, tmp_path / "out", quants=["q9_z"])


def test_quant_type_that_needs_an_importance_matrix_is_refused(model_copy, tmp_path):
    with pytest.raises(QuantTypeUnknown, match="importance matrix"):
        preflight(model_copy, tmp_path / "out", quants=["iq2_xxs"])


def test_output_folder_that_is_a_file_is_refused(model_copy, tmp_path):
    out = tmp_path / "out"
    out.write_text("I am a file")
    with pytest.raises(OutputDirInvalid, match="is a file"):
        preflight(model_copy, out)


def test_output_folder_that_cannot_be_written_is_refused(model_copy):
    with pytest.raises(OutputDirInvalid, match="not writable"):
        preflight(model_copy, Path("/proc/kiln-out"))


def test_not_enough_disk_is_refused_with_the_numbers(model_copy, tmp_path, monkeypatch):
    import shutil as shutil_module

    real = shutil_module.disk_usage
    monkeypatch.setattr("tasks.preflight.shutil.disk_usage",
                        lambda p: real(p)._replace(free=50_000_000))
    with pytest.raises(NotEnoughDisk, match=r"needs about 0\.\d+ GB but only 0\.05 GB"):
        preflight(model_copy, tmp_path / "out")


def test_branch_revision_is_refused_before_anything_runs():
    with pytest.raises(RevisionNotPinned, match="40"):
        parse_source("hf:HuggingFaceTB/SmolLM2-135M-Instruct@main")


@pytest.mark.parametrize("args, message", [
    (["export", "no-such-base"], "known"),
    (["export", "hf:HuggingFaceTB/SmolLM2-135M-Instruct@main"], "resolve-revision"),
    (["export", "demo", "--quant", "q4_k_m,q9_z"], "unknown quant type"),
    (["export", "./does/not/exist"], "no such folder"),
    (["export", "demo", "--ollama-name", "bad name!"], "ollama_name"),
])
def test_cli_refusals_are_one_line_and_exit_non_zero(args, message, tmp_path):
    proc = run_kiln(*args, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not reached_prefect(proc.stderr)  # refused before Prefect started
    assert not (tmp_path / "out").exists()  # not even an empty output folder


def test_cli_refuses_an_output_path_that_is_a_file(tmp_path):
    out = tmp_path / "file"
    out.write_text("x")
    proc = run_kiln("demo", "--out", str(out))
    assert proc.returncode == 2 and "is a file" in proc.stderr


def test_unknown_registry_key_lists_the_known_ones():
    with pytest.raises(UnknownBaseModel, match="smollm2-135m-instruct"):
        parse_source("no-such-base")


def test_checking_the_output_folder_creates_nothing(tmp_path):
    """A refused export leaves no folder: preflight only tries the nearest existing folder for writes."""
    from tasks.preflight import check_output_dir

    out = tmp_path / "a" / "b" / "out"
    check_output_dir(out)
    assert list(tmp_path.iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputDirInvalid, match="cannot be made: .* is a file"):
        check_output_dir(blocker / "out")


# ------------------------------------------------------------------ prebuilt GGUFs: which types are made


@pytest.mark.parametrize("source, asked, allow, made, skipped", [
    # A float source: every type, none up (f16 → f32 would only grow).
    ("f16", ["q8_0", "q4_k_m", "f32"], False, ["q8_0", "q4_k_m"], ["f32"]),
    # The default list on a Q4_K_M: Q8_0 would be bigger with the quality of the Q4_K_M; Q4_K_M is the source.
    ("q4_k_m", ["q8_0", "q4_k_m"], False, ["q4_k_m"], ["q8_0"]),
    # Down from Q8_0 only with --allow-requantize.
    ("q8_0", ["q8_0", "q4_k_m"], False, ["q8_0"], ["q4_k_m"]),
    ("q8_0", ["q8_0", "q4_k_m"], True, ["q8_0", "q4_k_m"], []),
    # Never up, even with the flag.
    ("q4_k_m", ["q6_k", "q3_k_m"], True, ["q3_k_m"], ["q6_k"]),
    # Nothing asked (the GGUF as it is, with its Modelfile).
    ("q4_k_m", [], False, [], []),
])
def test_prebuilt_gguf_is_never_quantized_up_and_down_only_when_allowed(source, asked, allow, made, skipped):
    from tasks.preflight import plan_requantization

    kept, why = plan_requantization("m.gguf", source, asked, allow)
    assert (kept, sorted(why)) == (made, sorted(skipped))
    for quant in skipped:
        assert ("more bits per weight" in why[quant]) or ("--allow-requantize" in why[quant]), why[quant]


@pytest.mark.parametrize("source, asked, allow, words", [
    ("q4_k_m", ["q8_0"], False, ["m.gguf is already q4_k_m", "q8_0 would have more bits than the source",
                                 "Pass --quant q4_k_m to export the GGUF as it is"]),
    ("q5_k_m", ["q8_0", "q4_k_m"], False, ["q8_0 would have more bits", "q4_k_m would requantize it down",
                                            "--allow-requantize to requantize it down anyway (quality loss)",
                                            "--quant q5_k_m"]),
    ("q4_k_m", ["auto"], False, ["--quant auto measures its candidates against a float GGUF"]),
])
def test_prebuilt_gguf_with_nothing_to_make_is_refused(source, asked, allow, words):
    from tasks.errors import RequantizeRefused
    from tasks.preflight import plan_requantization

    with pytest.raises(RequantizeRefused) as info:
        plan_requantization("m.gguf", source, asked, allow)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert "\n" not in str(info.value)


def test_quant_auto_passes_the_request_checks(model_copy, tmp_path):
    """`--quant auto` is not a type libllama knows; it is checked as the candidates it stands for."""
    report = preflight(model_copy, tmp_path / "out", quants=["auto"], max_size="500MB")
    assert report.estimated_bytes > 0


# ------------------------------------------------------------------ truncated files


def test_truncated_gguf_is_refused_from_its_tensor_table(demo_f16_gguf, tmp_path):
    """libllama found this 15 s into quantization ("data is not within the file bounds"); preflight reads
    the tensor table against the file size."""
    from tasks.errors import SourceCorrupt
    from tasks.fetch import check_gguf_complete, locate_metadata

    check_gguf_complete(demo_f16_gguf, "whole.gguf")  # the intact file passes
    cut = tmp_path / "cut.gguf"
    with open(demo_f16_gguf, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(demo_f16_gguf.stat().st_size - 4096))
    with pytest.raises(SourceCorrupt, match=r"cut.gguf: truncated: its tensor table describes \d+ bytes"):
        locate_metadata(parse_source(str(cut)))
    header_only = tmp_path / "head.gguf"
    with open(demo_f16_gguf, "rb") as src, open(header_only, "wb") as dst:
        dst.write(src.read(64 * 1024))
    with pytest.raises(SourceCorrupt, match="head.gguf: the GGUF header cannot be read"):
        check_gguf_complete(header_only, "head.gguf")


def test_safetensors_with_a_cut_header_is_refused(model_copy, tmp_path):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data[:1000])  # the 8-byte length survives, the JSON header does not
    with pytest.raises(KilnError, match="header length .* exceeds the file's 1000 bytes"):
        preflight(model_copy, tmp_path / "out")
