"""Chat templates through the `kiln` executable, as a user types the commands.

`kiln template check` on templates the dialects do not all fit (Llama 3.2's date, Mistral v0.3's
`[/INST]`, DeepSeek-R1-Distill-Qwen), its --bos-token/--eos-token options, text from outside Kiln
with square brackets printed literally, and a prebuilt GGUF without a chat template refused
before any heavy work. The exports that run the whole flow are in tests/test_template_export.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import templates
from tasks.demo import packaged_gguf
from tests.support.kiln_cli import reached_prefect, run_kiln

REFERENCES = templates.REFERENCE_DIR
LLAMA32 = REFERENCES / "llama3.Llama-3.2-3B-Instruct.jinja"
MISTRAL_V03 = REFERENCES / "mistralv3.Mistral-7B-Instruct-v0.3.jinja"
DEEPSEEK = REFERENCES / "unmatched.DeepSeek-R1-Distill-Qwen-32B.jinja"
DEEPSEEK_BOS, DEEPSEEK_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def model_folder(where: Path, template: str, bos: str | None, eos: str | None) -> Path:
    """A model folder as a user has it: tokenizer_config.json with the chat template and special tokens."""
    where.mkdir(parents=True)
    config = {"chat_template": template, "bos_token": bos, "eos_token": eos}
    (where / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return where


def gguf_with_template(target: Path, template: str | None) -> Path:
    """The demo GGUF with its chat template replaced (or removed), by gguf-py's own gguf_new_metadata."""
    edit = ["--remove-metadata", "tokenizer.chat_template"] if template is None else ["--chat-template", template]
    proc = subprocess.run(
        [sys.executable, "-m", "gguf.scripts.gguf_new_metadata", *edit, "--force", str(packaged_gguf()), str(target)],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return target


def assert_clean(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr and "MarkupError" not in proc.stderr, proc.stderr[-3000:]


# -- Llama 3.2: exact apart from the date (issue 13, item 1) --------------------------------


@pytest.mark.parametrize("dialect", [None, "llama3"])
def test_llama32_template_is_exact_apart_from_the_date(tmp_path: Path, dialect: str | None) -> None:
    folder = model_folder(tmp_path / "Llama-3.2-1B-Instruct", LLAMA32.read_text(), "<|begin_of_text|>", "<|eot_id|>")
    extra = ["--dialect", dialect] if dialect else []
    text = run_kiln("template", "check", str(folder), *extra)
    assert text.returncode == 0, text.stderr[-3000:]
    assert_clean(text)
    assert "exact apart from the date" in text.stderr
    assert "2024-07-26" in text.stderr and "today's date" in text.stderr
    assert "Ollama format: template" in text.stderr
    as_json = run_kiln("template", "check", str(folder), *extra, "--json")
    assert as_json.returncode == 0, as_json.stderr[-3000:]
    check = json.loads(as_json.stdout)
    assert (check["outcome"], check["dialect"], check["verified"]) == ("exact-apart-from-date", "llama3", True)
    assert (check["ollama_format"], check["date_policy"], check["mismatches"]) == ("template", "fixed", [])
    assert "2024-07-26" in check["date_note"]


def test_llama32_in_a_gguf_is_exact_apart_from_the_date(tmp_path: Path) -> None:
    gguf = gguf_with_template(tmp_path / "llama32-template.gguf", LLAMA32.read_text())
    proc = run_kiln("template", "check", str(gguf), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = json.loads(proc.stdout)
    assert check["source_kind"] == "gguf" and check["outcome"] == "exact-apart-from-date"


# -- options a user needs (issue 13, item 6) ------------------------------------------------


def test_a_bare_jinja_file_gets_its_special_tokens_from_options(tmp_path: Path) -> None:
    without = run_kiln("template", "check", str(MISTRAL_V03))
    assert without.returncode == 2
    assert_clean(without)
    assert "--bos-token/--eos-token" in without.stderr
    given = run_kiln("template", "check", str(MISTRAL_V03), "--bos-token", "<s>", "--eos-token", "</s>", "--json")
    assert given.returncode == 0, given.stderr[-3000:]
    check = json.loads(given.stdout)
    assert (check["dialect"], check["outcome"], check["ollama_format"]) == ("mistralv3", "exact", "template")


# -- no dialect fits: the model's own Jinja (issue 19) --------------------------------------


def test_an_unmatched_template_is_not_refused_it_goes_to_ollamas_jinja(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "DeepSeek-R1-Distill-Qwen-1.5B", DEEPSEEK.read_text(), DEEPSEEK_BOS, DEEPSEEK_EOS)
    text = run_kiln("template", "check", str(folder))
    assert text.returncode == 0, text.stderr[-3000:]
    assert "no dialect is exact" in text.stderr and "Ollama format: jinja" in text.stderr
    assert "REQUIRES" in text.stderr
    check = json.loads(run_kiln("template", "check", str(folder), "--json").stdout)
    assert (check["outcome"], check["ollama_format"], check["verified"], check["template"]) == (
        "no-match", "jinja", False, None)
    assert check["dialect"] in templates.registered_dialects() and check["mismatches"]
    # Asking for a Go template explicitly is where a refusal belongs.
    forced = run_kiln("template", "check", str(folder), "--dialect", "chatml")
    assert forced.returncode == 2 and "Leave --dialect out" in forced.stderr
    assert_clean(forced)


# -- square brackets from outside Kiln are printed literally (issue 19, item 3) ---------------


def test_mistral_template_with_the_wrong_dialect_prints_inst_tags_literally(tmp_path: Path) -> None:
    # The reported crash: rich.errors.MarkupError on "closing tag '[/INST]'". The folder's name has
    # brackets too.
    folder = model_folder(tmp_path / "[models]" / "Mistral-7B[/INST]v0.3", MISTRAL_V03.read_text(), "<s>", "</s>")
    proc = run_kiln("template", "check", str(folder), "--dialect", "mistral")
    assert proc.returncode == 2
    assert_clean(proc)
    assert proc.stderr.startswith("error: the 'mistral' dialect does not render")
    assert "[/INST]" in proc.stderr and "[INST] What is the capital of France?" in proc.stderr
    assert "[models]/Mistral-7B[/INST]v0.3" in proc.stderr
    assert "pass --dialect mistralv3" in proc.stderr
    ok = run_kiln("template", "check", str(folder), "--dialect", "mistralv3")
    assert ok.returncode == 0 and "exact: the mistralv3 dialect" in ok.stderr
    assert_clean(ok)


def test_a_prompt_with_brackets_in_the_difference_is_printed_literally(tmp_path: Path) -> None:
    # Mistral v0.3 that upper-cases one word of the user's text: the mistralv3 dialect differs only
    # on the matrix conversation whose prompt is full of template syntax, and the report quotes it.
    text = MISTRAL_V03.read_text().replace('"[INST] " + message["content"] + "[/INST]"',
                                           '"[INST] " + message["content"]|replace("Print", "PRINT") + "[/INST]"')
    assert text != MISTRAL_V03.read_text()
    path = tmp_path / "[tmpl]" / "mistral[v0.3].jinja"
    path.parent.mkdir()
    path.write_text(text, encoding="utf-8")
    proc = run_kiln("template", "check", str(path), "--bos-token", "<s>", "--eos-token", "</s>",
                    "--dialect", "mistralv3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_clean(proc)
    assert "near: closest dialect mistralv3" in proc.stderr and "template-syntax-in-content" in proc.stderr
    assert "'[INST] PRINT these literally: {{ .System }}" in proc.stderr
    assert "'[INST] Print these literally: {{ .System }}" in proc.stderr


def test_a_model_name_and_a_path_with_brackets_are_printed_literally(tmp_path: Path) -> None:
    for args, expected in [
        (["export", "hf:org/na[/INST]me@" + "0" * 40, "--out", str(tmp_path / "a")], "hf:org/na[/INST]me@"),
        (["export", "demo", "--ollama-name", "bad[/INST]name", "--out", str(tmp_path / "b")], "'bad[/INST]name'"),
        (["export", str(tmp_path / "[x]" / "a[/INST].gguf"), "--out", str(tmp_path / "c")], "[x]/a[/INST].gguf"),
    ]:
        proc = run_kiln(*args)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert_clean(proc)
        assert expected in proc.stderr, (expected, proc.stderr)


# -- a prebuilt GGUF without a chat template (issue 13, item 2) --------------------------------


def test_a_prebuilt_gguf_without_a_chat_template_is_refused_before_prefect(tmp_path: Path) -> None:
    gguf = gguf_with_template(tmp_path / "no-template.gguf", None)
    proc = run_kiln("export", str(gguf), "--quant", "q8_0", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert_clean(proc)
    assert "no-template.gguf carries no chat template" in proc.stderr and "--dialect" in proc.stderr
    assert not reached_prefect(proc.stderr)  # refused before Prefect
    assert not list(tmp_path.glob("out/*.gguf"))


def test_export_refuses_an_asked_for_dialect_that_is_far_off_before_prefect(tmp_path: Path) -> None:
    gguf = gguf_with_template(tmp_path / "deepseek-template.gguf", DEEPSEEK.read_text())
    proc = run_kiln("export", str(gguf), "--dialect", "chatml", "--quant", "q4_1", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert_clean(proc)
    assert "the 'chatml' dialect does not render" in proc.stderr and "Leave --dialect out" in proc.stderr
    assert not reached_prefect(proc.stderr)
