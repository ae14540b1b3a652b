"""`BaseModelSpec`: curated metadata for one pretrained base model (seed 000).

Every field is strict: `extra="forbid"`, frozen, validated on instantiation.
A spec packs what the rest of Kiln needs to know about a base without
re-fetching Hub metadata at every decision point:

- `revision`: a 40-char commit SHA, never a branch, so an export made today
  pins exactly the same weights next year.
- `target_modules`: the LoRA target list for the architecture; adapter
  validation refuses targets outside it.
- `template`: the chat-template dialect the Modelfile's Go template comes from.
- `gguf_arch` / `tokenizer_pre`: what llama.cpp's converter writes for this
  model; preflight compares them with what the pinned converter really writes.
- licence fields: SPDX, acceptance gating and redistribution, each consumed
  by a different gate.
- `verified_by_standin` / `unverified_reason`: whether the suite exports a
  faithful stand-in of this base end to end, or why it cannot.
"""

from __future__ import annotations

import re
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from templates import Dialect, PlannedDialect

SHA_RE: Final[re.Pattern[str]] = re.compile(r"^[0-9a-f]{40}$")
HF_ID_PART_RE: Final[re.Pattern[str]] = re.compile(r"^[A-Za-z0-9._-]+$")
DEFAULT_PROMPT_TEMPERATURE: Final[float] = 0.7
DEFAULT_REASONING_PROMPT_TEMPERATURE: Final[float] = 0.6


class VlPreprocessorPlan(BaseModel):
    """Per-base vision preprocessing, pinned so cache keys stay stable.

    `target_size` is `(height, width)` in pixels; `image_token` is the textual
    placeholder the processor expands into `num_image_tokens` copies.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_size: tuple[int, int] = Field(..., description="(height, width) in pixels")
    resize_policy: Literal["fixed", "dynamic"] = "fixed"
    image_token: str = Field(..., min_length=1, description="Placeholder token string")
    num_image_tokens: int = Field(..., gt=0, description="Tokens consumed per image")

    @field_validator("target_size")
    @classmethod
    def _validate_target_size(cls, value: tuple[int, int]) -> tuple[int, int]:
        h, w = value
        if h <= 0 or w <= 0:
            raise ValueError(f"target_size must be positive, got {value!r}")
        return value


class AudioPreprocessorPlan(BaseModel):
    """Per-base audio preprocessing; audio at another `sample_rate` is refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sample_rate: int = Field(..., gt=0, description="Hz; refuse on mismatch")
    max_length_seconds: float = Field(..., gt=0.0)
    audio_token: str = Field(..., min_length=1, description="Placeholder token string")
    num_audio_tokens: int = Field(..., gt=0, description="Tokens reserved per clip")


