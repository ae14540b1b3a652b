"""Why Kiln passes the converter `--model-name`: a Phi-3.5 prompt's token ids, llama.cpp against transformers.

On the Phi-3.5-mini-instruct stand-in (tests/support/families.py: the phi-3 vocabulary llama.cpp
ships, Phi-3.5's config and chat template, random weights) this:
  1. converts it to f16 twice with the pinned converter, once under the converter's own name for it
     ("Phi 3.5 Mini Instruct", its titling of config.json's `_name_or_path`) and once under the name
     Kiln now passes ("Phi-3.5-mini-instruct", `tasks.convert.gguf_model_name`);
  2. renders one user turn through each GGUF's chat template and tokenizes it as `kiln export`'s
     verify step does (libllama, special tokens parsed, BOS per the GGUF);
  3. tokenizes the same turn with transformers' `apply_chat_template`, and prints both.

libllama strips the whitespace after Phi-3's chat tokens (as the published tokenizer does) only
where the lowercased general.name contains "phi-3" or "phi3" (src/llama-vocab.cpp).

    PYTHONPATH=. .venv/bin/python bench/phi3_tokens.py

Uses a fresh temporary KILN_CACHE_DIR; about a minute.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = "What is the capital of France?"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="kiln-bench-phi3-") as tmp:
        os.environ["KILN_CACHE_DIR"] = str(Path(tmp) / "cache")
        from llama_cpp import Llama
        from transformers import AutoTokenizer

        from tasks.convert import convert_to_gguf
        from tasks.demo import ensure_demo_model
        from tasks.toolchain import current_toolchain
        from tasks.verify import gguf_metadata, render_prompt
        from tests.support.families import FAMILIES, build_standin

        folder = build_standin(FAMILIES["phi-3.5-mini-instruct"], Path(tmp) / "standins", ensure_demo_model()[0])
        hf = list(AutoTokenizer.from_pretrained(folder).apply_chat_template(
            [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True, return_dict=False))
        print(f"transformers             {hf}")
        for key, name in (("converter", "Phi 3.5 Mini Instruct"), ("kiln", "Phi-3.5-mini-instruct")):
            gguf, _ = convert_to_gguf(folder, f"bench-{key}", "f16", current_toolchain(), name)
            meta = gguf_metadata(gguf)
            text = render_prompt(meta, PROMPT)
            llm = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
            add_bos = bool(meta["add_bos"]) and not (meta["bos_token"] and text.startswith(str(meta["bos_token"])))
            ids = llm.tokenize(text.encode(), add_bos=add_bos, special=True)
            llm.close()
            print(f"{name!r:24} {ids}  {'same' if ids == hf else 'DIFFERENT'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
