"""The decision: which dialect, and how Ollama will format chats.

- A dialect exact on every case (or exact apart from the date): its Go TEMPLATE.
- None exact and no dialect asked for: Ollama renders the GGUF's own Jinja
  (`ollama_format="jinja"`, no TEMPLATE); the closest dialect is still named
  (its stops apply) with the cases it gets wrong, so the user can choose.
- A dialect asked for (`--dialect`): used when it is exact, or near (wrong on
  at most `NEAR_MAX_MISMATCHES` cases, named); otherwise refused, naming the
  dialect that is exact or the Jinja fallback. A refusal happens only here,
  where the user asked for a Go template explicitly.

The closest dialect is the one with the smallest difference over the whole
matrix: fewest cases that differ, then fewest characters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Literal

import templates
from tasks.template_check.compare import (
    Comparison,
    DialectTrial,
    TemplateCheck,
    compare_with_dialects,
)
from tasks.template_check.errors import NoChatTemplate, NoDialectMatches
from tasks.template_check.gorender import GoRenderer
from tasks.template_check.jinja import JinjaChatTemplate
from tasks.template_check.matrix import DEFAULT_MATRIX, MatrixCase
from tasks.template_check.source import load_chat_template

# "Exact on all but a few cases": the user may accept such a dialect's Go template with --dialect.
NEAR_MAX_MISMATCHES: Final = 3

JINJA_FALLBACK: Final = (
    "Ollama renders the model's own Jinja chat template from the GGUF "
    "(Modelfile without TEMPLATE, with a REQUIRES line for an Ollama that can)"
)


def _is_near(trial: DialectTrial) -> bool:
    return trial.cases_matched > 0 and len(trial.mismatched_cases) <= NEAR_MAX_MISMATCHES


def _date_note(trial: DialectTrial, ollama_format: str, prints_today: bool) -> str | None:
    if not prints_today:
        return None
    if ollama_format == "jinja":
        return "the model's template prints today's date; Ollama renders that Jinja, so prompts carry today's date"
    if trial.pinned_date is None:
        return (f"the model's template prints today's date; the {trial.dialect} Go TEMPLATE does not print "
                "today's date")
    return (
        f"the model's template prints today's date; the {trial.dialect} Go TEMPLATE prints the fixed date "
        f"{trial.pinned_date.isoformat()} in its place (Ollama's currentDate prints only 2006-01-02, so no Go "
        "template can print the model's format of today). Everything else was compared with the model's "
        "clock set to that date. The GGUF's own Jinja, as llama-server renders it, prints today's date"
    )


def _explicit_refusal(dialect: str, trial: DialectTrial, comparison: Comparison, source: str,
                      matrix_size: int) -> str:
    exact = [t.dialect for t in comparison.trials if t.matched]
    wrong = trial.mismatched_cases
    detail = trial.mismatch.describe() if trial.mismatch else "no case could be compared"
    shown = ", ".join(wrong[:6]) + (", …" if len(wrong) > 6 else "")
    if exact:
        remedy = f"{exact[0]!r} renders it exactly: pass --dialect {exact[0]}, or leave --dialect out."
    else:
        remedy = f"Leave --dialect out: then {JINJA_FALLBACK}."
    return (
        f"the {dialect!r} dialect does not render what {source}'s chat template renders: it differs on "
        f"{len(wrong)} of {matrix_size} conversations ({shown}); {detail}\n{remedy}"
    )


def check_template_text(
    text: str,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    dialect: str | None = None,
    prefer: str | None = None,
    strict: bool = True,
    source: str = "<text>",
    source_kind: Literal["jinja", "model_dir", "gguf"] = "jinja",
    matrix: Sequence[MatrixCase] = DEFAULT_MATRIX,
    renderer: GoRenderer | None = None,
) -> TemplateCheck:
    """`check_template` for a Jinja template given as text."""
    for name in (dialect, prefer):
        if name is not None:
            templates.get_dialect(name)  # an unknown name is refused before any rendering
    jinja = JinjaChatTemplate(text, {"bos_token": bos_token, "eos_token": eos_token})
    matrix = [case for case in matrix if case.applies_to(text)]  # tool conversations for templates that take tools
    comparison = compare_with_dialects(jinja, matrix=matrix, renderer=renderer)
    trials = comparison.trials
    by_name = {t.dialect: t for t in trials}
    exact = [t for t in trials if t.matched]
    closest = min(trials, key=lambda t: t.distance)  # min keeps table order on ties
    if dialect is not None:
        chosen = by_name[dialect]
    elif prefer is not None and by_name[prefer].matched:
        chosen = by_name[prefer]
    else:
        chosen = exact[0] if exact else closest

    outcome: Literal["exact", "exact-apart-from-date", "near", "no-match"]
    if chosen.matched:
        outcome = "exact-apart-from-date" if chosen.pinned_date is not None else "exact"
    else:
        outcome = "near" if _is_near(chosen) else "no-match"
    ollama_format: Literal["template", "jinja"] = "template" if (chosen.matched or dialect) else "jinja"
    uses_template = ollama_format == "template"
    check = TemplateCheck(
        source=source,
        source_kind=source_kind,
        jinja_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        dialect=chosen.dialect,
        template=templates.load_template_text(chosen.dialect) if uses_template else None,
        # With no TEMPLATE, the Jinja template writes its own default system prompt.
        system=chosen.system if uses_template else None,
        verified=chosen.matched,
        matrix_size=len(matrix),
        cases_checked=chosen.cases_matched,
        cases_skipped=tuple(comparison.refusals),
        candidates=tuple(t.dialect for t in exact),
        mismatch=None if chosen.matched else chosen.mismatch,
        template_writes_bos=jinja.writes_bos,
        trials=trials,
        outcome=outcome,
        ollama_format=ollama_format,
        mismatches=chosen.mismatched_cases,
        date_policy="fixed" if uses_template and comparison.prints_today and chosen.pinned_date else "none",
        date_note=_date_note(chosen, ollama_format, comparison.prints_today),
    )
    if dialect is not None and outcome == "no-match" and strict:
        raise NoDialectMatches(_explicit_refusal(dialect, chosen, comparison, source, len(matrix)), check)
    return check


def check_template(
    source: Path,
    *,
    dialect: str | None = None,
    prefer: str | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    strict: bool = True,
    matrix: Sequence[MatrixCase] = DEFAULT_MATRIX,
    renderer: GoRenderer | None = None,
) -> TemplateCheck:
    """Match the chat template of `source` (.jinja, model folder or .gguf) with a dialect.

    With `dialect` (the user's --dialect), that dialect is the answer if it is
    exact or near; otherwise `strict` raises `NoDialectMatches` (its `.check`
    holds the details). Without it, the exact dialect is chosen (`prefer`, a
    registry entry's dialect, first when it is exact), and when none is exact
    the check says `ollama_format="jinja"`: nothing is refused. With no chat
    template in the source and a `dialect` given, the dialect is returned
    unchecked; with neither, `NoChatTemplate` is raised.
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
            outcome="unchecked",
        )
    check = check_template_text(
        loaded.text,
        bos_token=loaded.bos_token or bos_token,
        eos_token=loaded.eos_token or eos_token,
        dialect=dialect,
        prefer=prefer,
        strict=strict,
        source=loaded.path,
        source_kind=loaded.kind,
        matrix=matrix,
        renderer=renderer,
    )
    if check.template_writes_bos and loaded.add_bos_token is False and check.ollama_format == "template":
        # Kiln's templates never write BOS (the runtime adds it); this GGUF
        # tells the runtime not to, so the prompt would start without one.
        warning = (
            f"the chat template writes the BOS token itself but {loaded.path} sets "
            "tokenizer.ggml.add_bos_token=false: llama.cpp and Ollama will not add BOS, and the Modelfile "
            "TEMPLATE does not write it, so prompts will start without BOS"
        )
        check = check.model_copy(update={"warnings": check.warnings + (warning,)})
    from tasks.ollama_format import architecture_of_source, builtin_renderer

    builtin = builtin_renderer(architecture_of_source(Path(source)))
    if builtin is not None:
        # `ollama create` gives this architecture a built-in renderer, which overrides any TEMPLATE (--dialect too).
        check = check.model_copy(update={"ollama_format": "renderer"})
    return check


def outcome_lines(check: TemplateCheck) -> list[str]:
    """The decision in plain sentences (the CLI prints them literally, never as markup)."""
    counted = f"{check.cases_checked} of {check.matrix_size - len(check.cases_skipped)} conversations"
    lines: list[str] = []
    if check.outcome == "unchecked":
        lines.append(f"{check.source} carries no chat template: the {check.dialect} dialect, as given, "
                     "is used unchecked (Go TEMPLATE)")
    elif check.outcome == "exact":
        lines.append(f"exact: the {check.dialect} dialect renders the model's template on {counted}")
    elif check.outcome == "exact-apart-from-date":
        lines.append(f"exact apart from the date: the {check.dialect} dialect renders the model's template on "
                     f"{counted} once the model's clock is set to the date the Go template prints")
    else:
        head = "near" if check.outcome == "near" else "no dialect is exact"
        wrong = ", ".join(check.mismatches[:6]) + (", …" if len(check.mismatches) > 6 else "")
        lines.append(f"{head}: closest dialect {check.dialect}, exact on {counted}; it differs on "
                     f"{len(check.mismatches)}: {wrong}")
        if check.mismatch is not None:
            lines.append(check.mismatch.describe())
    if check.cases_skipped:
        lines.append(f"skipped (the model's template refuses them): {', '.join(check.cases_skipped)}")
    if check.date_note:
        lines.append(f"date: {check.date_note}")
    if check.ollama_format == "renderer":
        lines.append("Ollama format: renderer. kiln export writes Ollama's built-in RENDERER and PARSER for this "
                     "architecture (Ollama assigns them itself and they override any TEMPLATE), with REQUIRES.")
    elif check.ollama_format == "jinja":
        lines.append(f"Ollama format: jinja. kiln export writes no TEMPLATE: {JINJA_FALLBACK}.")
        if check.outcome == "near":
            lines.append(f"To use the {check.dialect} Go template anyway (it prompts differently on the cases "
                         f"above), pass --dialect {check.dialect}.")
    else:
        verified = "verified" if check.verified else "not verified"
        lines.append(f"Ollama format: template. kiln export writes the {check.dialect} Go TEMPLATE ({verified}).")
        if check.outcome in ("near", "no-match"):
            lines.append("Leave --dialect out to have Ollama render the model's own Jinja template instead.")
    if check.system is not None:
        lines.append(f"default system prompt (Modelfile SYSTEM): {check.system!r}")
    return lines
