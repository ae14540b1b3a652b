"""How much memory an export needs at its peak, step by step, against the memory budget.

The steps run one after another (the quantizations side by side, sized to the budget by
flows/convert_quantize.py), so the export's peak is its largest step, not their sum:

- convert: the converter script reads the checkpoint lazily, a tensor at a time, and writes the
  GGUF; its peak follows the widest tensor, not the model's size (`_CONVERT_COPIES`, measured below);
- quantize: one libllama quantization, a few copies of the largest tensor (`quant_job_memory`);
- verify: llama.cpp runs the float GGUF (its weights resident) with a KV cache and the logits of
  every position; the transformers comparison streams one block at a time (tasks/hf_stream.py)
  and runs after the GGUF is closed, so the larger of the two counts;
- report: llama.cpp runs the float GGUF with the logits of half a text chunk, three copies;
- imatrix (`--imatrix auto|TEXT`): llama-imatrix runs the float GGUF over chunks of
  `tasks.imatrix.CTX` tokens, with that chunk's KV cache and logits, beside the export's process.

- a prebuilt GGUF source (`gguf_source_memory`): no conversion; requantizing, verify and the report
  run the source file itself, so its size and the shape its header gives govern them.

- merge (with a LoRA adapter): the streamed merge holds a block of rows and one tensor pair
  (tasks/adapter/stream_merge.py); `--adapter-mode peft` loads the whole model in transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from tasks.errors import KilnError

# The converter reads lazily and writes a tensor at a time: its peak is a few float32 copies of the
# widest tensor over its imports. bench/scale.py, 1.17B synthetic Llama (widest: the 49152 x 2048
# embedding, 0.4 GB in float32): 1.01 GB summed PSS, which 1.5 copies over a 0.4 GB baseline match.
_CONVERT_COPIES = 1.5
_CONVERT_BASELINE = 400 << 20
_PROCESS_BASELINE = 600 << 20  # Python, torch and llama.cpp imported: what any step pays before weights
_BYTES = {"f32": 4, "f16": 2, "bf16": 2}


# Peak resident memory of one libllama quantization, measured on SmolLM2-135M: about 7 bytes per
# element of the largest tensor (read buffer, f32 copy, output) over the process's baseline.
_QUANT_BYTES_PER_ELEMENT = 10
_QUANT_OVERHEAD = 64 << 20


class NotEnoughMemory(KilnError):
    """The export cannot run within the memory budget."""


class MemoryEstimate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    peak_bytes: int
    peak_step: str
    steps: dict[str, int]

    def detail(self) -> str:
        return ", ".join(f"{step} {n / 1e9:.2f} GB" for step, n in self.steps.items())


def quant_job_memory(base: Path, config: dict[str, Any]) -> int:
    """Peak memory of one quantization: a few copies of the largest tensor (from config.json), else the base's size."""
    hidden = config.get("hidden_size") or config.get("n_embd")
    widest = max(config.get("vocab_size") or 0, config.get("intermediate_size") or 0)
    if hidden and widest:
        return _QUANT_BYTES_PER_ELEMENT * int(hidden) * int(widest) + _QUANT_OVERHEAD
    try:
        return base.stat().st_size + _QUANT_OVERHEAD
    except OSError:
        return _QUANT_OVERHEAD


