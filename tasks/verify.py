"""Verify: run every GGUF, and hold the float one against the Hugging Face model.

Two checks a user would otherwise find out about in production:
- each GGUF loads in llama.cpp and, prompted through the model's own chat
  template, stops on an end-of-generation token within a token budget
  (a missing or wrong EOS is the commonest cause of runaway chat);
- the float GGUF predicts the same next token as the model in transformers
  (top-1 agreement over the prompts and the GGUF's own continuation), and both
  tokenize the prompts identically (a wrong pre-tokenizer shows up here first).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from registry.models import Check
from tasks.errors import VerificationFailed
from tasks.progress import progress_reporter
from tasks.step import step

if TYPE_CHECKING:
    from tasks.preflight import DialectChoice

VERIFY_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Name the three primary colors.",
    "Say hello in one short sentence.",
)
TOKEN_BUDGET = 256
# f16 conversion changes only rounding, which flips the arg-max at near-ties alone; a wrong
# permutation, rope or tokenizer drops agreement far below one half. 0.95 separates the two.
PARITY_THRESHOLD = 0.95
N_CTX = 1024


class Generation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str
    prompt_text: str = Field(description="the prompt as rendered through the chat template (or dialect) and tokenized")
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    stopped: bool


class GgufRun(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    generations: list[Generation]


def _threads() -> int:
    return max(1, os.cpu_count() or 1)


def gguf_metadata(path: Path) -> dict[str, object]:
    """The GGUF's chat template and special tokens, read without loading tensors."""
    from tasks.gguf_file import read_tokenizer

    tokenizer = read_tokenizer(path, with_vocabulary=False)
    return {
        "chat_template": tokenizer.chat_template,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "add_bos": bool(tokenizer.add_bos_token),
    }


def ships_dialect(chat: DialectChoice | None) -> bool:
    """Whether Ollama will prompt through the dialect's Go template where the model's own Jinja says otherwise.

    So for a source with no chat template (its dialect given or from the registry), and for a
    --dialect that is near the model's template but not exact: verification prompts as Ollama will.
    """
    return chat is not None and chat.format == "template" and (not chat.verified or bool(chat.mismatches))


def render_prompt(meta: dict[str, object], user_text: str, chat: DialectChoice | None = None) -> str:
    """The prompt text for one user turn, as the exported model will be prompted.

    The model's own Jinja chat template, except where the Modelfile's Go template of the chosen
    dialect differs from it or stands in for a missing one (`ships_dialect`): rendered as Ollama
    renders that Go template.
    """
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = meta["chat_template"]
    if chat is not None and (not template or ships_dialect(chat)):
        from tasks.template_check import ChatMessage, render_go_template
        from templates import load_template_text

        return render_go_template(load_template_text(chat.dialect), [ChatMessage(role="user", content=user_text)],
                                  system=chat.system)
    if not template:
        raise VerificationFailed("the GGUF carries no tokenizer.chat_template, so chat prompts cannot be rendered")
    formatter = Jinja2ChatFormatter(
        template=str(template), eos_token=str(meta["eos_token"] or ""), bos_token=str(meta["bos_token"] or ""),
        add_generation_prompt=True,
    )
    return formatter(messages=[{"role": "user", "content": user_text}]).prompt


def adds_bos(meta: dict[str, object], text: str) -> bool:
    """Whether llama.cpp puts a BOS before the rendered prompt: where the GGUF asks for one and the
    template has not written it already (Llama 3, Gemma and Mistral write their own; a second one
    would differ from transformers, which tokenizes the rendered chat without special tokens)."""
    return bool(meta["add_bos"]) and not (meta["bos_token"] and text.startswith(str(meta["bos_token"])))


def run_gguf(path: Path, prompts: tuple[str, ...] = VERIFY_PROMPTS, budget: int = TOKEN_BUDGET,
             chat: DialectChoice | None = None) -> GgufRun:
    """Greedy generation on each prompt through the chat template; records whether it stopped on EOG."""
    from llama_cpp import Llama

    meta = gguf_metadata(path)
    llm = Llama(model_path=str(path), n_ctx=N_CTX, n_threads=_threads(), verbose=False, seed=0)
    try:
        generations = []
        for prompt in prompts:
            text = render_prompt(meta, prompt, chat)
            prompt_tokens = llm.tokenize(text.encode(), add_bos=adds_bos(meta, text), special=True)
            out = llm.create_completion(prompt_tokens, max_tokens=budget, temperature=0.0, top_k=1)
            choice = out["choices"][0]
            completion_tokens = llm.tokenize(choice["text"].encode(), add_bos=False, special=True)
            generations.append(Generation(
                prompt=prompt, prompt_text=text, prompt_tokens=list(prompt_tokens), tokens=completion_tokens,
                text=choice["text"], stopped=choice["finish_reason"] == "stop",
            ))
        return GgufRun(path=str(path), generations=generations)
    finally:
        llm.close()


