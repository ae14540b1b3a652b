"""Real model sizes: the bare tools against `kiln export`, checks off and on, wall time and peak memory.

    .venv/bin/python bench/scale.py --size 1b [--size 3b ...] [--quant q4_k_m] [--keep DIR]
    .venv/bin/python bench/scale.py --size 8b --only kiln-checks   # the 8B run: checks on only

1. A synthetic Llama folder at the size asked for (TOOLCHAIN.md, "Models at real sizes"): the demo
   model's SmolLM2 tokenizer files, a config with the wanted dimensions, random bf16 weights written
   with safetensors in shards of about 2 GB. Every turn ends at once, so every check can pass:
   embedding rows are one shared vector of ones plus 1 % noise, `o_proj`/`down_proj` are tiny
   (std 1e-4) so the layers barely move the residual, and the untied `lm_head` row of `<|im_end|>`
   (id 2) is 0.05 everywhere: after the final RMSNorm that row's logit is about 0.05 x hidden
   against a few units for any other token, at every position.
2. Side by side in one run, each from an empty cache:
   - bare tools: `convert_hf_to_gguf.py --outtype f16`, then `llama_model_quantize` per quant type;
   - `kiln export --no-verify --no-report` (checks off);
   - `kiln export` (checks on: verify, with the transformers comparison, and the quant report).
   Wall time from outside, and the peak of the summed PSS (proportional set size: shared pages
   counted once across the tree) of the process and all its children, sampled every 0.25 s.
3. One line with the load average over each run: other work on the machine slows every row.

A benchmark, not a test: at 1B it takes minutes. `--size tiny` (a few MB) checks the script itself,
but is not run in CI either: it took 3.5 minutes on the 2-CPU machine at load 6 (a Prefect server
start for each row's fresh cache, the converter probe, verify), against about a minute a test may take.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# (hidden, intermediate, layers, attention heads, kv heads); vocabulary: SmolLM2's 49152.
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (256, 512, 2, 4, 2),
    "1b": (2048, 8192, 16, 32, 8),     # ~1.17B parameters, 2.35 GB in bf16
    "3b": (3072, 8192, 28, 24, 8),     # ~3.1B (Llama 3.2 3B's body), 6.2 GB
    "8b": (4096, 14336, 32, 32, 8),    # ~7.4B (Llama 3 8B's body, SmolLM2's vocabulary), 14.9 GB
}
VOCAB = 49152
END_OF_TURN = 2  # <|im_end|> in SmolLM2's vocabulary
SHARD_BYTES = 2 << 30
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def make_model(folder: Path, size: str, seed: int = 0) -> int:
    """Write a synthetic Llama folder of `size`; returns its parameter count."""
    import torch
    from safetensors.torch import save_file

    from tasks.demo import ensure_demo_model

    hidden, inter, layers, heads, kv_heads = SIZES[size]
    head_dim = hidden // heads
    folder.mkdir(parents=True, exist_ok=True)
    demo = ensure_demo_model()[0]
    for name in TOKENIZER_FILES:
        if (demo / name).is_file():
            shutil.copy(demo / name, folder / name)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "vocab_size": VOCAB, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        "bos_token_id": 1, "eos_token_id": END_OF_TURN, "pad_token_id": END_OF_TURN,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))

    gen = torch.Generator().manual_seed(seed)

    def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)

    def tensors():
        embed = torch.ones(VOCAB, hidden) + torch.randn(VOCAB, hidden, generator=gen) * 0.01
        yield "model.embed_tokens.weight", embed.to(torch.bfloat16)
        del embed
        for i in range(layers):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16)
            yield p + "post_attention_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16)
            yield p + "self_attn.q_proj.weight", normal((heads * head_dim, hidden), 0.02)
            yield p + "self_attn.k_proj.weight", normal((kv_heads * head_dim, hidden), 0.02)
            yield p + "self_attn.v_proj.weight", normal((kv_heads * head_dim, hidden), 0.02)
            yield p + "self_attn.o_proj.weight", normal((hidden, heads * head_dim), 1e-4)
            yield p + "mlp.gate_proj.weight", normal((inter, hidden), 0.02)
            yield p + "mlp.up_proj.weight", normal((inter, hidden), 0.02)
            yield p + "mlp.down_proj.weight", normal((hidden, inter), 1e-4)
        yield "model.norm.weight", torch.ones(hidden, dtype=torch.bfloat16)
        head = normal((VOCAB, hidden), 0.02)
        head[END_OF_TURN] = 0.05
        yield "lm_head.weight", head

    shards: list[dict[str, torch.Tensor]] = [{}]
    written: list[tuple[str, list[str]]] = []
    params = total_bytes = 0
    shard_bytes = 0

    def flush() -> None:
        nonlocal shard_bytes
        name = f"model-{len(written) + 1:05d}.safetensors"
        save_file(shards[0], str(folder / name), metadata={"format": "pt"})
        written.append((name, list(shards[0])))
        shards[0] = {}
        shard_bytes = 0

    for name, tensor in tensors():
        if shard_bytes and shard_bytes + tensor.nbytes > SHARD_BYTES:
            flush()
        shards[0][name] = tensor
        shard_bytes += tensor.nbytes
        total_bytes += tensor.nbytes
        params += tensor.numel()
    flush()
    # Shards named -0000i-of-0000N as transformers writes them, with the index pointing at them.
    n = len(written)
    weight_map = {}
    for i, (name, names) in enumerate(written, start=1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        (folder / name).rename(folder / final)
        weight_map.update({t: final for t in names})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=1))
    return params


# ---------------------------------------------------------------- measuring a process tree


class PeakPss:
    """Samples the summed PSS of a process and its descendants until stopped; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for proc in procs:
                try:
                    total += proc.memory_full_info().pss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def load_average() -> float:
    return os.getloadavg()[0]


