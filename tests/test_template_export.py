"""`kiln export` of prebuilt GGUFs whose chat template Kiln cannot simply take: none at all (the
user's --dialect is what verification prompts with) and one no dialect renders (exported through
Ollama rendering the GGUF's own Jinja, not refused). Both run the whole flow through the `kiln`
executable on the embedded SmolLM2 GGUF with its template edited by gguf-py's gguf_new_metadata,
exported as it is (`--quant q4_1`, its own type: nothing to quantize, one file to verify).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.kiln_cli import run_kiln
from tests.test_template_cli import DEEPSEEK, gguf_with_template


def checks_of(manifest: dict) -> dict[tuple[str, str], dict]:
    return {(c["name"], c["target"]): c for c in manifest["checks"]}


def test_a_prebuilt_gguf_without_a_template_is_verified_through_the_given_dialect(tmp_path: Path) -> None:
    gguf = gguf_with_template(tmp_path / "no-template.gguf", None)
    out = tmp_path / "out"
    proc = run_kiln("export", str(gguf), "--dialect", "chatml", "--quant", "q4_1", "--no-report",
                    "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    manifest = json.loads(proc.stdout)
    checks = checks_of(manifest)
    chat = checks[("chat template", "source")]
    assert "chatml" in chat["detail"] and "no chat template" in chat["detail"]
    # Verification prompted the model through chatml (it fails outright with no template to render):
    # the instruct model then answers and stops on <|im_end|>.
    stops = [c for (name, _), c in checks.items() if name == "stops on end of turn"]
    assert stops and all(c["passed"] for c in stops), stops
    assert any("Paris" in c["detail"] for c in stops), stops
    assert manifest["ollama"]["dialect"] == "chatml" and not manifest["ollama"]["verified"]


def test_a_template_no_dialect_renders_exports_through_ollamas_jinja(tmp_path: Path) -> None:
    gguf = gguf_with_template(tmp_path / "deepseek-template.gguf", DEEPSEEK.read_text())
    out = tmp_path / "out"
    proc = run_kiln("export", str(gguf), "--quant", "q4_1", "--no-verify", "--no-report", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    manifest = json.loads(proc.stdout)
    chat = checks_of(manifest)[("chat template", "source")]
    assert "no dialect is exact" in chat["detail"] and "Ollama format: jinja" in chat["detail"]
    # The manifest names the closest dialect (its stops) and, not verified, says so.
    assert manifest["ollama"]["dialect"] and not manifest["ollama"]["verified"]
