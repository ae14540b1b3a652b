"""Every registry base, exported end to end as a stand-in (tests/support/families.py says how each is built).

For each base with a stand-in recipe:
- the rebuilt tokenizer gives llama.cpp's own token ids on every text of its `ggml-vocab-*.gguf.inp`;
- `kiln export hf:ORG/NAME@SHA` (the base's own Hub id and pinned commit, served from a Hugging Face
  cache laid out as a download leaves it, offline) runs preflight, conversion, one quantization,
  verification through the family's own chat template and the Modelfile; the GGUF says the
  architecture and pre-tokenizer the registry entry claims, and the chat template is recognised as
  the entry's dialect;
- one small base also goes through its registry key, so the spec-versus-converter check and the
  licence flag are on the path.
The registry marks (`verified_by_standin` / `unverified_reason`) must agree with what runs here.
Exports run two at a time (each is mostly waiting on a subprocess); every test waits for its own.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from registry import get_base, load_registry
from tests.support.kiln_cli import run_kiln
from tests.support.families import FAMILIES, Family, build_standin, install_in_hub_cache, llama_cpp_models, vocab_vectors

QUANT = "q4_0"  # one small type: quantization is on the path, its cost is not
# Families whose export is refused today for a reason outside the stand-in; strict, so a fix flips them.
EXPECTED_REFUSALS: dict[str, str] = {}
# Bases whose real config.json carries auto_map (custom code transformers does not need: it ships Phi3).
AUTO_MAP_BASES = ("phi-3.5-mini-instruct", "phi-4-mini-instruct")
REGISTRY_KEY_EXPORT = "qwen2.5-0.5b-instruct"  # small enough for any machine's disk and memory checks


def _param(key: str):
    marks = [pytest.mark.xfail(strict=True, reason=EXPECTED_REFUSALS[key])] if key in EXPECTED_REFUSALS else []
    return pytest.param(key, marks=marks, id=key)


@pytest.fixture(scope="session")
def standin_root(kiln_cache: Path) -> Path:
    return kiln_cache / "test-standins"


@pytest.fixture(scope="session")
def standins(standin_root: Path, demo_model_dir: Path) -> dict[str, Path]:
    """Every stand-in folder, built once (and kept under KILN_TEST_CACHE_DIR across runs)."""
    return {key: build_standin(family, standin_root, demo_model_dir) for key, family in FAMILIES.items()}


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory: pytest.TempPathFactory, standins: dict[str, Path]) -> Path:
    """A Hugging Face cache holding every stand-in at its base's pinned commit."""
    cache = tmp_path_factory.mktemp("standin-hub")
    for key, folder in standins.items():
        spec = get_base(key)
        install_in_hub_cache(folder, cache, spec.hf_id, spec.revision)
    return cache


def _hub_env(hub_cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_ENDPOINT", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    return {**env, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="session")
def family_exports(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, hub_cache: Path):
    """`kiln export hf:ORG/NAME@SHA --quant q4_0` of every stand-in this session tests, two at a time."""
    out_root = tmp_path_factory.mktemp("family-exports")
    env = _hub_env(hub_cache)

    def export(key: str):
        spec = get_base(key)
        out = out_root / key
        proc = run_kiln("export", f"hf:{spec.hf_id}@{spec.revision}", "--quant", QUANT, "--no-report",
                        "--out", str(out), "--json", *FAMILIES[key].export_flags, env=env, timeout=900)
        return out, proc

    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="family-export")
    wanted = [item.callspec.params["key"] for item in request.session.items
              if getattr(item, "originalname", None) == "test_stand_in_exports_end_to_end"]
    futures: dict[str, Future] = {key: pool.submit(export, key) for key in dict.fromkeys(wanted)}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def test_every_registry_base_has_a_stand_in_or_a_reason():
    """The registry says which bases a stand-in verifies, and why the others are not."""
    for key, spec in load_registry().items():
        family: Family | None = FAMILIES.get(key)
        if family is not None and family.faithful and key not in EXPECTED_REFUSALS:
            assert spec.verified_by_standin and spec.unverified_reason is None, key
        else:
            assert not spec.verified_by_standin and spec.unverified_reason, key


def test_registry_list_and_show_say_which_bases_a_stand_in_verifies():
    listed = run_kiln("registry", "list", timeout=60)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines() if line.strip()}
    for key, spec in load_registry().items():
        assert ("stand-in verified" in rows[key]) == spec.verified_by_standin, rows[key]
        assert ("unverified" in rows[key]) == (not spec.verified_by_standin), rows[key]
    unverified = [k for k, s in load_registry().items() if not s.verified_by_standin]
    note = " ".join(listed.stderr.split())  # rich wraps the line at the terminal's width
    assert all(k in note for k in unverified) and "kiln registry show KEY" in note, note
    shown = run_kiln("registry", "show", unverified[0], timeout=60)
    data = json.loads(shown.stdout)
    assert data["verified_by_standin"] is False and data["unverified_reason"]


@pytest.mark.parametrize("key", [k for k, f in FAMILIES.items() if f.vocab is not None and not f.spm_prefix])
def test_rebuilt_tokenizer_gives_llama_cpps_token_ids(key: str, standins: dict[str, Path], standin_root: Path):
    """The tokenizer, loaded as the converter and transformers load it, on every text llama.cpp tests."""
    from transformers import AutoTokenizer

    family = FAMILIES[key]
    folder = standins[key]
    vectors = vocab_vectors(llama_cpp_models(standin_root), family.vocab)
    assert len(vectors) > 30
    tokenizer = AutoTokenizer.from_pretrained(folder)
    wrong = [(text, ids) for text, ids in vectors if tokenizer.encode(text, add_special_tokens=False) != ids]
    assert not wrong, f"{len(wrong)} of {len(vectors)} texts tokenized differently, e.g. {wrong[0][0]!r}"
    if (folder / "tokenizer.model").is_file():
        import sentencepiece

        model = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        wrong = [text for text, ids in vectors if model.encode(text) != ids]
        assert not wrong, f"tokenizer.model: {len(wrong)} of {len(vectors)} texts differ, e.g. {wrong[0]!r}"


