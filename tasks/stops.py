"""Stop strings for a Modelfile: derived from the model, checked against its vocabulary.

`compute_stops` gathers the candidates (the dialect's defaults, the model's EOS and
end-of-turn tokens); the proof that each one is right comes from a short generation
on the exported GGUF (below, "Proof by generation").
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field

import templates
from registry.models import StopProof
from tasks.errors import KilnError


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


# ---------------------------------------------------------------------------
# Derived stops: the model's own end tokens, never a token its format uses inside a turn

_QUESTION = "What is the capital of France?"
_ANSWER = "The capital of France is Paris."
_THOUGHT = "France's capital is Paris."


class StopCandidate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    stop: str
    sources: tuple[str, ...]


class DerivedStops(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    candidates: tuple[StopCandidate, ...]
    inside_turn: tuple[str, ...] = Field(description="special tokens the format writes inside an assistant turn")
    end_of_turn: str | None
    warnings: tuple[str, ...] = ()


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _assistant_turns(template: Any, special: Collection[str]) -> tuple[str | None, set[str]]:
    """(end-of-turn marker, special tokens inside the assistant's turn), from the model's Jinja template.

    The turn is the text a finished reply adds after the generation prompt: rendered with a plain
    answer, with thinking, and with a tool call, where the template takes them.
    """
    from tasks.template_check import TOOL_CALL_REPLY, WEATHER_TOOL, ChatMessage

    user = ChatMessage(role="user", content=_QUESTION)
    # The template check's own tool call: its id is one Mistral's templates accept (nine characters).
    replies = [
        (ChatMessage(role="assistant", content=_ANSWER), None),
        (ChatMessage(role="assistant", content=_ANSWER, thinking=_THOUGHT), None),
        (TOOL_CALL_REPLY, [WEATHER_TOOL]),
    ]
    by_length = sorted(special, key=len, reverse=True)
    renders: list[tuple[str, str]] = []
    for reply, tools in replies:
        try:
            renders.append((template.render([user], tools=tools), template.render([user, reply], tools=tools)))
        except Exception:  # noqa: BLE001 - a template that refuses or cannot take this kind of reply
            renders.append(("", ""))
    prompt, whole = renders[0]
    start = _common_prefix(prompt, whole)
    anchor = whole.rfind(_ANSWER)
    if not whole or anchor < start:
        return None, set()
    after = whole[anchor + len(_ANSWER):]
    end_marker = next((tok for tok in by_length if after.startswith(tok)), None)
    if end_marker is None:
        return None, set()
    inside = {tok for tok in special if tok in whole[start:anchor + len(_ANSWER)]}
    for prompt, whole in renders[1:]:
        start = _common_prefix(prompt, whole)
        end = whole.rfind(end_marker, start)
        if whole and end > start:
            inside |= {tok for tok in special if tok in whole[start:end]}
    inside.discard(end_marker)
    return end_marker, inside


def derive_stops(
    *,
    chat_template: str | None,
    tokens: Sequence[str] | None,
    special_tokens: Collection[str],
    bos_token: str | None,
    gguf_eos: Iterable[str | None],
    model_dir: Path | None = None,
) -> DerivedStops:
    """The stop candidates: the model's EOS tokens (generation_config.json, tokenizer_config.json, the GGUF)
    and its template's end-of-turn marker; any the format writes inside a turn is dropped with a warning.
    """
    from tasks.template_check import JinjaChatTemplate

    found: dict[str, list[str]] = {}
    warnings: list[str] = []

    def add(token: str | None, source: str) -> None:
        if token:
            found.setdefault(token, [])
            if source not in found[token]:
                found[token].append(source)

    if model_dir is not None:
        for token in _generation_config_eos(model_dir, tokens):
            add(token, "generation_config.json eos_token_id")
        add(_tokenizer_config_eos(model_dir), "tokenizer_config.json eos_token")
    for token in gguf_eos:
        add(token, "GGUF end-of-generation token")
    end_marker: str | None = None
    inside: set[str] = set()
    if chat_template:
        eos_text = next(iter(found), None)
        try:
            template = JinjaChatTemplate(chat_template, {"bos_token": bos_token, "eos_token": eos_text})
            end_marker, inside = _assistant_turns(template, set(special_tokens) | set(found))
        except KilnError as exc:
            warnings.append(f"the chat template could not be rendered to find its end-of-turn marker: {exc}")
        add(end_marker, "chat template end of turn")
    vocabulary = set(tokens) if tokens is not None else None
    candidates = []
    for stop, sources in found.items():
        if stop in inside:
            warnings.append(f"not a stop: {stop!r} ({', '.join(sources)}) is written inside an assistant turn by the "
                            "chat template; stopping on it would cut replies short")
            continue
        if vocabulary is not None and stop not in vocabulary and (not chat_template or stop not in chat_template):
            warnings.append(f"not a stop: {stop!r} ({', '.join(sources)}) is neither a token of the vocabulary nor "
                            "text the template writes, so generation can never produce it")
            continue
        candidates.append(StopCandidate(stop=stop, sources=tuple(sources)))
    return DerivedStops(candidates=tuple(candidates), inside_turn=tuple(sorted(inside)), end_of_turn=end_marker,
                        warnings=tuple(warnings))


def _generation_config_eos(model_dir: Path, tokens: Sequence[str] | None) -> list[str]:
    path = model_dir / "generation_config.json"
    if tokens is None or not path.is_file():
        return []
    try:
        ids = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (ValueError, OSError, AttributeError):
        return []
    ids = ids if isinstance(ids, list) else [ids]
    return [tokens[i] for i in ids if isinstance(i, int) and 0 <= i < len(tokens)]


def _tokenizer_config_eos(model_dir: Path) -> str | None:
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("eos_token")
    except (ValueError, OSError, AttributeError):
        return None
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


# ---------------------------------------------------------------------------
# Proof by generation: each stop must end a real reply of the exported GGUF

PROOF_PROMPTS: Final = (_QUESTION, "Name the three primary colors.")
PROOF_BUDGET: Final = 64  # tokens a prompt; a short answer of a chat model ends well within it
_PROOF_CTX: Final = 512


def prove_stops(gguf_path: Path, derived: DerivedStops, *, chat_template: str, bos_token: str | None,
                eos_token: str | None, add_bos: bool, budget: int = PROOF_BUDGET) -> list[StopProof]:
    """Greedy generation on each proof prompt, through the GGUF's own chat template, token by token
    with special tokens shown, until a candidate stop appears or the budget is spent.

    A stop is proven when a reply ends on it with some text before it (a stop that cut a reply to
    nothing would show here as an empty reply). Only proven stops go into the Modelfile. One that
    no prompt reached is left out: when llama.cpp marks it end-of-generation, llama.cpp (and so
    Ollama) stops on it without a Modelfile stop; otherwise a warning says it is unproven.
    """
    import llama_cpp
    from llama_cpp import Llama

    from tasks.template_check import ChatMessage, JinjaChatTemplate

    template = JinjaChatTemplate(chat_template, {"bos_token": bos_token, "eos_token": eos_token})
    stops = [c.stop for c in derived.candidates]
    llm = Llama(model_path=str(gguf_path), n_ctx=_PROOF_CTX, n_threads=max(1, os.cpu_count() or 1),
                verbose=False, seed=0)
    proofs: dict[str, StopProof] = {}
    try:
        ids: dict[str, int | None] = {}
        for stop in stops:
            pieces = llm.tokenize(stop.encode(), add_bos=False, special=True)
            ids[stop] = pieces[0] if len(pieces) == 1 else None
        for prompt in PROOF_PROMPTS:
            if len(proofs) == len(stops):
                break  # every candidate has its proof
            text = template.render([ChatMessage(role="user", content=prompt)])
            prompt_tokens = llm.tokenize(text.encode(), add_bos=add_bos, special=True)
            generated: list[int] = []
            hit: str | None = None
            reply = ""
            for token in llm.generate(prompt_tokens, top_k=1, temp=0.0, repeat_penalty=1.0):
                generated.append(token)
                reply = llm.detokenize(generated, special=True).decode("utf-8", errors="replace")
                hit = next((s for s in stops if reply.endswith(s)), None)
                if hit is not None or len(generated) >= budget:
                    break
                if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                    break  # an end token that is no candidate: reported below
            if hit is None or hit in proofs:
                continue
            before = reply[: len(reply) - len(hit)]
            proofs[hit] = StopProof(
                stop=hit, token_id=ids[hit], sources=[], in_modelfile=bool(before.strip()),
                proven=bool(before.strip()), prompt=prompt, reply=before[:200], reply_tokens=len(generated) - 1,
                detail=f"greedy reply ended on it after {len(generated) - 1} tokens" if before.strip()
                else "the reply was empty before it: it would cut replies short",
            )
        out = []
        for candidate in derived.candidates:
            proof = proofs.get(candidate.stop)
            if proof is not None:
                out.append(proof.model_copy(update={"sources": list(candidate.sources)}))
                continue
            token_id = ids[candidate.stop]
            eog = token_id is not None and bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, token_id))
            out.append(StopProof(
                stop=candidate.stop, token_id=token_id, sources=list(candidate.sources), in_modelfile=False,
                proven=False,
                detail=("no proof reply ended on it, so it stays out of the Modelfile; llama.cpp ends generation on "
                        "this token by itself (end-of-generation), as Ollama's llama-server does") if eog
                else "no proof reply ended on it and llama.cpp does not end generation on it: left out, unproven",
            ))
        return out
    finally:
        llm.close()


def unproven_stops(derived: DerivedStops, why: str) -> list[StopProof]:
    """Records for stops kept without a proof run (verification turned off)."""
    return [StopProof(stop=c.stop, sources=list(c.sources), in_modelfile=True, proven=False, detail=why)
            for c in derived.candidates]
