"""Does `--imatrix auto` pay for itself? Q4_K_M with and without Kiln's importance matrix, on the demo model.

On SmolLM2-135M-Instruct (the demo model) this:
  1. converts it to f16 once (Kiln's cache);
  2. quantizes to each type in-process with libllama (Kiln's path without a matrix), timed;
  3. quantizes the same type through llama-quantize without a matrix: the file must be byte-identical
     to 2 (so the comparison below is the matrix's doing, not the tool's);
  4. computes the importance matrix on Kiln's calibration text (tasks/calibration_text/) with
     llama-imatrix, as `--imatrix auto` does, into a fresh folder (never Kiln's cache), timed;
  5. quantizes each type with the matrix through llama-quantize, timed;
  6. measures every file against f16 with the report's own measurement (tasks/report/: KL divergence
     on tasks/eval_text/, which shares no passage with the calibration text), and prints both.

    .venv/bin/python bench/imatrix.py [--types q4_k_m,q3_k_m] [--threads N] [--n-ctx 512] [--n-chunks 8]

Uses `KILN_CACHE_DIR` (default: the user's cache) for the demo folder and its f16 conversion.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    from registry.models import ResolvedSource
    from tasks import report as rp
    from tasks.convert import conversion_key, convert_to_gguf, gguf_model_name
    from tasks.demo import ensure_demo_model
    from tasks.fetch import fingerprint, model_files
    from tasks.files import sha256_file
    from tasks.imatrix import CALIBRATION_TEXT, CTX, MAX_CHUNKS, compute_imatrix
    from tasks.quantize import _quantize_with_tool, quantize_gguf
    from tasks.report.measure import _machine
    from tasks.toolchain import current_toolchain

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="q4_k_m", help="comma-separated quant types (default q4_k_m)")
    ap.add_argument("--threads", type=int, default=None, help="threads for every step (default: CPU count)")
    # More of the evaluation text than an export's report scores (1 chunk of 256): two quantizations of
    # one type differ by less than the types do, and 127 tokens cannot tell them apart reliably.
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--n-chunks", type=int, default=8, help="chunks of the evaluation text (its ~4200 tokens: 8 of 512)")
    args = ap.parse_args()
    types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    threads = args.threads or os.cpu_count() or 1

    demo_dir, _ = ensure_demo_model()
    source = ResolvedSource(kind="demo", id="demo", path=str(demo_dir),
                            files=fingerprint(model_files(demo_dir), demo_dir))
    f16, _ = convert_to_gguf(demo_dir, conversion_key(source), "f16", current_toolchain(), gguf_model_name(source))
    print(f"machine: {_machine()}; {threads} threads; load average {os.getloadavg()[0]:.2f}", flush=True)

    files: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-imatrix-") as tmp:
        work = Path(tmp)
        for quant in types:
            t0 = time.perf_counter()
            files[quant] = quantize_gguf(f16, work / f"{quant}.gguf", quant, threads)
            seconds[quant] = round(time.perf_counter() - t0, 2)
            plain_tool = work / f"{quant}.tool.gguf"
            _quantize_with_tool(f16, plain_tool, quant, threads, None, None, lambda _f: None)
            same = sha256_file(plain_tool) == sha256_file(files[quant])
            print(f"{quant}: in-process {seconds[quant]:.1f} s; llama-quantize without a matrix writes "
                  f"{'the same bytes' if same else 'DIFFERENT bytes'}", flush=True)
            plain_tool.unlink()

        t0 = time.perf_counter()
        matrix, _, _ = compute_imatrix(f16, CALIBRATION_TEXT, work / "imatrix.gguf", threads)
        t_matrix = time.perf_counter() - t0
        print(f"importance matrix: {t_matrix:.1f} s (llama-imatrix, {CALIBRATION_TEXT.name}, at most {MAX_CHUNKS} "
              f"chunks of {CTX} tokens, {threads} threads)", flush=True)

        for quant in types:
            label = f"{quant}-imat"
            t0 = time.perf_counter()
            files[label] = quantize_gguf(f16, work / f"{label}.gguf", quant, threads, imatrix=matrix)
            seconds[label] = round(time.perf_counter() - t0, 2)
            print(f"{label}: llama-quantize with the matrix {seconds[label]:.1f} s", flush=True)

        report = rp.measure_quants(f16, files, n_threads=threads, quantize_seconds=seconds, n_ctx=args.n_ctx,
                                   n_chunks=args.n_chunks)

    from rich.console import Console

    Console(width=160).print(rp.rich_table(report))
    print(f"eval text {report.eval_text} ({report.scored_tokens} scored tokens, n_ctx {report.n_ctx})")
    for quant in types:
        plain, imat = report.row(quant), report.row(f"{quant}-imat")
        verdict = "lower" if imat.kl_mean < plain.kl_mean else "NOT lower"
        print(f"{quant}: KL {plain.kl_mean:.5f} without, {imat.kl_mean:.5f} with the matrix ({verdict}, "
              f"{imat.kl_mean / plain.kl_mean:.0%}); top-1 {plain.top1_agreement:.3f} -> {imat.top1_agreement:.3f}; "
              f"PPL ratio {plain.ppl_ratio:.4f} -> {imat.ppl_ratio:.4f}")
        print(f"{quant}: the matrix costs {t_matrix:.1f} s = {t_matrix / seconds[quant]:.1f}x one in-process "
              f"quantization ({seconds[quant]:.1f} s); with it, quantizing took {seconds[quant + '-imat']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
