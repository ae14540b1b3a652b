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

from pydantic import BaseModel, ConfigDict

from registry.models import Check
from tasks.errors import VerificationFailed
from tasks.progress import progress_reporter
from tasks.step import step

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
    from tasks.modelfile import read_gguf_tokenizer

    tokenizer = read_gguf_tokenizer(path, with_vocabulary=False)
    return {
        "chat_template": tokenizer.chat_template,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "add_bos": bool(tokenizer.add_bos_token),
    }


def render_prompt(meta: dict[str, object], user_text: str) -> str:
    """The prompt text the model's own Jinja chat template produces for one user turn."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = meta["chat_template"]
    if not template:
        raise VerificationFailed("the GGUF carries no tokenizer.chat_template, so chat prompts cannot be rendered")
    formatter = Jinja2ChatFormatter(
        template=str(template), eos_token=str(meta["eos_token"] or ""), bos_token=str(meta["bos_token"] or ""),
        add_generation_prompt=True,
    )
    return formatter(messages=[{"role": "user", "content": user_text}]).prompt


def run_gguf(path: Path, prompts: tuple[str, ...] = VERIFY_PROMPTS, budget: int = TOKEN_BUDGET) -> GgufRun:
    """Greedy generation on each prompt through the chat template; records whether it stopped on EOG."""
    from llama_cpp import Llama

    meta = gguf_metadata(path)
    llm = Llama(model_path=str(path), n_ctx=N_CTX, n_threads=_threads(), verbose=False, seed=0)
    try:
        generations = []
        for prompt in prompts:
            text = render_prompt(meta, prompt)
            prompt_tokens = llm.tokenize(text.encode(), add_bos=bool(meta["add_bos"]), special=True)
            out = llm.create_completion(prompt_tokens, max_tokens=budget, temperature=0.0, top_k=1)
            choice = out["choices"][0]
            completion_tokens = llm.tokenize(choice["text"].encode(), add_bos=False, special=True)
            generations.append(Generation(
                prompt=prompt, prompt_tokens=list(prompt_tokens), tokens=completion_tokens,
                text=choice["text"], stopped=choice["finish_reason"] == "stop",
            ))
        return GgufRun(path=str(path), generations=generations)
    finally:
        llm.close()


def top1_agreement(gguf_path: Path, hf_dir: Path, run: GgufRun) -> tuple[float, bool, int]:
    """(agreement, tokenization identical, positions compared) between the GGUF and transformers."""
    import numpy as np
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    llm = Llama(model_path=str(gguf_path), n_ctx=N_CTX, n_threads=_threads(), verbose=False, logits_all=True)
    agree = total = 0
    same_tokens = True
    try:
        for gen in run.generations:
            hf_ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": gen.prompt}], add_generation_prompt=True, tokenize=True,
                return_dict=False,
            )
            if list(hf_ids) != gen.prompt_tokens:
                same_tokens = False
            sequence = gen.prompt_tokens + gen.tokens
            llm.reset()
            llm.eval(sequence)
            gguf_top = np.asarray(llm.scores[: len(sequence)]).argmax(axis=-1)
            with torch.no_grad():
                logits = model(torch.tensor([sequence])).logits[0]
            hf_top = logits.argmax(dim=-1).numpy()
            agree += int((gguf_top == hf_top).sum())
            total += len(sequence)
    finally:
        llm.close()
    return agree / max(total, 1), same_tokens, total


@step(name="verify")
def verify_outputs(outputs: dict[str, Path], hf_dir: Path | None, float_quant: str | None) -> list[Check]:
    """Checks for every GGUF; raises `VerificationFailed` naming each failure after running them all."""
    checks: list[Check] = []
    runs: dict[str, GgufRun] = {}
    report = progress_reporter(f"verify {len(outputs)} GGUF files")
    for done, (quant, path) in enumerate(outputs.items(), start=1):
        run = run_gguf(path)
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
        agreement, same_tokens, positions = top1_agreement(outputs[float_quant], hf_dir, runs[float_quant])
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
