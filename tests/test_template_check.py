"""check_template: sources, matching, system inference, refusals; the dialect
table; and the Go renderer's fidelity to Ollama's message assembly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import templates
from tasks.demo import packaged_gguf
from tasks.errors import KilnError
from tasks.template_check import (
    MESSAGE_MATRIX,
    ChatMessage,
    ChatTemplateBroken,
    GoRenderer,
    GoRenderError,
    GoRenderJob,
    GoToolchainMissing,
    NoChatTemplate,
    NoDialectMatches,
    ToolCall,
    ToolCallFunction,
    check_template,
    check_template_text,
    outcome_lines,
    render_go_template,
)

SEED_001_DIALECTS = ("chatml", "qwen3thinking", "gemma2", "smollm3", "olmo2", "llama3", "phi3", "phi4mini", "mistral")
# qwen2.5 (ChatML plus Qwen2.5's tools) comes right after chatml, which it extends.
DIALECTS = ("chatml", "qwen2.5", *SEED_001_DIALECTS[1:], "mistralv3")
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def system(text: str) -> ChatMessage:
    return ChatMessage(role="system", content=text)


def assistant(text: str) -> ChatMessage:
    return ChatMessage(role="assistant", content=text)


def reference(dialect: str, index: int = 0) -> templates.ReferenceTemplate:
    return templates.get_dialect(dialect).references[index]


# -- the dialect table --------------------------------------------------------


def test_table_has_every_seed_dialect_with_its_files() -> None:
    assert templates.registered_dialects() == DIALECTS
    for name in DIALECTS:
        row = templates.get_dialect(name)
        assert row.template_path.name == f"{name}.gotmpl"
        assert row.read_template() == templates.load_template_text(name)
        assert row.default_stops and 0 < row.default_temperature <= 1 and 0 < row.default_top_p <= 1
        for ref in row.references:
            assert ref.path.parent == templates.REFERENCE_DIR and ref.read()


def test_unknown_dialect_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(KilnError) as info:
        templates.get_dialect("alpaca")
    assert "alpaca" in str(info.value)
    assert all(name in str(info.value) for name in SEED_001_DIALECTS)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_templates_never_write_a_bos_token(dialect: str, go_renderer: GoRenderer) -> None:  # noqa: F811
    text = templates.load_template_text(dialect)
    for bos in ("<s>", "<bos>", "<|begin_of_text|>", "{{ bos_token }}"):
        assert bos not in text
    rendered = render_go_template(text, [user("Hi")], renderer=go_renderer)
    assert not rendered.startswith(("<s>", "<bos>", "<|begin_of_text|>"))


@pytest.mark.parametrize("dialect", DIALECTS)
def test_tools_flag_matches_the_template(dialect: str, go_renderer: GoRenderer) -> None:  # noqa: F811
    row = templates.get_dialect(dialect)
    text = row.read_template()
    assert row.has_tools == (".Tools" in text)
    if not row.has_tools:
        return
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
            "parameters": {"type": "object", "required": ["city"],
                           "properties": {"city": {"type": "string", "description": "City name"}}}}}
    call = ToolCall(id="call12345", function=ToolCallFunction(name="get_weather", arguments={"city": "Paris"}))
    messages = [
        user("Weather in Paris?"),
        ChatMessage(role="assistant", content="", tool_calls=(call,)),
        ChatMessage(role="tool", content='{"temp": 21}', tool_name="get_weather", tool_call_id="call12345"),
    ]
    rendered = render_go_template(text, messages, tools=[tool], renderer=go_renderer)
    # Arguments print as the models' Jinja `tojson` does (", " and ": "), not as Go's compact json.
    assert "get_weather" in rendered and '{"city": "Paris"}' in rendered and '"city":"Paris"' not in rendered
    assert '{"temp": 21}' in rendered or '"{\\"temp\\": 21}"' in rendered  # Llama 3 quotes the result as a string


# -- check_template on real sources --------------------------------------------


def test_embedded_smollm2_gguf_is_chatml_with_its_default_system(go_renderer: GoRenderer) -> None:  # noqa: F811
    check = check_template(packaged_gguf(), renderer=go_renderer)
    assert check.source_kind == "gguf"
    assert check.dialect == "chatml" and check.verified
    assert check.system == SMOLLM2_SYSTEM
    assert check.template == templates.load_template_text("chatml")
    assert check.cases_checked == len(MESSAGE_MATRIX) == check.matrix_size
    assert check.mismatch is None


def _model_dir(tmp_path: Path, config: dict, standalone: str | None = None) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if standalone is not None:
        (folder / "chat_template.jinja").write_text(standalone)
    return folder


def test_model_folder_supplies_special_tokens(tmp_path: Path, go_renderer: GoRenderer) -> None:  # noqa: F811
    ref = reference("mistral")
    folder = _model_dir(tmp_path, {
        "chat_template": ref.read(),
        "bos_token": {"content": "<s>", "special": True},  # AddedToken form
        "eos_token": "</s>",
    })
    check = check_template(folder, renderer=go_renderer)
    assert (check.source_kind, check.dialect, check.system) == ("model_dir", "mistral", None)


def test_standalone_chat_template_file_wins_over_the_config(tmp_path: Path, go_renderer: GoRenderer) -> None:  # noqa: F811
    folder = _model_dir(tmp_path, {"chat_template": reference("phi3").read()}, standalone=reference("chatml").read())
    assert check_template(folder, renderer=go_renderer).dialect == "chatml"


def test_named_templates_use_the_default_one(tmp_path: Path, go_renderer: GoRenderer) -> None:  # noqa: F811
    folder = _model_dir(tmp_path, {"chat_template": [
        {"name": "tool_use", "template": reference("chatml").read()},
        {"name": "default", "template": reference("phi3").read()},
    ]})
    assert check_template(folder, renderer=go_renderer).dialect == "phi3"


def test_bare_jinja_file_needing_tokens_says_so(tmp_path: Path, go_renderer: GoRenderer) -> None:  # noqa: F811
    path = tmp_path / "mistral.jinja"
    path.write_text(reference("mistral").read())
    with pytest.raises(ChatTemplateBroken, match="eos_token"):
        check_template(path, renderer=go_renderer)
    assert check_template(path, eos_token="</s>", bos_token="<s>", renderer=go_renderer).dialect == "mistral"


def test_no_chat_template_is_refused_unless_a_dialect_is_given(tmp_path: Path, go_renderer: GoRenderer) -> None:  # noqa: F811
    folder = _model_dir(tmp_path, {"eos_token": "</s>"})
    with pytest.raises(NoChatTemplate, match="--dialect"):
        check_template(folder, renderer=go_renderer)
    check = check_template(folder, dialect="llama3", renderer=go_renderer)
    assert check.dialect == "llama3" and not check.verified and check.cases_checked == 0
    assert check.template == templates.load_template_text("llama3")


def _gguf_with_template(path: Path, template: str, tokens: list[str], bos: int, eos: int, add_bos: bool) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "gemma2")
    writer.add_chat_template(template)
    writer.add_token_list(tokens)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("add_bos", [True, False])
def test_gguf_whose_template_writes_bos_warns_when_the_runtime_will_not_add_it(
    add_bos: bool, tmp_path: Path, go_renderer: GoRenderer  # noqa: F811
) -> None:
    path = _gguf_with_template(tmp_path / "gemma.gguf", reference("gemma2").read(),
                               ["<pad>", "<eos>", "<bos>", "hello"], bos=2, eos=1, add_bos=add_bos)
    check = check_template(path, renderer=go_renderer)
    assert check.dialect == "gemma2" and check.template_writes_bos
    assert bool(check.warnings) is (not add_bos)
    if not add_bos:
        assert "add_bos_token=false" in check.warnings[0]


# -- matching logic -------------------------------------------------------------


def test_default_system_is_inferred_not_looked_up(go_renderer: GoRenderer) -> None:  # noqa: F811
    custom = reference("chatml").read().replace(SMOLLM2_SYSTEM, "You are Ember, a careful assistant.")
    check = check_template_text(custom, renderer=go_renderer)
    assert (check.dialect, check.system) == ("chatml", "You are Ember, a careful assistant.")


ALPACA = (
    "{% for m in messages %}{% if m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'assistant' %}### Response:\n{{ m['content'] }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


def test_a_template_no_dialect_reproduces_falls_back_to_the_models_own_jinja(go_renderer: GoRenderer) -> None:  # noqa: F811
    check = check_template_text(ALPACA, renderer=go_renderer, source="alpaca.jinja")
    assert (check.outcome, check.ollama_format, check.verified) == ("no-match", "jinja", False)
    assert check.template is None and check.system is None and check.candidates == ()
    assert check.dialect in DIALECTS  # the closest, for its stops
    assert check.mismatches == tuple(c.name for c in MESSAGE_MATRIX)
    assert check.mismatch is not None and check.mismatch.jinja_render.startswith("### Instruction:")
    assert check.mismatch.go_render != check.mismatch.jinja_render


def test_asking_for_a_dialect_that_is_far_off_is_refused_with_the_difference(go_renderer: GoRenderer) -> None:  # noqa: F811
    with pytest.raises(NoDialectMatches) as info:
        check_template_text(ALPACA, dialect="chatml", renderer=go_renderer, source="alpaca.jinja")
    message = str(info.value)
    assert "'chatml' dialect" in message and "alpaca.jinja" in message and "first difference" in message
    assert "Leave --dialect out" in message
    assert info.value.check.mismatch.dialect == "chatml"


def test_a_near_miss_is_caught_and_the_closest_is_over_the_whole_matrix(go_renderer: GoRenderer) -> None:  # noqa: F811
    # ChatML with one extra newline after each turn: close, but not the same.
    near = reference("qwen2.5").read().replace("'<|im_end|>' + '\\n'", "'<|im_end|>' + '\\n\\n'")
    assert near != reference("qwen2.5").read()
    check = check_template_text(near, renderer=go_renderer)
    assert not check.verified and check.ollama_format == "jinja"
    assert check.dialect == "qwen2.5" and check.mismatch.dialect == "qwen2.5"


def test_the_closest_dialect_is_the_smallest_difference_not_the_earliest(go_renderer: GoRenderer) -> None:  # noqa: F811
    # Llama 3.1 with another knowledge date: every case differs, by a few characters, late in the text.
    # The earliest differing character would name chatml (its first character already differs).
    changed = reference("llama3").read().replace("December 2023", "March 2024")
    check = check_template_text(changed, bos_token="<|begin_of_text|>", renderer=go_renderer)
    assert check.outcome == "no-match" and check.dialect == "llama3"
    assert check.mismatch.offset > 20
    others = [t for t in check.trials if t.dialect != "llama3"]
    assert all(t.distance > check.trials[DIALECTS.index("llama3")].distance for t in others)


def _gemma3_without_empty_system() -> str:
    # Gemma 3 as it would be had it dropped an empty system message: the gemma2 dialect is then
    # exact on every case but `empty-system`.
    text = reference("gemma2", 1).read()
    old = '(first_user_prefix if loop.first else "")'
    assert text.count(old) == 1
    return text.replace(old, '(first_user_prefix if loop.first and first_user_prefix.strip() else "")')


def test_one_dialect_exact_on_all_but_a_few_cases_names_them(go_renderer: GoRenderer) -> None:  # noqa: F811
    text = _gemma3_without_empty_system()
    check = check_template_text(text, bos_token="<bos>", renderer=go_renderer)
    assert (check.outcome, check.dialect, check.mismatches, check.ollama_format) == (
        "near", "gemma2", ("empty-system",), "jinja")
    lines = "\n".join(outcome_lines(check))
    assert "empty-system" in lines and "pass --dialect gemma2" in lines
    # The user accepts the Go template: no refusal, not verified, the case still named.
    chosen = check_template_text(text, bos_token="<bos>", dialect="gemma2", renderer=go_renderer)
    assert (chosen.outcome, chosen.ollama_format, chosen.verified, chosen.mismatches) == (
        "near", "template", False, ("empty-system",))
    assert chosen.template == templates.load_template_text("gemma2")


def test_forcing_the_wrong_dialect_is_refused(go_renderer: GoRenderer) -> None:  # noqa: F811
    with pytest.raises(NoDialectMatches, match="'llama3' dialect"):
        check_template(packaged_gguf(), dialect="llama3", renderer=go_renderer)
    check = check_template(packaged_gguf(), dialect="llama3", strict=False, renderer=go_renderer)
    assert check.dialect == "llama3" and not check.verified and check.mismatch.dialect == "llama3"
    with pytest.raises(templates.TemplateRegistryError):
        check_template(packaged_gguf(), dialect="vicuna", renderer=go_renderer)


def test_reference_refusals_are_skipped_and_reported(go_renderer: GoRenderer) -> None:  # noqa: F811
    ref = reference("gemma2")
    check = check_template_text(ref.read(), bos_token=ref.bos_token, renderer=go_renderer)
    assert check.dialect == "gemma2"
    assert set(check.cases_skipped) == {c.name for c in MESSAGE_MATRIX if c.has_system}
    assert check.cases_checked == len(MESSAGE_MATRIX) - len(check.cases_skipped)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("{% for m in messages %}{{ m.content }", ChatTemplateBroken),
        ("{{ raise_exception('no chat for you') }}", ChatTemplateBroken),
        ("{{ messages[0].content.nonexistent_method() }}", ChatTemplateBroken),
    ],
)
def test_broken_templates_are_refused_clearly(text: str, error: type, go_renderer: GoRenderer) -> None:  # noqa: F811
    with pytest.raises(error):
        check_template_text(text, renderer=go_renderer)


# -- the Go renderer: Ollama's message assembly --------------------------------

CHATML = templates.load_template_text("chatml")


def render(go_renderer: GoRenderer, template: str, messages, **kwargs) -> str:
    return go_renderer.render(GoRenderJob(template=template, messages=tuple(messages), **kwargs))


def test_modelfile_system_is_prepended_when_the_request_has_none(go_renderer: GoRenderer) -> None:  # noqa: F811
    out = render(go_renderer, CHATML, [user("Hi")], system="SYS")
    assert out == "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_request_system_replaces_the_modelfile_system(go_renderer: GoRenderer) -> None:  # noqa: F811
    out = render(go_renderer, CHATML, [system("Mine"), user("Hi")], system="SYS")
    assert "SYS" not in out and out.startswith("<|im_start|>system\nMine<|im_end|>")


def test_modelfile_messages_come_between_system_and_request(go_renderer: GoRenderer) -> None:  # noqa: F811
    out = render(go_renderer, "{{ range .Messages }}[{{ .Role }}:{{ .Content }}]{{ end }}", [user("Q")],
                 system="S", modelfile_messages=(user("example q"), assistant("example a")))
    assert out == "[system:S][user:example q][assistant:example a][user:Q]"


def test_consecutive_same_role_messages_are_merged(go_renderer: GoRenderer) -> None:  # noqa: F811
    out = render(go_renderer, "{{ range .Messages }}[{{ .Role }}:{{ .Content }}]{{ end }}|{{ .System }}",
                 [system("a"), system("b"), user("1"), user("2"), assistant("x"), user("3"), system("c")])
    assert out == "[system:a\n\nb][user:1\n\n2][assistant:x][user:3][system:c]|a\n\nb\n\nc"


def test_tool_messages_are_not_merged(go_renderer: GoRenderer) -> None:  # noqa: F811
    tool = ChatMessage(role="tool", content="r")
    out = render(go_renderer, "{{ range .Messages }}[{{ .Role }}]{{ end }}", [user("q"), tool, tool])
    assert out == "[user][tool][tool]"


def test_messages_templates_get_no_prompt_and_missing_keys_are_zero(go_renderer: GoRenderer) -> None:  # noqa: F811
    out = render(go_renderer, "{{ .Messages | len }}|{{ .Prompt }}|{{ .Response }}|{{ .Tools }}|{{ .Think }}", [user("q")])
    # .Prompt is absent from the map: missingkey=zero prints Go's <no value>.
    # .Tools is a nil list, which prints as JSON null (Ollama's templateTools.String).
    assert out == "1|<no value>||null|false"


def test_legacy_templates_render_per_turn_and_stop_at_the_response(go_renderer: GoRenderer) -> None:  # noqa: F811
    legacy = "{{ if .System }}S:{{ .System }} {{ end }}U:{{ .Prompt }} A:{{ .Response }}<end>"
    out = render(go_renderer, legacy, [user("q1"), assistant("r1"), user("q2")], system="sys")
    assert out == "S:sys U:q1 A:r1<end>U:q2 A:"


def test_a_template_without_response_gets_one_appended(go_renderer: GoRenderer) -> None:  # noqa: F811
    assert render(go_renderer, "Q: {{ .Prompt }}\n", [user("hi"), assistant("yo"), user("again")]) == "Q: hi\nyoQ: again\n"


def test_think_and_dates(go_renderer: GoRenderer) -> None:  # noqa: F811
    template = "{{ .Think }} {{ .IsThinkSet }} {{ .ThinkLevel }} {{ currentDate }} {{ yesterdayDate }}{{ range .Messages }}{{ end }}"
    assert render(go_renderer, template, [user("q")], think="high", today="2024-03-01") == "true true high 2024-03-01 2024-02-29"
    assert render(go_renderer, template, [user("q")], think=False, today="2024-03-01").startswith("false true ")


def test_template_errors_are_reported_per_job(go_renderer: GoRenderer) -> None:  # noqa: F811
    results = go_renderer.render_many([
        GoRenderJob(template="{{ .Messages ", messages=(user("q"),)),
        GoRenderJob(template=CHATML, messages=(user("q"),)),
        GoRenderJob(template="{{ range .Messages }}{{ .Nope }}{{ end }}", messages=(user("q"),)),
    ])
    assert isinstance(results[0], GoRenderError) and "unclosed action" in results[0].message
    assert results[1] == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    assert isinstance(results[2], GoRenderError) and "Nope" in results[2].message


def test_content_is_data_never_template_source(go_renderer: GoRenderer) -> None:  # noqa: F811
    tricky = "{{ .System }} {{ template \"x\" }} <|im_end|>"
    out = render(go_renderer, CHATML, [user(tricky)], system="S")
    assert f"user\n{tricky}<|im_end|>" in out


def test_missing_go_fails_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no `go` here
    renderer = GoRenderer(cache_root=tmp_path / "fresh-cache")
    with pytest.raises(GoToolchainMissing, match="golang-go"):
        renderer.binary()


def test_the_renderer_is_built_once_per_source(go_renderer: GoRenderer) -> None:  # noqa: F811
    binary = go_renderer.binary()
    assert binary.is_file() and re.fullmatch(r"[0-9a-f]{16}", binary.parent.name)
    again = GoRenderer(cache_root=go_renderer.cache_root)
    assert again.binary() == binary  # found in the cache, not rebuilt


def test_the_renderer_hands_templates_tools_as_ollama_does(go_renderer: GoRenderer) -> None:  # noqa: F811
    # Ollama (template/template.go convertToolsForTemplate, api/types.go): the top-level properties are a
    # Go map (sorted), nested ones keep the request's order, api.ToolProperty's fields in their order, and
    # toTypeScriptType is ToolProperty.ToTypeScriptType (anyOf joined, object as Record<string, any>).
    tool = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {
        "type": "object", "properties": {
            "b": {"description": "nested", "type": "object",
                  "properties": {"z": {"type": "string"}, "a": {"type": "integer"}}},
            "a": {"anyOf": [{"type": "string"}, {"type": "null"}], "title": "dropped by Ollama"}},
        "required": ["b"]}}}
    text = ("{{ range .Messages }}{{ end }}{{ range .Tools }}{{ range $k, $v := .Function.Parameters.Properties }}"
            "{{ $k }}: {{ toTypeScriptType $v }}; {{ end }}{{ json . }}{{ end }}")
    rendered = render_go_template(text, [user("hi")], tools=[tool], renderer=go_renderer)
    assert rendered == (
        'a: string | null; b: Record<string, any>; '
        '{"type":"function","function":{"name":"f","description":"d","parameters":{"type":"object",'
        '"required":["b"],"properties":{"a":{"anyOf":[{"type":"string"},{"type":"null"}]},'
        '"b":{"type":"object","description":"nested","properties":{"z":{"type":"string"},"a":{"type":"integer"}}}}}}}'
    )


# The text each model writes before its tool calls (what its own template puts there): Ollama's
# tool-call parser waits for the tag it derives from the TEMPLATE before it reads any call, so a
# wrong tag means tool calls come back as plain text. "{": the model answers with bare JSON.
TOOL_TAGS = {"qwen2.5": "<tool_call>", "qwen3thinking": "<tool_call>", "llama3": "{",
             "mistral": "[TOOL_CALLS][", "mistralv3": "[TOOL_CALLS] ["}


def test_ollamas_tool_call_parser_finds_each_models_tool_call_tag(go_renderer: GoRenderer) -> None:  # noqa: F811
    assert {d for d in DIALECTS if templates.get_dialect(d).has_tools} == set(TOOL_TAGS)
    for dialect, tag in TOOL_TAGS.items():
        assert go_renderer.tool_tag(templates.load_template_text(dialect)) == tag, dialect
    # The parser's own rules (tools/template.go): the first text inside the first `if` on .ToolCalls, up to "{".
    assert go_renderer.tool_tag('{{ range .Messages }}{{ if .ToolCalls }}\n[CALLS] {"a": 1}{{ end }}{{ end }}') == "[CALLS]"
    assert go_renderer.tool_tag("{{ range .Messages }}{{ range .ToolCalls }}<call>{{ end }}{{ end }}") == "{"


def test_ollamas_thinking_parser_finds_the_think_tags(go_renderer: GoRenderer) -> None:  # noqa: F811
    # Ollama splits a reply's thinking out only with tags it infers from the TEMPLATE (thinking/template.go
    # InferTags: the text around a {{ .Thinking }} inside a range over .Messages); none found, none split.
    printing = [d for d in DIALECTS if ".Thinking" in templates.load_template_text(d)]
    assert printing == ["qwen3thinking"]
    assert go_renderer.think_tags(templates.load_template_text("qwen3thinking")) == ("<think>", "</think>")
    # A range over a variable holding .Messages is not recognised (what qwen3thinking did before).
    assert go_renderer.think_tags("{{ $m := .Messages }}{{ range $m }}<t>{{ .Thinking }}</t>{{ end }}") == ("", "")
