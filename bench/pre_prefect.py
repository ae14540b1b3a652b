"""What `kiln export` pays before conversion starts: the CLI's checks before Prefect, then the flow's
preflight and fetch (hashing), for a model Kiln has never seen (cold) and for the same model again
into a new folder (warm: no manifest there, so the up-to-date check cannot help).

    .venv/bin/python bench/pre_prefect.py --model DIR [--tree REPO] [--quant q8_0]

DIR: a model folder, e.g. one `bench/scale.py --size 1b --make DIR` wrote. `--tree` runs the
`kiln` of another checkout of this repository (a `git worktree` of an older commit) with this
venv, so two versions compare on one machine in one sitting.

Each run uses one fresh KILN_CACHE_DIR holding only the toolchain of the machine's cache (the
converter source, as `kiln setup` leaves it) and a Prefect server kept from a warm-up export of the
demo model, so neither the converter's extraction nor a server start is in the numbers. Printed
for each run: seconds until the CLI printed `exporting (` (its own checks before Prefect), the
seconds until conversion began (`convert` or `probe beside conversion` in the manifest's timings,
counted from the command's start), the whole wall time, and the flow's step timings.

Measured on the 2-CPU machine at load 5-8, 1.17B synthetic Llama (bench/scale.py --size 1b),
--quant q8_0, two runs each, before (861c47f) and after (the CLI leaves the probe to the flow where it
converts beside it; source hashes remembered by file identity, tasks/source_hashes.py):
- cold, before Prefect: 11.1 / 15.7 s before, 2.6 / 1.8 s after; conversion starts at 21.6 / 30.4 s
  before, 25.3 / 18.2 s after; wall 97 / 117 s before, 117 / 117 s after: on two busy cores the probe
  running beside the conversion slows it by about what it saves, so the cold wall time does not move.
- warm (same model, new folder): the flow's hashing 3.5 / 3.6 s before, 0.0 / 0.1 s after; wall
  10.0 / 11.3 s before, 8.2 / 10.5 s after. Hashing grows with the model (2.35 GB here; 16 GB at 8B).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def kiln_cmd(tree: Path) -> list[str]:
    code = f"import sys; sys.path.insert(0, {str(tree)!r}); from cli import main; main()"
    return [sys.executable, "-c", code]


def run(tree: Path, args: list[str], env: dict[str, str]) -> tuple[float, float | None, str]:
    """(wall seconds, seconds until `exporting (` appeared on stderr, stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([*kiln_cmd(tree), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    marker = None
    assert proc.stderr is not None
    err = []
    for line in proc.stderr:
        err.append(line)
        if marker is None and line.startswith("exporting ("):
            marker = time.perf_counter() - t0
    out = proc.stdout.read() if proc.stdout else ""
    proc.wait()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"kiln {' '.join(args)} failed:\n{''.join(err[-30:])}")
    return wall, marker, out



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--tree", type=Path, default=REPO, help="checkout whose kiln runs (default: this one)")
    parser.add_argument("--quant", default="q8_0")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from tasks.settings import cache_root

    machine_cache = cache_root()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-pre-") as work:
        cache = Path(work) / "cache"
        shutil.copytree(machine_cache / "toolchain", cache / "toolchain", symlinks=True)
        env = {**os.environ, "KILN_CACHE_DIR": str(cache), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)
        run(args.tree, ["demo", "--out", str(Path(work) / "warmup"), "--no-verify", "--no-report"], env)
        print(f"tree {args.tree} ({subprocess.run(['git', '-C', str(args.tree), 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()}), "
              f"model {args.model}, --quant {args.quant}, load {os.getloadavg()[0]:.1f}")
        print("| run | before Prefect (s) | conversion starts (s) | wall (s) | flow steps (s) |")
        print("| --- | ---: | ---: | ---: | --- |")
        for label in ("cold", "warm"):
            out = Path(work) / f"out-{label}"
            wall, marker, stdout = run(args.tree, ["export", str(args.model), "--quant", args.quant, "--out", str(out),
                                                   "--no-verify", "--no-report", "--json"], env)
            timings = json.loads(stdout)["timings"]
            before_convert = sum(v for k, v in timings.items() if k in ("preflight", "fetch"))
            flow_start = wall - timings["total"]
            starts = flow_start + before_convert
            steps = ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
            print(f"| {label} | {marker:.1f} | {starts:.1f} | {wall:.1f} | {steps} |", flush=True)
        print(f"load after: {os.getloadavg()[0]:.1f}")
        from flows.local_server import stop_kept_server

        stop_kept_server(cache / "prefect-server")


if __name__ == "__main__":
    main()
