"""The llama.cpp toolchain: the installed llama-cpp-python and the converter from the same source.

Converter and runtime must never disagree, so the converter scripts
(`convert_hf_to_gguf.py`, its `conversion/` package, `convert_lora_to_gguf.py`)
and the `gguf-py` they import are taken from the source distribution of the
very llama-cpp-python version that is installed. They are extracted once into
the cache, and a tree hash recorded at extraction is checked on every use.
`LLAMA_CPP_DIR` points at a user's own llama.cpp checkout instead.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from tasks import settings
from tasks.errors import ToolchainError
from tasks.files import atomic_dir, cache_dir

# What the converter needs from a llama.cpp tree; nothing else is extracted.
CONVERTER_MEMBERS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py")
_SOURCE_STAMP = "kiln-source.json"


class Toolchain(BaseModel):
    """What produced the GGUF files, recorded in every manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    llama_cpp_python: str
    converter_source: str
    converter_dir: str
    converter_sha256: str
    gguf_py_version: str

    @property
    def cache_key(self) -> str:
        """Changes whenever runtime or converter change, so cached conversions are rebuilt."""
        return hashlib.sha256(f"{self.llama_cpp_python}:{self.converter_sha256}".encode()).hexdigest()[:16]


def llama_cpp_python_version() -> str:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        raise ToolchainError(
            "llama-cpp-python is not installed. Install it from source with "
            'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python (see README).'
        ) from None


def tree_sha256(root: Path, members: tuple[str, ...] = CONVERTER_MEMBERS) -> str:
    """One hash over the converter's Python files (paths and contents), in a stable order."""
    digest = hashlib.sha256()
    for member in members:
        base = root / member
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*.py") if p.is_file())
        for path in files:
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _check_tree(root: Path) -> None:
    missing = [m for m in CONVERTER_MEMBERS if not (root / m).exists()]
    if missing:
        raise ToolchainError(f"llama.cpp tree {root} lacks {', '.join(missing)}; it cannot convert models")


