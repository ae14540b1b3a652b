"""Peak memory of verify's transformers side: the whole model (float32, bfloat16) against the streamed forward.

    .venv/bin/python bench/scale.py --make /tmp/m1b --size 1b
    .venv/bin/python bench/hf_memory.py /tmp/m1b

Each way in a fresh process: load, one forward over 35 tokens, the arg-max; prints wall time and
the process's peak resident set (max RSS, torch included). The numbers in tasks/hf_stream.py's
`StreamedCausalLM` comment come from this script.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENS = [1, 50, 60, 70, 80, 90, 100] * 5


def one(folder: Path, how: str) -> None:
    import torch

    t0 = time.perf_counter()
    if how == "streamed":
        from tasks.hf_stream import StreamedCausalLM

        model = StreamedCausalLM(folder)
        top = model.argmax_logits([TOKENS])[0]
    else:
        from transformers import AutoModelForCausalLM

        whole = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, how)).eval()
        with torch.no_grad():
            top = whole(torch.tensor([TOKENS])).logits[0].argmax(-1).numpy()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"{how}: {time.perf_counter() - t0:.1f} s, peak RSS {peak / 1e9:.2f} GB, first arg-max {int(top[0])}")


def main() -> None:
    folder = Path(sys.argv[1])
    if len(sys.argv) > 2:
        sys.path.insert(0, str(REPO))
        one(folder, sys.argv[2])
        return
    for how in ("float32", "bfloat16", "streamed"):
        subprocess.run([sys.executable, __file__, str(folder), how], check=True)


if __name__ == "__main__":
    main()