def timed(cmd: list[str], env: dict[str, str], label: str) -> tuple[float, int, float, str]:
    """(wall seconds, peak summed PSS bytes, mean 1-minute load, stdout) of one command."""
    t0 = time.perf_counter()
    load0 = load_average()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = PeakPss(proc.pid)
    out, err = proc.communicate()
    peak = sampler.stop()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed (exit {proc.returncode}):\n{err[-3000:]}")
    return wall, peak, (load0 + load_average()) / 2, out


BARE_QUANTIZE = """
import ctypes, os, sys
import llama_cpp
from tasks.quantize import known_quant_types
src, quant, dst = sys.argv[1:4]
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = known_quant_types()[quant]
params.nthread = os.cpu_count() or 1
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
sys.exit(rc)
"""


def bare_tools(model: Path, quants: list[str], work: Path, converter: Path, env: dict[str, str]) -> dict:
    from tasks.toolchain import converter_env

    f16 = work / "bare-f16.gguf"
    convert_env = {**env, **converter_env(converter)}
    convert = timed([sys.executable, str(converter / "convert_hf_to_gguf.py"), "--outtype", "f16",
                     "--outfile", str(f16), str(model)], convert_env, "bare converter")
    rows = {"convert": convert}
    for quant in quants:
        out = work / f"bare-{quant}.gguf"
        rows[f"quantize {quant}"] = timed([sys.executable, "-c", BARE_QUANTIZE, str(f16), quant, str(out)],
                                          {**env, "PYTHONPATH": str(REPO)}, f"bare quantize {quant}")
        out.unlink()
    f16.unlink()
    return rows


def kiln(model: Path, quants: list[str], out: Path, env: dict[str, str], checks: bool) -> tuple:
    cmd = [str(Path(sys.executable).parent / "kiln"), "export", str(model), "--quant", ",".join(quants),
           "--out", str(out), "--json"]
    if not checks:
        cmd += ["--no-verify", "--no-report"]
    wall, peak, load, stdout = timed(cmd, env, "kiln export" + ("" if checks else " (checks off)"))
    return wall, peak, load, json.loads(stdout)



