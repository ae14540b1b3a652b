"""Modelfile writing and parsing (Ollama's grammar), and stops."""

from __future__ import annotations

import pytest

import templates
from tasks.demo import packaged_gguf
from tasks.gguf_file import read_tokenizer
from tasks.modelfile import (
    Modelfile,
    ModelfileError,
    ModelfileMessage,
    build_modelfile,
    format_value,
    parse_modelfile,
    parse_modelfile_commands,
    render_modelfile,
)
from tasks.stops import compute_stops

TRICKY_TEXTS = [
    "plain",
    "two words",
    " leading space",
    "trailing space ",
    'say "hi"',
    '"starts with a quote',
    '""starts with two quotes',
    'ends with a quote"',
    'triple """ in the middle of a line',
    'x"""',
    '"""',
    "line one\nline two",
    "line one\r\nline two",
    "tab\tinside",
    "# not a comment",
    "PARAMETER stop looks like a command",
    "ünïcödé and emoji 🦙",
    "{{ .System }} and <|im_end|>",
    "",
]


@pytest.mark.parametrize("text", TRICKY_TEXTS)
@pytest.mark.parametrize("prefer", ["text", "word"])
def test_every_written_value_reads_back_unchanged(text: str, prefer: str) -> None:
    written = format_value(text, prefer=prefer)  # type: ignore[arg-type]
    commands = parse_modelfile_commands(f"FROM x\nSYSTEM {written}\n")
    assert commands[1].args == text


def test_text_values_use_triple_quotes_like_ollama() -> None:
    assert format_value("You are helpful.") == '"""You are helpful."""'
    assert format_value("<|im_end|>", prefer="word") == "<|im_end|>"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('first line ends with """\nsecond', '"""'),
        ('a\n"""\nb', '"""'),
        ("no-break\u00a0space", "U+00A0"),
        ("escape \x1b[0m", "U+001B"),
    ],
)
def test_unwritable_text_is_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(ModelfileError) as info:
        format_value(text, what="SYSTEM prompt")
    assert reason in str(info.value) and "SYSTEM prompt" in str(info.value)


@pytest.mark.parametrize("dialect", templates.registered_dialects())
def test_every_dialect_template_round_trips_through_a_modelfile(dialect: str) -> None:
    modelfile = build_modelfile(
        from_="./smollm2-135m-instruct.Q4_K_M.gguf",
        dialect=dialect,
        system='You are "Kiln".\nAnswer with """ when asked.',
        stop=templates.get_dialect(dialect).default_stops,
        num_ctx=8192,
        parameters={"seed": 42, "num_predict": 128, "use_mmap": False},
        license=["Apache-2.0", "Line one\nLine two"],
        messages=[
            ModelfileMessage(role="user", content="Hi"),
            ModelfileMessage(role="assistant", content='Hello, "friend".\nHow can I help?'),
        ],
    )
    text = render_modelfile(modelfile, header=["Written by Kiln", f"dialect: {dialect}"])
    assert text.startswith("# Written by Kiln\n# dialect: ")
    parsed = parse_modelfile(text)
    assert parsed == modelfile
    assert parsed.template == templates.load_template_text(dialect)  # trailing newlines included
    assert parsed.parameters["temperature"] == templates.get_dialect(dialect).default_temperature


def test_build_defaults_come_from_the_dialect_and_overrides_win() -> None:
    row = templates.get_dialect("qwen3thinking")
    default = build_modelfile(from_="m.gguf", dialect="qwen3thinking")
    assert default.parameters == {"temperature": row.default_temperature, "top_p": row.default_top_p}
    assert default.system is None and default.adapter is None
    custom = build_modelfile(from_="m.gguf", dialect="qwen3thinking", temperature=0.2, top_p=0.5, adapter="lora.gguf")
    assert custom.parameters == {"temperature": 0.2, "top_p": 0.5}
    assert "ADAPTER lora.gguf" in render_modelfile(custom)


def test_build_refuses_without_a_template_and_unknown_dialects() -> None:
    with pytest.raises(ModelfileError, match="TEMPLATE"):
        build_modelfile(from_="m.gguf")
    with pytest.raises(templates.TemplateRegistryError, match="known dialects"):
        build_modelfile(from_="m.gguf", dialect="alpaca")


def test_parameters_are_checked_against_ollama_options() -> None:
    with pytest.raises(ModelfileError, match="unknown parameter 'temprature'"):
        Modelfile(from_="m.gguf", parameters={"temprature": 0.7})
    with pytest.raises(ModelfileError, match="integer"):
        Modelfile(from_="m.gguf", parameters={"num_ctx": 4096.5})
    with pytest.raises(ModelfileError, match="stop"):
        Modelfile(from_="m.gguf", parameters={"stop": "x"})


