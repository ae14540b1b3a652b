"""Choose a quant type by evidence: quality, size and speed of every GGUF against the f16 reference.

`measure_quants` runs the float (f16) GGUF and each quantized GGUF with llama-cpp-python on

* Kiln's fixed evaluation text (`tasks/eval_text/kiln-eval-v1.txt`, its sha256 recorded), scored
  exactly as llama.cpp's `llama-perplexity --kl-divergence` scores a text: the tokens (BOS added
  when the vocabulary asks for it) are cut into consecutive chunks of `n_ctx` tokens, the first
  token of each chunk is replaced by BOS when the model adds one, the KV cache is cleared between
  chunks, and only the second half of each chunk is scored (the first half is context only): the
  logits at positions `n_ctx/2 … n_ctx-2` predict tokens `n_ctx/2+1 … n_ctx-1`. For every scored
  token, over the full vocabulary:
    - NLL = log-sum-exp(logits) - logit[next token];  PPL = exp(mean NLL);
    - KL(f16 ‖ quant) = Σ_i p_i · (log p_i − log q_i), with p the f16 softmax (terms with
      log p_i ≤ −16 skipped, as llama.cpp does), q the quant's;
    - top-1 agreement: argmax of the quant's logits equals argmax of f16's.
  So `llama-perplexity -f kiln-eval-v1.txt -c N_CTX --chunks N_CHUNKS --kl-divergence` gives
  comparable numbers (llama.cpp stores the f16 log-probabilities as 16-bit; Kiln keeps float32).
* the model's own chat prompts: each user message rendered through the GGUF's chat template; f16
  answers greedily once, and every model is scored teacher-forced on f16's answer (same KL and
  top-1 definitions, over the answer tokens).

Speed on this machine: prompt tokens/s is measured on the context halves of the text chunks
(no logits requested, a batch of `n_ctx/2` tokens); generation tokens/s on greedy one-token
decodes (f16: its answer to the first chat prompt; a quant: continuing after the last chat
sequence, so no prompt is decoded twice). Both with `n_threads`, recorded with the load average:
by default the CPUs the load leaves idle (see `default_threads`).

f16's log-probabilities are computed once and reused for every quant; one model is loaded at a
time, and a quant's logits are held one chunk at a time. `check_report_memory` holds that peak
against the memory budget (`KILN_MEMORY_BUDGET`, `--memory-budget`) before anything is measured.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from registry.models import QuantMetrics, QuantReport
from tasks.errors import KilnError
from tasks.files import sha256_file
from tasks.step import step

# The text stays in tasks/eval_text/ (package data of `tasks`), one folder above this package.
EVAL_TEXT_DIR = Path(__file__).resolve().parent.parent / "eval_text"
DEFAULT_EVAL_TEXT = EVAL_TEXT_DIR / "kiln-eval-v1.txt"
# Candidates `--quant auto` quantizes and measures, best quality first: a fixed list keeps the
# cost bounded and known (six quantizations plus one measurement of each).
AUTO_CANDIDATES: tuple[str, ...] = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k")
DEFAULT_CHAT_PROMPTS: tuple[str, ...] = ("What is the capital of France?",)
# Lean defaults (about 256 + 40 token evaluations and 8 single-token decodes a model): the report
# must stay a small fraction of an export (bench/report.py). Raise n_chunks (and n_ctx=512, the
# llama.cpp convention) for tighter numbers; the text holds about 4200 tokens.
DEFAULT_N_CTX = 256
DEFAULT_N_CHUNKS = 1
DEFAULT_GEN_TOKENS = 8
_MIN_CONTEXT = 512  # KV cache positions: chat prompt + answer must fit
# llama.cpp's perplexity tool skips f16 probabilities below e^-16 in the KL sum.
_KL_LOG_P_FLOOR = -16.0


class ReportError(KilnError):
    """The quality report could not be measured (a GGUF that does not load, a text too short, ...)."""


class NoQuantFits(KilnError):
    """`--quant auto`: no measured quant type satisfies the requested bounds."""



class _RefPart:
    """f16's numbers for one decoded piece (a text chunk or a chat answer), kept for the quants."""

    __slots__ = ("logp", "p", "argmax")

    def __init__(self, logits: np.ndarray) -> None:
        self.logp = _log_softmax(logits)
        # llama.cpp's KL sum skips f16 probabilities below e^-16: the same mask here.
        self.p = np.exp(self.logp)
        self.p[self.logp <= _KL_LOG_P_FLOOR] = 0.0
        self.argmax = logits.argmax(axis=1)


