"""The batch against the bare llama.cpp tools, and a second identical batch against the first.

    .venv/bin/python bench/batch.py [--model DIR] [--quants q8_0,q4_k_m,q5_k_m,q6_k]

Targets (one base × four quant types, verification and the quality report off: the bare tools
check and measure nothing):
- first batch run, wall time <= 1.2 × (one bare conversion + four bare quantizations),
  both measured in this same run, on an empty Kiln cache and an empty Prefect home;
- second identical batch run <= 10 % of the first run's wall time.

1. Bare tools: `convert_hf_to_gguf.py --outtype f16` as a subprocess, then
   `llama_model_quantize` for each quant type, one after another with every core.
2. In one child process (fresh KILN_CACHE_DIR and PREFECT_HOME, converter tree shared through
   LLAMA_CPP_DIR, the Go renderer's build copied): a trivial flow first, so the temporary Prefect server's start-up, paid once
   a process, is measured apart; then `batch_export` over a one-item catalogue, timed around the
   call: run 1 (real work), run 2 (identical: the folder is up to date), run 3 (`force`: the
   export runs again and its conversion and quantizations come from Prefect's cross-run cache).
   The runs are made as `kiln batch` makes them: without flow-run heartbeats (flows/heartbeats.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.export import bare_tools  # noqa: E402  (the same bare tools as the export benchmark)

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from prefect import flow, task
@task
def one(): return 1
@flow
def trivial(): return one()
trivial()
startup = time.perf_counter() - t0
from flows.batch import batch_export
from flows.heartbeats import without_heartbeats
runs = []
for label, force in (("first", False), ("second", False), ("forced", True)):
    t = time.perf_counter()
    with without_heartbeats():  # as `kiln batch` runs it
        state = batch_export(sys.argv[1], force=force, return_state=True)
    wall = time.perf_counter() - t
    rows = state.result() if state.is_completed() else str(state.message)
    timings = json.loads(open(rows[0]["out_dir"] + "/manifest.json").read())["timings"] if state.is_completed() else {}
    runs.append({"run": label, "wall": wall, "state": state.name, "rows": rows, "timings": timings})
print("BENCH-JSON " + json.dumps({"startup": startup, "runs": runs}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="Hugging Face folder (default: the demo model)")
    parser.add_argument("--quants", default="q8_0,q4_k_m,q5_k_m,q6_k")
    args = parser.parse_args()
    quants = args.quants.split(",")

    import logging

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    from tasks.demo import ensure_demo_model
    from tasks.toolchain import current_toolchain

    model = (args.model or ensure_demo_model()[0]).resolve()
    converter = Path(current_toolchain().converter_dir)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-batch-") as tmp:
        work = Path(tmp)
        bare = bare_tools(model, quants, work, converter)
        bare_total = sum(bare.values())

        catalogue = work / "catalogue.yaml"
        catalogue.write_text(json.dumps({
            "out_root": str(work / "out"),
            "defaults": {"verify": False, "placement": "local", "options": {"report": False}},
            "bases": [{"source": str(model), "name": "bench", "quants": quants}],
        }))
        # Machine set-up is shared, as with `kiln setup` done once: the converter tree (LLAMA_CPP_DIR)
        # and the Go template renderer's build. Everything a model adds (probe, GGUF, records) starts empty.
        from tasks.files import cache_dir

        if (cache_dir() / "gorender").is_dir():
            shutil.copytree(cache_dir() / "gorender", work / "cache" / "gorender")
        env = {**os.environ, "KILN_CACHE_DIR": str(work / "cache"), "LLAMA_CPP_DIR": str(converter),
               "PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_LOGGING_LEVEL": "WARNING"}
        proc = subprocess.run([sys.executable, "-c", CHILD, str(catalogue)], capture_output=True, text=True,
                              env=env, cwd=REPO)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH-JSON ")), None)
        if proc.returncode != 0 or line is None:
            raise SystemExit(f"batch runs failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        result = json.loads(line.removeprefix("BENCH-JSON "))

    runs = {r["run"]: r for r in result["runs"]}
    first, second, forced = runs["first"], runs["second"], runs["forced"]
    for run in (first, second, forced):
        if run["state"] != "Completed":
            raise SystemExit(f"batch run {run['run']} ended {run['state']}: {run['rows']}")
    limit_first = 1.2 * bare_total
    print(f"model: {model}; quant types: {', '.join(quants)}; {os.cpu_count()} cores")
    print("bare tools (s): " + ", ".join(f"{k} {v:.2f}" for k, v in bare.items()) + f"; total {bare_total:.2f}")
    print(f"prefect temporary server start-up + trivial flow (once a process, not in the runs): {result['startup']:.2f} s")
    print(f"batch run 1 (empty caches), wall: {first['wall']:.2f} s = {first['wall'] / bare_total:.2f} × bare "
          f"(target <= 1.20 × = {limit_first:.2f} s): {'PASS' if first['wall'] <= limit_first else 'FAIL'}")
    print("  steps inside run 1's export (s): " + ", ".join(f"{k} {v:g}" for k, v in first["timings"].items()))
    print("  (preflight's converter probe runs beside the base conversion, started as soon as the other checks pass)")
    print(f"batch run 2 (identical), wall: {second['wall']:.2f} s = {100 * second['wall'] / first['wall']:.1f} % of run 1 "
          f"(target <= 10 %): {'PASS' if second['wall'] <= 0.1 * first['wall'] else 'FAIL'}; "
          f"item status: {second['rows'][0]['status']}")
    print(f"batch run 3 (force: export again, conversions from Prefect's cache), wall: {forced['wall']:.2f} s "
          f"= {100 * forced['wall'] / first['wall']:.1f} % of run 1; item status: {forced['rows'][0]['status']}")


if __name__ == "__main__":
    main()
