"""Adapter records, errors and constants shared by every adapter module."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from registry.models import AdapterMode, SourceFile
from tasks.errors import KilnError

ADAPTER_MODES: tuple[AdapterMode, ...] = ("merge", "adapter", "peft")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Tokenizer files an adapter that added tokens ships beside its weights.
ADAPTER_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
)
_PEFT_PREFIX = "base_model.model."
_LORA_RE = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")
_DORA_RE = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.weight)?$")
_LORA_GGUF_SUFFIXES = (".lora_a", ".lora_b")


class AdapterIncompatible(KilnError):
    """The adapter does not fit the base (another base, another vocabulary, targets it lacks)."""


class AdapterModeUnsupported(KilnError):
    """The adapter is valid, but the chosen `--adapter-mode` cannot apply it; the message names one that can."""


class MergeFailed(KilnError):
    """A streaming merge met GGUF files that do not belong together."""


class LoraLayoutUnknown(KilnError):
    """The base's own conversion does not show where an adapter's tensors go in its GGUF (the reason says why).

    Internal: `apply_adapter` answers it by running `convert_lora_to_gguf.py` instead.
    """


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


class AdapterInfo(BaseModel):
    """What validation learned about an adapter; the manifest stores it (sha256 and files)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    sha256: str = Field(
        ..., description="The adapter's identity: sha256 over its files (config in canonical form), wherever the folder is."
    )
    files: list[SourceFile]
    base_model_name_or_path: str | None
    rank: int
    alpha: float
    ranks: list[int] = Field(..., description="Every rank the adapter's tensors have (several with rank_pattern).")
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    scale_rule: Literal["alpha/r", "alpha/sqrt(r)"]
    target_modules: list[str] = Field(..., description="Leaf module names the adapter's weights adapt.")
    adapted_weights: int = Field(..., description="How many weight matrices the adapter changes.")
    modules_to_save: list[str] = Field(default_factory=list)
    full_tensors: list[str] = Field(default_factory=list, description="Tensors the adapter replaces whole.")
    base_vocab_size: int
    adapter_vocab_size: int | None = Field(None, description="Embedding rows the adapter brings, if it brings any.")
    adapter_tokenizer_size: int | None = Field(None, description="Tokens in the adapter's own tokenizer, if it ships one.")
    ships_tokenizer: bool = False
    unsupported: dict[str, str] = Field(
        default_factory=dict, description="Mode -> why that mode cannot apply this adapter; absent modes can."
    )
    needs_scale_fold: bool = Field(
        False, description="peft's scale differs from llama.cpp's alpha/r (rslora, alpha_pattern); folded into lora_B."
    )
    notes: list[str] = Field(default_factory=list)

    @property
    def supported_modes(self) -> list[AdapterMode]:
        return [m for m in ADAPTER_MODES if m not in self.unsupported]

    @property
    def vocab_resized(self) -> bool:
        return self.adapter_vocab_size is not None and self.adapter_vocab_size != self.base_vocab_size

    def check_mode(self, mode: AdapterMode) -> None:
        """Raise `AdapterModeUnsupported` when `mode` cannot apply this adapter."""
        if mode not in ADAPTER_MODES:
            raise AdapterModeUnsupported(f"unknown adapter mode {mode!r}; use one of {', '.join(ADAPTER_MODES)}")
        if mode in self.unsupported:
            others = [m for m in self.supported_modes]
            hint = f" Use --adapter-mode {' or '.join(others)}." if others else ""
            raise AdapterModeUnsupported(
                f"--adapter-mode {mode} cannot apply the adapter {self.path}: {self.unsupported[mode]}.{hint}"
            )


class AdapterOutput(BaseModel):
    """What one adapter mode produced, for the flow and the manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: AdapterMode
    adapter_sha256: str
    gguf: str = Field(..., description="merge/peft: the merged float GGUF that quantization starts from; adapter: the base GGUF.")
    lora_gguf: str | None = Field(
        None, description="The GGUF LoRA (adapter mode: the Modelfile's ADAPTER; merge: its input, when the converter ran)."
    )
    reused: bool = Field(False, description="The result came from the cache.")
    seconds: float = 0.0