class BaseModelSpec(BaseModel):
    """Curated registry metadata for one base model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(..., min_length=1, description="Registry slug (e.g. `qwen2.5-1.5b`).")
    hf_id: str = Field(..., min_length=1, description="Hugging Face id, e.g. `Qwen/Qwen2.5-1.5B-Instruct`.")
    revision: str = Field(..., description="40-char commit SHA; never a branch.")
    architecture: str = Field(..., description="transformers `config.architectures[0]` value.")
    params: int = Field(..., gt=0, description="Parameter count; drives disk and memory estimates.")
    target_modules: list[str] = Field(..., min_length=1)
    template: Literal[Dialect, PlannedDialect]  # one flat Literal: one readable validation error
    gguf_arch: str = Field(..., min_length=1, description="Name llama.cpp's converter uses.")
    tokenizer_pre: str = Field(..., min_length=1, description="Pre-tokenizer label.")

    license_spdx: str = Field(..., min_length=1)
    license_url: str | None = None
    requires_acceptance: bool = False
    redistributable: bool = Field(..., description="True iff the licence allows shipping the base's weights.")
    # Only a spec that says True may pass `trust_remote_code=True` to
    # transformers; the default keeps non-custom bases from ever opting in.
    trust_remote_code: bool = False

    size_gb_fp16: float = Field(..., gt=0)
    context_length: int = Field(..., gt=0)
    context_length_effective: int | None = Field(None, gt=0)
    recommended_seq_len: int = Field(..., gt=0)
    reasoning_tuned: bool = False
    refresh_check_hf_gating: bool = True
    provenance_url: str | None = None
    provenance_match_text: str | None = None

    # What the test suite shows for this base without downloading it: a stand-in (its tokenizer
    # rebuilt from llama.cpp's own vocabularies, its config.json scaled down) exported end to end
    # (tests/test_families.py). Where no faithful stand-in can be built, the reason says why.
    verified_by_standin: bool = False
    unverified_reason: str | None = Field(None, min_length=1)

    modality: Literal["text", "text-moe", "vision-language", "audio-language"] = "text"
    vl_preprocessor_plan: VlPreprocessorPlan | None = None
    audio_preprocessor_plan: AudioPreprocessorPlan | None = None

    @model_validator(mode="after")
    def _modality_matches_plan(self) -> BaseModelSpec:
        if self.modality == "vision-language":
            if self.vl_preprocessor_plan is None:
                raise ValueError(
                    f"base {self.key!r}: modality='vision-language' requires "
                    "a vl_preprocessor_plan (pinned image size + token shape)"
                )
            if self.audio_preprocessor_plan is not None:
                raise ValueError(
                    f"base {self.key!r}: audio_preprocessor_plan is invalid on a vision-language base"
                )
        elif self.modality == "audio-language":
            if self.audio_preprocessor_plan is None:
                raise ValueError(
                    f"base {self.key!r}: modality='audio-language' requires "
                    "an audio_preprocessor_plan (pinned sample_rate + token shape)"
                )
            if self.vl_preprocessor_plan is not None:
                raise ValueError(
                    f"base {self.key!r}: vl_preprocessor_plan is invalid on an audio-language base"
                )
        else:
            if self.vl_preprocessor_plan is not None:
                raise ValueError(
                    f"base {self.key!r}: vl_preprocessor_plan only valid with modality='vision-language'"
                )
            if self.audio_preprocessor_plan is not None:
                raise ValueError(
                    f"base {self.key!r}: audio_preprocessor_plan only valid with modality='audio-language'"
                )
        return self

    @model_validator(mode="after")
    def _effective_context_length_is_bounded(self) -> BaseModelSpec:
        if (
            self.context_length_effective is not None
            and self.context_length_effective > self.context_length
        ):
            raise ValueError(
                f"base {self.key!r}: context_length_effective={self.context_length_effective} "
                f"cannot exceed context_length={self.context_length}"
            )
        return self

    @model_validator(mode="after")
    def _provenance_probe_is_complete(self) -> BaseModelSpec:
        url_set = self.provenance_url is not None
        text_set = self.provenance_match_text is not None
        if url_set != text_set:
            raise ValueError(
                f"base {self.key!r}: provenance_url and provenance_match_text must be set together"
            )
        if not self.refresh_check_hf_gating and not url_set:
            raise ValueError(
                f"base {self.key!r}: refresh_check_hf_gating=False requires a "
                "first-party provenance_url + provenance_match_text"
            )
        return self

    @model_validator(mode="after")
    def _verified_or_unverified(self) -> BaseModelSpec:
        if self.verified_by_standin and self.unverified_reason is not None:
            raise ValueError(
                f"base {self.key!r}: verified_by_standin=true and an unverified_reason contradict each other"
            )
        return self

    @property
    def standin_status(self) -> str:
        """One line: verified by a stand-in, or why not, or never checked."""
        if self.verified_by_standin:
            return "verified by a stand-in export"
        if self.unverified_reason:
            return f"unverified: {self.unverified_reason}"
        return "not checked by a stand-in"

    @property
    def suggested_prompt_temperature(self) -> float:
        """Reasoning-tuned bases run cooler so their control tokens stay stable."""
        if self.reasoning_tuned:
            return DEFAULT_REASONING_PROMPT_TEMPERATURE
        return DEFAULT_PROMPT_TEMPERATURE

    @property
    def effective_context_length(self) -> int:
        """The practical context ceiling: the effective length when pinned, else the nominal one."""
        return self.context_length_effective or self.context_length

    @field_validator("revision")
    @classmethod
    def _validate_revision(cls, value: str) -> str:
        if not SHA_RE.fullmatch(value):
            raise ValueError(f"revision must be a 40-char lowercase hex SHA, got {value!r}")
        return value

    @field_validator("hf_id")
    @classmethod
    def _validate_hf_id(cls, value: str) -> str:
        if "/" not in value or value.startswith("/") or value.endswith("/"):
            raise ValueError(f"hf_id must be 'org/name', got {value!r}")
        org, _, name = value.partition("/")
        if not org or not name or "/" in name:
            raise ValueError(f"hf_id must be 'org/name' (single `/`), got {value!r}")
        # The Hub's own rules for repo ids; they also keep the id from naming a path outside the Hub cache.
        for part in (org, name):
            if (not HF_ID_PART_RE.fullmatch(part) or "--" in part or ".." in part
                    or part[0] in "-." or part[-1] in "-."):
                raise ValueError(
                    f"hf_id {value!r}: {part!r} is not a Hub name (letters, digits, '-', '_', '.'; "
                    "no '--' or '..'; not starting or ending with '-' or '.')"
                )
        if len(value) > 96:
            raise ValueError(f"hf_id {value!r} is {len(value)} characters; the Hub allows at most 96")
        return value

    @field_validator("target_modules")
    @classmethod
    def _validate_target_modules(cls, value: list[str]) -> list[str]:
        if any(not m for m in value):
            raise ValueError("target_modules must not contain empty strings")
        return value
