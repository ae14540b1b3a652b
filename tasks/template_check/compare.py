"""The comparison: render both sides over the matrix and measure each dialect's distance from exact.

A model template that prints today's date (`strftime_now`, Llama 3.2) is
detected by rendering it with two different pinned clocks. A dialect that
declares the fixed date its Go template prints (`DialectTemplate.fixed_date`)
is then compared with the Jinja clock pinned to that date: a match is exact
apart from the date, which `decide` reports as its own outcome.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Final, Literal

import jinja2
from pydantic import BaseModel, ConfigDict, Field

import templates
from tasks.template_check.errors import ChatTemplateBroken
from tasks.template_check.gorender import GoRenderer, GoRenderError, GoRenderJob
from tasks.template_check.jinja import ConversationRefused, JinjaChatTemplate
from tasks.template_check.matrix import DEFAULT_MATRIX, MatrixCase

# Two clocks far from today and from each other: a template whose renders
# differ between them prints the date.
_DATE_PROBES: Final = (date(2031, 3, 14), date(2032, 11, 5))


class CaseOutcome(BaseModel):
    model_config = ConfigDict(frozen=True)

    case: str
    status: Literal["match", "mismatch", "reference-refused", "go-error"]
    detail: str | None = None


class TemplateMismatch(BaseModel):
    """The first case where a dialect's Go render differs from the Jinja render."""

    model_config = ConfigDict(frozen=True)

    dialect: str
    case: str
    system: str | None
    jinja_render: str
    go_render: str
    offset: int = Field(description="index of the first differing character")

    def describe(self, context: int = 40) -> str:
        start = max(0, self.offset - context)
        jinja_part = self.jinja_render[start : self.offset + context]
        go_part = self.go_render[start : self.offset + context]
        return (
            f"dialect {self.dialect!r}, case {self.case!r}, first difference at character {self.offset}:\n"
            f"  model's Jinja: {jinja_part!r}\n"
            f"  Go template:   {go_part!r}"
        )


class DialectTrial(BaseModel):
    """How one dialect fared against the model's template."""

    model_config = ConfigDict(frozen=True)

    dialect: str
    matched: bool
    system: str | None
    cases: tuple[CaseOutcome, ...]
    mismatch: TemplateMismatch | None = None
    difference: int = Field(default=0, description="characters that differ, summed over the cases that differ")
    pinned_date: date | None = Field(
        default=None, description="the model's template prints today's date; it was compared with its clock "
        "pinned to this date, the one the dialect's Go template prints"
    )

    @property
    def cases_matched(self) -> int:
        return sum(1 for c in self.cases if c.status == "match")

    @property
    def mismatched_cases(self) -> tuple[str, ...]:
        return tuple(c.case for c in self.cases if c.status in ("mismatch", "go-error"))

    @property
    def distance(self) -> tuple[int, int]:
        """How far from exact, over the whole matrix: cases that differ, then characters that differ."""
        return (len(self.mismatched_cases), self.difference)


class TemplateCheck(BaseModel):
    """The result of matching a model's chat template with the dialects."""

    model_config = ConfigDict(frozen=True)

    source: str
    source_kind: Literal["jinja", "model_dir", "gguf", "none"]
    jinja_sha256: str | None
    dialect: str | None
    template: str | None = Field(description="the chosen dialect's Go template (the Modelfile TEMPLATE)")
    system: str | None = Field(description="the Modelfile SYSTEM the match needs (the template's default system prompt)")
    verified: bool = Field(description="the Go template rendered exactly the Jinja text on every case checked")
    matrix_size: int
    cases_checked: int
    cases_skipped: tuple[str, ...] = Field(description="cases the model's own template refuses")
    candidates: tuple[str, ...] = Field(description="every dialect that is exact, in table order")
    mismatch: TemplateMismatch | None = Field(
        description="the chosen (or closest) dialect's first differing case, when it is not exact"
    )
    template_writes_bos: bool = Field(
        default=False, description="the Jinja template prints bos_token itself (removed before comparing)"
    )
    warnings: tuple[str, ...] = ()
    trials: tuple[DialectTrial, ...] = ()
    outcome: Literal["exact", "exact-apart-from-date", "near", "no-match", "unchecked"] = Field(
        default="exact",
        description="exact: a dialect renders the model's template on every case; exact-apart-from-date: so too, "
        "except that the model's template prints today's date where the Go template prints a fixed one; near: the "
        "closest dialect differs on a few cases (`mismatches`); no-match: nothing close; unchecked: the source has "
        "no chat template and the dialect was given",
    )
    ollama_format: Literal["template", "jinja", "renderer"] = Field(
        default="template",
        description="how Ollama will format chats: template (the dialect's Go TEMPLATE) or jinja (no TEMPLATE: "
        "Ollama renders the GGUF's own Jinja chat template; the Modelfile then REQUIRES a recent Ollama); renderer: "
        "Ollama's built-in renderer for the architecture (tasks/ollama_format.py)",
    )
    mismatches: tuple[str, ...] = Field(
        default=(), description="matrix cases the chosen (or closest) dialect renders differently; empty when exact"
    )
    date_policy: Literal["none", "fixed"] = Field(
        default="none",
        description="fixed: the model's template prints today's date, the Go TEMPLATE a fixed date (Ollama's "
        "currentDate prints 2006-01-02 only, so a Go template cannot print the model's format of today)",
    )
    date_note: str | None = Field(default=None, description="what each renderer prints for the date, when it matters")