def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def run_size(size: str, quants: list[str], only: str | None, keep: Path | None, model: Path | None = None) -> None:
    from flows.local_server import stop_kept_server
    from tasks.toolchain import current_toolchain

    converter = Path(current_toolchain().converter_dir)
    with tempfile.TemporaryDirectory(prefix=f"kiln-scale-{size}-", dir=keep) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        if model is None:
            model = work / "model"
            params = make_model(model, size)
        else:  # made earlier with --make
            from tasks.preflight import local_weight_params

            params = local_weight_params(model)
        (work / "model").exists() or (work / "model").symlink_to(model.resolve())
        print(f"[{size}] synthetic Llama: {params / 1e9:.2f}B parameters, made in {time.perf_counter() - t0:.0f} s",
              flush=True)
        base_env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "LLAMA_CPP_DIR": str(converter)}
        rows: dict[str, tuple] = {}
        if only in (None, "bare"):
            bare = bare_tools(work / "model", quants, work, converter, base_env)
            wall = sum(r[0] for r in bare.values())
            peak = max(r[1] for r in bare.values())
            load = sum(r[2] for r in bare.values()) / len(bare)
            rows["bare tools"] = (wall, peak, load, ", ".join(f"{k} {r[0]:.0f} s / {gb(r[1])}" for k, r in bare.items()))
            rows["bare converter"] = (bare["convert"][0], bare["convert"][1], bare["convert"][2], "")
            print(f"[{size}] bare tools: {rows['bare tools'][3]}", flush=True)
        for label, checks in (("kiln, checks off", False), ("kiln, checks on", True)):
            if only not in (None, "kiln-checks" if checks else "kiln-off"):
                continue
            env = {**base_env, "KILN_CACHE_DIR": str(work / f"cache-{checks}"),
                   "PREFECT_HOME": str(work / f"prefect-{checks}")}
            wall, peak, load, manifest = kiln(work / "model", quants, work / f"out-{checks}", env, checks)
            steps = ", ".join(f"{k} {v:g}" for k, v in manifest.get("timings", {}).items())
            rows[label] = (wall, peak, load, steps)
            print(f"[{size}] {label}: {wall:.0f} s, {gb(peak)}; steps: {steps}", flush=True)
            shutil.rmtree(work / f"out-{checks}", ignore_errors=True)
            stop_kept_server(work / f"cache-{checks}" / "prefect-server")
            shutil.rmtree(work / f"cache-{checks}", ignore_errors=True)

    bare_wall = rows.get("bare tools", (None,))[0]
    conv_peak = rows.get("bare converter", (None, None))[1]
    print(f"\n## {size}: {params / 1e9:.2f}B parameters, quant {','.join(quants)}, {os.cpu_count()} CPUs")
    print("| run | wall | × bare wall | peak PSS | × bare converter peak | mean load |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, (wall, peak, load, _detail) in rows.items():
        ratio = f"{wall / bare_wall:.2f}" if bare_wall else "–"
        mem = f"{peak / conv_peak:.2f}" if conv_peak else "–"
        print(f"| {label} | {wall:.0f} s | {ratio} | {gb(peak)} | {mem} | {load:.1f} |")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", action="append", choices=list(SIZES), help="repeatable; default 1b")
    parser.add_argument("--quant", default="q4_k_m", help="comma-separated quant types (default q4_k_m)")
    parser.add_argument("--only", choices=["bare", "kiln-off", "kiln-checks"], help="run one row only")
    parser.add_argument("--keep", type=Path, help="folder for the work files (default: the system's temp)")
    parser.add_argument("--make", type=Path, help="only write the synthetic model into this folder")
    parser.add_argument("--model", type=Path, help="a synthetic model made earlier with --make (one --size)")
    args = parser.parse_args()
    if args.make:
        print(f"{make_model(args.make, (args.size or ['1b'])[0]) / 1e9:.2f}B parameters in {args.make}")
        return
    for size in args.size or ["1b"]:
        run_size(size, args.quant.split(","), args.only, args.keep, args.model)


if __name__ == "__main__":
    main()
