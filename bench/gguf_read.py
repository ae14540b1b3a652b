"""Reading a GGUF's tokenizer: tasks/gguf_file.py against gguf-py's GGUFReader.

    .venv/bin/python bench/gguf_read.py [GGUF ...]

Default: the embedded SmolLM2-135M GGUF (49,152 tokens). Pass a large-vocabulary GGUF too,
e.g. llama.cpp's `models/ggml-vocab-gemma-4.gguf` (262,144 tokens) from the llama-cpp-python
source distribution. Target: Kiln's reader within a small factor of reading the bytes, and far
under GGUFReader, which builds a numpy view for every array element and tensor.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import gguf

    from tasks.demo import packaged_gguf
    from tasks.gguf_file import read_tokenizer

    paths = [Path(p) for p in sys.argv[1:]] or [packaged_gguf()]
    for path in paths:
        t0 = time.perf_counter()
        ours = read_tokenizer(path)
        kiln_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        field = gguf.GGUFReader(path).fields[gguf.Keys.Tokenizer.LIST]
        theirs = [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        reader_s = time.perf_counter() - t0
        assert list(ours.tokens or ()) == theirs
        print(f"{path.name}: {len(theirs)} tokens; tasks.gguf_file {kiln_s:.2f} s, GGUFReader {reader_s:.2f} s")


if __name__ == "__main__":
    main()