def _first_difference(a: str, b: str) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def _char_difference(a: str, b: str) -> int:
    """Characters inserted or deleted to turn one render into the other (common ends skipped first:
    differences are mostly local, and the matcher is quadratic in what is left)."""
    start = _first_difference(a, b)
    end = 0
    while end < min(len(a), len(b)) - start and a[len(a) - 1 - end] == b[len(b) - 1 - end]:
        end += 1
    a_mid, b_mid = a[start : len(a) - end], b[start : len(b) - end]
    if not a_mid or not b_mid:
        return len(a_mid) + len(b_mid)
    same = sum(block.size for block in difflib.SequenceMatcher(None, a_mid, b_mid, autojunk=False).get_matching_blocks())
    return len(a_mid) + len(b_mid) - 2 * same


_SYSTEM_CANARY: Final = "KILN-SYSTEM-CANARY-5f0c1e"


def _infer_default_system(
    template: str,
    jinja_renders: Mapping[str, str],
    renderer: GoRenderer,
    matrix: Sequence[MatrixCase],
) -> str | None:
    """The Modelfile SYSTEM that makes the Go template write what Jinja writes
    when the conversation has no system message, if there is one.

    Render a no-system case with a canary SYSTEM; the Go output is then
    prefix + canary + suffix, and the Jinja text must be prefix + S + suffix.
    """
    probe = next((c for c in matrix if not c.has_system and c.think is None and c.name in jinja_renders), None)
    if probe is None:
        return None
    (canary_render,) = renderer.render_many(
        [GoRenderJob(template=template, messages=probe.messages, system=_SYSTEM_CANARY)]
    )
    if isinstance(canary_render, GoRenderError) or canary_render.count(_SYSTEM_CANARY) != 1:
        return None
    prefix, suffix = canary_render.split(_SYSTEM_CANARY)
    expected = jinja_renders[probe.name]
    if len(expected) <= len(prefix) + len(suffix):
        return None
    if not (expected.startswith(prefix) and expected.endswith(suffix)):
        return None
    inferred = expected[len(prefix) : len(expected) - len(suffix)]
    return inferred or None


def _judge(
    dialect: str,
    system: str | None,
    matrix: Sequence[MatrixCase],
    side: JinjaSide,
    go_renders: Sequence[str | GoRenderError],
) -> DialectTrial:
    jinja_renders, refusals = side.renders, side.refusals
    outcomes: list[CaseOutcome] = []
    mismatch: TemplateMismatch | None = None
    difference = 0
    renders = iter(go_renders)
    for case in matrix:
        if case.name in refusals:
            outcomes.append(CaseOutcome(case=case.name, status="reference-refused", detail=refusals[case.name]))
            continue
        go = next(renders)
        if isinstance(go, GoRenderError):
            outcomes.append(CaseOutcome(case=case.name, status="go-error", detail=go.message))
            difference += len(jinja_renders[case.name])
            if mismatch is None:
                mismatch = TemplateMismatch(
                    dialect=dialect, case=case.name, system=system,
                    jinja_render=jinja_renders[case.name], go_render=f"<error: {go.message}>", offset=0,
                )
            continue
        expected = jinja_renders[case.name]
        if go == expected:
            outcomes.append(CaseOutcome(case=case.name, status="match"))
            continue
        outcomes.append(CaseOutcome(case=case.name, status="mismatch"))
        difference += _char_difference(expected, go)
        if mismatch is None:
            mismatch = TemplateMismatch(
                dialect=dialect, case=case.name, system=system,
                jinja_render=expected, go_render=go, offset=_first_difference(expected, go),
            )
    matched = mismatch is None and any(o.status == "match" for o in outcomes)
    return DialectTrial(dialect=dialect, matched=matched, system=system, cases=tuple(outcomes), mismatch=mismatch,
                        difference=difference, pinned_date=side.today)


@dataclass
class JinjaSide:
    """The model's template rendered over the matrix with one clock (`today`; None: the real one)."""

    today: date | None
    renders: dict[str, str] = field(default_factory=dict)
    refusals: dict[str, str] = field(default_factory=dict)

    @property
    def cases(self) -> list[str]:
        return list(self.renders)


