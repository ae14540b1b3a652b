"""The check: render both sides over the matrix and pick the dialect that is exact."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final, Literal

import jinja2
from pydantic import BaseModel, ConfigDict, Field

import templates
from tasks.template_check.errors import ChatTemplateBroken, NoChatTemplate, NoDialectMatches
from tasks.template_check.gorender import GoRenderer, GoRenderError, GoRenderJob
from tasks.template_check.jinja import ConversationRefused, JinjaChatTemplate
from tasks.template_check.matrix import MESSAGE_MATRIX, MatrixCase
from tasks.template_check.source import load_chat_template

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

    @property
    def cases_matched(self) -> int:
        return sum(1 for c in self.cases if c.status == "match")


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
    candidates: tuple[str, ...] = Field(description="every dialect that matched, in table order")
    mismatch: TemplateMismatch | None = Field(description="closest dialect's first differing case, when none matched")
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
    ollama_format: Literal["template", "jinja"] = Field(
        default="template",
        description="how Ollama will format chats: template (the dialect's Go TEMPLATE) or jinja (no TEMPLATE: "
        "Ollama renders the GGUF's own Jinja chat template; the Modelfile then REQUIRES a recent Ollama)",
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
    jinja_renders: Mapping[str, str],
    refusals: Mapping[str, str],
    go_renders: Sequence[str | GoRenderError],
) -> DialectTrial:
    outcomes: list[CaseOutcome] = []
    mismatch: TemplateMismatch | None = None
    renders = iter(go_renders)
    for case in matrix:
        if case.name in refusals:
            outcomes.append(CaseOutcome(case=case.name, status="reference-refused", detail=refusals[case.name]))
            continue
        go = next(renders)
        if isinstance(go, GoRenderError):
            outcomes.append(CaseOutcome(case=case.name, status="go-error", detail=go.message))
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
        if mismatch is None:
            mismatch = TemplateMismatch(
                dialect=dialect, case=case.name, system=system,
                jinja_render=expected, go_render=go, offset=_first_difference(expected, go),
            )
    matched = mismatch is None and any(o.status == "match" for o in outcomes)
    return DialectTrial(dialect=dialect, matched=matched, system=system, cases=tuple(outcomes), mismatch=mismatch)


def compare_with_dialects(
    jinja: JinjaChatTemplate,
    dialects: Sequence[str] | None = None,
    *,
    matrix: Sequence[MatrixCase] = MESSAGE_MATRIX,
    renderer: GoRenderer | None = None,
) -> tuple[tuple[DialectTrial, ...], dict[str, str], dict[str, str]]:
    """Try each dialect against a compiled Jinja template.

    Returns the trials (table order) plus the Jinja renders and refusals by
    case name. Each dialect is tried first with no Modelfile SYSTEM, then with
    the default system prompt inferred from the Jinja template.
    """
    renderer = renderer or GoRenderer()
    names = list(dialects) if dialects is not None else list(templates.registered_dialects())
    rows = [templates.get_dialect(n) for n in names]

    jinja_renders: dict[str, str] = {}
    refusals: dict[str, str] = {}
    for case in matrix:
        try:
            jinja_renders[case.name] = jinja.render(case.messages, think=case.think)
        except ConversationRefused as exc:
            refusals[case.name] = f"the model's template refuses it: {exc.message}"
        except jinja2.UndefinedError as exc:
            raise ChatTemplateBroken(
                f"the chat template uses a value Kiln does not pass ({exc.message}); if it is a special "
                "token such as eos_token, check the model folder or the GGUF (a bare .jinja file carries "
                "none) or pass bos_token/eos_token"
            ) from None
        except jinja2.TemplateError as exc:
            raise ChatTemplateBroken(f"the chat template fails on the {case.name!r} conversation: {exc}") from None
        except Exception as exc:  # a template bug surfaces as a Python error inside the sandbox
            raise ChatTemplateBroken(
                f"the chat template crashes on the {case.name!r} conversation: {type(exc).__name__}: {exc}"
            ) from None
    if not jinja_renders:
        reasons = sorted(set(refusals.values()))
        raise ChatTemplateBroken("the chat template refuses every conversation of the matrix: " + "; ".join(reasons))

    rendered_cases = [c for c in matrix if c.name in jinja_renders]
    texts = {row.dialect: row.read_template() for row in rows}

    def jobs_for(dialect: str, system: str | None) -> list[GoRenderJob]:
        return [
            GoRenderJob(template=texts[dialect], messages=c.messages, system=system, think=c.think)
            for c in rendered_cases
        ]

    # Pass 1: every dialect with no SYSTEM, in one renderer process.
    plain_jobs = [job for row in rows for job in jobs_for(row.dialect, None)]
    plain = renderer.render_many(plain_jobs)
    per = len(rendered_cases)
    trials: dict[str, DialectTrial] = {}
    for i, row in enumerate(rows):
        trials[row.dialect] = _judge(
            row.dialect, None, matrix, jinja_renders, refusals, plain[i * per : (i + 1) * per]
        )

    # Pass 2: dialects that missed, with the inferred default system prompt.
    retry: list[tuple[str, str]] = []
    for row in rows:
        if trials[row.dialect].matched:
            continue
        inferred = _infer_default_system(texts[row.dialect], jinja_renders, renderer, matrix)
        if inferred is not None:
            retry.append((row.dialect, inferred))
    if retry:
        second = renderer.render_many([job for d, s in retry for job in jobs_for(d, s)])
        for i, (dialect, system) in enumerate(retry):
            attempt = _judge(dialect, system, matrix, jinja_renders, refusals, second[i * per : (i + 1) * per])
            if attempt.matched or attempt.cases_matched > trials[dialect].cases_matched:
                trials[dialect] = attempt
    return tuple(trials[row.dialect] for row in rows), jinja_renders, refusals


def check_template_text(
    text: str,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    dialect: str | None = None,
    strict: bool = True,
    source: str = "<text>",
    source_kind: Literal["jinja", "model_dir", "gguf"] = "jinja",
    matrix: Sequence[MatrixCase] = MESSAGE_MATRIX,
    renderer: GoRenderer | None = None,
) -> TemplateCheck:
    """`check_template` for a Jinja template given as text."""
    if dialect is not None:
        templates.get_dialect(dialect)  # an unknown name is refused before any rendering
    jinja = JinjaChatTemplate(text, {"bos_token": bos_token, "eos_token": eos_token})
    trials, jinja_renders, refusals = compare_with_dialects(
        jinja, [dialect] if dialect else None, matrix=matrix, renderer=renderer
    )
    matched = [t for t in trials if t.matched]
    chosen = matched[0] if matched else None
    closest = max(trials, key=lambda t: t.cases_matched)
    check = TemplateCheck(
        source=source,
        source_kind=source_kind,
        jinja_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        dialect=chosen.dialect if chosen else dialect,
        template=templates.load_template_text(chosen.dialect if chosen else dialect) if (chosen or dialect) else None,
        system=chosen.system if chosen else None,
        verified=chosen is not None,
        matrix_size=len(matrix),
        cases_checked=chosen.cases_matched if chosen else 0,
        cases_skipped=tuple(refusals),
        candidates=tuple(t.dialect for t in matched),
        mismatch=None if chosen else closest.mismatch,
        template_writes_bos=jinja.writes_bos,
        trials=trials,
    )
    if chosen is None and strict:
        tried = ", ".join(t.dialect for t in trials)
        detail = closest.mismatch.describe() if closest.mismatch else "no case could be compared"
        if dialect:
            message = (
                f"the {dialect!r} dialect does not render what {source}'s chat template renders; {detail}\n"
                "Pick another dialect with --dialect, or run without it to let Kiln search."
            )
        else:
            message = (
                f"no Kiln dialect renders what {source}'s chat template renders (tried {tried}). "
                f"Closest: {detail}\n"
                "Give the dialect explicitly with --dialect to export anyway; Ollama will then prompt "
                "the model differently from its own template."
            )
        raise NoDialectMatches(message, check)
    return check


def check_template(
    source: Path,
    *,
    dialect: str | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    strict: bool = True,
    matrix: Sequence[MatrixCase] = MESSAGE_MATRIX,
    renderer: GoRenderer | None = None,
) -> TemplateCheck:
    """Match the chat template of `source` (.jinja, model folder or .gguf) with a dialect.

    With `dialect`, only that dialect is checked. With no chat template in the
    source and a `dialect` given, the dialect is returned unverified; with
    neither, `NoChatTemplate` is raised. When nothing matches, `strict` raises
    `NoDialectMatches` (its `.check` holds the details); otherwise the check
    is returned with `verified=False` and the closest mismatch.
    `bos_token`/`eos_token` fill in what the source does not say (a bare
    .jinja file says nothing).
    """
    try:
        loaded = load_chat_template(Path(source))
    except NoChatTemplate:
        if dialect is None:
            raise
        templates.get_dialect(dialect)
        return TemplateCheck(
            source=str(source),
            source_kind="none",
            jinja_sha256=None,
            dialect=dialect,
            template=templates.load_template_text(dialect),
            system=None,
            verified=False,
            matrix_size=len(matrix),
            cases_checked=0,
            cases_skipped=(),
            candidates=(),
            mismatch=None,
        )
    check = check_template_text(
        loaded.text,
        bos_token=loaded.bos_token or bos_token,
        eos_token=loaded.eos_token or eos_token,
        dialect=dialect,
        strict=strict,
        source=loaded.path,
        source_kind=loaded.kind,
        matrix=matrix,
        renderer=renderer,
    )
    if check.template_writes_bos and loaded.add_bos_token is False:
        # Kiln's templates never write BOS (the runtime adds it); this GGUF
        # tells the runtime not to, so the prompt would start without one.
        warning = (
            f"the chat template writes the BOS token itself but {loaded.path} sets "
            "tokenizer.ggml.add_bos_token=false: llama.cpp and Ollama will not add BOS, and the Modelfile "
            "TEMPLATE does not write it, so prompts will start without BOS"
        )
        check = check.model_copy(update={"warnings": check.warnings + (warning,)})
    return check
