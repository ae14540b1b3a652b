"""Quantizations side by side against one after another, as `flows/convert_quantize.py` runs them.

    .venv/bin/python bench/quant_parallel.py [--model DIR] [--quants q8_0,q4_k_m,q5_k_m,q6_k] [--repeat 2]

The float GGUF is converted once; then every layout (jobs at a time × threads a job) makes all
the quant types with `quantize_gguf`, the step the flow runs (cache entry, stamp and all), into
an empty cache of its own. It prints each layout's wall time and the layout `quant_parallelism`
picks on this machine, which should be among the fastest.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def quantize_all(f16: Path, quants: list[str], out: Path, jobs: int, threads: int) -> float:
    from tasks.quantize import quantize_gguf

    out.mkdir()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(quants)) as pool:  # every job submitted at once, `jobs` run libllama together
        list(pool.map(lambda q: quantize_gguf(f16, out / f"{q}.gguf", q, threads, jobs), quants))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="Hugging Face folder (default: the demo model)")
    parser.add_argument("--quants", default="q8_0,q4_k_m,q5_k_m,q6_k")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    quants = args.quants.split(",")

    import logging

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    from flows.convert_quantize import quant_job_memory, quant_memory_budget, quant_parallelism
    from tasks.convert import run_converter
    from tasks.demo import ensure_demo_model
    from tasks.fetch import read_config
    from tasks.toolchain import current_toolchain

    model = (args.model or ensure_demo_model()[0]).resolve()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="kiln-bench-quant-") as tmp:
        work = Path(tmp)
        f16 = work / "f16.gguf"
        run_converter("convert_hf_to_gguf.py", ["--outtype", "f16", "--outfile", str(f16), str(model)],
                      current_toolchain())
        picked = quant_parallelism(len(quants), quant_job_memory(f16, read_config(model)), quant_memory_budget())
        layouts = sorted({(1, cores), (2, max(1, cores // 2)), (2, cores), (len(quants), 1), picked})
        print(f"model: {model}; quant types: {', '.join(quants)}; {cores} cores")
        for run in range(args.repeat):
            for jobs, threads in layouts:
                wall = quantize_all(f16, quants, work / f"r{run}-{jobs}x{threads}", jobs, threads)
                mark = "  <- quant_parallelism's choice" if (jobs, threads) == picked else ""
                print(f"run {run + 1}: {jobs} job(s) at a time × {threads} thread(s): {wall:.2f} s{mark}")


if __name__ == "__main__":
    main()