def _render_side(jinja: JinjaChatTemplate, matrix: Sequence[MatrixCase], today: date | None) -> JinjaSide:
    side = JinjaSide(today=today)
    for case in matrix:
        try:
            side.renders[case.name] = jinja.render(case.messages, think=case.think, today=today, tools=case.tools)
        except ConversationRefused as exc:
            side.refusals[case.name] = f"the model's template refuses it: {exc.message}"
        except jinja2.UndefinedError as exc:
            raise ChatTemplateBroken(
                f"the chat template uses a value Kiln does not pass ({exc.message}); if it is a special "
                "token such as eos_token, check the model folder or the GGUF (a bare .jinja file carries "
                "none) or give it with --bos-token/--eos-token"
            ) from None
        except jinja2.TemplateError as exc:
            raise ChatTemplateBroken(f"the chat template fails on the {case.name!r} conversation: {exc}") from None
        except Exception as exc:  # a template bug surfaces as a Python error inside the sandbox
            raise ChatTemplateBroken(
                f"the chat template crashes on the {case.name!r} conversation: {type(exc).__name__}: {exc}"
            ) from None
    if not side.renders:
        reasons = sorted(set(side.refusals.values()))
        raise ChatTemplateBroken("the chat template refuses every conversation of the matrix: " + "; ".join(reasons))
    return side


def prints_today(jinja: JinjaChatTemplate, matrix: Sequence[MatrixCase]) -> bool:
    """Whether the template's renders depend on the clock (it prints today's date)."""
    first, second = (_render_side(jinja, matrix, today) for today in _DATE_PROBES)
    return first.renders != second.renders


@dataclass(frozen=True)
class Comparison:
    """Every dialect's trial (table order), the real-clock Jinja side, and whether the template prints today's date."""

    trials: tuple[DialectTrial, ...]
    jinja_renders: dict[str, str]
    refusals: dict[str, str]
    prints_today: bool


def compare_with_dialects(
    jinja: JinjaChatTemplate,
    dialects: Sequence[str] | None = None,
    *,
    matrix: Sequence[MatrixCase] = DEFAULT_MATRIX,
    renderer: GoRenderer | None = None,
) -> Comparison:
    """Try each dialect against a compiled Jinja template.

    Each dialect is tried first with no Modelfile SYSTEM, then with the default
    system prompt inferred from the Jinja template; the closer of the two is kept.
    """
    renderer = renderer or GoRenderer()
    matrix = [case for case in matrix if case.applies_to(jinja.text)]  # tool cases for templates that take tools
    names = list(dialects) if dialects is not None else list(templates.registered_dialects())
    rows = [templates.get_dialect(n) for n in names]
    today_side = _render_side(jinja, matrix, None)
    dated = prints_today(jinja, matrix)
    pinned: dict[date, JinjaSide] = {}

    def side_for(row: templates.DialectTemplate) -> JinjaSide:
        if not dated or row.fixed_date is None:
            return today_side
        if row.fixed_date not in pinned:
            pinned[row.fixed_date] = _render_side(jinja, matrix, row.fixed_date)
        return pinned[row.fixed_date]

    sides = {row.dialect: side_for(row) for row in rows}
    texts = {row.dialect: row.read_template() for row in rows}

    def run(attempts: Sequence[tuple[str, str | None]]) -> dict[str, DialectTrial]:
        # Every attempt's jobs in one renderer process.
        jobs: list[GoRenderJob] = []
        spans: list[tuple[int, int]] = []
        for dialect, system in attempts:
            begin = len(jobs)
            jobs += [
                GoRenderJob(template=texts[dialect], messages=c.messages, system=system, think=c.think, tools=c.tools)
                for c in matrix if c.name in sides[dialect].renders
            ]
            spans.append((begin, len(jobs)))
        results = renderer.render_many(jobs)
        return {
            dialect: _judge(dialect, system, matrix, sides[dialect], results[begin:end])
            for (dialect, system), (begin, end) in zip(attempts, spans)
        }

    # Pass 1: every dialect with no SYSTEM.
    trials = run([(row.dialect, None) for row in rows])
    # Pass 2: dialects that missed, with the inferred default system prompt.
    retry: list[tuple[str, str | None]] = []
    for row in rows:
        if trials[row.dialect].matched:
            continue
        inferred = _infer_default_system(texts[row.dialect], sides[row.dialect].renders, renderer, matrix)
        if inferred is not None:
            retry.append((row.dialect, inferred))
    if retry:
        for dialect, attempt in run(retry).items():
            if attempt.matched or attempt.distance < trials[dialect].distance:
                trials[dialect] = attempt
    return Comparison(
        trials=tuple(trials[row.dialect] for row in rows),
        jinja_renders=today_side.renders,
        refusals=today_side.refusals,
        prints_today=dated,
    )
