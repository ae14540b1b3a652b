"""The chat format decision (tasks/ollama_format.py), the Modelfile it writes, and derived stops (tasks/stops.py)."""

from __future__ import annotations

import pytest

import templates
from tasks.modelfile import ModelfileError, build_modelfile, parse_modelfile, render_modelfile
from tasks.ollama_format import JINJA_SINCE, REQUIRES_SINCE, decide_format, version_tuple
from tasks.stops import derive_stops


def test_the_decision_follows_the_template_check_and_ollamas_own_renderers() -> None:
    assert decide_format("template", "llama", "chatml")[:4] == ("template", None, None, None)
    assert decide_format("jinja", "llama", "chatml")[:4] == ("jinja", None, None, JINJA_SINCE)
    # gemma4: `ollama create` assigns its renderer itself, and a renderer overrides any TEMPLATE.
    assert decide_format("template", "gemma4", "gemma2")[:4] == ("renderer", "gemma4", "gemma4", "0.20.0")
    nemotron = decide_format("jinja", "nemotron_h", "chatml")
    assert nemotron.format == "renderer" and version_tuple(nemotron.requires) >= version_tuple(REQUIRES_SINCE)


@pytest.mark.parametrize("chat_format", ["jinja", "renderer"])
def test_jinja_and_renderer_modelfiles_have_no_template_and_a_requires_line(chat_format: str) -> None:
    extra = {"renderer": "gemma4", "parser": "gemma4"} if chat_format == "renderer" else {}
    modelfile = build_modelfile(from_="./m.gguf", dialect="chatml", stop=("<|im_end|>",), chat_format=chat_format,
                                requires="0.30.0", **extra)
    text = render_modelfile(modelfile)
    assert "TEMPLATE" not in text and "REQUIRES 0.30.0" in text
    assert ("RENDERER gemma4" in text and "PARSER gemma4" in text) == (chat_format == "renderer")
    assert parse_modelfile(text) == modelfile


def test_a_format_without_what_it_needs_is_refused() -> None:
    with pytest.raises(ModelfileError, match="REQUIRES"):
        build_modelfile(from_="m.gguf", dialect="chatml", chat_format="jinja")
    with pytest.raises(ModelfileError, match="RENDERER and a PARSER"):
        build_modelfile(from_="m.gguf", dialect="chatml", chat_format="renderer", requires="0.20.0")
    with pytest.raises(ModelfileError, match="no TEMPLATE"):
        build_modelfile(from_="m.gguf", template="{{ .Prompt }}", chat_format="jinja", requires="0.30.0")


def _reference(name: str) -> templates.ReferenceTemplate:
    rows = (templates.get_dialect(d) for d in templates.registered_dialects())
    return next(r for row in rows for r in row.references if r.file_name.startswith(name))


@pytest.mark.parametrize(("reference", "eos", "end_of_turn", "inside"), [
    ("chatml.SmolLM2", "<|im_end|>", "<|im_end|>", set()),
    ("llama3.Llama-3.1", "<|eot_id|>", "<|eot_id|>", set()),  # its tool calls are plain JSON in the turn
    # Qwen3 writes thinking and tool calls inside the assistant's turn: never stops.
    ("qwen3thinking", "<|im_end|>", "<|im_end|>", {"<think>", "</think>", "<tool_call>", "</tool_call>"}),
])
def test_stops_are_the_models_end_tokens_never_a_token_used_inside_a_turn(
    reference: str, eos: str, end_of_turn: str, inside: set[str]
) -> None:
    ref = _reference(reference)
    special = {"<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>", "<|eot_id|>",
               "<|start_header_id|>", "<|end_header_id|>", "<|python_tag|>", "<|eom_id|>", "<|begin_of_text|>"}
    derived = derive_stops(chat_template=ref.read(), tokens=None, special_tokens=special, bos_token=ref.bos_token,
                           gguf_eos=[eos, "<think>"])
    assert derived.end_of_turn == end_of_turn
    assert inside <= set(derived.inside_turn)
    stops = [c.stop for c in derived.candidates]
    assert end_of_turn in stops and not (set(stops) & inside)
    if "<think>" in inside:
        assert any("inside an assistant turn" in w and "<think>" in w for w in derived.warnings)


def test_tool_conversations_are_in_the_default_matrix_where_the_template_takes_tools() -> None:
    from tasks.template_check import DEFAULT_MATRIX, MESSAGE_MATRIX, TOOL_MATRIX, check_template_text

    assert DEFAULT_MATRIX[-len(TOOL_MATRIX):] == TOOL_MATRIX
    # The tool-taking references stay on a verified Go TEMPLATE with the tool cases in: their dialects
    # print tools, calls and results as the models' own templates do.
    for name, dialect in [("smollm3", "smollm3"), ("qwen2.5.Qwen2.5", "qwen2.5"), ("qwen3thinking", "qwen3thinking"),
                          ("llama3.Llama-3.1", "llama3"), ("mistral.Mistral-Nemo", "mistral"),
                          ("mistralv3", "mistralv3")]:
        ref = _reference(name)
        check = check_template_text(ref.read(), bos_token=ref.bos_token, eos_token=ref.eos_token, strict=False)
        assert check.matrix_size == len(DEFAULT_MATRIX), name
        assert check.outcome == "exact" and check.ollama_format == "template" and check.dialect == dialect, name
        assert {c.name for c in TOOL_MATRIX} - set(check.cases_skipped) and not check.mismatches, name
    # A template that takes no tools is not asked about them.
    smollm2 = _reference("chatml.SmolLM2")
    plain = check_template_text(smollm2.read(), bos_token=smollm2.bos_token, eos_token=smollm2.eos_token, strict=False)
    assert plain.matrix_size == len(MESSAGE_MATRIX) and plain.outcome == "exact" and plain.dialect == "chatml"


def test_template_check_reports_the_renderer_ollama_assigns_to_the_architecture(tmp_path) -> None:
    import json

    import gguf

    from tests.support.kiln_cli import run_kiln

    path = tmp_path / "gemma4-like.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma4")
    writer.add_chat_template(_reference("qwen2.5.Qwen2.5").read())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    proc = run_kiln("template", "check", str(path), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["ollama_format"] == "renderer"
