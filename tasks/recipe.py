"""Per-tensor quantization recipes: which tensors get which ggml type, as llama-quantize's own flags.

A recipe is a small YAML file (read with the registry's loader, which refuses a key given twice):

    name: attn-v-q8            # optional; the file's stem otherwise. Labels outputs `q4_k_m-attn-v-q8`.
    description: attention V at q8_0
    tensors:                   # tensor-name pattern -> ggml type, in order
      attn_v\\.weight: q8_0
    output_tensor_type: q8_0   # optional (`--output-tensor-type`)
    token_embedding_type: q8_0 # optional (`--token-embedding-type`)

What a row means is exactly what llama.cpp does with `--tensor-type PATTERN=TYPE`
(tools/quantize/quantize.cpp, src/llama-quant.cpp of the vendored llama.cpp):
- the pattern is lower-cased, compiled as a std::regex (ECMAScript) and *searched* in each tensor
  name (`attn_v` matches `blk.3.attn_v.weight`; anchor with `^`/`$` for more); the first row that
  matches wins; a row touches only tensors llama.cpp quantizes at all (2-D+ `*weight`, not norms);
- the type is a ggml type name, case-insensitive (`q4_K` = `q4_k`), not a file type (`q4_k_m`);
- `--token-embedding-type` and `--output-tensor-type` are applied before any row; in a model with
  tied embeddings (no `output.weight`) the output type goes to `token_embd.weight` unless a token
  embedding type is given.
So Kiln refuses what llama-quantize would silently mis-read: upper-case letters (it lower-cases
the pattern, so `\\D` would become `\\d`), `=` (it splits the argument at the first one), and regex
syntax Python has but ECMAScript lacks (`(?P<..>`, look-behind, inline flags, possessive `*+`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field

from tasks.errors import SpecInvalid

# Built-in recipes `--quant auto` tries beside the standard types (package data of `tasks`).
BUILTIN_DIR: Final = Path(__file__).resolve().parent / "recipes"
# ggml types a tensor can be written as: the float types and every case of ggml.c's
# `ggml_quantize_chunk` (q8_1/q8_K are only intermediates; i8…i64 and f64 are not weights).
RECIPE_TYPES: Final[tuple[str, ...]] = (
    "f32", "f16", "bf16", "q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0", "iq4_nl", "iq4_xs",
    "q3_k", "iq3_s", "iq3_xxs", "q2_k", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s", "q2_0", "q1_0",
    "tq2_0", "tq1_0", "mxfp4", "nvfp4",
)
# src/llama-quant.cpp `tensor_requires_imatrix`: llama-quantize refuses these (outside the
# embedding and output tensors) without an importance matrix.
NEEDS_IMATRIX_TYPES: Final = frozenset({"iq3_xxs", "iq2_xxs", "iq2_xs", "iq2_s", "iq1_m", "iq1_s"})
_KEYS: Final = ("name", "description", "tensors", "output_tensor_type", "token_embedding_type")
_NAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
# Python regex syntax that std::regex's ECMAScript grammar lacks (or reads differently).
_NOT_ECMASCRIPT: Final = re.compile(r"\(\?(?![:=!])|[*+?}]\+")
# llama-quant.cpp `tensor_allows_quantization`: names it never quantizes, whatever a row says.
_NEVER_QUANTIZED: Final = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
                           "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight")
_TOKEN_EMBD: Final = ("token_embd.weight", "per_layer_token_embd.weight")


class RecipeInvalid(SpecInvalid):
    """A recipe file llama-quantize would refuse or mis-read, or one that does not fit the model."""


class RecipeRow(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pattern: str = Field(description="searched in each tensor name as a regex (llama-quantize --tensor-type)")
    type: str = Field(description="ggml type name, lower case (q8_0, q6_k, f16, ...)")


class Recipe(BaseModel):
    """One recipe, as read and checked; its `sha256` covers what it does, not its name or wording."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="label of the outputs it makes: `<type>[-imat]-<name>`")
    description: str = ""
    rows: tuple[RecipeRow, ...] = ()
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None

    def canonical_json(self) -> str:
        """What the recipe does, as one stable string: the rows in order and the two types."""
        return json.dumps({"rows": [[r.pattern, r.type] for r in self.rows],
                           "output_tensor_type": self.output_tensor_type,
                           "token_embedding_type": self.token_embedding_type}, sort_keys=True, separators=(",", ":"))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def tool_args(self) -> list[str]:
        """llama-quantize's flags for this recipe, rows in order (the first match wins there too)."""
        args: list[str] = []
        if self.output_tensor_type:
            args += ["--output-tensor-type", self.output_tensor_type]
        if self.token_embedding_type:
            args += ["--token-embedding-type", self.token_embedding_type]
        for row in self.rows:
            args += ["--tensor-type", f"{row.pattern}={row.type}"]
        return args

    def needs_imatrix(self) -> list[str]:
        """Rows whose type llama-quantize refuses without an importance matrix (`pattern=type`)."""
        return [f"{r.pattern}={r.type}" for r in self.rows if r.type in NEEDS_IMATRIX_TYPES]


