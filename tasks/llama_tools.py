"""llama.cpp's own command-line tools, built once from the source Kiln's converter comes from.

Why binaries, when everything else goes through llama-cpp-python: an importance matrix and
per-tensor type overrides reach libllama's quantizer only as C++ objects
(`llama_model_quantize_params.imatrix` is a `std::unordered_map<std::string, std::vector<float>>*`,
`.tensor_types` a `std::vector<tensor_quantization>*`), which ctypes cannot build. So
`llama-imatrix`, `llama-quantize` and `llama-gguf-split` are compiled by `kiln setup` from the
`vendor/llama.cpp` of the very llama-cpp-python source distribution that the converter is taken
from: one llama.cpp commit converts, quantizes, computes matrices and verifies.

They are linked statically (nothing to find at run time) with the portable CPU flags of the
llama-cpp-python build (`GGML_NATIVE=OFF`: a native build segfaults on these CPUs, TOOLCHAIN.md),
plus whatever `CMAKE_ARGS` the user gave that build (`-DGGML_CUDA=on` on a GPU worker). Only the
three tools and what they link are built: about 140 compile steps, against the ~200 of the wheel.
`LLAMA_CPP_DIR` (a user's own checkout) uses that checkout's `build/bin/` instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final, Literal

from tasks import settings
from tasks.errors import ToolchainError
from tasks.files import atomic_dir, cache_dir, sha256_file
from tasks.toolchain import download_sdist, llama_cpp_python_version

ToolName = Literal["llama-quantize", "llama-imatrix", "llama-gguf-split"]
TOOLS: Final[tuple[ToolName, ...]] = ("llama-quantize", "llama-imatrix", "llama-gguf-split")
_STAMP: Final = "kiln-tools.json"
# Everything else llama.cpp can build is off: no server, tests, examples, network or shared libraries.
_CMAKE_OPTIONS: Final = (
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_COMMON=ON",
)


def tools_dir() -> Path:
    """Where the built tools live: beside the llama-cpp-python they match, one folder per version.

    That is the environment Kiln is installed in (`sys.prefix`: they go with the venv, like the wheel,
    and every `KILN_CACHE_DIR` finds them), or Kiln's cache where that environment is read-only.
    """
    name = f"llama-tools-{llama_cpp_python_version()}"
    prefix = Path(sys.prefix) / "share" / "kiln"
    if os.access(prefix if prefix.exists() else Path(sys.prefix), os.W_OK):
        return prefix / name
    return cache_dir() / "toolchain" / name


def llama_tool(name: ToolName) -> Path:
    """The path of one built tool, checked against the hashes recorded when it was built.

    Raises:
        ToolchainError: the tools were never built (or were changed since): the message names
            `kiln setup`, or for `LLAMA_CPP_DIR` the build command for that checkout.
    """
    override = settings.llama_cpp_dir()
    if override is not None:
        path = override / "build" / "bin" / name
        if not os.access(path, os.X_OK):
            raise ToolchainError(
                f"LLAMA_CPP_DIR={override} has no built {name}; build it there with "
                f"`cmake -B build && cmake --build build --target {name}`"
            )
        return path
    root = tools_dir()
    recorded = _read_stamp(root)
    path = root / "bin" / name
    if recorded is None or name not in recorded.get("tools", {}) or not path.is_file():
        raise ToolchainError(f"llama.cpp's {name} is not built for llama-cpp-python "
                             f"{llama_cpp_python_version()}; run `kiln setup` once (it builds it, a few minutes)")
    if sha256_file(path) != recorded["tools"][name]:
        raise ToolchainError(f"{path} differs from the {name} `kiln setup` built; run `kiln setup` to rebuild it")
    return path


def tools_built() -> bool:
    """Whether every tool is built and intact (no error, for `kiln setup` and status lines)."""
    try:
        for name in TOOLS:
            llama_tool(name)
    except ToolchainError:
        return False
    return True


def _read_stamp(root: Path) -> dict | None:
    try:
        recorded = json.loads((root / _STAMP).read_text())
    except (OSError, ValueError):  # absent or damaged: the tools cannot be trusted either
        return None
    return recorded if isinstance(recorded, dict) else None


@contextmanager
def _vendored_llama_cpp(sdist: Path) -> Iterator[Path]:
    """The source distribution's `vendor/llama.cpp`, extracted into a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="kiln-llama-src-") as tmp, tarfile.open(sdist) as tar:
        top = tar.getmembers()[0].name.split("/")[0]
        prefix = f"{top}/vendor/llama.cpp/"
        wanted = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        if not wanted:
            raise ToolchainError(f"{sdist.name} carries no vendor/llama.cpp to build llama.cpp's tools from")
        tar.extractall(tmp, members=wanted, filter="data")
        yield Path(tmp) / prefix


def build_llama_tools(sdist: Path | None = None, *, log: Path | None = None) -> Path:
    """Build the tools once per llama-cpp-python version (no-op when built and intact); return their folder.

    Args:
        sdist: the llama-cpp-python source distribution already on disk; else pip fetches it.
        log: where CMake's output goes (kept on failure, for the message); a temporary file if None.

    Raises:
        ToolchainError: no C++ toolchain, or the build failed (the message names the log).
    """
    override = settings.llama_cpp_dir()
    if override is not None:  # a user's own checkout is built by its owner, never by Kiln
        return llama_tool(TOOLS[0]).parent
    root = tools_dir()
    if tools_built():
        return root
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        raise ToolchainError("building llama.cpp's tools needs cmake and a C++ compiler "
                             "(Debian: apt-get install cmake build-essential)")
    version = llama_cpp_python_version()
    with tempfile.TemporaryDirectory(prefix="kiln-sdist-") as download:
        archive = sdist or download_sdist(version, Path(download))
        log = log or root.with_name(f"{root.name}.build.log")
        with _vendored_llama_cpp(archive) as source, atomic_dir(root) as staging:
            build = staging / "build"
            generator = ["-G", "Ninja"] if shutil.which("ninja") else []
            configure = ["cmake", "-S", str(source), "-B", str(build), *generator, *_CMAKE_OPTIONS,
                         *settings.cmake_args()]
            compile_ = ["cmake", "--build", str(build), "--target", *TOOLS, "-j", str(os.cpu_count() or 1)]
            with open(log, "w") as out:
                for command in (configure, compile_):
                    if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                        raise ToolchainError(f"building llama.cpp's tools failed; CMake's output is in {log}")
            (staging / "bin").mkdir()
            hashes = {}
            for name in TOOLS:
                shutil.copy2(build / "bin" / name, staging / "bin" / name)
                hashes[name] = sha256_file(staging / "bin" / name)
            shutil.rmtree(build)
            (staging / _STAMP).write_text(json.dumps({
                "llama_cpp_python": version,
                "sdist": archive.name,
                "sdist_sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
                "cmake_args": [*_CMAKE_OPTIONS, *settings.cmake_args()],
                "tools": hashes,
            }, indent=2))
    return root