def download_sdist(version: str, into: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
        "--dest", str(into), f"llama-cpp-python=={version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sdists = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not sdists:
        raise ToolchainError(
            f"could not fetch the llama-cpp-python {version} source distribution for its converter "
            f"(pip said: {proc.stderr.strip()[-400:]}). Run `kiln setup` with package-index access, "
            "or set LLAMA_CPP_DIR to a llama.cpp checkout of the same version."
        )
    return sdists[0]


def _extract_converter(sdist: Path, dest: Path) -> None:
    with tarfile.open(sdist) as tar:
        top = tar.getmembers()[0].name.split("/")[0]
        prefix = f"{top}/vendor/llama.cpp/"
        wanted = []
        for member in tar.getmembers():
            if not member.name.startswith(prefix):
                continue
            rel = member.name[len(prefix):]
            if rel.split("/")[0] in CONVERTER_MEMBERS and (member.isfile() or member.isdir()):
                member.name = rel
                wanted.append(member)
        tar.extractall(dest, members=wanted, filter="data")
    _check_tree(dest)


def ensure_converter_source(sdist: Path | None = None) -> Path:
    """The llama.cpp tree the converter runs from; extracted and stamped on first use.

    `sdist` may name an already-downloaded source distribution (setup scripts pass
    the one pip built from); otherwise pip fetches it once.
    """
    override = settings.llama_cpp_dir()
    if override is not None:
        root = override.resolve()
        _check_tree(root)
        return root
    version = llama_cpp_python_version()
    root = cache_dir() / "toolchain" / f"llama-cpp-python-{version}"
    stamp = root / _SOURCE_STAMP
    if stamp.is_file():
        try:
            recorded = json.loads(stamp.read_text())
        except ValueError:  # a damaged stamp: the tree cannot be trusted either
            recorded = None
        if isinstance(recorded, dict) and recorded.get("tree_sha256") == tree_sha256(root):
            return root
        # A tree edited or damaged since extraction is replaced, never trusted.
    with tempfile.TemporaryDirectory(prefix="kiln-sdist-") as tmp:
        archive = sdist or download_sdist(version, Path(tmp))
        with atomic_dir(root) as staging:
            _extract_converter(archive, staging)
            sdist_sha = hashlib.sha256(archive.read_bytes()).hexdigest()
            (staging / _SOURCE_STAMP).write_text(json.dumps({
                "llama_cpp_python": version,
                "sdist": archive.name,
                "sdist_sha256": sdist_sha,
                "tree_sha256": tree_sha256(staging),
            }, indent=2))
    return root


@lru_cache(maxsize=None)
def _toolchain_for(root: Path, version: str, from_env: bool) -> Toolchain:
    gguf_version = "unknown"
    pyproject = root / "gguf-py" / "pyproject.toml"
    if pyproject.is_file():
        for line in pyproject.read_text().splitlines():
            if line.startswith("version"):
                gguf_version = line.split("=", 1)[1].strip().strip('"')
                break
    source = f"LLAMA_CPP_DIR={root}" if from_env else f"llama-cpp-python=={version} source distribution"
    return Toolchain(
        llama_cpp_python=version,
        converter_source=source,
        converter_dir=str(root),
        converter_sha256=tree_sha256(root),
        gguf_py_version=gguf_version,
    )


def current_toolchain() -> Toolchain:
    root = ensure_converter_source()
    return _toolchain_for(root, llama_cpp_python_version(), settings.llama_cpp_dir() is not None)


def converter_env(root: Path) -> dict[str, str]:
    """Environment for converter subprocesses: that tree's own gguf-py first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(root / "gguf-py"), str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env.pop("NO_LOCAL_GGUF", None)
    # It runs offline: no reason to hand it a Hub token.
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        env.pop(name, None)
    # The converter never needs the network; refuse it so a typo cannot trigger a Hub download.
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


_REGISTER_RE = re.compile(r"^[ \t]*@\w*\.register\(", re.MULTILINE)


def _registered_in(source: str) -> set[str]:
    """The string arguments of every `@<Class>.register(...)` decorator in `source`.

    Only the decorator calls are parsed (a whole-file AST of the converter's ~90 modules costs
    a third of a second, on the path of every first-sight export).
    """
    found: set[str] = set()
    for match in _REGISTER_RE.finditer(source):
        start = match.end() - 1  # the opening parenthesis
        depth, end = 0, start
        for end in range(start, len(source)):
            depth += {"(": 1, ")": -1}.get(source[end], 0)
            if depth == 0:
                break
        try:
            call = ast.parse(source[start: end + 1], mode="eval").body
        except SyntaxError:
            continue
        args = call.elts if isinstance(call, ast.Tuple) else [call]
        found.update(a.value for a in args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return found


@lru_cache(maxsize=None)
def registered_architectures(root: Path) -> frozenset[str]:
    """Text architectures the converter at `root` registers, read from its source without importing it.

    Newer llama.cpp keeps the registry in `conversion/__init__.py` (`TEXT_MODEL_MAP`);
    older trees register classes with `@ModelBase.register(...)` in `convert_hf_to_gguf.py`.
    """
    names: set[str] = set()
    registry = root / "conversion" / "__init__.py"
    if registry.is_file():
        tree = ast.parse(registry.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            target = getattr(node, "target", None) if isinstance(node, ast.AnnAssign) else None
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
            if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP" and isinstance(node.value, ast.Dict):
                names.update(k.value for k in node.value.keys if isinstance(k, ast.Constant))
    for script in [root / "convert_hf_to_gguf.py", *sorted((root / "conversion").glob("*.py"))]:
        if script.is_file():
            names.update(_registered_in(script.read_text(encoding="utf-8")))
    if not names:
        raise ToolchainError(f"found no registered architectures in the converter at {root}")
    return frozenset(names)