class _Reference:
    """f16's log-probabilities of every scored token, computed once and reused for every quant."""

    def __init__(self) -> None:
        self.chunks: list[_RefPart] = []
        self.chats: list[_RefPart] = []
        self.chat_sequences: list[tuple[list[int], int]] = []  # (tokens, index of the first answer token)
        self.ppl: float = float("nan")


class _Scores:
    def __init__(self) -> None:
        self.kl: list[np.ndarray] = []
        self.same_top: list[np.ndarray] = []
        self.nll: list[np.ndarray] = []

    def add(self, kl: np.ndarray, same: np.ndarray, nll: np.ndarray) -> None:
        self.kl.append(kl)
        self.same_top.append(same)
        self.nll.append(nll)

    def cat(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.kl:
            empty = np.zeros(0)
            return empty, empty.astype(bool), empty
        return np.concatenate(self.kl), np.concatenate(self.same_top), np.concatenate(self.nll)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32 (the exp sums accumulated in float64)."""
    z = np.asarray(logits, dtype=np.float32)
    m = z.max(axis=1, keepdims=True)
    out = np.subtract(z, m)
    lse = np.log(np.exp(out).sum(axis=1, keepdims=True, dtype=np.float64)).astype(np.float32)
    out -= lse
    return out


def _reference_scores(part: _RefPart, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nll = -part.logp[np.arange(len(targets)), targets].astype(np.float64)
    return np.zeros(len(targets)), np.ones(len(targets), dtype=bool), nll


def _compare(ref: _RefPart, logits: np.ndarray, targets: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per token: KL(f16 ‖ this), same argmax as f16, NLL of the target; llama.cpp's definitions.

    One temporary the size of the logits (float32), reused for log q, log p - log q and the products.
    """
    z = logits
    same = z.argmax(axis=1) == ref.argmax
    logq = _log_softmax(z)
    rows = np.arange(len(targets))
    nll = -logq[rows, targets].astype(np.float64)
    np.subtract(ref.logp, logq, out=logq)  # log p - log q: small where the quant is faithful
    logq *= ref.p
    kl = logq.sum(axis=1, dtype=np.float64)
    return kl, same, nll


class _Runner:
    """One loaded GGUF and the decode loop the measurements need (raw llama.cpp batches)."""

    def __init__(self, path: Path, n_ctx: int, n_threads: int) -> None:
        import llama_cpp

        self.llama_cpp = llama_cpp
        # Room for chat prompts longer than a text chunk; the text chunks use n_ctx positions only.
        size = max(n_ctx, _MIN_CONTEXT)
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=size, n_batch=size, n_ubatch=min(size, 512),
                n_threads=n_threads, n_threads_batch=n_threads, n_gpu_layers=0, verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise ReportError(f"could not load {path} with llama-cpp-python to measure it: {exc}") from exc
        self.ctx = self.llm._ctx.ctx
        self.model = self.llm._model.model
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = self.llm.n_vocab()
        self.n_ctx = size
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos = int(llama_cpp.llama_vocab_bos(self.vocab))
        self.batch = llama_cpp.llama_batch_init(size, 0, 1)

    def close(self) -> None:
        self.llama_cpp.llama_batch_free(self.batch)
        self.llm.close()

    def clear(self) -> None:
        self.llama_cpp.llama_memory_clear(self.llama_cpp.llama_get_memory(self.ctx), True)

    def decode(self, tokens: Sequence[int], start: int, want: Sequence[bool] | None) -> np.ndarray | None:
        """Decode `tokens` at positions `start…`; return the logits requested by `want` (rows in order)."""
        batch = self.batch
        n = len(tokens)
        batch.n_tokens = n
        n_out = 0
        for i, tok in enumerate(tokens):
            batch.token[i] = tok
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            flag = bool(want[i]) if want is not None else False
            batch.logits[i] = flag
            n_out += flag
        rc = self.llama_cpp.llama_decode(self.ctx, batch)
        if rc != 0:
            raise ReportError(f"llama_decode failed (return code {rc}) while measuring")
        self.llama_cpp.llama_synchronize(self.ctx)
        if not n_out:
            return None
        ptr = self.llama_cpp.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab)).copy()

    def last_argmax(self) -> int:
        ptr = self.llama_cpp.llama_get_logits_ith(self.ctx, -1)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def is_eog(self, token: int) -> bool:
        return bool(self.llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def generate(self, prompt: list[int], n: int, stop_at_eog: bool) -> tuple[list[int], float]:
        """Greedy continuation of `prompt`: (tokens, seconds spent in the one-token decodes)."""
        self.clear()
        n = max(0, min(n, self.n_ctx - len(prompt)))
        self.decode(prompt, 0, [i == len(prompt) - 1 for i in range(len(prompt))])
        out: list[int] = []
        t0 = time.perf_counter()
        tok = self.last_argmax()
        for k in range(n):
            out.append(tok)
            if stop_at_eog and self.is_eog(tok):
                break
            if k == n - 1:
                break
            self.decode([tok], len(prompt) + k, [True])
            tok = self.last_argmax()
        return out, time.perf_counter() - t0

    def size_stats(self) -> tuple[int, int]:
        return (int(self.llama_cpp.llama_model_size(self.model)),
                int(self.llama_cpp.llama_model_n_params(self.model)))


def _text_chunks(runner: _Runner, text: str, n_ctx: int, n_chunks: int) -> list[list[int]]:
    tokens = runner.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    available = len(tokens) // n_ctx
    if available < 1:
        raise ReportError(
            f"the evaluation text tokenizes to {len(tokens)} tokens, fewer than one chunk of {n_ctx}; "
            "use a longer text or a smaller n_ctx"
        )
    chunks = []
    for c in range(min(n_chunks, available)):
        chunk = list(tokens[c * n_ctx:(c + 1) * n_ctx])
        if runner.add_bos:
            chunk[0] = runner.bos
        chunks.append(chunk)
    return chunks


def _render_chat(runner: _Runner, prompts: Sequence[str], render: bool) -> list[list[int]]:
    """Token ids of each prompt, rendered through the GGUF's own chat template when it has one."""
    template = runner.llm.metadata.get("tokenizer.chat_template") if render else None
    rendered: list[str] = list(prompts)
    if template:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        def piece(token_id: int) -> str:
            if token_id < 0:
                return ""
            return runner.llm._model.token_get_text(token_id)

        formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=piece(runner.llm.token_eos()),
            bos_token=piece(runner.llm.token_bos()),
            add_generation_prompt=True,
        )
        rendered = [formatter(messages=[{"role": "user", "content": p}]).prompt for p in prompts]
    out = []
    for text in rendered:
        toks = list(runner.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))
        if len(toks) >= 2 and toks[0] == toks[1] == runner.bos:
            toks = toks[1:]  # the template wrote BOS itself
        out.append(toks)
    return out


