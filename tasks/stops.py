"""Stop strings for a Modelfile: derived from the model, checked against its vocabulary.

`compute_stops` gathers the candidates (the dialect's defaults, the model's EOS and
end-of-turn tokens); the proof that each one is right comes from a short generation
on the exported GGUF (below, "Proof by generation").
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from pydantic import BaseModel, ConfigDict

import templates


class StopSet(BaseModel):
    model_config = ConfigDict(frozen=True)

    stops: tuple[str, ...]
    warnings: tuple[str, ...] = ()


def compute_stops(
    dialect: str,
    eos_tokens: Iterable[str | None] = (),
    eot_tokens: Iterable[str | None] = (),
    added_tokens: Iterable[str] = (),
    vocab: Collection[str] | None = None,
) -> StopSet:
    """Stops = dialect defaults ∪ the model's EOS and end-of-turn tokens ∪
    special tokens an adapter added, in that order, without duplicates.

    A stop is kept when it is a token of the GGUF vocabulary (`vocab`), or
    text the dialect's template writes itself (the model learned to produce
    it as text, e.g. `[INST]`). Anything else can never be generated as such
    and is dropped with a warning. With `vocab=None` nothing can be checked:
    every stop is kept and a warning says so.
    """
    row = templates.get_dialect(dialect)
    template_text = row.read_template()
    vocabulary = set(vocab) if vocab is not None else None
    warnings: list[str] = []
    if vocabulary is None:
        warnings.append("no vocabulary given: stop strings were not checked against the model's tokens")
    stops: list[str] = []
    sources = (
        [(s, f"dialect {dialect} default") for s in row.default_stops]
        + [(s, "model EOS token") for s in eos_tokens if s is not None]
        + [(s, "model end-of-turn token") for s in eot_tokens if s is not None]
        + [(s, "adapter-added token") for s in added_tokens]
    )
    for stop, origin in sources:
        if stop in stops:
            continue
        if not stop:
            warnings.append(f"ignored an empty stop string ({origin})")
            continue
        if vocabulary is not None and stop not in vocabulary and stop not in template_text:
            warnings.append(
                f"dropped stop {stop!r} ({origin}): it is not a token of the model's vocabulary and "
                f"the {dialect} template never writes it, so generation can never produce it"
            )
            continue
        stops.append(stop)
    return StopSet(stops=tuple(stops), warnings=tuple(warnings))
