"""Every `KILN_*` environment setting, read when asked, never at import time.

One function a setting, so the README's table, the tests and the code name the same
thing, and a test that sets a variable after import still takes effect.

| variable | meaning | default |
| --- | --- | --- |
| `KILN_CACHE_DIR` | converted GGUFs, probes, the converter source, the demo model | `$XDG_CACHE_HOME/kiln` or `~/.cache/kiln` |
| `KILN_MEMORY_BUDGET` | memory every step together may use, e.g. `12GB` (`--memory-budget` sets it for one command) | the memory available when asked, less 5 % of the machine's (at least 1 GiB) |
| `KILN_QUANT_MEMORY_GB` | older name: GiB the parallel quantizations may use together; a budget of its own when set | the memory budget |
| `KILN_PREFECT_SERVER_KEEP` | seconds Kiln's local Prefect server stays up after its last command; `0`: a temporary server per command | `600` |
| `KILN_CONVERTER_HOST` | `0` runs every conversion as a plain subprocess | `1` (a forked host on Linux) |
| `KILN_PLACEMENT_POLL_SECONDS` | how often an export asks whether its cpu/gpu child run has finished | `2` |
| `LLAMA_CPP_DIR` | your own llama.cpp checkout instead of the pinned source's converter (its tools from its `build/bin/`) | unset |
| `CMAKE_ARGS` | flags for building llama-cpp-python, reused by `kiln setup` for llama.cpp's tools (`-DGGML_CUDA=on`) | unset |
| `KILN_POLICY_FILE` | the operator's policy for deployment runs (YAML, `deployments/policy.yaml`): roots, switches, keys | unset: both roots are the run's working folder, switches off |
| `KILN_SECRETS` | deployment runs: `VAR=block,...` fills each credential variable (`HF_TOKEN`, ...) from that Prefect Secret block | unset |
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from tasks.errors import KilnError


class SettingInvalid(KilnError):
    """An environment setting Kiln cannot read."""


def env_flag(name: str, default: bool = False) -> bool:
    """A yes/no variable: 1/on/yes/true (any case) is yes, 0/off/no/false is no, unset is `default`."""
    raw = os.environ.get(name, "").strip().upper()
    if not raw:
        return default
    if raw in ("1", "ON", "YES", "TRUE"):
        return True
    if raw in ("0", "OFF", "NO", "FALSE"):
        return False
    raise SettingInvalid(f"{name}={os.environ[name]!r} is not a yes/no value; use 1 or 0")


def _env_float(name: str, default: float, unit: str) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise SettingInvalid(f"{name}={raw!r} is not a number of {unit}") from None


def cache_root() -> Path:
    """`KILN_CACHE_DIR`, else the user's cache folder (`$XDG_CACHE_HOME/kiln` or `~/.cache/kiln`); not created."""
    explicit = os.environ.get("KILN_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "kiln"


def converter_host_enabled() -> bool:
    """`KILN_CONVERTER_HOST`: fork conversions from a host that imported the converter once (default yes)."""
    return env_flag("KILN_CONVERTER_HOST", default=True)


def placement_poll_seconds() -> float:
    """`KILN_PLACEMENT_POLL_SECONDS`: how often a parent export polls its convert-quantize child run."""
    return _env_float("KILN_PLACEMENT_POLL_SECONDS", 2.0, "seconds")


def memory_budget_bytes() -> int:
    """`KILN_MEMORY_BUDGET` (a size such as `12GB` or `800MiB`), else the memory available now less a reserve.

    Every step that holds weights sizes itself to this: verify's transformers comparison, the quant
    report, and how many quantizations run side by side; preflight refuses an export whose largest
    step is over it. The reserve (5 % of the machine's memory, at least 1 GiB) is for the kernel and
    whatever else starts meanwhile. Not a fraction of what is available: 80 % of the 19 GB a 24 GB
    machine had free refused an 8B export whose f16 GGUF (14.8 GB) fits (bench/scale.py).
    """
    from tasks.units import parse_size

    raw = os.environ.get("KILN_MEMORY_BUDGET", "").strip()
    if raw:
        try:
            budget = parse_size(raw)
        except KilnError:
            raise SettingInvalid(f"KILN_MEMORY_BUDGET={raw!r} is not a size; write it like 12GB or 800MiB") from None
        if budget <= 0:
            raise SettingInvalid(f"KILN_MEMORY_BUDGET={raw!r} must be more than zero")
        return budget
    import psutil

    memory = psutil.virtual_memory()
    return max(0, int(memory.available - max(1 << 30, memory.total * 0.05)))


def prefect_server_keep_seconds() -> float:
    """`KILN_PREFECT_SERVER_KEEP`: how long the local Prefect server outlives its last user (0: none kept)."""
    return _env_float("KILN_PREFECT_SERVER_KEEP", 600.0, "seconds")


def quant_memory_gib() -> float | None:
    """`KILN_QUANT_MEMORY_GB`: GiB the parallel quantizations may use together, or None for the default."""
    value = _env_float("KILN_QUANT_MEMORY_GB", -1.0, "GiB")
    return None if value < 0 else value


def llama_cpp_dir() -> Path | None:
    """`LLAMA_CPP_DIR`: a llama.cpp checkout whose converter replaces the pinned one."""
    raw = os.environ.get("LLAMA_CPP_DIR", "").strip()
    return Path(raw).expanduser() if raw else None


def cmake_args() -> list[str]:
    """`CMAKE_ARGS`: the flags the user gave llama-cpp-python's build (`-DGGML_CUDA=on`), reused for llama.cpp's tools."""
    try:
        return shlex.split(os.environ.get("CMAKE_ARGS", ""))
    except ValueError as exc:
        raise SettingInvalid(f"CMAKE_ARGS cannot be split into arguments ({exc})") from None


def policy_file() -> Path | None:
    """`KILN_POLICY_FILE`: the YAML policy deployment runs obey (tasks/policy.py); None: the defaults."""
    raw = os.environ.get("KILN_POLICY_FILE", "").strip()
    return Path(raw).expanduser() if raw else None


# Only credentials: a Secret block must not become PATH, LD_PRELOAD or PYTHONPATH.
_SECRET_VAR = re.compile(r"^(HF_TOKEN|HUGGING_FACE_HUB_TOKEN|[A-Z][A-Z0-9_]*_(TOKEN|KEY|PASSWORD|SECRET))$")


def secret_blocks() -> dict[str, str]:
    """`KILN_SECRETS`: `HF_TOKEN=hf-token[,VAR=block...]`, each credential variable and the Secret block holding it."""
    raw = os.environ.get("KILN_SECRETS", "").strip()
    pairs: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        var, sep, block = (x.strip() for x in part.partition("="))
        if not sep or not var or not block:
            raise SettingInvalid(f"KILN_SECRETS: {part!r} is not VAR=block; write e.g. KILN_SECRETS=HF_TOKEN=hf-token")
        if not _SECRET_VAR.match(var):
            raise SettingInvalid(f"KILN_SECRETS: {var!r} is not a credential variable (HF_TOKEN, or a name ending in "
                                 "_TOKEN, _KEY, _PASSWORD or _SECRET)")
        pairs[var] = block
    return pairs