def _score_text(runner: _Runner, chunks: list[list[int]], ref: _Reference, is_reference: bool
                ) -> tuple[_Scores, float]:
    """Score the text chunks as llama-perplexity does; returns the scores and prompt tokens/s."""
    n_ctx = len(chunks[0])
    first = n_ctx // 2
    # Logits only where they are scored: positions first … n_ctx-2 (predicting first+1 … n_ctx-1).
    want_second = [first + k <= n_ctx - 2 for k in range(n_ctx - first)]
    scores = _Scores()
    pp_tokens, pp_seconds = 0, 0.0
    for c, chunk in enumerate(chunks):
        runner.clear()
        t0 = time.perf_counter()
        runner.decode(chunk[:first], 0, None)  # the context half: prompt processing, timed
        pp_seconds += time.perf_counter() - t0
        pp_tokens += first
        logits = runner.decode(chunk[first:], first, want_second)
        assert logits is not None
        targets = np.asarray(chunk[first + 1:], dtype=np.int64)
        if is_reference:
            ref.chunks.append(_RefPart(logits))
            scores.add(*_reference_scores(ref.chunks[-1], targets))
        else:
            scores.add(*_compare(ref.chunks[c], logits, targets))
        del logits
    return scores, (pp_tokens / pp_seconds if pp_seconds > 0 else 0.0)


