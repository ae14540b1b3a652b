"""The reference merge: transformers + peft `merge_and_unload`, save, convert."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from tasks.adapter.records import AdapterInfo
from tasks.adapter.validate import validate_adapter
from tasks.convert import cached_build, folder_model_name, gguf_cache_path, run_converter
from tasks.errors import ConversionFailed
from tasks.fetch import fingerprint, model_files
from tasks.files import (
    TEMP_PREFIX,
)
from tasks.toolchain import Toolchain

# --------------------------------------------------------------------------------------------
# The reference: transformers + peft
# --------------------------------------------------------------------------------------------

# Files beside the weights that the converter reads for the vocabulary and the chat template.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)


def peft_merge_to_gguf(
    adapter_dir: Path,
    base_dir: Path,
    toolchain: Toolchain,
    outtype: Literal["f16", "bf16", "f32"] = "f16",
    info: AdapterInfo | None = None,
    base_key: str | None = None,
    on_line: Callable[[str], None] | None = None,
    model_name: str | None = None,
) -> tuple[Path, bool]:
    """transformers + peft `merge_and_unload`, save, convert with the pinned converter; returns (path, reused).

    The base loads in its stored dtype (peft computes each delta in float32 on CPU). A resized
    vocabulary is applied to the base first, and the adapter's own tokenizer goes with the merged
    model. Cached by (base content, adapter sha256, outtype, toolchain).
    """
    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    if info is None:
        info = validate_adapter(adapter_dir, base_dir)
    info.check_mode("peft")
    if base_key is None:
        from tasks.files import content_key

        base_key = content_key(fingerprint(model_files(base_dir), base_dir))
    final = gguf_cache_path(f"{base_key}-peft{info.sha256[:16]}", outtype, toolchain)
    # The base's name, not the staging folder's: libllama keys tokenizer rules on general.name (tasks.convert).
    name = model_name or folder_model_name(base_dir)

    def build(tmp: Path) -> None:
        # Named like the entry's temporaries, so a killed run's folder is swept by the next builder.
        with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{final.name}.peft-", dir=final.parent) as staging:
            merged_dir = Path(staging) / "merged"
            _peft_merge_folder(adapter_dir, base_dir, merged_dir, info)
            run_converter("convert_hf_to_gguf.py", ["--outtype", outtype, f"--model-name={name}", "--outfile", str(tmp),
                                                    str(merged_dir)], toolchain, on_line)
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise ConversionFailed(f"the converter exited cleanly but wrote nothing for the peft merge of {adapter_dir}")

    return cached_build(final, build)


def _peft_merge_folder(adapter_dir: Path, base_dir: Path, out: Path, info: AdapterInfo) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with torch.inference_mode():
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
        if info.vocab_resized:
            model.resize_token_embeddings(info.adapter_vocab_size, mean_resizing=False)  # the adapter brings the rows
        model = PeftModel.from_pretrained(model, adapter_dir)
        model = model.merge_and_unload()
        model.save_pretrained(out)
        del model
    tokenizer_source = adapter_dir if info.ships_tokenizer else base_dir
    for name in _TOKENIZER_FILES:
        src = tokenizer_source / name
        if not src.is_file() and tokenizer_source is adapter_dir:
            src = base_dir / name  # e.g. a chat template the adapter did not re-save
        if src.is_file():
            shutil.copyfile(src, out / name)
    gen = base_dir / "generation_config.json"
    if gen.is_file() and not (out / "generation_config.json").is_file():
        shutil.copyfile(gen, out / "generation_config.json")
