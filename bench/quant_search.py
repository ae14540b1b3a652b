"""What does `--quant auto`'s search buy over the standard types? (issue 18)

On the demo model (SmolLM2-135M-Instruct, converted to f16 by the pinned converter, cached) this runs,
for each `--max-size` bound, exactly the search `kiln export demo --quant auto --max-size X` runs
(`tasks.report.search.search_quants`: the six standard types, then the built-in recipes and, with
`--imatrix`, the importance-matrix variants of the types at the bound), and prints for each bound:
  chosen    = the candidate the search exports (size, mean KL from f16);
  standard  = the best standard type within the same bound, from the same measurement (what
              `--quant auto` chose before issue 18).
KL is measured as the export measures it (the report's defaults, `--n-chunks` to score more text).

    .venv/bin/python bench/quant_search.py [--max-size 100MB,120MB] [--imatrix auto] [--n-chunks 1]

Uses `KILN_CACHE_DIR` (default: the user's cache) for the demo model, the conversion and the matrix.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    from registry.models import ResolvedSource
    from tasks import report as rp
    from tasks.convert import conversion_key, convert_to_gguf
    from tasks.demo import ensure_demo_model
    from tasks.fetch import fingerprint, model_files
    from tasks.files import cache_dir
    from tasks.recipe import builtin_recipes
    from tasks.report.search import search_quants
    from tasks.toolchain import current_toolchain

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-size", default="100MB,120MB", help="comma-separated bounds")
    ap.add_argument("--imatrix", default=None, help="auto or a file, as `kiln export --imatrix` (default: none)")
    ap.add_argument("--n-chunks", type=int, default=rp.DEFAULT_N_CHUNKS)
    ap.add_argument("--json", action="store_true", help="also print each search's rows as JSON")
    args = ap.parse_args()

    demo_dir, _ = ensure_demo_model()
    toolchain = current_toolchain()
    source = ResolvedSource(kind="demo", id="demo", path=str(demo_dir),
                            files=fingerprint(model_files(demo_dir), demo_dir))
    f16 = convert_to_gguf(demo_dir, conversion_key(source), "f16", toolchain)[0]
    matrix = None
    if args.imatrix:
        from tasks.imatrix import resolve_imatrix

        t0 = time.perf_counter()
        matrix = Path(resolve_imatrix(args.imatrix, f16, toolchain.cache_key).path)
        print(f"importance matrix {args.imatrix}: {matrix.name} ({time.perf_counter() - t0:.1f} s)", flush=True)
    from tasks.report.measure import _machine

    print(f"machine: {_machine()}; load average {os.getloadavg()[0]:.2f}", flush=True)
    print("| --max-size | chosen | size | KL | best standard | size | KL | KL ratio | candidates | search s |")
    print("| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for bound in args.max_size.split(","):
        limit = rp.parse_size(bound)
        with tempfile.TemporaryDirectory(prefix="kiln-bench-search-", dir=cache_dir()) as work:
            report, choice, _ = search_quants(f16, Path(work), limit, None, recipes=builtin_recipes(),
                                              imatrix=matrix, n_chunks=args.n_chunks)
        standard = [r for r in report.rows if not r.is_reference and r.quant in rp.AUTO_CANDIDATES]
        std = rp.choose_quant(report.model_copy(update={"rows": standard}), limit, None)
        print(f"| {bound} | {choice.quant} | {rp.human_size(choice.size_bytes)} | {choice.kl_mean:.4f} | "
              f"{std.quant} | {rp.human_size(std.size_bytes)} | {std.kl_mean:.4f} | "
              f"{choice.kl_mean / std.kl_mean:.2f} | {len(choice.candidates)} | {choice.search_seconds:.0f} |",
              flush=True)
        if args.json:
            print(json.dumps({"bound": bound, "rows": [r.model_dump() for r in report.rows],
                              "choice": choice.model_dump()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
