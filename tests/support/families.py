"""Stand-ins for every model family in the registry, built offline at test time.

A registry base cannot be downloaded here, so each family gets a small Hugging Face folder
that is the same model in every respect Kiln and llama.cpp look at, at a toy size:

- **The tokenizer** is rebuilt from the vocabulary-only GGUFs that llama.cpp ships in the
  llama-cpp-python source distribution (`vendor/llama.cpp/models/ggml-vocab-*.gguf`, the very
  distribution Kiln's converter comes from; pip fetches it as `kiln setup` does). A rebuilt
  tokenizer must give, on every text of the GGUF's `.inp` file, the token ids of its `.out`
  file (what llama.cpp must produce), and the pinned converter must recognise its pre-tokenizer
  as the registry entry says (the export checks that; `chkhsh` hashing is the converter's own).
  BPE families become a `tokenizers` BPE with the family's split regex; SentencePiece families
  get a `tokenizer.model` written here (the protobuf encoded by hand: no protobuf package) and
  the matching `tokenizer.json`.
- **The config** is the base's real `config.json`, scaled down: hidden 64, 2 layers, the same
  architecture class and the special features (tied embeddings, rope scaling, sliding window,
  soft-capping, NoPE layers, fused projections, partial rotary).
- **The weights** are random but make every chat turn end at once (TOOLCHAIN.md, "Models at
  real sizes"): every embedding row is one constant vector plus 1 % noise, the layers' output
  projections are tiny, and the output row of the family's end-of-turn token is ten times that
  vector, so its logit (about 32) dominates every other (about 3) at every position.
- **The chat template** is the family's own, from llama.cpp's `models/templates/` or Kiln's
  `templates/reference/`.

`FAMILIES` says, per registry key, what was rebuilt faithfully; where it could not be (no
vocabulary of that family ships with llama.cpp: Gemma, Mistral v3, o200k), the stand-in puts the
family's own control tokens at their ids over a vocabulary that does ship (llama-spm, GPT-2), and
the registry entry says the base is not verified by a stand-in (`unverified_reason`).
`install_in_hub_cache` lays a stand-in out as a Hub download of the base's own id and pinned
commit, so `kiln export hf:ORG/NAME@SHA` and `kiln export KEY` find it offline.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

REPO_ROOT = Path(__file__).resolve().parents[2]
# Bump when a stand-in's recipe changes, so folders cached under KILN_TEST_CACHE_DIR are rebuilt.
RECIPE_VERSION = 2
VOCABS = ("llama-bpe", "llama-spm", "qwen2", "phi-3", "gpt-2")
PHI4_MINI_TEMPLATE = (  # tokenizer_config.json of microsoft/Phi-4-mini-instruct (no copy in the repo or llama.cpp)
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] "
    "is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + "
    "'<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")
# The size every stand-in is scaled to: big enough for every architecture's shape rules
# (heads divide hidden, kv heads divide heads, rotary dims even), small enough to convert in seconds.
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 2, 4, 2, 16
EMBED_VALUE = 0.05  # the shared embedding vector's entries: logits of about 64 * 0.05 = 3.2
EOT_SCALE = 10.0  # the end-of-turn row: logit about 32

# ------------------------------------------------------------------------- llama.cpp's models/


def llama_cpp_version() -> str:
    return metadata.version("llama-cpp-python")


def llama_cpp_models(root: Path) -> Path:
    """`models/` of the installed llama-cpp-python's source distribution (vocab GGUFs, vectors, templates).

    Fetched with pip exactly as `kiln setup` fetches the converter, and extracted once under `root`.
    """
    dest = root / f"llama-cpp-python-{llama_cpp_version()}" / "models"
    if (dest / ".complete").is_file():
        return dest
    with tempfile.TemporaryDirectory(prefix="kiln-standin-sdist-") as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             "--dest", tmp, f"llama-cpp-python=={llama_cpp_version()}"], capture_output=True, text=True)
        sdists = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        assert proc.returncode == 0 and sdists, f"pip could not fetch the source distribution: {proc.stderr[-2000:]}"
        staging = dest.with_name("models.partial")
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(sdists[0]) as tar:
            members = []
            for member in tar.getmembers():
                parts = member.name.split("/")
                if len(parts) < 5 or parts[1:4] != ["vendor", "llama.cpp", "models"] or not member.isfile():
                    continue
                rel = "/".join(parts[4:])
                if rel.startswith("templates/") and rel.endswith(".jinja") or any(
                        rel.startswith(f"ggml-vocab-{v}.gguf") for v in VOCABS):
                    member.name = rel
                    members.append(member)
            tar.extractall(staging, members=members, filter="data")
        (staging / ".complete").write_text("ok")
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    return dest


class GgufVocab(NamedTuple):
    tokens: list[str]
    types: list[int]  # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    scores: list[float] | None
    merges: list[str] | None


@lru_cache(maxsize=None)
def read_vocab(path: Path) -> GgufVocab:
    """The tokenizer arrays of a vocabulary GGUF, through Kiln's own reader (ten times gguf-py's speed here)."""
    from tasks.gguf_file import read_metadata

    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores", "tokenizer.ggml.merges")
    meta = read_metadata(path, keys)
    return GgufVocab(*(meta.get(k) for k in keys))


def vocab_vectors(models: Path, vocab: str) -> list[tuple[str, list[int]]]:
    """The texts of `ggml-vocab-<vocab>.gguf.inp` with the ids llama.cpp must give them (`.out`)."""
    texts = (models / f"ggml-vocab-{vocab}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    lines = (models / f"ggml-vocab-{vocab}.gguf.out").read_text(encoding="utf-8").split("\n")
    return [(text, [int(x) for x in line.split()]) for text, line in zip(texts, lines)]


# ------------------------------------------------------------------------- tokenizers

# The split regexes of the families' own tokenizer.json files.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


@dataclass(frozen=True)
class Special:
    """An added token: its id, text, and whether it is special (control) or user-defined."""

    id: int
    content: str
    special: bool = True


def byte_level_bpe(vocab: GgufVocab, split: str, *, ignore_merges: bool, nfc: bool, bos: str | None,
                   renamed: dict[int, str] | None = None, extra: tuple[Special, ...] = ()):
    """A byte-level BPE `tokenizers.Tokenizer` from a GGUF vocabulary (tokens are already byte-level text)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tokens = list(vocab.tokens)
    for i, text in (renamed or {}).items():
        tokens[i] = text
    n_regular = next((i for i, t in enumerate(vocab.types) if t != 1), len(tokens))
    ids = {t: i for i, t in enumerate(tokens[:n_regular])}
    merges = [tuple(m.split(" ", 1)) for m in vocab.merges]
    tokenizer = Tokenizer(models.BPE(vocab=ids, merges=merges, ignore_merges=ignore_merges, fuse_unk=False,
                                     byte_fallback=False))
    if nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    # The converter pads a vocabulary to the config's size with `[PAD<id>]` entries: not real tokens.
    added = {i: Special(i, tokens[i], vocab.types[i] == 3) for i in range(n_regular, len(tokens))
             if vocab.types[i] in (3, 4) and not tokens[i].startswith("[PAD")}
    added.update({s.id: s for s in extra})
    for tok in sorted(added.values(), key=lambda s: s.id):
        assert tokenizer.add_tokens([AddedToken(tok.content, special=tok.special, normalized=False)]) == 1
        assert tokenizer.token_to_id(tok.content) == tok.id, (tok, tokenizer.get_vocab_size())
    if bos is not None:
        bos_id = tokenizer.token_to_id(bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _bytes(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def _int(number: int, value: int) -> bytes:
    return _field(number, 0, _varint(value & 0xFFFFFFFFFFFFFFFF))


def sentencepiece_model(pieces: list[tuple[str, float, int]], *, add_dummy_prefix: bool = True) -> bytes:
    """A SentencePiece `ModelProto` (BPE, byte fallback, identity normalizer) as Llama-style models ship it.

    Field numbers from sentencepiece_model.proto: ModelProto 1 pieces, 2 trainer_spec, 3 normalizer_spec;
    SentencePiece 1 piece, 2 score, 3 type (the same numbering as llama.cpp's token types).
    """
    body = b"".join(
        _bytes(1, _bytes(1, piece.encode()) + _field(2, 5, struct.pack("<f", score)) + _int(3, kind))
        for piece, score, kind in pieces)
    specials = {piece: i for i, (piece, _, _) in enumerate(pieces) if piece in ("<unk>", "<s>", "</s>", "<bos>", "<eos>")}
    unk = specials.get("<unk>", 0)
    bos = specials.get("<s>", specials.get("<bos>", 1))
    eos = specials.get("</s>", specials.get("<eos>", 2))
    trainer = _int(3, 2) + _int(4, len(pieces)) + _int(35, 1) + _int(40, unk) + _int(41, bos) + _int(42, eos) + _int(43, -1)
    normalizer = _bytes(1, b"identity") + _int(3, int(add_dummy_prefix)) + _int(4, 0) + _int(5, 1)
    return body + _bytes(2, trainer) + _bytes(3, normalizer)


def sentencepiece_bpe(pieces: list[tuple[str, float, int]], *, bos: str | None, add_dummy_prefix: bool = True):
    """The `tokenizer.json` twin of `sentencepiece_model`: merges ranked by the merged piece's score."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    merges = []
    for piece, score, kind in pieces:
        if kind != 1:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-score, vocab[left], vocab[right], left, right))
    merges.sort()
    unk = next((p for p, _, k in pieces if k == 2), pieces[0][0])
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=unk,
                                     fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Replace(" ", "▁")]
    if add_dummy_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                          + ([decoders.Strip(" ", 1, 0)] if add_dummy_prefix else []))
    tokenizer.add_special_tokens([AddedToken(p, special=True, normalized=False)
                                  for p, _, k in pieces if k in (2, 3)])
    tokenizer.add_tokens([AddedToken(p, special=False, normalized=False) for p, _, k in pieces if k == 4])
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    return tokenizer


def spm_pieces(vocab: GgufVocab, count: int) -> list[tuple[str, float, int]]:
    return [(vocab.tokens[i], float(vocab.scores[i]), int(vocab.types[i])) for i in range(count)]


# ------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    """How one registry base's stand-in is made."""

    key: str
    vocab: str | None  # ggml-vocab-<vocab>.gguf the tokenizer is rebuilt from (None: the demo's own tokenizer)
    faithful: bool  # the tokenizer is the family's own (checked against llama.cpp's vectors and hash)
    config: dict
    template: str  # file name under llama.cpp's models/templates/ or Kiln's templates/reference/
    end_of_turn: str
    tokenizer_config: dict
    generation_config: dict | None = None
    extra_specials: tuple[Special, ...] = ()
    renamed: dict[int, str] = field(default_factory=dict)
    # A SentencePiece layout of the family's own control tokens, placed before llama-spm's pieces
    # (used where the family's vocabulary does not ship with llama.cpp), and its dummy-prefix setting.
    spm_prefix: tuple[tuple[str, int], ...] = ()
    spm_dummy_prefix: bool = True
    template_text: str | None = None  # the template itself, where no file in the repo or llama.cpp has it
    standin_pre: str | None = None  # not faithful: the pre-tokenizer the stand-in's vocabulary gets
    export_flags: tuple[str, ...] = ()  # flags a user must add today (tests/test_families.py says why)
    unfaithful_because: str | None = None


def _dims(**overrides) -> dict:
    dims = {"hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS}
    return {**dims, **overrides}


QWEN25_SPECIALS = tuple(Special(151646 + i, t, False) for i, t in enumerate((
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
    "<|file_sep|>")))
QWEN3_SPECIALS = QWEN25_SPECIALS + tuple(Special(151665 + i, t, False) for i, t in enumerate(
    ("<tool_response>", "</tool_response>", "<think>", "</think>")))
# Qwen marks its chat-layout tokens special; the tool/fim tokens above are plain added tokens.
_QWEN_SPECIAL_IDS = {151646, 151647, 151648, 151649, 151650, 151651, 151652, 151653, 151654, 151655, 151656,
                     151659, 151660, 151661, 151662, 151663, 151664}
QWEN25_SPECIALS = tuple(Special(s.id, s.content, s.id in _QWEN_SPECIAL_IDS) for s in QWEN25_SPECIALS)
QWEN3_SPECIALS = tuple(Special(s.id, s.content, s.id in _QWEN_SPECIAL_IDS) for s in QWEN3_SPECIALS)

PHI35_LONGROPE = {
    "type": "longrope",
    "long_factor": [1.08, 1.11, 1.14, 1.34, 1.59, 1.6, 1.62, 2.62],
    "short_factor": [1.05, 1.05, 1.05, 1.1, 1.1, 1.15, 1.2, 1.25],
}

GEMMA_SPM_PREFIX = (("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2), ("<mask>", 4), ("[multimodal]", 4),
                    *((f"<unused{i}>", 4) for i in range(100)), ("<start_of_turn>", 4), ("<end_of_turn>", 4))
MISTRAL_V3_SPM_PREFIX = (("<unk>", 2), ("<s>", 3), ("</s>", 3), ("[INST]", 3), ("[/INST]", 3), ("[TOOL_CALLS]", 3),
                         ("[AVAILABLE_TOOLS]", 3), ("[/AVAILABLE_TOOLS]", 3), ("[TOOL_RESULTS]", 3),
                         ("[/TOOL_RESULTS]", 3), *((f"[control_{i}]", 3) for i in range(8, 766)))
PHI4_SPECIALS = tuple(Special(50257 + i, t) for i, t in enumerate((
    "<|endofprompt|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>", "<|tool|>", "<|/tool|>",
    "<|tool_call|>", "<|/tool_call|>", "<|tool_response|>", "<|tag|>")))
PHI_AUTO_MAP = {"AutoConfig": "configuration_phi3.Phi3Config", "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"}

FAMILIES: dict[str, Family] = {f.key: f for f in (
    Family(
        key="smollm2-135m-instruct", vocab=None, faithful=True,
        config={"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
                "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "initializer_range": 0.041,
                "max_position_embeddings": 8192, "mlp_bias": False, "pad_token_id": 2, "pretraining_tp": 1,
                "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True,
                "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 49152, **_dims()},
        template="demo", end_of_turn="<|im_end|>", tokenizer_config={},
        generation_config={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},
    ),
    Family(
        key="qwen2.5-0.5b-instruct", vocab="qwen2", faithful=True,
        config={"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
                "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu", "initializer_range": 0.02,
                "max_position_embeddings": 32768, "max_window_layers": 21, "rms_norm_eps": 1e-06,
                "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
                "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
                **_dims()},
        template="Qwen-Qwen2.5-7B-Instruct.jinja", end_of_turn="<|im_end|>",
        tokenizer_config={"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
                          "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": 131072,
                          "clean_up_tokenization_spaces": False, "split_special_tokens": False,
                          "errors": "replace"},
        generation_config={"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643},
        extra_specials=QWEN25_SPECIALS,
    ),
    Family(
        key="qwen3-0.6b", vocab="qwen2", faithful=True,
        config={"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
                "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": HEAD_DIM,
                "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 40960,
                "max_window_layers": 28, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
                "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
                "use_sliding_window": False, "vocab_size": 151936, **_dims()},
        template="Qwen-Qwen3-0.6B.jinja", end_of_turn="<|im_end|>",
        tokenizer_config={"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
                          "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": 131072,
                          "clean_up_tokenization_spaces": False, "split_special_tokens": False,
                          "errors": "replace"},
        generation_config={"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
                           "do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95},
        extra_specials=QWEN3_SPECIALS,
    ),
    Family(
        key="smollm3-3b", vocab="llama-bpe", faithful=True,
        config={"architectures": ["SmolLM3ForCausalLM"], "model_type": "smollm3", "attention_bias": False,
                "attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": 128012, "hidden_act": "silu",
                "initializer_range": 0.02, "max_position_embeddings": 65536, "max_window_layers": 28,
                "mlp_bias": False, "no_rope_layer_interval": 2, "no_rope_layers": [1, 0], "pad_token_id": 128004,
                "pretraining_tp": 2, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 5000000.0,
                "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": False,
                "use_sliding_window": False, "vocab_size": 128256, **_dims()},
        template="HuggingFaceTB-SmolLM3-3B.jinja", end_of_turn="<|im_end|>",
        # SmolLM3 adds no BOS: that alone is what makes its hash "smaug-bpe" rather than "llama-bpe".
        tokenizer_config={"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
                          "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "model_max_length": 131072,
                          "clean_up_tokenization_spaces": True},
        generation_config={"eos_token_id": 128012, "pad_token_id": 128004},
        # SmolLM3 renames Llama 3's reserved tokens for its chat layout and reasoning blocks.
        renamed={128002: "<think>", 128003: "</think>", 128011: "<|im_start|>", 128012: "<|im_end|>"},
    ),
    Family(
        key="llama-3.2-1b-instruct", vocab="llama-bpe", faithful=True,
        config={"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
                "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
                "head_dim": HEAD_DIM, "hidden_act": "silu", "initializer_range": 0.02,
                "max_position_embeddings": 131072, "mlp_bias": False, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
                "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
                "vocab_size": 128256, **_dims()},
        template="meta-llama-Llama-3.2-3B-Instruct.jinja", end_of_turn="<|eot_id|>",
        tokenizer_config={"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                          "eos_token": "<|eot_id|>", "model_max_length": 131072,
                          "clean_up_tokenization_spaces": True,
                          "model_input_names": ["input_ids", "attention_mask"]},
        generation_config={"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
                           "do_sample": True, "temperature": 0.6, "top_p": 0.9},
    ),
    Family(
        key="phi-3.5-mini-instruct", vocab="phi-3", faithful=True,
        config={"_name_or_path": "Phi-3.5-mini-instruct", "architectures": ["Phi3ForCausalLM"],
                "model_type": "phi3", "attention_bias": False, "attention_dropout": 0.0, "auto_map": PHI_AUTO_MAP,
                "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu",
                "initializer_range": 0.02, "max_position_embeddings": 131072,
                "original_max_position_embeddings": 4096, "pad_token_id": 32000, "resid_pdrop": 0.0,
                "rms_norm_eps": 1e-05, "rope_scaling": PHI35_LONGROPE, "rope_theta": 10000.0,
                "sliding_window": 262144, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                "use_cache": True, "vocab_size": 32064, **_dims(num_key_value_heads=HEADS)},
        template="microsoft-Phi-3.5-mini-instruct.jinja", end_of_turn="<|end|>",
        tokenizer_config={"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "<|endoftext|>",
                          "pad_token": "<|endoftext|>", "unk_token": "<unk>", "add_bos_token": False,
                          "add_eos_token": False, "legacy": False, "model_max_length": 131072,
                          "clean_up_tokenization_spaces": False, "sp_model_kwargs": {}},
        generation_config={"bos_token_id": 1, "eos_token_id": [32007, 32001, 32000], "pad_token_id": 32000},
    ),
    Family(
        key="gemma-2-2b-it", vocab="llama-spm", faithful=False,
        unfaithful_because="no Gemma vocabulary (256,000 SentencePiece pieces) ships with llama.cpp; the stand-in "
                           "puts Gemma's control tokens at their ids before llama-spm's pieces",
        config={"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "attention_bias": False,
                "attention_dropout": 0.0, "attn_logit_softcapping": 50.0, "bos_token_id": 2,
                "cache_implementation": "hybrid", "eos_token_id": [1, 107], "final_logit_softcapping": 30.0,
                "head_dim": HEAD_DIM, "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
                "initializer_range": 0.02, "max_position_embeddings": 8192, "pad_token_id": 0,
                "query_pre_attn_scalar": HEAD_DIM, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
                # 4096 in the real model: 16 here, so the verify prompts (about 20 tokens) cross the window.
                "sliding_window": 16, "torch_dtype": "float32", "use_cache": True,
                "vocab_size": len(GEMMA_SPM_PREFIX) + 32000 - 3, **_dims()},
        template="google-gemma-2-2b-it.jinja", end_of_turn="<end_of_turn>",
        tokenizer_config={"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
                          "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
                          "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False,
                          "sp_model_kwargs": {}},
        generation_config={"bos_token_id": 2, "eos_token_id": [1, 107], "pad_token_id": 0,
                           "cache_implementation": "hybrid"},
        spm_prefix=GEMMA_SPM_PREFIX, spm_dummy_prefix=False, standin_pre="default",
    ),
    Family(
        key="mistral-7b-instruct-v0.3", vocab="llama-spm", faithful=False,
        unfaithful_because="no Mistral v3 vocabulary (32,768 SentencePiece pieces) ships with llama.cpp; the "
                           "stand-in puts Mistral's 768 control tokens at their ids before llama-spm's pieces",
        config={"architectures": ["MistralForCausalLM"], "model_type": "mistral", "attention_dropout": 0.0,
                "bos_token_id": 1, "eos_token_id": 2, "head_dim": HEAD_DIM, "hidden_act": "silu",
                "initializer_range": 0.02, "max_position_embeddings": 32768, "rms_norm_eps": 1e-05,
                "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
                "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32768, **_dims()},
        template="mistralv3.Mistral-7B-Instruct-v0.3.jinja", end_of_turn="</s>",
        tokenizer_config={"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                          "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": False,
                          "clean_up_tokenization_spaces": False, "model_max_length": 1000000000000000019884624838656,
                          "sp_model_kwargs": {}, "spaces_between_special_tokens": False},
        generation_config={"bos_token_id": 1, "eos_token_id": 2},
        spm_prefix=MISTRAL_V3_SPM_PREFIX, standin_pre="default",
    ),
    Family(
        key="phi-4-mini-instruct", vocab="gpt-2", faithful=False,
        unfaithful_because="no o200k (gpt-4o) vocabulary ships with llama.cpp; the stand-in uses GPT-2's with "
                           "Phi-4-mini's chat tokens added, so the converter writes pre-tokenizer gpt-2, not gpt-4o",
        config={"_name_or_path": "Phi-4-mini-instruct", "architectures": ["Phi3ForCausalLM"],
                "model_type": "phi3", "attention_bias": False, "attention_dropout": 0.0,
                "auto_map": {**PHI_AUTO_MAP, "AutoTokenizer": "Xenova/gpt-4o"},
                "bos_token_id": 50256, "embd_pdrop": 0.0, "eos_token_id": 50256, "full_attn_mod": 1,
                "hidden_act": "silu", "initializer_range": 0.02, "interpolate_factor": 1, "lm_head_bias": False,
                "max_position_embeddings": 131072, "mlp_bias": False, "original_max_position_embeddings": 4096,
                "pad_token_id": 50256, "partial_rotary_factor": 0.75, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
                "rope_scaling": {"type": "longrope", "long_factor": [1.0, 1.12, 1.25, 1.4, 1.6, 1.8],
                                 "short_factor": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]},
                "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": True,
                "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 50304, **_dims()},
        template="phi4mini", template_text=PHI4_MINI_TEMPLATE, end_of_turn="<|end|>",
        tokenizer_config={"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>",
                          "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                          "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
                          "model_max_length": 131072},
        generation_config={"bos_token_id": 50256, "eos_token_id": [50259, 50256], "pad_token_id": 50256},
        extra_specials=PHI4_SPECIALS, standin_pre="gpt-2",
    ),
)}


# ------------------------------------------------------------------------- building


def template_text(family: Family, models: Path, demo_dir: Path) -> str:
    if family.template_text is not None:
        return family.template_text
    if family.template == "demo":
        if (demo_dir / "chat_template.jinja").is_file():
            return (demo_dir / "chat_template.jinja").read_text(encoding="utf-8")
        return json.loads((demo_dir / "tokenizer_config.json").read_text())["chat_template"]
    for folder in (REPO_ROOT / "templates" / "reference", models / "templates"):
        if (folder / family.template).is_file():
            return (folder / family.template).read_text(encoding="utf-8")
    raise FileNotFoundError(f"no chat template {family.template} in templates/reference or llama.cpp's models/templates")


def build_tokenizer(family: Family, models: Path, demo_dir: Path, folder: Path) -> None:
    """The family's tokenizer files in `folder` (tokenizer.json, tokenizer_config.json, tokenizer.model)."""
    config = dict(family.tokenizer_config)
    if family.vocab is None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
            if (demo_dir / name).is_file():
                shutil.copy(demo_dir / name, folder / name)
        return
    vocab = read_vocab(models / f"ggml-vocab-{family.vocab}.gguf")
    if vocab.merges is not None:
        bos = config.get("bos_token") if config.get("add_bos_token", True) else None
        split = {"llama-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT, "gpt-2": GPT2_SPLIT}[family.vocab]
        tokenizer = byte_level_bpe(vocab, split, ignore_merges=family.vocab == "llama-bpe",
                                   nfc=family.vocab == "qwen2", bos=bos, renamed=family.renamed,
                                   extra=family.extra_specials)
    else:
        n_pieces = 32000
        pieces = spm_pieces(vocab, n_pieces)
        if family.spm_prefix:
            # The family's own control tokens at their own ids, then llama-spm's pieces after its three.
            pieces = [(p, 0.0, kind) for p, kind in family.spm_prefix] + pieces[3:]
            model_pieces = pieces
        else:
            # The GGUF's first three types are the converter's view after the tokenizer's added tokens
            # (Phi-3 says `</s>` is not special); the SentencePiece model itself has the standard ones.
            model_pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3), *pieces[3:]]
        (folder / "tokenizer.model").write_bytes(sentencepiece_model(model_pieces, add_dummy_prefix=family.spm_dummy_prefix))
        # Like the BPE branch: no BOS post-processor where the tokenizer says add_bos_token false (Phi-3.5;
        # the converter prefers the post-processor to tokenizer_config, so it would write add_bos true,
        # where the real Phi-3.5 files convert to add_bos false).
        bos = config.get("bos_token") if config.get("add_bos_token", True) else None
        tokenizer = sentencepiece_bpe(pieces, bos=bos, add_dummy_prefix=family.spm_dummy_prefix)
        added = [] if family.spm_prefix else [
            Special(i, vocab.tokens[i], True) for i in range(n_pieces, len(vocab.tokens)) if vocab.types[i] == 3]
        from tokenizers import AddedToken

        if added:
            # Phi-3's published tokenizer: its chat tokens and `</s>` strip the whitespace after them
            # (llama.cpp mirrors that only for a model whose general.name says phi-3 or phi3, which
            # Kiln's conversion writes: tasks.convert.gguf_model_name);
            # `</s>` is not special, <|endoftext|> strips nothing.
            tokenizer.add_tokens([AddedToken("</s>", special=False, normalized=False, rstrip=True)])
        for tok in added:
            assert tokenizer.add_special_tokens([AddedToken(tok.content, special=True, normalized=False,
                                                            rstrip=tok.content != "<|endoftext|>")]) == 1
            assert tokenizer.token_to_id(tok.content) == tok.id
    tokenizer.save(str(folder / "tokenizer.json"))
    added_decoder = {str(tid): {"content": tok.content, "lstrip": tok.lstrip, "normalized": tok.normalized,
                                "rstrip": tok.rstrip, "single_word": tok.single_word, "special": tok.special}
                     for tid, tok in sorted(tokenizer.get_added_tokens_decoder().items())}
    config["added_tokens_decoder"] = added_decoder
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def write_weights(family: Family, folder: Path) -> None:
    """Random weights whose every chat turn ends at once (see the module docstring), as bf16 safetensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    eot = AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids(family.end_of_turn)
    assert isinstance(eot, int) and eot >= 0, family.end_of_turn
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed.copy_(EMBED_VALUE * (1 + 0.01 * torch.randn_like(embed)))
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.normal_(0.0, 1e-4)
            elif config.model_type.startswith("gemma") and name.endswith(
                    ("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
                param.fill_(-0.999)  # Gemma norms scale by (1 + w): the layers' outputs stay tiny
        head = model.get_output_embeddings().weight
        if head.data_ptr() != embed.data_ptr():
            head.copy_(EMBED_VALUE * (1 + 0.01 * torch.randn_like(head)))
        head[eot] = EOT_SCALE * EMBED_VALUE
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def build_standin(family: Family, root: Path, demo_dir: Path) -> Path:
    """The family's stand-in folder under `root` (built once; reused while the recipe is unchanged)."""
    models = llama_cpp_models(root)
    recipe = hashlib.sha256(json.dumps([RECIPE_VERSION, family.key, family.config, family.template,
                                        family.tokenizer_config, llama_cpp_version()], sort_keys=True,
                                       default=str).encode()).hexdigest()[:12]
    folder = root / "standins" / f"{family.key}-{recipe}"
    if (folder / "model.safetensors").is_file():
        return folder
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / "config.json").write_text(json.dumps(family.config, indent=2))
    if family.generation_config is not None:
        (staging / "generation_config.json").write_text(json.dumps(family.generation_config, indent=2))
    build_tokenizer(family, models, demo_dir, staging)
    tok_config = json.loads((staging / "tokenizer_config.json").read_text())
    tok_config["chat_template"] = template_text(family, models, demo_dir)
    (staging / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))
    write_weights(family, staging)
    staging.rename(folder)
    return folder


# ------------------------------------------------------------------------- a Hub cache that holds it


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def install_in_hub_cache(folder: Path, hub_cache: Path, repo_id: str, revision: str) -> None:
    """`folder` laid out in a huggingface_hub cache as a download of `repo_id` at `revision` leaves it.

    Blobs are named by their hash (sha256 for LFS files, the git blob sha1 for others), the snapshot
    links to them, and `trees/<revision>.json` is the file list huggingface_hub itself records.
    """
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

    storage = hub_cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (storage / "blobs").mkdir(exist_ok=True)
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(revision)
    entries = {}
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        sha1 = _git_blob_sha1(data)
        if path.suffix in (".safetensors", ".model", ".gguf"):
            sha256 = hashlib.sha256(data).hexdigest()
            blob, entry = sha256, TreeCacheEntry(size=len(data), blob_id=sha1, lfs_sha256=sha256, lfs_size=len(data))
        else:
            blob, entry = sha1, TreeCacheEntry(size=len(data), blob_id=sha1)
        target = storage / "blobs" / blob
        if not target.exists():
            shutil.copyfile(path, target)
        link = snapshot / path.name
        link.unlink(missing_ok=True)
        link.symlink_to(Path("../../blobs") / blob)
        entries[path.name] = entry
    write_tree_cache(str(storage), revision, entries)