def estimate_memory(params: int, outtype: str, config: dict, *, verify: bool, report: bool,
                    converts: bool = True, quantizes: bool = True, adapter_mode: str | None = None,
                    float_bytes: int | None = None, hf_reference: bool = True,
                    imatrix: bool = False) -> MemoryEstimate:
    """Peak memory of each step of an export of a model of `params` parameters (config.json's shape).

    `adapter_mode`: how a LoRA adapter is applied, if one is (merge, adapter, peft).
    `float_bytes`: the size of the GGUF verify and the report run as the reference, where it is known
    (a prebuilt GGUF source: the file itself); else `params` in `outtype`. `hf_reference`: verify
    also runs the transformers comparison (not for a GGUF source, which has no Hugging Face folder).
    `imatrix`: an importance matrix is computed (not given as a file).
    """
    hidden = int(config.get("hidden_size") or config.get("n_embd") or 0)
    vocab = int(config.get("vocab_size") or 0)
    layers = int(config.get("num_hidden_layers") or 0)
    kv_heads = int(config.get("num_key_value_heads") or config.get("num_attention_heads") or 0)
    heads = int(config.get("num_attention_heads") or 0)
    head_dim = int(config.get("head_dim") or (hidden // heads if heads else 0))
    float_gguf = float_bytes if float_bytes is not None else params * _BYTES.get(outtype, 2)
    steps: dict[str, int] = {}
    if converts:
        widest = hidden * max(vocab, int(config.get("intermediate_size") or 0))
        steps["convert"] = int(_CONVERT_COPIES * 4 * widest) + _CONVERT_BASELINE if widest else \
            int(params * 2) + _CONVERT_BASELINE  # no shape known: as much as the checkpoint
    if quantizes:
        steps["quantize"] = quant_job_memory(Path("-"), config) + _PROCESS_BASELINE
    if adapter_mode == "merge":
        # Streamed a block of 1024 rows at a time (tasks/adapter/stream_merge.py): the block and its
        # delta in float32, plus the LoRA pair; a few copies of the widest row.
        widest = max(vocab, hidden, int(config.get("intermediate_size") or 0))
        steps["merge"] = 4 * 4 * 1024 * widest + _PROCESS_BASELINE
    elif adapter_mode == "peft":
        # The transformers + peft reference merge loads the whole model in its own dtype.
        steps["merge"] = params * 2 + _PROCESS_BASELINE
    if verify:
        from tasks.verify import N_CTX, TOKEN_BUDGET, VERIFY_PROMPTS

        positions = 64 + TOKEN_BUDGET  # a chat prompt and the longest answer verify lets run
        kv_cache = 2 * layers * N_CTX * kv_heads * head_dim * 2  # K and V in f16
        gguf = float_gguf + kv_cache + positions * vocab * 4
        # The largest streamed block in float32 (an embedding, or a layer's ~12 h^2 weights), read
        # from bfloat16 a tensor at a time, and the logits of every sequence at once.
        largest_block = max(vocab * hidden, 12 * hidden * hidden) * 4
        hf = int(largest_block * 1.5) + len(VERIFY_PROMPTS) * positions * vocab * 4 if hf_reference else 0
        steps["verify"] = max(gguf, hf) + _PROCESS_BASELINE
    if report:
        steps["report"] = float_gguf + 3 * 256 * vocab * 4 + _PROCESS_BASELINE
    if imatrix:
        from tasks.imatrix import CTX

        # The chunk's logits and their softmax; the export's own process waits beside the tool.
        chunk_kv = 2 * layers * CTX * kv_heads * head_dim * 2
        steps["imatrix"] = float_gguf + chunk_kv + 2 * CTX * vocab * 4 + _PROCESS_BASELINE
    peak_step = max(steps, key=lambda s: steps[s]) if steps else "none"
    return MemoryEstimate(peak_bytes=steps.get(peak_step, 0), peak_step=peak_step, steps=steps)


def gguf_shape(path: Path) -> dict[str, int]:
    """config.json's shape keys for a GGUF, from its header: what `estimate_memory` reads."""
    from tasks.gguf_file import read_layout, read_metadata

    arch = read_metadata(path, ("general.architecture",)).get("general.architecture")
    keys = {f"{arch}.{k}": name for k, name in (
        ("embedding_length", "hidden_size"), ("feed_forward_length", "intermediate_size"),
        ("block_count", "num_hidden_layers"), ("attention.head_count", "num_attention_heads"),
        ("attention.head_count_kv", "num_key_value_heads"), ("attention.key_length", "head_dim"))}
    found = read_metadata(path, tuple(keys))
    config = {name: int(found[key]) for key, name in keys.items() if isinstance(found.get(key), int)}
    embedding = next((t for t in read_layout(path).tensors if t.name == "token_embd.weight"), None)
    if embedding is not None and len(embedding.shape) == 2:
        config["vocab_size"] = int(embedding.shape[1])  # (hidden, vocab), fastest-varying first
    return config


def gguf_source_memory(path: Path, *, requantizes: bool, verify: bool, report: bool,
                       imatrix: bool = False) -> MemoryEstimate:
    """Peak memory of each step of exporting a prebuilt GGUF: its size is what verify, the report and llama-imatrix map."""
    config = gguf_shape(path)
    size = path.stat().st_size
    estimate = estimate_memory(0, "f16", config, verify=verify, report=report, converts=False,
                               quantizes=False, float_bytes=size, hf_reference=False, imatrix=imatrix)
    steps = dict(estimate.steps)
    if requantizes:
        # libllama reads the source a tensor at a time; the largest one, dequantized to float32, governs.
        from tasks.gguf_file import read_layout

        elements = max((_count(t.shape) for t in read_layout(path).tensors), default=0)
        steps["quantize"] = _QUANT_BYTES_PER_ELEMENT * elements + _QUANT_OVERHEAD + _PROCESS_BASELINE
    peak_step = max(steps, key=lambda s: steps[s]) if steps else "none"
    return MemoryEstimate(peak_bytes=steps.get(peak_step, 0), peak_step=peak_step, steps=steps)


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def check_memory(estimate: MemoryEstimate, budget: int) -> None:
    """Refuse, naming the numbers and the fix, when the export's largest step is over the budget."""
    if estimate.peak_bytes <= budget:
        return
    fixes = ["raise --memory-budget (or KILN_MEMORY_BUDGET)"]
    if estimate.peak_step in ("verify", "report"):
        fixes.append("skip the step with --no-verify / --no-report (they run the float GGUF)")
    if estimate.peak_step == "imatrix":
        fixes.append("give a matrix computed elsewhere (--imatrix PATH.gguf)")
    fixes.append("or run on a machine with more memory")
    raise NotEnoughMemory(
        f"this export needs about {estimate.peak_bytes / 1e9:.2f} GB of memory at its peak ({estimate.peak_step}; "
        f"{estimate.detail()}), over the memory budget of {budget / 1e9:.2f} GB; " + ", ".join(fixes)
    )
