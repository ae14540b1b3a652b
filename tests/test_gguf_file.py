"""tasks/gguf_file.py held against gguf-py's own GGUFReader, on the embedded SmolLM2 GGUF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, Keys

from tasks.demo import packaged_gguf
from tasks.errors import KilnError
from tasks.gguf_file import (
    TOKENIZER_KEYS,
    GGUFFileError,
    copy_with_string_metadata,
    read_chat_template,
    read_file_type,
    read_layout,
    read_metadata,
    read_tokenizer,
)


@pytest.fixture(scope="module")
def reference() -> GGUFReader:
    return GGUFReader(str(packaged_gguf()))


def test_metadata_agrees_with_gguf_reader(reference: GGUFReader) -> None:
    keys = TOKENIZER_KEYS | {Keys.General.ARCHITECTURE, "llama.block_count", Keys.General.FILE_TYPE}
    ours = read_metadata(packaged_gguf(), keys)
    for key in keys:
        if key not in reference.fields:
            assert key not in ours
            continue
        assert ours[key] == reference.fields[key].contents(), key
    assert read_file_type(packaged_gguf()) == reference.fields[Keys.General.FILE_TYPE].contents()
    assert read_chat_template(packaged_gguf()) == reference.fields[Keys.Tokenizer.CHAT_TEMPLATE].contents()


def test_layout_agrees_with_gguf_reader(reference: GGUFReader) -> None:
    layout = read_layout(packaged_gguf())
    assert layout.data_offset == reference.data_offset
    assert len(layout.tensors) == len(reference.tensors)
    for ours, theirs in zip(layout.tensors, reference.tensors):
        assert ours.name == theirs.name
        assert ours.shape == tuple(int(d) for d in theirs.shape)
        assert ours.ggml_type == int(theirs.tensor_type)
        assert layout.data_offset + ours.offset == theirs.data_offset
        assert ours.nbytes == theirs.n_bytes
    last = max(layout.tensors, key=lambda t: t.offset)
    assert layout.data_offset + last.offset + last.nbytes <= layout.file_size


def test_tokenizer_facts_of_the_embedded_model() -> None:
    facts = read_tokenizer(packaged_gguf())
    assert facts.chat_template and "<|im_start|>" in facts.chat_template
    assert (facts.bos_token, facts.eos_token, facts.add_bos_token) == ("<|im_start|>", "<|im_end|>", False)
    assert facts.tokens is not None and len(facts.tokens) == 49152
    assert "<|im_end|>" in facts.special_tokens and "hello" not in facts.special_tokens
    assert read_tokenizer(packaged_gguf(), with_vocabulary=False).tokens is None


def test_a_copy_with_a_new_chat_template_changes_only_that(tmp_path: Path, reference: GGUFReader) -> None:
    target = tmp_path / "copy.gguf"
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    copy_with_string_metadata(packaged_gguf(), target, {Keys.Tokenizer.CHAT_TEMPLATE: template, "kiln.test": "x"})
    assert read_chat_template(target) == template
    copied = GGUFReader(str(target))
    assert copied.fields["kiln.test"].contents() == "x"
    for key, field in reference.fields.items():
        if key.startswith("GGUF.") or key == Keys.Tokenizer.CHAT_TEMPLATE:
            continue
        assert copied.fields[key].contents() == field.contents(), key
    for ours, theirs in zip(copied.tensors, reference.tensors):
        assert ours.name == theirs.name and np.array_equal(ours.data, theirs.data)
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("content", [b"", b"not a gguf at all", b"GGUF\x03\x00\x00\x00" + b"\x00" * 4])
def test_what_is_not_a_whole_gguf_is_refused_with_one_error(tmp_path: Path, content: bytes) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(content)
    for read in (read_tokenizer, read_layout, read_chat_template):
        with pytest.raises(GGUFFileError, match="GGUF"):
            read(bogus)
    assert issubclass(GGUFFileError, KilnError)


def test_a_truncated_header_is_refused(tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(packaged_gguf().read_bytes()[:200_000])  # inside the token list
    with pytest.raises(GGUFFileError, match="not a readable GGUF"):
        read_tokenizer(cut)
