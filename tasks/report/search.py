"""`--quant auto`'s search: the standard types, then variants of the ones at the bound, measured one by one.

Phase 1 measures every standard candidate (`AUTO_CANDIDATES`). Their numbers show where the
bound falls: the best standard type within it (`T`) and the next smaller type (`S`). Phase 2
measures variants of those two only, because a variant moves a type a little (an importance
matrix lowers KL at the same size; a recipe spends or saves a few bytes on one kind of tensor):
- each built-in recipe (`tasks/recipes/`) and the user's `--recipe`, on T and S;
- with an importance matrix (`--imatrix`), T and S with it, and each recipe with it too.
The matrix is never computed unasked: it costs a pass of the model over a calibration text.
Then `choose_quant` picks among everything measured. A time budget stops the search between
two candidates (never before the first); the report then lists what was left unmeasured.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from registry.models import QuantChoice, QuantReport
from tasks.recipe import Recipe, RecipeInvalid, check_recipe_against, quant_label
from tasks.report.advise import choose_quant
from tasks.report.measure import AUTO_CANDIDATES, Measurement, NoQuantFits
from tasks.files import sha256_file
from tasks.units import human_size


class Candidate(BaseModel):
    """One thing the search can export: a standard type, maybe with a matrix, maybe with a recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str
    quant: str
    imatrix: bool = False
    recipe_path: str | None = None
    recipe: Recipe | None = None

    def describe(self) -> str:
        parts = [self.quant]
        if self.imatrix:
            parts.append("with the importance matrix")
        if self.recipe is not None:
            parts.append(f"recipe {self.recipe.name}" + (f" ({self.recipe.description})" if self.recipe.description else ""))
        return ", ".join(parts)


def make_candidate(quant: str, imatrix: bool = False, recipe: tuple[Path, Recipe] | None = None) -> Candidate:
    return Candidate(label=quant_label(quant, imatrix, recipe[1] if recipe else None), quant=quant, imatrix=imatrix,
                     recipe_path=str(recipe[0]) if recipe else None, recipe=recipe[1] if recipe else None)


def boundary_types(report: QuantReport, max_size: int | None, max_kl: float | None,
                   standard: Sequence[str] = AUTO_CANDIDATES) -> list[str]:
    """The standard types whose variants may beat the standard choice: T, the best within the bound; under a
    size bound L, the next larger type (a recipe that saves bytes may bring it in); under a KL bound S, the
    next smaller one (a matrix or recipe may bring its KL down). With nothing within the bound: the smallest
    type under a size bound, the most faithful under a KL bound."""
    measured = sorted((r for r in report.rows if not r.is_reference and r.quant in standard),
                      key=lambda r: r.size_bytes)
    if not measured:
        return []
    order = [r.quant for r in measured]
    try:
        best = choose_quant(report.model_copy(update={"rows": [r for r in report.rows if r.is_reference] + measured}),
                            max_size, max_kl).quant
    except NoQuantFits:
        return [order[0]] if max_size is not None else [min(measured, key=lambda r: r.kl_mean).quant]
    at = order.index(best)
    bases = [best]
    if max_size is not None and at + 1 < len(order):
        bases.append(order[at + 1])
    if max_kl is not None and at > 0:
        bases.append(order[at - 1])
    return bases


def variants(bases: Sequence[str], recipes: Sequence[tuple[Path, Recipe]], with_imatrix: bool) -> list[Candidate]:
    out: list[Candidate] = []
    for quant in bases:
        if with_imatrix:
            out.append(make_candidate(quant, True))
        for recipe in recipes:
            out.append(make_candidate(quant, False, recipe))
            if with_imatrix:
                out.append(make_candidate(quant, True, recipe))
    return out


def usable_recipes(recipes: Sequence[tuple[Path, Recipe]], f16: Path, say: Callable[[str], None]
                   ) -> list[tuple[Path, Recipe]]:
    """The recipes that fit this model; a built-in one that names no tensor of it is left out, said why."""
    out = []
    for path, recipe in recipes:
        try:
            check_recipe_against(recipe, f16)
        except RecipeInvalid as exc:
            say(f"recipe {recipe.name} left out of the search: {exc}")
            continue
        out.append((path, recipe))
    return out