def _score_chat(runner: _Runner, ref: _Reference, is_reference: bool) -> tuple[_Scores, int | None]:
    """Teacher-forced scores on f16's answers to the chat prompts.

    Also returns the greedy next token after the last sequence (its KV cache stays in place), so a
    generation-speed run can continue from there without decoding a prompt again.
    """
    scores = _Scores()
    next_token = None
    for s, (seq, start) in enumerate(ref.chat_sequences):
        last = s == len(ref.chat_sequences) - 1
        runner.clear()
        logits = runner.decode(seq, 0, [start - 1 <= i <= len(seq) - (1 if last else 2) for i in range(len(seq))])
        assert logits is not None
        if last:
            next_token = int(logits[-1].argmax())
            logits = logits[:-1]
        targets = np.asarray(seq[start:], dtype=np.int64)
        if is_reference:
            ref.chats.append(_RefPart(logits))
            scores.add(*_reference_scores(ref.chats[-1], targets))
        else:
            scores.add(*_compare(ref.chats[s], logits, targets))
    return scores, next_token


def _continue_speed(runner: _Runner, position: int, token: int, n: int) -> float:
    """Generation tokens/s: greedy one-token decodes continuing the sequence in the KV cache."""
    n = max(0, min(n - 1, runner.n_ctx - position))
    t0 = time.perf_counter()
    for k in range(n):
        runner.decode([token], position + k, [True])
        token = runner.last_argmax()
    seconds = time.perf_counter() - t0
    return n / seconds if n and seconds > 0 else 0.0


def _gen_speed(runner: _Runner, prompt: list[int], n: int) -> tuple[list[int], float]:
    """Greedy continuation of `prompt` (n tokens, through end-of-generation): (tokens, tokens/s)."""
    generated, seconds = runner.generate(prompt, n, stop_at_eog=False)
    decodes = len(generated) - 1  # the first token comes from the prompt's logits
    return generated, (decodes / seconds if decodes > 0 and seconds > 0 else 0.0)


def _answer_until_eog(runner: _Runner, tokens: list[int]) -> list[int]:
    for i, tok in enumerate(tokens):
        if runner.is_eog(tok):
            return tokens[: i + 1]
    return tokens


