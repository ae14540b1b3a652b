"""How much does the quality report add to an export? (issue: at most 30% of the export's wall time)

On the demo model (SmolLM2-135M-Instruct) this times, in one process, interleaved `--rounds` times:
  export  = one fresh f16 conversion (llama.cpp's converter, not the cache) + 3 quantizations
            (q8_0, q4_k_m, q2_k) with libllama's quantizer;
  report  = `measure_quants` on that f16 and those 3 quants with the default settings;
and prints each round, the medians and report / export.

    .venv/bin/python bench/report.py [--rounds 3] [--threads N] [--n-chunks K] [--n-ctx N]

Uses `KILN_CACHE_DIR` (default: the user's cache) for the demo folder and the converter source; each
round's conversion gets a fresh cache key (so the converter really runs) and is deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QUANTS = ("q8_0", "q4_k_m", "q2_k")


def main() -> int:
    from tasks import report as rp
    from tasks.convert import convert_to_gguf
    from tasks.demo import ensure_demo_model
    from tasks.quantize import quantize_gguf
    from tasks.toolchain import current_toolchain

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="report threads (default: CPU count)")
    ap.add_argument("--n-ctx", type=int, default=rp.DEFAULT_N_CTX)
    ap.add_argument("--n-chunks", type=int, default=rp.DEFAULT_N_CHUNKS)
    ap.add_argument("--gen-tokens", type=int, default=rp.DEFAULT_GEN_TOKENS)
    ap.add_argument("--cli", action="store_true",
                    help="instead: time `kiln export` of the demo folder with and without --no-report")
    args = ap.parse_args()
    if args.cli:
        return compare_cli_exports()

    demo_dir, _ = ensure_demo_model()
    toolchain = current_toolchain()
    print(f"machine: {rp._machine()}; load average {os.getloadavg()[0]:.2f}; "
          f"report threads {args.threads or rp.default_threads()}", flush=True)
    exports, reports, converts = [], [], []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-report-") as tmp:
        for rnd in range(args.rounds):
            work = Path(tmp) / f"round{rnd}"
            work.mkdir()
            t0 = time.perf_counter()
            # A content key never used before: the converter really runs (no cache hit).
            f16, reused = convert_to_gguf(demo_dir, f"bench-{uuid.uuid4().hex[:12]}", "f16", toolchain)
            assert not reused
            t_convert = time.perf_counter() - t0
            quants = {}
            q_times = []
            for q in QUANTS:
                tq = time.perf_counter()
                quants[q] = quantize_gguf(f16, work / f"demo.{q}.gguf", q)
                q_times.append(time.perf_counter() - tq)
            t_export = time.perf_counter() - t0

            t1 = time.perf_counter()
            report = rp.measure_quants(f16, quants, n_threads=args.threads, n_ctx=args.n_ctx,
                                       n_chunks=args.n_chunks, gen_tokens=args.gen_tokens)
            t_report = time.perf_counter() - t1
            for leftover in [f16, *f16.parent.glob(f16.name + ".*")]:  # the file, its lock and sidecars
                leftover.unlink(missing_ok=True)
            exports.append(t_export)
            reports.append(t_report)
            converts.append(t_convert)
            per = ", ".join(f"{r.quant} {r.eval_seconds:.1f}" for r in report.rows)
            print(f"round {rnd + 1}: export {t_export:.1f} s (convert {t_convert:.1f} s, quantize "
                  f"{' + '.join(f'{x:.1f}' for x in q_times)} s); report {t_report:.1f} s ({per}); "
                  f"report/export {t_report / t_export:.0%}; load {os.getloadavg()[0]:.2f}", flush=True)
    me, mr = statistics.median(exports), statistics.median(reports)
    print(f"median: export {me:.1f} s (convert {statistics.median(converts):.1f} s), report {mr:.1f} s "
          f"on {report.scored_tokens} scored text tokens + {report.chat_tokens} chat tokens, "
          f"{len(report.rows)} models: the report adds {mr / me:.0%} to the export")
    from rich.console import Console

    Console(width=160).print(rp.rich_table(report))
    return 0


def compare_cli_exports() -> int:
    """`kiln export DEMO --quant q8_0,q4_k_m,q2_k` as a user runs it (verification on), with and without the report.

    Each run has its own empty cache, so both convert and quantize for real; the
    converter tree is shared through LLAMA_CPP_DIR so neither downloads it.
    """
    import subprocess

    from tasks.demo import ensure_demo_model
    from tasks.toolchain import current_toolchain

    model = ensure_demo_model()[0]
    kiln = str(Path(sys.executable).parent / "kiln")
    walls = {}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-report-") as tmp:
        for label, extra in (("without report", ["--no-report"]), ("with report", [])):
            env = {**os.environ, "KILN_CACHE_DIR": f"{tmp}/cache-{len(walls)}",
                   "LLAMA_CPP_DIR": current_toolchain().converter_dir}
            cmd = [kiln, "export", str(model), "--quant", ",".join(QUANTS), "--out", f"{tmp}/out-{len(walls)}", *extra]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, env=env)
            walls[label] = time.perf_counter() - t0
            print(f"kiln export {label}: {walls[label]:.1f} s", flush=True)
    added = walls["with report"] - walls["without report"]
    print(f"the report adds {added:.1f} s, {added / walls['without report']:.0%} of the export's wall time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
