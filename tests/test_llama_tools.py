"""llama.cpp's tools built by `kiln setup` (tasks/llama_tools.py): found, run, and refused when changed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tasks import llama_tools
from tasks.errors import ToolchainError
from tasks.llama_tools import TOOLS, llama_tool


@pytest.mark.parametrize("name", TOOLS)
def test_built_tool_runs(name):
    """Each tool `kiln setup` built is the real llama.cpp program: it prints its usage."""
    proc = subprocess.run([str(llama_tool(name)), "--help"], capture_output=True, text=True, timeout=60)
    assert "usage" in (proc.stdout + proc.stderr).lower(), proc.stderr[-2000:]


@pytest.fixture
def tools_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    copy = tmp_path / "llama-tools"
    shutil.copytree(llama_tools.tools_dir(), copy)
    monkeypatch.setattr(llama_tools, "tools_dir", lambda: copy)
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    return copy


def test_changed_tool_is_refused(tools_copy: Path):
    with open(tools_copy / "bin" / "llama-quantize", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ToolchainError, match=r"differs from the llama-quantize `kiln setup` built"):
        llama_tool("llama-quantize")
    assert not llama_tools.tools_built()


@pytest.mark.parametrize("damage", ["missing-tool", "missing-stamp", "garbage-stamp"])
def test_unbuilt_tools_name_kiln_setup(tools_copy: Path, damage: str):
    if damage == "missing-tool":
        (tools_copy / "bin" / "llama-imatrix").unlink()
    elif damage == "missing-stamp":
        (tools_copy / "kiln-tools.json").unlink()
    else:
        (tools_copy / "kiln-tools.json").write_text("{not json")
    with pytest.raises(ToolchainError, match=r"run `kiln setup` once"):
        llama_tool("llama-imatrix")


def test_own_checkout_without_a_build_names_the_build_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path))
    with pytest.raises(ToolchainError, match=r"cmake --build build --target llama-gguf-split"):
        llama_tool("llama-gguf-split")
