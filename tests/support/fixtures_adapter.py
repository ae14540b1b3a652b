"""A real peft LoRA adapter on the demo model, made once per session, and the outputs of each mode.

The adapter is made the way a user makes one: transformers loads the base, peft wraps it
(`LoraConfig(r=16, lora_alpha=32)` over the seven projections), and `save_pretrained` writes it.
peft initialises lora_B to zero, which would make every merge a no-op, so lora_B is filled with
seeded Gaussian noise first: the merged weights really differ from the base.

Import the fixtures into a test module (`from fixtures_adapter import ...`); pytest picks them up.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_B_STD = 0.05


def make_peft_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    r: int = 16,
    alpha: int = 32,
    targets: list[str] | None = None,
    seed: int = 0,
    b_std: float = LORA_B_STD,
    **lora_kwargs,
) -> Path:
    """Save a peft LoRA adapter for the model in `base_dir` to `out_dir`, with non-zero, seeded lora_B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)  # lora_A's initialisation: the same adapter, byte for byte, every session
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets or SEVEN_PROJECTIONS), task_type="CAUSAL_LM", **lora_kwargs
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * b_std)
    peft_model.save_pretrained(out_dir)
    del peft_model, model
    return Path(out_dir)


@pytest.fixture(scope="session")
def peft_adapter(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rank 16, alpha 32, the seven projections of SmolLM2-135M-Instruct, lora_B randomised (seed 0)."""
    return make_peft_adapter(demo_model_dir, tmp_path_factory.mktemp("adapter") / "smollm2-lora-r16")


@pytest.fixture(scope="session")
def adapter_info(peft_adapter: Path, demo_model_dir: Path):
    from registry import get_base
    from tasks.adapter import validate_adapter

    return validate_adapter(peft_adapter, demo_model_dir, get_base("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def demo_base_key(demo_model_dir: Path) -> str:
    """The demo export's conversion key: the session's `demo_f16_gguf` is that cache entry."""
    from tests.support.model_folders import folder_conversion_key

    return folder_conversion_key(demo_model_dir, kind="demo")


@pytest.fixture(scope="session")
def lora_gguf(adapter_info, demo_model_dir: Path, toolchain) -> Path:
    """The adapter as a GGUF LoRA by the pinned convert_lora_to_gguf.py (cached by adapter sha256)."""
    from tasks.adapter import convert_adapter_to_gguf

    return convert_adapter_to_gguf(Path(adapter_info.path), demo_model_dir, toolchain, info=adapter_info)[0]


@pytest.fixture(scope="session")
def merged_gguf(adapter_info, demo_model_dir: Path, demo_f16_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`--adapter-mode merge`'s result: the peft adapter streamed into the cached f16 base, placed by the
    layout learned from that base's own conversion (the merge always recomputed)."""
    from tasks.adapter import merge_peft_adapter

    out = tmp_path_factory.mktemp("merged") / "merged-f16.gguf"
    return merge_peft_adapter(Path(adapter_info.path), demo_model_dir, demo_f16_gguf, out, adapter_info)


@pytest.fixture(scope="session")
def converter_merged_gguf(lora_gguf: Path, demo_f16_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The merge mode's fallback: the converter's GGUF LoRA streamed into the cached f16 base (always recomputed)."""
    from tasks.adapter import merge_lora_gguf

    return merge_lora_gguf(demo_f16_gguf, lora_gguf, tmp_path_factory.mktemp("merged") / "converter-merged-f16.gguf")


@pytest.fixture(scope="session")
def peft_output(adapter_info, demo_model_dir: Path, demo_base_key: str, toolchain):
    """`--adapter-mode peft`: transformers + peft merge_and_unload, save, convert."""
    from tasks.adapter import apply_adapter

    return apply_adapter(adapter_info, "peft", base_dir=demo_model_dir, base_gguf=None,
                         base_key=demo_base_key, toolchain=toolchain)
