"""Fixtures for registration tests: a fresh Ollama stand-in and small GGUF files.

Registered for every test by `pytest_plugins` in tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.ollama_standin import OllamaStandIn


@pytest.fixture
def ollama_standin() -> Iterator[OllamaStandIn]:
    """An `OllamaStandIn` (not Ollama) on an ephemeral loopback port."""
    server = OllamaStandIn().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_gguf(tmp_path: Path) -> Callable[..., Path]:
    """Write a tiny but valid GGUF file (metadata only, no tensors).

    `marker` lands in the metadata so different files get different digests;
    `architecture="adapter"` marks a LoRA adapter as convert_lora_to_gguf does.
    """
    import gguf

    def make(name: str = "model.gguf", marker: str = "kiln-test", adapter: bool = False) -> Path:
        path = tmp_path / name
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_string("general.name", marker)
        if adapter:
            writer.add_string("general.type", "adapter")
            writer.add_string("adapter.type", "lora")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    return make
