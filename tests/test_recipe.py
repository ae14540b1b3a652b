"""Per-tensor recipes (`--recipe`) and the bounded search (`--search-budget`), through the `kiln` executable.

A recipe means what llama-quantize does with `--tensor-type PATTERN=TYPE` (tasks/recipe.py); these tests
read the written GGUF's tensor types back to hold Kiln to that.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.files import sha256_file
from tasks.gguf_file import read_layout
from tasks.recipe import RecipeInvalid, builtin_recipes, check_recipe_against, load_recipe, parse_recipe
from tests.support.kiln_cli import reached_prefect, run_kiln

GGML_Q8_0 = 8  # ggml.h `GGML_TYPE_Q8_0`


def _recipe(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ the file alone


def test_recipe_file_reads_as_llama_quantize_flags(tmp_path: Path) -> None:
    path = _recipe(tmp_path, "tensors:\n  attn_v\\.weight$: Q8_0\n  ffn_down: q6_K\noutput_tensor_type: q8_0\n",
                   name="My_Recipe.yaml")
    recipe = load_recipe(path)
    assert recipe.name == "my-recipe"
    assert recipe.tool_args() == ["--output-tensor-type", "q8_0", "--tensor-type", "attn_v\\.weight$=q8_0",
                                  "--tensor-type", "ffn_down=q6_k"]
    # What it does, not its wording: the same rows under another name hash the same.
    same = parse_recipe({"name": "other", "tensors": {"attn_v\\.weight$": "q8_0", "ffn_down": "q6_k"},
                         "output_tensor_type": "Q8_0"}, path)
    assert same.sha256 == recipe.sha256
    reordered = parse_recipe({"tensors": {"ffn_down": "q6_k", "attn_v\\.weight$": "q8_0"},
                              "output_tensor_type": "q8_0"}, path)
    assert reordered.sha256 != recipe.sha256  # the first match wins: order is meaning


@pytest.mark.parametrize("text, words", [
    ("tensors:\n  attn_v: q4_k_m\n", ["unknown ggml type", "q4_k_m", "file type"]),
    ("tensors:\n  attn_v: q8_0\n  attn_v: q6_k\n", ["twice"]),
    ("tensors: [attn_v, q8_0\n", ["not valid YAML"]),
    ("tensors:\n  'attn_v[': q8_0\n", ["not a valid regex"]),
    ("tensors:\n  'attn_V': q8_0\n", ["upper-case", "lower-cases"]),
    ("tensors:\n  'attn_v=x': q8_0\n", ["'='"]),
    ("tensors:\n  '(?<!blk)attn_v': q8_0\n", ["ECMAScript"]),
    ("tensors:\n  '(?i)attn_v': q8_0\n", ["ECMAScript"]),
    ("tensor:\n  attn_v: q8_0\n", ["unknown key", "tensor"]),
    ("name: x\n", ["changes nothing"]),
])
def test_bad_recipe_files_are_refused_in_one_line(tmp_path: Path, text: str, words: list[str]) -> None:
    with pytest.raises(RecipeInvalid) as caught:
        load_recipe(_recipe(tmp_path, text))
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "r.yaml") in message
    for word in words:
        assert word in message


def test_recipe_rows_are_checked_against_the_models_tensors(demo_f16_gguf: Path, tmp_path: Path) -> None:
    for _, recipe in builtin_recipes():
        check_recipe_against(recipe, demo_f16_gguf)  # every built-in fits the demo model
    cases = {
        "tensors:\n  attn_qkv: q8_0\n": ["names no tensor", "blk.0.attn_q.weight"],
        "tensors:\n  attn_norm: q8_0\n": ["never quantizes"],
        "tensors:\n  attn_v: q8_0\n  'blk\\.0\\.attn_v': q6_k\n": ["earlier row", "first match wins"],
    }
    for text, words in cases.items():
        with pytest.raises(RecipeInvalid) as caught:
            check_recipe_against(load_recipe(_recipe(tmp_path, text)), demo_f16_gguf)
        for word in words:
            assert word in str(caught.value)


# ------------------------------------------------------------------ through the kiln executable


@pytest.mark.parametrize("text, words", [
    ("tensors:\n  attn_v: q9_9\n", ["unknown ggml type 'q9_9'"]),
    ("tensors:\n  - attn_v\n  - q8_0\n", ["must be a mapping"]),
    ("tensors:\n  'attn_v(': q8_0\n", ["not a valid regex"]),
    ("tensors:\n  attn_v: iq2_xs\n", ["need an importance matrix", "--imatrix"]),
])
def test_export_refuses_a_bad_recipe_before_prefect(tmp_path: Path, text: str, words: list[str]) -> None:
    recipe, out = _recipe(tmp_path, text), tmp_path / "out"
    proc = run_kiln("export", "demo", "--quant", "q4_k_m", "--recipe", str(recipe), "--out", str(out))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and not reached_prefect(proc.stderr)
    for word in words:
        assert word in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("args, words", [
    (["--quant", "auto", "--max-size", "100MB", "--search-budget", "soon"], ["search_budget", "duration"]),
    (["--quant", "q4_k_m", "--search-budget", "10m"], ["only applies to quants [auto]"]),
    (["--quant", "f16", "--recipe", "r.yaml"], ["give a quant type"]),
])
def test_export_refuses_bad_search_and_recipe_flags_before_prefect(tmp_path: Path, args: list[str],
                                                                    words: list[str]) -> None:
    proc = run_kiln("export", "demo", *args, "--out", str(tmp_path / "out"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and not reached_prefect(proc.stderr)
    for word in words:
        assert word in proc.stderr


def test_a_recipe_naming_no_tensor_is_refused_before_quantizing(tmp_path: Path) -> None:
    recipe, out = _recipe(tmp_path, "tensors:\n  attn_qkv: q8_0\n"), tmp_path / "out"
    proc = run_kiln("export", "demo", "--quant", "q4_k_m", "--recipe", str(recipe), "--out", str(out),
                    "--no-verify", "--no-report")
    assert proc.returncode != 0
    assert "attn_qkv: q8_0` names no tensor" in proc.stderr and "blk.0.attn_q.weight" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(out.glob("*.gguf")) if out.exists() else True


def test_recipe_export_is_labelled_recorded_and_reproduced(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "name: v8\ntensors:\n  attn_v\\.weight$: q8_0\n")
    out = tmp_path / "out"
    args = ["export", "demo", "--quant", "q4_k_m", "--recipe", str(recipe), "--out", str(out), "--no-verify",
            "--no-report", "--json"]
    first = run_kiln(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = json.loads(first.stdout)
    ggufs = [o["path"] for o in manifest["outputs"] if o["path"].endswith(".gguf")]
    assert len(ggufs) == 2 and ggufs[0].endswith("-f16.gguf") and ggufs[1].endswith("-q4_k_m-v8.gguf")
    gguf = out / ggufs[1]
    assert manifest["recipe"]["sha256"] == load_recipe(recipe).sha256
    assert manifest["recipe"]["recipe"]["rows"] == [{"pattern": "attn_v\\.weight$", "type": "q8_0"}]
    # The file says what the recipe said: every attention V at q8_0, and the rest as q4_k_m makes it.
    types = {t.name: t.ggml_type for t in read_layout(gguf).tensors}
    assert all(types[n] == GGML_Q8_0 for n in types if n.endswith("attn_v.weight"))
    assert types["blk.0.attn_q.weight"] != GGML_Q8_0
    digest = sha256_file(gguf)

    again = run_kiln(*args)  # same recipe, same request: nothing to do
    assert again.returncode == 0 and "up to date" in again.stderr
    forced = run_kiln(*args, "--force")  # made again: the same bytes
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert sha256_file(gguf) == digest

    # q5_0, not q6_k: these rows are not whole q6_k blocks, and llama.cpp would fall back to q8_0 again.
    recipe.write_text("name: v8\ntensors:\n  attn_v\\.weight$: q5_0\n", encoding="utf-8")
    changed = run_kiln(*args)  # the same path, other content: not up to date
    assert changed.returncode == 0 and "up to date" not in changed.stderr.splitlines()[-1]
    assert sha256_file(gguf) != digest


def test_search_budget_stops_and_exports_the_best_so_far(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_kiln("export", "demo", "--quant", "auto", "--max-size", "500MB", "--search-budget", "1s",
                    "--out", str(out), "--no-verify", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    choice = json.loads(proc.stdout)["choice"]
    assert choice["quant"] == "q8_0"  # the first candidate is always measured; the budget stopped the rest
    assert choice["budget_seconds"] == 1 and choice["unmeasured"]
    assert set(choice["unmeasured"]) < set(choice["candidates"])
    report = (out / "quant-report.md").read_text(encoding="utf-8")
    assert "the search was cut short" in report and "not measured: the search budget ran out" in report


def test_auto_with_imatrix_searches_matrix_and_recipe_variants(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_kiln("export", "demo", "--quant", "auto", "--max-size", "100MB", "--imatrix", "auto", "--out", str(out),
                    "--no-verify", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(proc.stdout)
    choice = manifest["choice"]
    # The types at the bound (q3_k_m fits, q4_k_m does not), with the matrix and with each built-in recipe.
    assert {"q3_k_m-imat", "q4_k_m-imat", "q4_k_m-embed-q5", "q4_k_m-imat-embed-q5"} <= set(choice["candidates"])
    assert choice["size_bytes"] <= 100_000_000
    standard = [r for r in manifest["report"]["rows"] if r["quant"] in ("q3_k_m", "q2_k")]
    assert choice["kl_mean"] <= min(r["kl_mean"] for r in standard)  # never worse than the standard choice
    chosen = [o for o in manifest["outputs"] if o["quant"] == choice["quant"] and o["path"].endswith(".gguf")]
    assert len(chosen) == 1 and chosen[0]["path"].endswith(f"-{choice['quant']}.gguf")
    assert (manifest["imatrix"] is not None) == ("-imat" in choice["quant"])
    assert (manifest["recipe"] is not None) == (choice["quant"].count("-") > ("-imat" in choice["quant"]))
    assert "### Search: every candidate" in (out / "quant-report.md").read_text(encoding="utf-8")
