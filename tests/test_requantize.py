"""A prebuilt quantized GGUF through `kiln export`: never quantized up, down only with --allow-requantize.

The sources are the session demo export's own Q4_K_M and Q8_0 files (tests/conftest.py), so
nothing is converted; verification and the report are off, the subject here is which types are made.
The refusals (nothing left to make, `--quant auto`) are rows F03/F04 of docs/bad-inputs.md.
"""

from __future__ import annotations

import json

from tests.support.kiln_cli import run_kiln


def test_default_list_on_a_q4_k_m_gguf_skips_q8_0_and_says_why(demo_export, tmp_path):
    """Was: Q8_0 made from the Q4_K_M, a bigger file with the quality of the Q4_K_M."""
    source = demo_export[0] / "smollm2-135m-instruct-q4_k_m.gguf"
    out = tmp_path / "out"
    proc = run_kiln("export", str(source), "--out", str(out), "--no-verify", "--no-report", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped q8_0: more bits per weight" in proc.stderr  # in the terminal, before the flow starts
    manifest = json.loads(proc.stdout)
    assert [o["quant"] for o in manifest["outputs"] if o["path"].endswith(".gguf")] == ["q4_k_m"]
    skipped = [c for c in manifest["checks"] if c["name"] == "quant type skipped"]
    assert [(c["target"], "quality of the q4_k_m it came from" in c["detail"]) for c in skipped] == [("q8_0", True)]
    assert manifest["request"]["quants"] == ["q8_0", "q4_k_m"]  # what was asked stays on record


def test_allow_requantize_makes_a_smaller_type_from_a_q8_0_gguf_and_warns(demo_export, tmp_path):
    source = demo_export[0] / "smollm2-135m-instruct-q8_0.gguf"
    out = tmp_path / "out"
    refused = run_kiln("export", str(source), "--quant", "q4_k_m", "--out", str(out), timeout=120)
    assert refused.returncode == 2 and "--allow-requantize" in refused.stderr, refused.stderr[-3000:]
    assert not out.exists()
    proc = run_kiln("export", str(source), "--quant", "q4_k_m", "--allow-requantize", "--out", str(out),
                    "--no-verify", "--no-report", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: --allow-requantize: q4_k_m made from the q8_0 source lose more" in proc.stderr
    manifest = json.loads(proc.stdout)
    assert {o["quant"] for o in manifest["outputs"] if o["path"].endswith(".gguf")} == {"q8_0", "q4_k_m"}
    assert any(c["name"] == "requantize" for c in manifest["checks"])
