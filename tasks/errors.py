"""Kiln's one exception family.

Every refusal a user can act on is a `KilnError`: its message says what is
wrong and how to fix it. The `kiln` command prints the message without a
traceback and exits non-zero; anything that is not a `KilnError` is a bug.
"""

from __future__ import annotations


class KilnError(Exception):
    """Base of every error Kiln raises on purpose."""

    exit_code: int = 2


class SpecInvalid(KilnError):
    """A registry entry, request or catalogue failed validation."""


class UnknownBaseModel(KilnError):
    """A registry key that the curated registry does not hold."""


class SourceInvalid(KilnError):
    """A source that cannot be exported as given (no config.json, not a model, ...)."""


class RevisionNotPinned(KilnError):
    """A Hub revision that is a branch or tag where a 40-hex commit SHA is required."""


class ArchitectureUnsupported(KilnError):
    """`config.json`'s architecture is not one the pinned converter registers."""


class PreTokenizerUnknown(KilnError):
    """The tokenizer's pre-tokenizer hash is not in the converter's known list."""


class SpecMismatch(KilnError):
    """The spec's `gguf_arch` / `tokenizer_pre` disagree with what the converter writes."""


class QuantTypeUnknown(KilnError):
    """A quant type libllama does not know."""


class RequantizeRefused(KilnError):
    """A prebuilt quantized GGUF would be quantized to no requested type: every one has more bits, or
    needs `--allow-requantize`."""


class OutputDirInvalid(KilnError):
    """The output folder is a file, not writable, or a name escapes its folder."""


class NotEnoughDisk(KilnError):
    """Free disk space is below the estimate of every file the run will write."""


class ToolchainError(KilnError):
    """llama-cpp-python or the converter source is missing or inconsistent."""


class ConversionFailed(KilnError):
    """The converter subprocess failed; the message carries its cause."""


class QuantizationFailed(KilnError):
    """libllama's quantizer returned an error."""


class VerificationFailed(KilnError):
    """A written GGUF did not load, ran away, or disagreed with the reference."""


class SourceCorrupt(KilnError):
    """A source file failed verification: wrong sha256, truncated, a missing shard, a path escaping its folder."""


class RepoGated(KilnError):
    """The Hub answered 401/403: a gated or private repo, and no token with access was sent."""


class RemoteCodeRefused(KilnError):
    """The model needs custom code (`auto_map`) and its spec does not say `trust_remote_code: true`."""


class PickleRefused(KilnError):
    """The only weights are pickles (`*.bin`, `*.pt`, `*.pth`), and `--allow-pickle` was not given."""


class HubUnreachable(KilnError):
    """The Hub could not be reached (or offline mode is on) and the cache lacks the pinned revision."""
