"""Orchestration overhead: the bare llama.cpp tools against `kiln export`, same model, same run.

    .venv/bin/python bench/export.py [--model DIR] [--quants q8_0,q4_k_m]

1. Bare tools: `convert_hf_to_gguf.py --outtype f16` as a subprocess, then
   `llama_model_quantize` for each quant type, each timed.
2. `kiln export DIR --quant ... --no-verify` in a subprocess with an empty cache
   (so it converts and quantizes for real), timed from outside.
3. A trivial Prefect flow in a subprocess: the temporary-server start-up that any
   local Prefect run pays, reported separately.
4. `kiln export` again with an empty cache against a Prefect server that is
   already running (PREFECT_API_URL): what a user running many exports pays.
5. `kiln export` again: the up-to-date re-run.
6. `kiln export` of a copy of the model whose config names an architecture the
   converter does not know: how long a refusal takes (it comes before Prefect starts).

Verification is left out of the comparison (the bare tools verify nothing); the
manifest's per-step timings are printed so its cost is visible too.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TRIVIAL_FLOW = """
from prefect import flow, task
@task
def one(): return 1
@flow
def trivial(): return one()
trivial()
"""


def bare_tools(model: Path, quants: list[str], work: Path, converter: Path) -> dict[str, float]:
    import llama_cpp

    from tasks.quantize import known_quant_types
    from tasks.toolchain import converter_env

    times: dict[str, float] = {}
    f16 = work / "bare-f16.gguf"
    cmd = [sys.executable, str(converter / "convert_hf_to_gguf.py"), "--outtype", "f16", "--outfile", str(f16), str(model)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=converter_env(converter), capture_output=True)
    times["convert f16"] = time.perf_counter() - t0
    devnull = os.open(os.devnull, os.O_WRONLY)
    saved_stderr = os.dup(2)
    for quant in quants:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = known_quant_types()[quant]
        params.nthread = os.cpu_count() or 1
        out = work / f"bare-{quant}.gguf"
        t0 = time.perf_counter()
        os.dup2(devnull, 2)  # libllama writes a line per tensor to stderr
        try:
            rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), ctypes.byref(params))
        finally:
            os.dup2(saved_stderr, 2)
        times[f"quantize {quant}"] = time.perf_counter() - t0
        if rc != 0:
            raise SystemExit(f"bare quantize {quant} failed (return code {rc})")
        out.unlink()
    os.close(devnull)
    os.close(saved_stderr)
    f16.unlink()
    return times


def kiln_export(model: Path, quants: list[str], out: Path, env: dict[str, str]) -> tuple[float, dict]:
    cmd = [str(Path(sys.executable).parent / "kiln"), "export", str(model), "--quant", ",".join(quants),
           "--out", str(out), "--no-verify", "--no-report", "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"kiln export failed:\n{proc.stderr[-3000:]}")
    return wall, json.loads(proc.stdout)


def refused_export(model: Path, work: Path, env: dict[str, str]) -> tuple[float, str]:
    """Time a refusal: the model's config and tokenizer, with an architecture no converter knows."""
    bad = work / "unknown-architecture"
    bad.mkdir()
    for item in model.iterdir():
        if item.suffix == ".json" or item.suffix == ".jinja":
            shutil.copy(item, bad / item.name)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["FrobnicatorForCausalLM"]
    (bad / "config.json").write_text(json.dumps(config))
    cmd = [str(Path(sys.executable).parent / "kiln"), "export", str(bad), "--out", str(work / "refused")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode == 0:
        raise SystemExit("the export of an unknown architecture was not refused")
    return wall, proc.stderr.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="Hugging Face folder (default: the demo model)")
    parser.add_argument("--quants", default="q8_0,q4_k_m")
    args = parser.parse_args()
    quants = args.quants.split(",")

    from tasks.demo import ensure_demo_model
    from tasks.toolchain import current_toolchain

    model = args.model or ensure_demo_model()[0]
    converter = Path(current_toolchain().converter_dir)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        work = Path(tmp)
        bare = bare_tools(model, quants, work, converter)
        bare_total = sum(bare.values())

        env = {**os.environ, "KILN_CACHE_DIR": str(work / "cache"), "LLAMA_CPP_DIR": str(converter),
               "PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        kiln_wall, manifest = kiln_export(model, quants, work / "out", env)

        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", TRIVIAL_FLOW], check=True, capture_output=True, env=env)
        prefect_startup = time.perf_counter() - t0

        rerun_wall, _ = kiln_export(model, quants, work / "out", env)
        refusal_wall, refusal = refused_export(model, work, env)

        from tests.support.prefect_server import PrefectServer

        server = PrefectServer.start(work / "server-home")
        try:
            served_env = {**env, "KILN_CACHE_DIR": str(work / "cache2"), "PREFECT_API_URL": server.api_url}
            served_wall, served = kiln_export(model, quants, work / "out2", served_env)
        finally:
            server.stop()

    print(f"model: {model}")
    print("bare tools (s): " + ", ".join(f"{k} {v:.2f}" for k, v in bare.items()) + f"; total {bare_total:.2f}")
    print(f"kiln export, wall (s): {kiln_wall:.2f}; steps inside the flow: "
          + ", ".join(f"{k} {v:g}" for k, v in manifest["timings"].items()))
    print(f"prefect: a trivial local flow run takes {prefect_startup:.2f} s (temporary server start-up + one task)")
    print(f"ratio kiln/bare, whole command: {kiln_wall / bare_total:.2f}")
    print(f"ratio kiln/bare, without Prefect's start-up: {(kiln_wall - prefect_startup) / bare_total:.2f}")
    print(f"ratio kiln/bare, steps inside the flow: {manifest['timings']['total'] / bare_total:.2f}")
    print(f"kiln export against a running Prefect server, wall (s): {served_wall:.2f}; steps: "
          + ", ".join(f"{k} {v:g}" for k, v in served["timings"].items()))
    print(f"ratio kiln/bare with a running server: {served_wall / bare_total:.2f}")
    print(f"up-to-date re-run, wall (s): {rerun_wall:.2f}")
    print(f"refusal of an unknown architecture, wall (s): {refusal_wall:.2f} ({refusal[:100]})")


if __name__ == "__main__":
    main()
