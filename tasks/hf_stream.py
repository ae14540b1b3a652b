"""The Hugging Face model's forward pass in bounded memory: one block of weights at a time, from safetensors.

Verification holds the float GGUF against the model in transformers. Loading that model whole
costs 4 bytes a parameter in float32 (about 32 GB for 8B parameters), so on a 24 GB machine an 8B
export could not be verified at all. Here the model is built with its parameters on the meta
device (no memory; buffers such as rotary frequencies stay real), and each block is filled just
before its forward and emptied just after:

- every decoder layer is one block;
- every other module that owns parameters (the embedding, the final norm, the head) is its own block.

So peak memory is the largest block in float32 plus the activations, whatever the number of
layers, and transformers' own forward runs unchanged (masks, rotary, per-architecture scaling).
Tensors are read from the safetensors shards with `safe_open`, one file handle a block, closed
before the forward, so the shards' mapped pages do not stay in the process either.

Why this and not the alternatives (measured): see `StreamedCausalLM`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from tasks import safetensors_file
from tasks.errors import KilnError


class StreamingUnsupported(KilnError):
    """The model's weights cannot be streamed block by block (no safetensors, or names transformers renames)."""


def safetensors_index(folder: Path) -> dict[str, Path]:
    """Tensor name → the safetensors file holding it (sharded with an index, or one or more plain files)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    found: dict[str, Path] = {}
    for path in sorted(folder.glob("*.safetensors")):
        for name in safetensors_file.read_header(path).tensors:
            found[name] = path
    return found


def largest_block_bytes(folder: Path, dtype_bytes: int = 4) -> int:
    """Bytes of the largest streamed block in float32, from the safetensors headers alone (no tensor read)."""
    index = safetensors_index(folder)
    sizes: dict[str, int] = defaultdict(int)
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, path in index.items():
        by_file[path].append(name)
    for path, names in by_file.items():
        header = safetensors_file.read_header(path).tensors
        for name in names:
            shape = header.get(name, {}).get("shape", [])
            n = 1
            for d in shape:
                n *= int(d)
            sizes[_block_of(name)] += n * dtype_bytes
    return max(sizes.values(), default=0)


def _block_of(name: str) -> str:
    """The block a checkpoint tensor belongs to: `…layers.N` for decoder layers, else its module."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return ".".join(parts[:-1])


class StreamedCausalLM:
    """A causal LM whose weights live on disk and visit memory one block at a time.

    Why block streaming: peak resident memory (max RSS, torch included) of loading the 1.17B
    synthetic Llama of bench/scale.py and running one forward, on the 2-CPU machine
    (bench/hf_memory.py):
    - the whole model in float32 (what verify did): 7.2 GB, and it grows at 4 bytes a parameter
      and more (32 GB and up at 8B, more than this machine has);
    - the whole model in bfloat16: 2.5 GB, still growing with the model, and a bfloat16 forward
      is not the float32 reference that verify's 0.95 agreement threshold was set against;
    - this: 0.95 GB, the largest block in float32 (here the embedding or the head) plus activations,
      with float32 arithmetic as before; each weight is read from the checkpoint once a forward.
    accelerate's disk offload was not measured: in float32 it first writes an offload copy of every
    weight (twice the bfloat16 checkpoint) to disk, and loads it back layer by layer as this does.
    """

    def __init__(self, folder: Path) -> None:
        import torch
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder = Path(folder)
        self.index = safetensors_index(self.folder)
        if not self.index:
            raise StreamingUnsupported(f"{folder} has no safetensors weights to stream")
        config = AutoConfig.from_pretrained(self.folder)
        # include_buffers=False: rotary frequencies and the like are computed now, on the CPU.
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.eval()
        self.model = model
        self.torch = torch
        names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        self.sources = self._checkpoint_names(model, names)
        self._hooks: list[Any] = []
        for prefix, module, recurse in self._blocks(model):
            self._hooks.append(module.register_forward_pre_hook(self._loader(prefix, recurse)))
            self._hooks.append(module.register_forward_hook(self._unloader(recurse)))

    def _checkpoint_names(self, model: Any, names: set[str]) -> dict[str, str]:
        """Each parameter's tensor in the checkpoint; tied heads read the embedding's."""
        sources: dict[str, str] = {}
        tied: dict[str, str] = {}
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        if out_emb is not None and in_emb is not None:
            out_name = next((n for n, m in model.named_modules() if m is out_emb), None)
            in_name = next((n for n, m in model.named_modules() if m is in_emb), None)
            if out_name and in_name:
                tied[f"{out_name}.weight"] = f"{in_name}.weight"
        missing = []
        for name in sorted(names):
            if name in self.index:
                sources[name] = name
            elif name in tied and tied[name] in self.index:
                sources[name] = tied[name]
            else:
                missing.append(name)
        if missing:
            raise StreamingUnsupported(
                f"{len(missing)} parameter(s) of the transformers model are not in the checkpoint under "
                f"their own names (e.g. {missing[0]!r}); this architecture's weights are renamed on load"
            )
        return sources

    @staticmethod
    def _blocks(model: Any) -> list[tuple[str, Any, bool]]:
        """(name, module, whole subtree): each decoder layer, and each other module that owns parameters directly."""
        import torch.nn as nn

        layer_lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
        layers_name, layers = max(layer_lists, key=lambda nm: len(nm[1]), default=("", None))
        blocks: list[tuple[str, Any, bool]] = []
        if layers is not None:
            blocks += [(f"{layers_name}.{i}", layer, True) for i, layer in enumerate(layers)]
        inside = {id(m) for _, layer, _ in blocks for m in layer.modules()}
        for name, module in model.named_modules():
            if id(module) not in inside and any(True for _ in module.parameters(recurse=False)):
                blocks.append((name, module, False))
        return blocks

    def _loader(self, prefix: str, recurse: bool):
        from safetensors import safe_open

        def load(module: Any, _args: Any) -> None:
            torch = self.torch
            wanted: dict[Path, list[tuple[Any, str, str]]] = defaultdict(list)
            for local, param in module.named_parameters(recurse=recurse):
                full = f"{prefix}.{local}" if prefix else local
                if param.is_meta:
                    source = self.sources[full]
                    wanted[self.index[source]].append((local, source, full))
            for path, items in wanted.items():
                with safe_open(str(path), framework="pt") as f:
                    for local, source, _full in items:
                        tensor = f.get_tensor(source).to(torch.float32)
                        owner, attr = _owner(module, local)
                        owner._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)

        return load

    def _unloader(self, recurse: bool):
        def unload(module: Any, _args: Any, _output: Any) -> None:
            torch = self.torch
            for local, param in module.named_parameters(recurse=recurse):
                if not param.is_meta:
                    owner, attr = _owner(module, local)
                    owner._parameters[attr] = torch.nn.Parameter(
                        torch.empty(param.shape, dtype=param.dtype, device="meta"), requires_grad=False)

        return unload

    def argmax_logits(self, sequences: list[list[int]]) -> list[Any]:
        """Arg-max token at every position of each sequence (one forward over them all, right-padded)."""
        torch = self.torch
        longest = max(len(s) for s in sequences)
        ids = torch.zeros((len(sequences), longest), dtype=torch.long)
        mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        with torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        tops = logits.argmax(dim=-1)
        return [tops[row, : len(seq)].numpy() for row, seq in enumerate(sequences)]

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def _owner(module: Any, dotted: str) -> tuple[Any, str]:
    *path, attr = dotted.split(".")
    for part in path:
        module = getattr(module, part)
    return module, attr