class AppliedRecipe(BaseModel):
    """The manifest's record of the recipe an export used: enough to write the file again."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="the recipe file as given (a built-in one: its path in the package)")
    sha256: str = Field(description="sha256 of the recipe's canonical JSON (Recipe.canonical_json)")
    recipe: Recipe


def _type(value: Any, where: str, path: Path) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RecipeInvalid(f"{path}: {where} must be a ggml type name such as q8_0, not {value!r}")
    name = value.strip().lower()
    if name not in RECIPE_TYPES:
        hint = " (that is a file type; its tensors are q4_k, q5_k, ...)" if re.fullmatch(r"q\d_k_[sml]", name) else ""
        raise RecipeInvalid(f"{path}: {where}: unknown ggml type {value!r}{hint}; llama-quantize writes: "
                            f"{', '.join(RECIPE_TYPES)}")
    return name


def check_pattern(pattern: Any, where: str, path: Path) -> str:
    """A row's pattern as llama-quantize will read it, or the one-line reason it would not."""
    if not isinstance(pattern, str) or not pattern:
        raise RecipeInvalid(f"{path}: {where}: a tensor pattern must be non-empty text, not {pattern!r}")
    if "=" in pattern:
        raise RecipeInvalid(f"{path}: {where}: pattern {pattern!r} holds '=', where llama-quantize splits "
                            "PATTERN=TYPE; match it with '.' instead")
    if any(c.isspace() for c in pattern):
        raise RecipeInvalid(f"{path}: {where}: pattern {pattern!r} holds white space; tensor names have none "
                            "(use \\s if you mean it)")
    if pattern != pattern.lower():
        raise RecipeInvalid(f"{path}: {where}: pattern {pattern!r} has upper-case letters; llama-quantize "
                            "lower-cases patterns (\\D would become \\d), so write it in lower case")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise RecipeInvalid(f"{path}: {where}: pattern {pattern!r} is not a valid regex ({exc})") from None
    if bad := _NOT_ECMASCRIPT.search(pattern):
        raise RecipeInvalid(f"{path}: {where}: pattern {pattern!r} uses {bad.group()!r}, which llama.cpp's "
                            "std::regex (ECMAScript) does not read as Python does; only (?:, (?= and (?! groups")
    return pattern


def _name_from(path: Path) -> str:
    name = re.sub(r"[^a-z0-9]+", "-", path.stem.lower()).strip("-")[:40] or "recipe"
    return name if name[0].isalnum() else f"r{name}"


def parse_recipe(data: Any, path: Path) -> Recipe:
    """A recipe from the YAML data of `path` (named in every error)."""
    if not isinstance(data, dict):
        raise RecipeInvalid(f"{path}: a recipe is a mapping with `tensors:` (pattern: type) and optional "
                            f"output_tensor_type / token_embedding_type, not {type(data).__name__}")
    unknown = [str(k) for k in data if k not in _KEYS]
    if unknown:
        raise RecipeInvalid(f"{path}: unknown key(s) {', '.join(unknown)}; a recipe has {', '.join(_KEYS)}")
    name = data.get("name")
    if name is None:
        name = _name_from(path)
    elif not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise RecipeInvalid(f"{path}: name {name!r} must be lower-case letters, digits and '-' (at most 40): "
                            "it becomes part of the output file names")
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise RecipeInvalid(f"{path}: description must be text")
    tensors = data.get("tensors") or {}
    if not isinstance(tensors, dict):
        raise RecipeInvalid(f"{path}: tensors must be a mapping of tensor-name pattern to ggml type "
                            f"(e.g. `attn_v: q8_0`), not {type(tensors).__name__}")
    rows = tuple(RecipeRow(pattern=check_pattern(p, f"tensors row {p!r}", path),
                           type=_type(t, f"tensors row {p!r}", path)) for p, t in tensors.items())
    output = data.get("output_tensor_type")
    embedding = data.get("token_embedding_type")
    recipe = Recipe(
        name=name, description=description, rows=rows,
        output_tensor_type=None if output is None else _type(output, "output_tensor_type", path),
        token_embedding_type=None if embedding is None else _type(embedding, "token_embedding_type", path),
    )
    if not recipe.rows and recipe.output_tensor_type is None and recipe.token_embedding_type is None:
        raise RecipeInvalid(f"{path}: the recipe changes nothing; give tensors rows, output_tensor_type or "
                            "token_embedding_type")
    return recipe


def load_recipe(path: Path | str) -> Recipe:
    """Read and check a recipe file; `RecipeInvalid` (one line, naming the file) for anything wrong."""
    from registry import load_yaml

    path = Path(path)
    if not path.is_file():
        raise RecipeInvalid(f"recipe {path} is not a file" + (
            "" if path.exists() else f"; the built-in recipes are in {BUILTIN_DIR}"))
    try:
        data = load_yaml(path, "recipe")
    except SpecInvalid as exc:  # PyYAML's own message spans lines (a caret under the place): one line here
        raise RecipeInvalid(" ".join(str(exc).split())) from None
    return parse_recipe(data, path)