def test_parser_reads_ollama_style_modelfiles() -> None:
    text = (
        "# a comment line\n"
        "from llama3.2\n"
        'TEMPLATE """{{ if .System }}<|system|>\n{{ .System }}{{ end }}"""\n'
        "Parameter stop <|eot_id|>\n"
        'PARAMETER stop "<|start_header_id|>"\n'
        "PARAMETER temperature 1\n"
        "PARAMETER num_ctx   4096\n"
        "PARAMETER use_mmap TRUE\n"
        "PARAMETER mirostat 2\n"  # deprecated: Ollama warns and ignores it
        "SYSTEM first\n"
        'SYSTEM """second wins"""\n'
        "LICENSE MIT\n"
        'LICENSE """Apache\nLicense"""\n'
        "MESSAGE user Is Toronto in Canada?\n"
        "MESSAGE assistant yes\n"
    )
    parsed = parse_modelfile(text)
    assert parsed.from_ == "llama3.2"
    assert parsed.template == "{{ if .System }}<|system|>\n{{ .System }}{{ end }}"
    assert parsed.stop == ("<|eot_id|>", "<|start_header_id|>")
    assert parsed.parameters == {"temperature": 1.0, "num_ctx": 4096, "use_mmap": True}
    assert parsed.system == "second wins"
    assert parsed.license == ("MIT", "Apache\nLicense")
    assert [m.model_dump() for m in parsed.messages] == [
        {"role": "user", "content": "Is Toronto in Canada?"},
        {"role": "assistant", "content": "yes"},
    ]


def test_triple_quoted_value_ends_at_the_first_closing_line() -> None:
    # No escapes: the value stops at the first line break after a closing """.
    commands = parse_modelfile_commands('FROM x\nSYSTEM """a """ b\nc"""\n')
    assert commands[1].args == 'a """ b\nc'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("SYSTEM hi\n", "no FROM"),
        ("FROM x\nSYSTEM \"\"\"never closed\n", "end of file inside a quoted value"),
        ("FROM x\nFOO bar\n", "unknown command 'FOO'"),
        ("FROM x\nMESSAGE tool hi\n", "MESSAGE role"),
        ("FROM x\nPARAMETER Temperature 1\n", "unknown parameter 'Temperature'"),
        ("FROM x\nPARAMETER num_ctx lots\n", "integer"),
        ("FROM x\nPARAMETER use_mmap maybe\n", "true or false"),
        ("FROM x\nFROM y\n", "more than one FROM"),
        ("FROM\n", "needs a value"),
    ],
)
def test_parser_refuses_what_ollama_refuses(text: str, message: str) -> None:
    with pytest.raises(ModelfileError, match=message):
        parse_modelfile(text)


def test_parser_reports_the_line() -> None:
    with pytest.raises(ModelfileError, match="line 4"):
        parse_modelfile('FROM x\nSYSTEM """a\nb"""\nMESSAGE robot hi\n')


def test_rendering_refuses_a_system_prompt_ollama_would_misread() -> None:
    modelfile = build_modelfile(from_="m.gguf", dialect="chatml", system='Use a docstring:\n"""\nlike that')
    with pytest.raises(ModelfileError, match='"""'):
        render_modelfile(modelfile)


# -- stops ------------------------------------------------------------------


def test_stops_union_in_order_without_duplicates() -> None:
    vocab = {"<|im_end|>", "<|endoftext|>", "<|im_start|>", "<|tool_end|>", "hello"}
    result = compute_stops("chatml", eos_tokens=["<|im_end|>"], eot_tokens=["<|endoftext|>"],
                           added_tokens=["<|tool_end|>"], vocab=vocab)
    assert result.stops == ("<|im_end|>", "<|endoftext|>", "<|im_start|>", "<|tool_end|>")
    assert result.warnings == ()


def test_stops_that_can_never_occur_are_dropped_with_a_warning() -> None:
    vocab = {"<|im_end|>", "<|im_start|>", "</s>"}
    result = compute_stops("chatml", eos_tokens=["</s>"], added_tokens=["<|never|>"], vocab=vocab)
    assert result.stops == ("<|im_end|>", "<|im_start|>", "</s>")
    dropped = " ".join(result.warnings)
    assert "'<|endoftext|>'" in dropped and "'<|never|>'" in dropped and "adapter-added" in dropped


def test_plain_text_the_dialect_writes_is_a_valid_stop() -> None:
    # Mistral v0.1-style vocabularies have no [INST] token, but the template
    # writes "[INST]" as text, so the model can produce it.
    result = compute_stops("mistral", eos_tokens=["</s>"], vocab={"</s>", "<s>", "▁hello"})
    assert result.stops == ("</s>", "[/INST]", "[INST]")
    assert result.warnings == ()


def test_without_a_vocabulary_every_stop_is_kept_and_the_gap_reported() -> None:
    result = compute_stops("phi3", eos_tokens=["<|endoftext|>", None], vocab=None)
    assert result.stops == templates.get_dialect("phi3").default_stops
    assert any("not checked" in w for w in result.warnings)


def test_stops_from_the_embedded_model() -> None:
    facts = read_tokenizer(packaged_gguf())
    result = compute_stops("chatml", eos_tokens=[facts.eos_token], eot_tokens=[facts.eot_token], vocab=facts.tokens)
    assert result.stops == ("<|im_end|>", "<|endoftext|>", "<|im_start|>")
    assert result.warnings == ()
    llama = compute_stops("llama3", eos_tokens=[facts.eos_token], vocab=facts.tokens)
    # Not SmolLM2 tokens, and the llama3 template never writes them.
    assert "<|end_of_text|>" not in llama.stops and "<|eom_id|>" not in llama.stops
    assert len(llama.warnings) == 2