def search_quants(
    f16: Path,
    work_dir: Path,
    max_size: int | None,
    max_kl: float | None,
    *,
    recipes: Sequence[tuple[Path, Recipe]] = (),
    imatrix: Path | None = None,
    budget_seconds: float | None = None,
    quantize: Callable[..., Path] | None = None,
    standard: Sequence[str] = AUTO_CANDIDATES,
    on_progress: Callable[[str], None] | None = None,
    **measure_kwargs: Any,
) -> tuple[QuantReport, QuantChoice, Candidate]:
    """Measure the standard candidates, then the variants at the bound; return the report, the choice and
    the chosen candidate (its file is not kept: the export quantizes it again into the cache).

    `quantize(src, dst, quant, imatrix=..., recipe=...)` is `tasks.quantize.quantize_gguf` unless given.
    """
    if quantize is None:
        from tasks.quantize import quantize_gguf as quantize
    say = on_progress or (lambda _msg: None)
    started = time.monotonic()
    deadline = started + budget_seconds if budget_seconds else None
    measurement = Measurement(Path(f16), on_progress=on_progress, **measure_kwargs)
    candidates: dict[str, Candidate] = {}
    unmeasured: list[str] = []
    files: dict[str, str] = {}  # sha256 → the first candidate with those bytes
    same: dict[str, str] = {}

    def run(batch: Sequence[Candidate]) -> None:
        for cand in batch:
            if cand.label in candidates:
                continue
            candidates[cand.label] = cand
            # The first candidate is always measured: a search with nothing measured has nothing to export.
            if deadline is not None and time.monotonic() >= deadline and measurement.rows[1:]:
                unmeasured.append(cand.label)
                continue
            dst = Path(work_dir) / f"{cand.label}.gguf"
            say(f"quantizing candidate {cand.label}")
            t0 = time.perf_counter()
            extra: dict[str, Any] = {}
            if cand.imatrix:
                extra["imatrix"] = imatrix
            if cand.recipe is not None:
                extra["recipe"] = cand.recipe
            quantize(Path(f16), dst, cand.quant, **extra)
            seconds = round(time.perf_counter() - t0, 3)
            digest = sha256_file(dst)
            if digest in files:  # a recipe that changes nothing in this model: the same bytes, not measured twice
                same[cand.label] = f"the same file as {files[digest]}: nothing in it differs for this model"
            else:
                files[digest] = cand.label
                measurement.add(cand.label, dst, seconds)
            dst.unlink(missing_ok=True)  # the numbers are what the search keeps; disk stays at one candidate

    run([make_candidate(q) for q in standard])
    usable = usable_recipes(recipes, Path(f16), say)
    bases = boundary_types(measurement.report(), max_size, max_kl, standard)
    run(variants(bases, usable, imatrix is not None))
    report = measurement.report()
    try:
        choice = choose_quant(report, max_size, max_kl)
    except NoQuantFits as exc:
        if unmeasured:
            raise NoQuantFits(f"{exc} The search budget ran out before {len(unmeasured)} candidate(s) "
                              f"({', '.join(unmeasured)}) were measured; raise --search-budget.") from None
        raise
    reason = choice.reason
    if bases and choice.quant != bases[0] and max_size is not None:
        std = report.row(bases[0])
        reason += (f"; it beats the best standard type within the bound, {std.quant} (KL {std.kl_mean:.4f}, "
                   f"{human_size(std.size_bytes)})")
    elif bases and choice.quant != bases[0] and max_kl is not None:
        std = report.row(bases[0])
        reason += (f"; it is smaller than the smallest standard type within the bound, {std.quant} "
                   f"({human_size(std.size_bytes)}, KL {std.kl_mean:.4f})")
    if unmeasured:
        reason += (f"; the search budget ({budget_seconds:g} s) ran out: {len(unmeasured)} candidate(s) were not "
                   f"measured ({', '.join(unmeasured)}), so this is the best so far")
    choice = choice.model_copy(update={
        "reason": reason,
        "candidates": {label: c.describe() for label, c in candidates.items()},
        "rejected": {**choice.rejected, **same},
        "unmeasured": unmeasured,
        "budget_seconds": budget_seconds,
        "search_seconds": round(time.monotonic() - started, 3),
    })
    return report, choice, candidates[choice.quant]