def applied(path: Path | str) -> AppliedRecipe:
    recipe = load_recipe(path)
    return AppliedRecipe(path=str(path), sha256=recipe.sha256, recipe=recipe)


def builtin_recipes() -> list[tuple[Path, Recipe]]:
    """The recipes shipped with Kiln, by file name."""
    return [(p, load_recipe(p)) for p in sorted(BUILTIN_DIR.glob("*.yaml"))]


def quant_label(quant: str, imatrix: bool = False, recipe: Recipe | None = None) -> str:
    """What a user sees for a variant: `<type>[-imat][-<recipe name>]` (a standard type keeps its name)."""
    return quant + ("-imat" if imatrix else "") + (f"-{recipe.name}" if recipe is not None else "")


def quantized_by_llama(name: str, shape: tuple[int, ...]) -> bool:
    """Whether llama-quantize quantizes this tensor at all (llama-quant.cpp `tensor_allows_quantization`)."""
    dims = len(shape)
    while dims > 1 and shape[dims - 1] == 1:  # ggml_n_dims: trailing dimensions of 1 do not count
        dims -= 1
    return dims >= 2 and name.endswith("weight") and not any(part in name for part in _NEVER_QUANTIZED)


def _examples(names: list[str], n: int = 6, near: str | None = None) -> str:
    """A few real tensor names, one of each kind (layer numbers collapsed), those most like `near` first."""
    import difflib

    seen: dict[str, str] = {}
    for name in names:
        seen.setdefault(re.sub(r"\.\d+\.", ".N.", name), name)
    kinds = list(seen)
    if near:
        close = difflib.get_close_matches(near, [k.rsplit(".", 2)[-2] if k.count(".") >= 2 else k for k in kinds],
                                          n=len(kinds), cutoff=0)
        order = {short: i for i, short in enumerate(close)}
        kinds.sort(key=lambda k: order.get(k.rsplit(".", 2)[-2] if k.count(".") >= 2 else k, len(order)))
    return ", ".join(seen[k] for k in kinds[:n])


def check_recipe_against(recipe: Recipe, gguf_path: Path, where: str = "") -> None:
    """Refuse a recipe with a row (or type) that names no tensor this model's quantization would touch.

    Rows are matched as llama-quantize matches them (first match wins; the embedding and output
    types are applied before the rows), so a row shadowed by an earlier one is refused too.
    """
    from tasks.gguf_file import read_layout

    tensors = [(t.name, t.shape) for t in read_layout(Path(gguf_path)).tensors]
    names = [n for n, _ in tensors]
    quantized = [n for n, s in tensors if quantized_by_llama(n, s)]
    label = where or f"recipe {recipe.name}"
    model = Path(gguf_path).name
    if recipe.output_tensor_type and "output.weight" not in names and "token_embd.weight" not in names:
        raise RecipeInvalid(f"{label}: output_tensor_type {recipe.output_tensor_type}: {model} has no output.weight "
                            "(nor a tied token_embd.weight); remove it")
    if recipe.token_embedding_type and not any(n in names for n in _TOKEN_EMBD):
        raise RecipeInvalid(f"{label}: token_embedding_type {recipe.token_embedding_type}: {model} has no "
                            f"token_embd.weight; remove it")
    claimed: set[str] = set()
    if recipe.token_embedding_type:
        claimed.update(_TOKEN_EMBD)
    if recipe.output_tensor_type:
        claimed.add("output.weight")
    for row in recipe.rows:
        rx = re.compile(row.pattern)
        hits = [n for n in names if rx.search(n)]
        live = [n for n in hits if n in quantized and n not in claimed]
        if live:
            claimed.update(live)
            continue
        shown = f"row `{row.pattern}: {row.type}`"
        if not hits:
            raise RecipeInvalid(f"{label}: {shown} names no tensor of the model (its {len(names)} tensors are named "
                                f"like {_examples(names, near=row.pattern)}); fix the pattern")
        if any(n in quantized for n in hits):
            raise RecipeInvalid(f"{label}: {shown} only matches tensors an earlier row or type already sets "
                                f"({_examples(hits, 3)}; the first match wins); remove or reorder it")
        raise RecipeInvalid(f"{label}: {shown} only matches tensors llama.cpp never quantizes "
                            f"({_examples(hits, 3)}); fix the pattern")


def check_recipe_request(request: Any) -> Recipe | None:
    """What the request alone shows about its recipe (the file, types that need a matrix); None without one."""
    if request.recipe is None:
        return None
    recipe = load_recipe(request.recipe)
    starved = recipe.needs_imatrix()
    if starved and getattr(request, "imatrix", None) is None:
        raise RecipeInvalid(f"{request.recipe}: row(s) {', '.join(starved)} need an importance matrix, which "
                            "llama-quantize requires for those types; add --imatrix auto, or use q2_k/q3_k or larger")
    return recipe