class ComparisonOverBudget(VerificationFailed):
    """The transformers comparison cannot run within the memory budget."""


def _chat_sequences(hf_dir: Path, run: GgufRun, chat: DialectChoice | None = None) -> tuple[list[list[int]], bool]:
    """Each prompt plus the GGUF's own continuation, and whether transformers tokenizes the prompts identically.

    Where the GGUF side rendered the dialect's Go template (`ships_dialect`), transformers
    tokenizes the same text; for a model with no template of its own, it is prompted through the
    dialect's Jinja equivalent.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    template = None
    if tokenizer.chat_template and ships_dialect(chat):
        # The model's own template is not what ships: the same text the GGUF side rendered, through both tokenizers.
        meta, same_tokens = gguf_metadata(Path(run.path)), True
        for gen in run.generations:
            bos = [gen.prompt_tokens[0]] if adds_bos(meta, gen.prompt_text) and gen.prompt_tokens else []
            same = bos + list(tokenizer(gen.prompt_text, add_special_tokens=False)["input_ids"]) == gen.prompt_tokens
            same_tokens = same_tokens and same
        return [gen.prompt_tokens + gen.tokens for gen in run.generations], same_tokens
    if chat is not None and not tokenizer.chat_template:
        from tasks.ollama_plan import dialect_jinja

        template = dialect_jinja(chat.dialect)
        if template is None:
            raise VerificationFailed(f"{hf_dir} has no chat template and Kiln holds no Jinja template for the "
                                     f"{chat.dialect} dialect to prompt transformers with; add the model's "
                                     "chat_template to tokenizer_config.json, or pass --no-verify")
    same_tokens, sequences = True, []
    for gen in run.generations:
        hf_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": gen.prompt}], add_generation_prompt=True, tokenize=True,
            return_dict=False, chat_template=template,
        )
        if list(hf_ids) != gen.prompt_tokens:
            same_tokens = False
        sequences.append(gen.prompt_tokens + gen.tokens)
    return sequences, same_tokens


def _gguf_argmax(gguf_path: Path, sequences: list[list[int]]) -> list[object]:
    import numpy as np
    from llama_cpp import Llama

    # logits_all keeps n_ctx x n_vocab float32 scores: a context just long enough for the longest
    # sequence, not N_CTX (at a 128k vocabulary, 1024 positions are 0.5 GB).
    n_ctx = min(N_CTX, max(len(s) for s in sequences) + 1)
    llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=_threads(), verbose=False, logits_all=True)
    try:
        tops = []
        for sequence in sequences:
            llm.reset()
            llm.eval(sequence)
            tops.append(np.asarray(llm.scores[: len(sequence)]).argmax(axis=-1))
        return tops
    finally:
        llm.close()


def hf_comparison_bytes(hf_dir: Path, sequences: list[list[int]]) -> int:
    """Memory the streamed transformers forward needs: the largest block in float32, its bfloat16 read, the logits."""
    from transformers import AutoConfig

    from tasks.hf_stream import largest_block_bytes

    vocab = int(getattr(AutoConfig.from_pretrained(hf_dir), "vocab_size", 0) or 0)
    logits = 4 * vocab * sum(max(len(s) for s in sequences) for _ in sequences)
    return int(largest_block_bytes(hf_dir) * 1.5) + logits


def _hf_argmax(hf_dir: Path, sequences: list[list[int]], budget: int) -> list[object]:
    """Transformers' arg-max at every position, in float32, streamed a block at a time (tasks/hf_stream.py).

    Why streamed and not the whole model: see `StreamedCausalLM`; in short, float32 needs 4 bytes a
    parameter (32 GB at 8B), and streaming is bounded by the largest block whatever the depth.
    An architecture whose weights transformers renames on load cannot be streamed: it is loaded
    whole, when that fits the budget.
    """
    from tasks.hf_stream import StreamedCausalLM, StreamingUnsupported

    fix = "raise --memory-budget / KILN_MEMORY_BUDGET, or pass --no-verify"
    try:
        need = hf_comparison_bytes(hf_dir, sequences)
        if need > budget:
            raise ComparisonOverBudget(
                f"the transformers comparison needs about {need / 1e9:.2f} GB (its largest layer in float32 "
                f"and the logits), over the memory budget of {budget / 1e9:.2f} GB; {fix}")
        model = StreamedCausalLM(hf_dir)
    except StreamingUnsupported as why:
        import torch
        from transformers import AutoModelForCausalLM

        from tasks.preflight import local_weight_params

        need = 4 * local_weight_params(hf_dir, allow_pickle=True)
        if need > budget:
            raise ComparisonOverBudget(
                f"{why}, and loading it whole in float32 needs about {need / 1e9:.2f} GB, over the memory "
                f"budget of {budget / 1e9:.2f} GB; {fix}") from None
        whole = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        whole.eval()
        with torch.no_grad():
            return [whole(torch.tensor([seq])).logits[0].argmax(dim=-1).numpy() for seq in sequences]
    try:
        return model.argmax_logits(sequences)
    finally:
        model.close()


def top1_agreement(gguf_path: Path, hf_dir: Path, run: GgufRun, budget: int | None = None,
                   chat: DialectChoice | None = None) -> tuple[float, bool, int]:
    """(agreement, tokenization identical, positions compared) between the GGUF and transformers.

    The GGUF runs first and is closed before transformers starts, so the two never share memory:
    the peak is the larger of the mapped GGUF and one streamed block, not their sum.
    """
    from tasks import settings

    sequences, same_tokens = _chat_sequences(hf_dir, run, chat)
    gguf_tops = _gguf_argmax(gguf_path, sequences)
    hf_tops = _hf_argmax(hf_dir, sequences, settings.memory_budget_bytes() if budget is None else budget)
    agree = sum(int((g == h).sum()) for g, h in zip(gguf_tops, hf_tops))
    total = sum(len(s) for s in sequences)
    return agree / max(total, 1), same_tokens, total


@step(name="verify")
def verify_outputs(outputs: dict[str, Path], hf_dir: Path | None, float_quant: str | None,
                   chat: DialectChoice | None = None) -> list[Check]:
    """Checks for every GGUF; raises `VerificationFailed` naming each failure after running them all.

    `chat` (preflight's choice) prompts a GGUF that carries no chat template.
    """
    checks: list[Check] = []
    runs: dict[str, GgufRun] = {}
    report = progress_reporter(f"verify {len(outputs)} GGUF files")
    for done, (quant, path) in enumerate(outputs.items(), start=1):
        run = run_gguf(path, chat=chat)
        runs[quant] = run
        report(done / (len(outputs) + 1))
        runaway = [g.prompt for g in run.generations if not g.stopped]
        answer = run.generations[0].text.strip().replace("\n", " ")
        # A broken EOS or template makes every prompt run away; one greedy loop on a tiny
        # quantized model is a quality signal, reported in the detail but not a refusal.
        detail = f"{len(run.generations) - len(runaway)}/{len(run.generations)} prompts stopped"
        if runaway:
            detail += f"; ran past {TOKEN_BUDGET} tokens on: {'; '.join(runaway)}"
        checks.append(Check(
            name="stops on end of turn", target=quant, passed=len(runaway) * 2 <= len(run.generations),
            detail=f"{detail}; {VERIFY_PROMPTS[0]!r} -> {answer[:120]!r}",
        ))
    if hf_dir is not None and float_quant is not None and float_quant in runs:
        agreement, same_tokens, positions = top1_agreement(outputs[float_quant], hf_dir, runs[float_quant],
                                                           chat=chat)
        checks.append(Check(
            name="tokenization matches transformers", target=float_quant, passed=same_tokens,
            detail="prompt token ids identical" if same_tokens else "prompt token ids differ from the HF tokenizer",
        ))
        checks.append(Check(
            name="top-1 agreement with transformers", target=float_quant, passed=agreement >= PARITY_THRESHOLD,
            value=round(agreement, 4), detail=f"{agreement:.1%} of {positions} positions (threshold {PARITY_THRESHOLD:.0%})",
        ))
    report(1.0)
    failed = [c for c in checks if not c.passed]
    if failed:
        raise VerificationFailed("; ".join(f"{c.target}: {c.name} failed ({c.detail})" for c in failed))
    return checks
