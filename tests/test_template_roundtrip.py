"""Round trip: each dialect's Go template renders exactly what its reference
Jinja templates render (add_generation_prompt=True) over the message matrix.

The Go side runs through Kiln's own renderer (templates/gorender, built with
`go build`), which assembles messages as Ollama's /api/chat does, with the
reference's default system prompt as the Modelfile SYSTEM. A case the
reference itself refuses (Gemma has no system role) cannot be compared; it
is listed, and the Go template must still render it without error. A
reference that prints today's date (Llama 3.2) is rendered with its clock set
to the dialect's `fixed_date`, the date the Go template prints, and must be
reported as exact apart from the date.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import templates
from tasks.template_check import (
    DEFAULT_MATRIX,
    ConversationRefused,
    GoRenderer,
    GoRenderError,
    GoRenderJob,
    JinjaChatTemplate,
    check_template_text,
    prints_today,
)

REFERENCES = [
    (row.dialect, ref) for row in (templates.get_dialect(d) for d in templates.registered_dialects())
    for ref in row.references
]
# Tool conversations only where the reference takes tools (MatrixCase.applies_to).
PAIRS = [(dialect, ref, case) for dialect, ref in REFERENCES for case in DEFAULT_MATRIX if case.applies_to(ref.read())]


@dataclass(frozen=True)
class Outcome:
    jinja: str | None  # None: the reference refuses the conversation
    refusal: str | None
    go: str | GoRenderError


@pytest.fixture(scope="module")
def outcomes(go_renderer: GoRenderer) -> dict[tuple[str, str], Outcome]:  # noqa: F811
    """Every (reference, case) rendered both ways, the Go side in one batch."""
    jinja_side: list[tuple[str | None, str | None]] = []
    jobs: list[GoRenderJob] = []
    compiled = {
        ref.file_name: JinjaChatTemplate(ref.read(), {"bos_token": ref.bos_token, "eos_token": ref.eos_token})
        for _, ref in REFERENCES
    }
    for dialect, ref, case in PAIRS:
        jinja = compiled[ref.file_name]
        try:
            today = templates.get_dialect(dialect).fixed_date
            jinja_side.append((jinja.render(case.messages, think=case.think, tools=case.tools, today=today), None))
        except ConversationRefused as exc:
            jinja_side.append((None, exc.message))
        jobs.append(GoRenderJob(
            template=templates.load_template_text(dialect), messages=case.messages,
            system=ref.system, think=case.think, tools=case.tools,
        ))
    go_side = go_renderer.render_many(jobs)
    return {
        (ref.file_name, case.name): Outcome(jinja=j, refusal=r, go=g)
        for (_, ref, case), (j, r), g in zip(PAIRS, jinja_side, go_side)
    }


@pytest.mark.parametrize(
    ("dialect", "reference", "case"),
    PAIRS,
    ids=[f"{ref.file_name.removesuffix('.jinja')}-{case.name}" for _, ref, case in PAIRS],
)
def test_go_render_equals_jinja_render(dialect, reference, case, outcomes) -> None:
    outcome = outcomes[(reference.file_name, case.name)]
    assert not isinstance(outcome.go, GoRenderError), outcome.go
    if outcome.jinja is None:
        # Only a system message is ever refused by a reference (Gemma's
        # "System role not supported"); anything else would hide a gap.
        assert case.has_system, f"{reference.model} refuses {case.name!r}: {outcome.refusal}"
        return
    assert outcome.go == outcome.jinja


@pytest.mark.parametrize(("dialect", "reference"), REFERENCES, ids=[r.file_name for _, r in REFERENCES])
def test_check_picks_the_dialect_and_infers_the_default_system(dialect, reference, go_renderer) -> None:  # noqa: F811
    check = check_template_text(
        reference.read(), bos_token=reference.bos_token, eos_token=reference.eos_token,
        renderer=go_renderer, source=reference.file_name,
    )
    assert check.dialect == dialect
    # The matrix tells the dialects apart: exactly one matches each reference, except that qwen2.5 is
    # ChatML plus tools, so it renders a ChatML model without tools too (chatml comes first in the table).
    assert check.candidates == ((dialect, "qwen2.5") if dialect == "chatml" else (dialect,))
    assert check.system == reference.system
    applicable = [c for c in DEFAULT_MATRIX if c.applies_to(reference.read())]
    assert check.verified and check.cases_checked + len(check.cases_skipped) == len(applicable) == check.matrix_size
    assert check.ollama_format == "template" and check.mismatches == ()
    dated = prints_today(JinjaChatTemplate(reference.read(), {"bos_token": reference.bos_token,
                                                              "eos_token": reference.eos_token}), DEFAULT_MATRIX)
    assert check.outcome == ("exact-apart-from-date" if dated else "exact")
    assert (check.date_policy == "fixed") is dated


def test_the_new_references_are_in_the_table() -> None:
    # Issue 19 and 13: Mistral 7B v0.3, Gemma 3 and Llama 3.2 (date-bearing) are covered above.
    files = {ref.file_name for _, ref in REFERENCES}
    assert {"mistralv3.Mistral-7B-Instruct-v0.3.jinja", "gemma2.gemma-3-it.jinja",
            "llama3.Llama-3.2-3B-Instruct.jinja"} <= files
    dated = [ref.file_name for _, ref in REFERENCES
             if prints_today(JinjaChatTemplate(ref.read(), {"bos_token": ref.bos_token, "eos_token": ref.eos_token}),
                             DEFAULT_MATRIX)]
    assert dated == ["llama3.Llama-3.2-3B-Instruct.jinja"]


def test_verified_flags_are_exactly_the_dialects_with_references(outcomes) -> None:
    for dialect in templates.registered_dialects():
        row = templates.get_dialect(dialect)
        assert row.verified == bool(row.references)
        for ref in row.references:
            compared = [o for (f, _), o in outcomes.items() if f == ref.file_name and o.jinja is not None]
            assert compared and all(o.go == o.jinja for o in compared), ref.file_name
    assert set(templates.verified_dialects()) == {
        "chatml", "qwen2.5", "qwen3thinking", "gemma2", "smollm3", "llama3", "phi3", "mistral", "mistralv3",
    }
    assert not templates.get_dialect("olmo2").verified and not templates.get_dialect("phi4mini").verified


def test_report_matrix(outcomes) -> None:
    compared = sum(1 for o in outcomes.values() if o.jinja is not None)
    refused = len(outcomes) - compared
    unverified = [d for d in templates.registered_dialects() if not templates.get_dialect(d).verified]
    print(
        f"\nround-trip matrix: {len(DEFAULT_MATRIX)} message sets (tool sets where the template takes tools) x "
        f"{len(REFERENCES)} reference templates: "
        f"{compared} compared, {refused} refused by the reference\n"
        f"verified dialects: {', '.join(templates.verified_dialects())}\n"
        f"unverified dialects (no reference): {', '.join(unverified)}"
    )
    assert compared >= len(REFERENCES) * 10


# A tool schema with what real tools carry: several properties, an enum, an array, a nested object,
# anyOf, a parameterless tool, and arguments with nesting, numbers, booleans, null, quotes, newlines,
# "<", ">" and "&" (which Go's json would escape and Python's does not). Properties are in sorted
# order: Ollama hands them to a template as a Go map, which no template can visit in request order.
_RICH_TOOLS = (
    {"type": "function", "function": {
        "name": "search", "description": 'Find <items> & "things" — café',
        "parameters": {"type": "object", "properties": {
            "filters": {"type": "object", "description": "Nested",
                        "properties": {"a": {"type": "string"}, "b": {"type": ["integer", "null"]}}, "required": ["a"]},
            "limit": {"type": "integer", "description": "Max results"},
            "tags": {"type": "array", "items": {"type": "string"}, "description": "Tags"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Unit"},
            "when": {"anyOf": [{"type": "string"}, {"type": "null"}], "description": "Date"}},
            "required": ["limit", "unit"]}}},
    {"type": "function", "function": {"name": "now", "description": "Time",
                                      "parameters": {"type": "object", "properties": {}}}},
)


def _rich_conversation(arguments: dict) -> tuple:
    from tasks.template_check import ChatMessage, ToolCall, ToolCallFunction

    call = ChatMessage(role="assistant", content="", tool_calls=(
        ToolCall(id="call00002", function=ToolCallFunction(name="search", arguments=arguments)),))
    result = ChatMessage(role="tool", content='{"found": 1, "url": "a?b=1&c=<2>"}', tool_name="search",
                         tool_call_id="call00002")
    return (ChatMessage(role="user", content="Find it"), call, result)


TOOL_REFERENCES = [(d, r) for d, r in REFERENCES if templates.get_dialect(d).has_tools]


@pytest.mark.parametrize(("dialect", "reference"), TOOL_REFERENCES, ids=[r.file_name for _, r in TOOL_REFERENCES])
def test_tool_json_prints_as_the_models_tojson(dialect, reference, go_renderer) -> None:  # noqa: F811
    row = templates.get_dialect(dialect)
    messages = _rich_conversation({"filters": {"a": "x", "b": None}, "limit": 5, "ok": True, "ratio": 0.5,
                                   "tags": ["a", "b<c"], "text": 'line1\nline2 "q" & <tag>'})
    jinja = JinjaChatTemplate(reference.read(), {"bos_token": reference.bos_token, "eos_token": reference.eos_token})
    expected = jinja.render(messages, tools=_RICH_TOOLS, today=row.fixed_date)
    got = go_renderer.render(GoRenderJob(
        template=row.read_template(), messages=messages, system=reference.system, tools=_RICH_TOOLS,
        today=row.fixed_date.isoformat() if row.fixed_date else None))
    assert got == expected


def test_tool_json_limit_request_order_of_properties(go_renderer) -> None:  # noqa: F811
    # The honest limit: Ollama converts a tool's properties and a call's arguments to Go maps before the
    # template sees them, so a Go template prints them in sorted key order; the model's Jinja keeps the
    # request's order. Here "unit" comes before "city": the renders differ, only in that order.
    (dialect, reference) = next((d, r) for d, r in TOOL_REFERENCES if d == "qwen2.5")
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
            "parameters": {"type": "object", "properties": {"unit": {"type": "string"}, "city": {"type": "string"}},
                           "required": ["city"]}}}
    messages = _rich_conversation({"unit": "c", "city": "Paris"})
    jinja = JinjaChatTemplate(reference.read(), {"eos_token": reference.eos_token})
    expected = jinja.render(messages, tools=(tool,))
    got = go_renderer.render(GoRenderJob(template=templates.load_template_text(dialect), messages=messages,
                                         system=reference.system, tools=(tool,)))
    assert got != expected
    assert '"properties": {"city": {"type": "string"}, "unit": {"type": "string"}}' in got
    assert '"arguments": {"city": "Paris", "unit": "c"}' in got
    swapped = expected.replace('"unit": {"type": "string"}, "city": {"type": "string"}',
                               '"city": {"type": "string"}, "unit": {"type": "string"}').replace(
        '{"unit": "c", "city": "Paris"}', '{"city": "Paris", "unit": "c"}')
    assert got == swapped


@pytest.mark.parametrize("dialect", [d for d in templates.verified_dialects()])
def test_each_verified_dialect_has_a_jinja_equivalent_for_prebuilt_ggufs(dialect, go_renderer) -> None:  # noqa: F811
    # `kiln export X.gguf --dialect D` writes this Jinja into the GGUF (tasks/ollama_plan.py): it must render
    # what D's Go template renders with no Modelfile SYSTEM, tool conversations included.
    from tasks.ollama_plan import dialect_jinja

    jinja = dialect_jinja(dialect)
    assert jinja is not None
    row = templates.get_dialect(dialect)
    ref = row.references[0]
    check = check_template_text(jinja, bos_token=ref.bos_token, eos_token=ref.eos_token, dialect=dialect,
                                renderer=go_renderer)
    assert check.verified and check.system is None and check.mismatches == ()
