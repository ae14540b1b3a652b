"""Model folders broken in one way, built from the demo folder (weights hard-linked, never copied)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def folder_conversion_key(folder: Path, kind: str = "local") -> str:
    """The cache key an export of `folder` converts under (its files and the name written into the GGUF)."""
    from registry.models import ResolvedSource
    from tasks.convert import conversion_key
    from tasks.fetch import fingerprint, model_files

    source = ResolvedSource(kind=kind, id=kind if kind == "demo" else str(folder), path=str(folder),
                            files=fingerprint(model_files(folder), folder))
    return conversion_key(source)


def demo_copy(demo_model_dir: Path, folder: Path) -> Path:
    """A private copy of the demo folder to break: weights hard-linked, every other file copied."""
    folder.mkdir(parents=True)
    for item in demo_model_dir.iterdir():
        if item.name.endswith(".safetensors"):
            (folder / item.name).hardlink_to(item)
        elif item.is_file():
            shutil.copy(item, folder / item.name)
    return folder


def give_unknown_pre_tokenizer(folder: Path) -> None:
    """A BPE tokenizer trained here on a few lines: its pre-tokenizer hash is in no converter's list."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(["the quick brown fox", "jumps over the lazy dog", "kiln fires clay"] * 20, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = tokenizer.get_vocab_size()
    (folder / "config.json").write_text(json.dumps(config))