def _gguf_fields(path: Path) -> dict:
    from tasks.gguf_file import read_metadata

    return read_metadata(path, ("general.architecture", "general.name", "tokenizer.ggml.pre",
                                "tokenizer.chat_template"))


@pytest.mark.parametrize("key", [_param(k) for k in FAMILIES])
def test_stand_in_exports_end_to_end(key: str, family_exports, standins: dict[str, Path]):
    """Preflight, conversion, quantization, verification with the family's template, and the Modelfile."""
    spec = get_base(key)
    out, proc = family_exports[key].result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(proc.stdout)
    checks = {(c["name"], c["target"]): c for c in manifest["checks"]}
    assert all(c["passed"] for c in manifest["checks"]), [c for c in manifest["checks"] if not c["passed"]]
    # The same comparisons a registry export makes against the entry, here on what was really written.
    assert checks[("architecture", "source")]["detail"] == f"{spec.architecture} -> {spec.gguf_arch}"
    pre = FAMILIES[key].standin_pre or spec.tokenizer_pre
    assert checks[("pre-tokenizer", "source")]["detail"] == pre
    chat = checks[("chat template", "source")]["detail"]
    # The entry's dialect is the one Kiln picks: exact, exact apart from the date (Llama 3.2), or the
    # closest where no dialect renders every conversation of the matrix (Ollama then gets the Jinja).
    dialect = re.escape(spec.template)
    assert re.match(rf"(exact( apart from the date)?: the {dialect} dialect |no dialect is exact: closest dialect {dialect},)",
                    chat), chat
    for target in ("f16", QUANT):
        assert checks[("stops on end of turn", target)]["detail"].startswith("3/3 prompts stopped")
    assert checks[("tokenization matches transformers", "f16")]["passed"]
    paths = {o["quant"]: out / o["path"] for o in manifest["outputs"] if o["path"].endswith(".gguf")}
    for quant in ("f16", QUANT):
        fields = _gguf_fields(paths[quant])
        assert fields["general.architecture"] == spec.gguf_arch
        # The repository's own spelling: libllama keys tokenizer rules on it (Phi-3's need "phi-3" in it).
        assert fields["general.name"] == spec.hf_id.split("/")[-1]
        assert (fields["tokenizer.ggml.pre"] or "default") == pre
        template = json.loads((standins[key] / "tokenizer_config.json").read_text())["chat_template"]
        assert fields["tokenizer.chat_template"] == template
    for quant in ("f16", QUANT):
        modelfile = paths[quant].with_suffix(".Modelfile").read_text()
        assert f"\nFROM ./{paths[quant].name}\n" in modelfile and '\nTEMPLATE """' in modelfile, modelfile[:500]


def test_a_registry_key_export_checks_the_entry_against_the_converter(hub_cache: Path, tmp_path: Path):
    """`kiln export KEY --accept-license`: the registry path, where preflight compares the entry with the converter."""
    spec = get_base(REGISTRY_KEY_EXPORT)
    out = tmp_path / "out"
    proc = run_kiln("export", spec.key, "--accept-license", "--quant", QUANT, "--no-report", "--no-verify",
                    "--out", str(out), "--json", env=_hub_env(hub_cache), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["spec matches converter"]["detail"] == f"gguf_arch={spec.gguf_arch}, tokenizer_pre={spec.tokenizer_pre}"
    assert (out / "manifest.json").is_file()


# transformers ships Phi3 and Kiln never passes trust_remote_code on, so the auto_map is not needed.
@pytest.mark.parametrize("key", AUTO_MAP_BASES)
def test_a_registry_base_with_an_unneeded_auto_map_is_not_refused(key: str, hub_cache: Path, tmp_path: Path):
    proc = run_kiln("export", key, "--accept-license", "--quant", QUANT, "--no-report", "--no-verify",
                    "--out", str(tmp_path / "out"), env=_hub_env(hub_cache), timeout=900)
    assert "custom Python code" not in proc.stderr, proc.stderr[-1000:]


def test_a_phi3_fine_tune_under_a_name_of_its_own_verifies(standins: dict[str, Path], tmp_path: Path):
    """A local Phi-3.5 fine-tune in a folder named `my-ft`, its config naming no model (as transformers 5
    saves it): Kiln adds "phi3" to general.name, so libllama strips after the chat tokens as the
    tokenizer does, and the prompt token ids match transformers'."""
    import shutil

    folder = tmp_path / "my-ft"
    shutil.copytree(standins["phi-3.5-mini-instruct"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("_name_or_path", None)
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    proc = run_kiln("export", str(folder), "--quant", QUANT, "--no-report", "--out", str(out), "--json", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(proc.stdout)
    checks = {(c["name"], c["target"]): c for c in manifest["checks"]}
    assert checks[("tokenization matches transformers", "f16")]["passed"], checks
    f16 = next(out / o["path"] for o in manifest["outputs"] if o["quant"] == "f16")
    assert _gguf_fields(f16)["general.name"] == "my-ft-phi3"