def default_threads() -> int:
    """The usable CPUs less what other processes keep busy (1-minute load average), at least 1.

    ggml's threads spin at every barrier of the graph: with more threads than idle cores, decoding
    gets several times slower, not faster (measured on a 2-CPU machine at load 4.5: 2 threads
    decoded 3 to 10 times slower than 1).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return max(1, min(cores, int(cores - load + 0.5)))


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()}"


def report_memory_bytes(reference: Path, n_vocab: int, n_ctx: int, n_chunks: int, n_prompts: int,
                        gen_tokens: int) -> int:
    """Peak memory of the report: the largest GGUF's weights (llama.cpp maps them; the reference is
    the largest), f16's kept log-probabilities and probabilities for every scored token (two float32
    rows a token), and one chunk's logits with its temporary while a quant is compared."""
    scored = n_chunks * (n_ctx // 2) + n_prompts * gen_tokens
    chunk = (n_ctx // 2) * n_vocab * 4
    return Path(reference).stat().st_size + 2 * scored * n_vocab * 4 + 2 * chunk


def check_report_memory(reference: Path, n_vocab: int, n_ctx: int, n_chunks: int, n_prompts: int,
                        gen_tokens: int) -> None:
    """Refuse before measuring when the report cannot run within the memory budget."""
    from tasks import settings

    need = report_memory_bytes(reference, n_vocab, n_ctx, n_chunks, n_prompts, gen_tokens)
    budget = settings.memory_budget_bytes()
    if need > budget:
        raise ReportError(
            f"the quant report needs about {need / 1e9:.2f} GB of memory ({Path(reference).name} and the "
            f"reference log-probabilities of {n_chunks} chunk(s) of {n_ctx} tokens), over the memory budget of "
            f"{budget / 1e9:.2f} GB; raise --memory-budget (or KILN_MEMORY_BUDGET), or pass --no-report"
        )


class Measurement:
    """The reference measured once, then any number of quantized GGUFs one at a time (`add`).

    `measure_quants` measures a fixed set; `--quant auto`'s search adds candidates as it makes them,
    and can stop between any two (its time budget) with a report of what it has.
    """

    def __init__(
        self,
        f16_path: Path,
        eval_text_path: Path | None = None,
        chat_prompts: Sequence[str] | None = None,
        n_threads: int | None = None,
        *,
        reference_name: str = "f16",
        n_ctx: int = DEFAULT_N_CTX,
        n_chunks: int = DEFAULT_N_CHUNKS,
        gen_tokens: int = DEFAULT_GEN_TOKENS,
        render_chat: bool = True,
        on_progress: Callable[[str], None] | None = None,
    ) -> None:
        if n_ctx < 8 or n_ctx % 2:
            raise ReportError(f"n_ctx must be an even number of at least 8, not {n_ctx}")
        self.f16_path = Path(f16_path)
        self.eval_path = Path(eval_text_path) if eval_text_path else DEFAULT_EVAL_TEXT
        if not self.eval_path.is_file():
            raise ReportError(f"evaluation text {self.eval_path} not found")
        if not self.f16_path.is_file():
            raise ReportError(f"cannot measure {reference_name}: {self.f16_path} does not exist")
        self.text = self.eval_path.read_text(encoding="utf-8")
        self.threads = n_threads or default_threads()
        self.prompts = list(DEFAULT_CHAT_PROMPTS if chat_prompts is None else chat_prompts)
        self.say = on_progress or (lambda _msg: None)
        self.reference_name = reference_name
        self.n_ctx, self.n_chunks, self.gen_tokens, self.render_chat = n_ctx, n_chunks, gen_tokens, render_chat
        try:
            self.load_at_start = os.getloadavg()[0]
        except (AttributeError, OSError):
            self.load_at_start = 0.0
        self.ref = _Reference()
        self.rows: list[QuantMetrics] = []
        self.chunks: list[list[int]] = []
        self.timing_prompt: list[int] = []
        self.rendered: list[list[int]] = []
        self.ref_vocab = 0
        self._measure(reference_name, self.f16_path, None, is_ref=True)

    def add(self, name: str, path: Path, quantize_seconds: float | None = None) -> QuantMetrics:
        path = Path(path)
        if not path.is_file():
            raise ReportError(f"cannot measure {name}: {path} does not exist")
        return self._measure(name, path, quantize_seconds, is_ref=False)

    def _measure(self, name: str, path: Path, quantize_seconds: float | None, is_ref: bool) -> QuantMetrics:
        ref, n_ctx, gen_tokens = self.ref, self.n_ctx, self.gen_tokens
        self.say(f"measuring {name} ({path.name})")
        t0 = time.perf_counter()
        runner = _Runner(path, n_ctx, self.threads)
        try:
            if is_ref:
                check_report_memory(path, runner.n_vocab, n_ctx, self.n_chunks, len(self.prompts), gen_tokens)
                self.chunks = _text_chunks(runner, self.text, n_ctx, self.n_chunks)
                self.rendered = _render_chat(runner, self.prompts, self.render_chat)
                self.ref_vocab = runner.n_vocab
                longest = max((len(p) for p in self.rendered), default=0)
                if longest + gen_tokens > runner.n_ctx:
                    raise ReportError(
                        f"a chat prompt of {longest} tokens plus {gen_tokens} answer tokens does not fit "
                        f"in the context of {runner.n_ctx}; shorten the prompt or raise n_ctx"
                    )
                self.timing_prompt = self.rendered[0] if self.rendered else self.chunks[0][: max(1, n_ctx // 16)]
            elif runner.n_vocab != self.ref_vocab:
                raise ReportError(
                    f"{name} ({path.name}) has a vocabulary of {runner.n_vocab} tokens, {self.reference_name} "
                    f"{self.ref_vocab}: they are not the same model"
                )
            text_s, pp_tps = _score_text(runner, self.chunks, ref, is_ref)
            if is_ref:
                # Generation speed on the first chat prompt; that greedy run is also f16's answer to it.
                generated, gen_tps = _gen_speed(runner, self.timing_prompt, gen_tokens)
                # f16's greedy answers: the teacher-forced targets of every model's chat score.
                for p, prompt in enumerate(self.rendered):
                    answer = (_answer_until_eog(runner, generated) if p == 0
                              else runner.generate(prompt, gen_tokens, stop_at_eog=True)[0])
                    if answer:
                        ref.chat_sequences.append((prompt + answer, len(prompt)))
                chat_s, _ = _score_chat(runner, ref, is_ref)
            else:
                chat_s, next_token = _score_chat(runner, ref, is_ref)
                if next_token is not None:
                    # Continue after the last chat sequence: no second prompt decode for the timing.
                    gen_tps = _continue_speed(runner, len(ref.chat_sequences[-1][0]), next_token, gen_tokens)
                else:
                    gen_tps = _gen_speed(runner, self.timing_prompt, gen_tokens)[1]
            model_bytes, n_params = runner.size_stats()
        finally:
            runner.close()
        kl, same, nll = text_s.cat()
        ckl, csame, _ = chat_s.cat()
        ppl = float(math.exp(nll.mean())) if len(nll) else float("nan")
        if is_ref:
            ref.ppl = ppl
        row = QuantMetrics(
            quant=name,
            file=path.name,
            is_reference=is_ref,
            size_bytes=path.stat().st_size,
            n_params=n_params,
            bits_per_weight=round(model_bytes * 8 / n_params, 4) if n_params else 0.0,
            kl_mean=float(kl.mean()) if len(kl) else 0.0,
            kl_p99=float(np.percentile(kl, 99)) if len(kl) else 0.0,
            kl_max=float(kl.max()) if len(kl) else 0.0,
            top1_agreement=float(same.mean()) if len(same) else 1.0,
            ppl=ppl,
            ppl_ratio=ppl / ref.ppl if ref.ppl and not math.isnan(ref.ppl) else float("nan"),
            chat_kl_mean=float(ckl.mean()) if len(ckl) else None,
            chat_top1_agreement=float(csame.mean()) if len(csame) else None,
            prompt_tps=round(pp_tps, 2),
            gen_tps=round(gen_tps, 2),
            eval_seconds=round(time.perf_counter() - t0, 3),
            quantize_seconds=quantize_seconds,
        )
        self.rows.append(row)
        return row

    def report(self) -> QuantReport:
        """Everything measured so far."""
        import llama_cpp

        ref, n_ctx = self.ref, self.n_ctx
        chat_tokens = sum(len(seq) - start for seq, start in ref.chat_sequences)
        q_times = [r.quantize_seconds for r in self.rows if r.quantize_seconds is not None]
        return QuantReport(
            reference=self.reference_name,
            eval_text=self.eval_path.name,
            eval_text_sha256=sha256_file(self.eval_path),
            n_ctx=n_ctx,
            n_chunks=len(self.chunks),
            scored_tokens=len(self.chunks) * (n_ctx - 1 - n_ctx // 2),
            chat_prompts=len(ref.chat_sequences),
            chat_tokens=chat_tokens,
            n_threads=self.threads,
            load_average=round(self.load_at_start, 2),
            machine=_machine(),
            llama_cpp_python=getattr(llama_cpp, "__version__", "unknown"),
            measure_seconds=round(sum(r.eval_seconds for r in self.rows), 3),
            quantize_seconds=round(sum(q_times), 3) if q_times else None,
            rows=list(self.rows),
        )


@step(name="report")
def measure_quants(
    f16_path: Path,
    quant_paths: dict[str, Path],
    eval_text_path: Path | None = None,
    chat_prompts: Sequence[str] | None = None,
    n_threads: int | None = None,
    *,
    reference_name: str = "f16",
    n_ctx: int = DEFAULT_N_CTX,
    n_chunks: int = DEFAULT_N_CHUNKS,
    gen_tokens: int = DEFAULT_GEN_TOKENS,
    render_chat: bool = True,
    quantize_seconds: dict[str, float] | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> QuantReport:
    """Measure the reference GGUF and every quantized GGUF; see the module docstring for definitions.

    `chat_prompts` are user messages rendered through the GGUF's chat template (`render_chat=False`:
    already-rendered prompt texts); None: `DEFAULT_CHAT_PROMPTS`; an empty list skips chat scoring.
    `n_ctx` must be even; `n_chunks` chunks of `n_ctx` tokens are scored (fewer if the text is short).
    """
    if n_ctx < 8 or n_ctx % 2:
        raise ReportError(f"n_ctx must be an even number of at least 8, not {n_ctx}")
    for name, path in {reference_name: f16_path, **quant_paths}.items():
        if not Path(path).is_file():
            raise ReportError(f"cannot measure {name}: {path} does not exist")
    measurement = Measurement(f16_path, eval_text_path, chat_prompts, n_threads, reference_name=reference_name,
                              n_ctx=n_ctx, n_chunks=n_chunks, gen_tokens=gen_tokens, render_chat=render_chat,
                              on_progress=on_progress)
    for name, path in quant_paths.items():
        measurement.add(name, path, (quantize_seconds or {}).get(name))
    return measurement.report()


def measure_candidates(
    f16_path: Path,
    work_dir: Path,
    candidates: Sequence[str] = AUTO_CANDIDATES,
    *,
    stem: str | None = None,
    on_progress: Callable[[str], None] | None = None,
    **measure_kwargs: Any,
) -> tuple[QuantReport, dict[str, Path]]:
    """`--quant auto`'s evidence: quantize each candidate into `work_dir`, then measure them all.

    Returns the report (with per-type and total quantize time) and the quantized files, which stay
    in `work_dir` so the chosen one can be moved into the outputs without quantizing it again.
    """
    from tasks.quantize import check_quant_types, quantize_gguf

    check_quant_types(list(candidates))
    say = on_progress or (lambda _msg: None)
    base = stem or Path(f16_path).stem
    paths: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    for quant in candidates:
        dst = Path(work_dir) / f"{base}.{quant}.gguf"
        say(f"quantizing candidate {quant}")
        t0 = time.perf_counter()
        quantize_gguf(Path(f16_path), dst, quant)
        seconds[quant] = round(time.perf_counter() - t0, 3)
        paths[quant] = dst
    report = measure_quants(Path(f16_path), paths, quantize_seconds=seconds, on_progress=on_progress,
                            **measure_kwargs)
    return report, paths
