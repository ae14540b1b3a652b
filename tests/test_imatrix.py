"""`--imatrix`: the calibration text, reading and checking matrices, and the refusals through `kiln` as typed.

The one full export (`test_export_with_imatrix_auto`) computes a real matrix with llama-imatrix on
the demo model and makes q4_k_m and iq2_xs with it through llama-quantize (about 3 minutes here).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

from tasks.files import sha256_file
from tasks.imatrix import (
    CALIBRATION_SHA256,
    CALIBRATION_TEXT,
    CTX,
    ImatrixInvalid,
    check_calibration_text,
    check_imatrix_matches,
    check_imatrix_value,
    imatrix_kind,
    read_matrix_entries,
)
from tests.support.kiln_cli import reached_prefect, run_kiln

EVAL_TEXT = Path(__file__).resolve().parent.parent / "tasks" / "eval_text" / "kiln-eval-v1.txt"


def write_gguf_matrix(path: Path, entries: dict[str, int]) -> Path:
    """A matrix in llama-imatrix's GGUF layout (`NAME.in_sum2` and `NAME.counts`, f32), `entries`: name → values."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch="imatrix")
    writer.add_type("imatrix")
    for name, n in entries.items():
        writer.add_tensor(f"{name}.in_sum2", np.ones(n, dtype=np.float32))
        writer.add_tensor(f"{name}.counts", np.ones(1, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_dat_matrix(path: Path, entries: dict[str, int]) -> Path:
    """llama-imatrix's legacy `.dat` layout (tools/imatrix/imatrix.cpp `save_imatrix_legacy`)."""
    data = struct.pack("<i", len(entries))
    for name, n in entries.items():
        encoded = name.encode()
        data += struct.pack("<i", len(encoded)) + encoded + struct.pack("<ii", 1, n) + struct.pack(f"<{n}f", *[1.0] * n)
    path.write_bytes(data + struct.pack("<i", 1))
    return path


def model_entries(gguf_path: Path) -> dict[str, int]:
    """What a matrix for this model holds: every 2-D weight except the embedding, by its input columns."""
    from tasks.gguf_file import read_layout

    return {t.name: t.shape[0] for t in read_layout(gguf_path).tensors
            if len(t.shape) == 2 and t.name.startswith("blk.")}


# ------------------------------------------------------------------ the calibration text


def test_calibration_text_is_the_recorded_one_and_shares_nothing_with_the_eval_text():
    assert sha256_file(CALIBRATION_TEXT) == CALIBRATION_SHA256
    readme = (CALIBRATION_TEXT.parent / "README.md").read_text()
    assert CALIBRATION_SHA256 in readme and "CC0" in readme

    def shingles(text: str, n: int = 6) -> set[tuple[str, ...]]:
        words = re.findall(r"\w+", text.lower())
        return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}

    assert not shingles(CALIBRATION_TEXT.read_text()) & shingles(EVAL_TEXT.read_text())


def test_calibration_text_fills_the_chunks_it_is_computed_on(demo_model_dir):
    from tokenizers import Tokenizer

    tokens = len(Tokenizer.from_file(str(demo_model_dir / "tokenizer.json")).encode(CALIBRATION_TEXT.read_text()).ids)
    assert tokens >= 4 * CTX  # a few thousand tokens: several chunks, not the bare minimum of two


# ------------------------------------------------------------------ values and files alone


@pytest.mark.parametrize("value, kind", [("auto", "auto"), ("my.txt", "user-text"), ("m.gguf", "file"),
                                         ("m.DAT", "file")])
def test_imatrix_kind(value, kind):
    assert imatrix_kind(value) == kind


@pytest.mark.parametrize("content, words", [
    (b"", "is empty"),
    (b" \n\t\n", "is empty"),
    ("caf\u00e9 ".encode("latin-1") * 400, "is not UTF-8"),
    (b"short text. " * 20, "too short"),
])
def test_calibration_text_refusals(tmp_path, content, words):
    text = tmp_path / "calib.txt"
    text.write_bytes(content)
    with pytest.raises(ImatrixInvalid, match=words):
        check_calibration_text(text)


def test_matrix_files_are_read_in_both_formats(tmp_path):
    entries = {"blk.0.attn_q.weight": 8, "blk.0.ffn_down.weight": 16}
    assert read_matrix_entries(write_gguf_matrix(tmp_path / "m.gguf", entries)) == entries
    assert read_matrix_entries(write_dat_matrix(tmp_path / "m.dat", entries)) == entries
    (tmp_path / "junk.dat").write_bytes(b"\xff" * 64)
    with pytest.raises(ImatrixInvalid, match="not an importance matrix"):
        read_matrix_entries(tmp_path / "junk.dat")


def test_a_model_gguf_is_not_a_matrix(demo_f16_gguf):
    with pytest.raises(ImatrixInvalid, match="not an importance matrix"):
        check_imatrix_value(str(demo_f16_gguf))


def test_matrix_for_this_model_fits_and_another_models_is_refused(tmp_path, demo_f16_gguf):
    mine = model_entries(demo_f16_gguf)
    assert check_imatrix_matches(write_dat_matrix(tmp_path / "mine.dat", mine), demo_f16_gguf) == len(mine)
    # A wider model's matrix: same tensor names, 4096 columns where SmolLM2 has 576.
    wider = {name: 4096 for name in mine}
    with pytest.raises(ImatrixInvalid, match="another model.*4096 values"):
        check_imatrix_matches(write_gguf_matrix(tmp_path / "wider.gguf", wider), demo_f16_gguf)
    # A deeper model's: layers this one does not have.
    deeper = {**mine, "blk.40.ffn_down.weight": 1536}
    with pytest.raises(ImatrixInvalid, match="another model.*blk.40.ffn_down.weight"):
        check_imatrix_matches(write_gguf_matrix(tmp_path / "deeper.gguf", deeper), demo_f16_gguf)


# ------------------------------------------------------------------ refusals through `kiln`


def _refused(proc, out: Path, *words: str, before_prefect: bool = True) -> None:
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for word in words:
        assert word in proc.stderr, (word, proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if line.lower().startswith("error")]
    assert len(errors) == 1, proc.stderr[-3000:]
    if before_prefect:
        assert not reached_prefect(proc.stderr), proc.stderr[-2000:]
    assert not out.exists()  # nothing left behind, not even the folder


@pytest.mark.parametrize("content, words", [
    (b"", ["calib.txt is empty"]),
    ("na\u00efve caf\u00e9 ".encode("latin-1") * 500, ["calib.txt is not UTF-8", "iconv"]),
    (b"Too short to fill one chunk of context.\n", ["calib.txt is too short"]),
])
def test_cli_refuses_bad_calibration_text(tmp_path, content, words):
    text = tmp_path / "calib.txt"
    text.write_bytes(content)
    out = tmp_path / "out"
    proc = run_kiln("export", "demo", "--quant", "q4_k_m", "--imatrix", str(text), "--out", str(out), timeout=120)
    _refused(proc, out, *words)


def test_cli_refuses_a_type_that_needs_a_matrix_without_one(tmp_path):
    out = tmp_path / "out"
    proc = run_kiln("export", "demo", "--quant", "iq2_xs", "--out", str(out), timeout=120)
    _refused(proc, out, "iq2_xs need an importance matrix", "--imatrix auto")


def test_cli_refuses_an_imatrix_value_of_no_known_kind(tmp_path):
    out = tmp_path / "out"
    proc = run_kiln("export", "demo", "--imatrix", str(tmp_path / "notes.md"), "--out", str(out), timeout=120)
    _refused(proc, out, "--imatrix", "PATH.txt")


def test_cli_counts_llama_imatrix_against_the_memory_budget(tmp_path, demo_model_dir):
    """llama-imatrix maps the float GGUF and holds a 512-token chunk's logits: SmolLM2-135M's
    0.98 GB quantization fits 1.05 GB, its 1.11 GB matrix does not (tasks/memory.py)."""
    from tasks.memory import estimate_memory
    from tasks.preflight import local_weight_params

    config = json.loads((demo_model_dir / "config.json").read_text())
    without = estimate_memory(local_weight_params(demo_model_dir), "f16", config, verify=False, report=False)
    assert without.peak_bytes < 1.05e9  # the same export without a matrix to compute fits
    out = tmp_path / "out"
    proc = run_kiln("export", "demo", "--quant", "q4_k_m", "--imatrix", "auto", "--no-verify", "--no-report",
                    "--memory-budget", "1.05GB", "--out", str(out), timeout=120)
    _refused(proc, out, "at its peak (imatrix;", "over the memory budget of 1.05 GB", "--imatrix PATH.gguf")


def test_cli_refuses_a_matrix_for_another_model(tmp_path, demo_f16_gguf):
    """Only the converted model's tensors show the misfit: refused after conversion, before quantizing."""
    wider = write_gguf_matrix(tmp_path / "llama-8b.imatrix.gguf", {n: 4096 for n in model_entries(demo_f16_gguf)})
    out = tmp_path / "out"
    proc = run_kiln("export", "demo", "--quant", "q4_k_m", "--imatrix", str(wider), "--no-verify", "--no-report",
                    "--out", str(out), timeout=600)
    _refused(proc, out, "llama-8b.imatrix.gguf was made for another model", before_prefect=False)
    assert "quantize to" not in proc.stderr  # nothing was quantized with it


def test_cli_refuses_a_text_too_short_for_the_models_tokens(tmp_path):
    """Long enough in bytes to pass the check before Prefect; llama-imatrix counts the tokens and says."""
    text = tmp_path / "calib.txt"
    text.write_text("A kiln fires clay slowly, and the potter waits for it to cool. " * 30)  # ~1900 bytes, ~400 tokens
    out = tmp_path / "out"
    proc = run_kiln("export", "demo", "--quant", "q4_k_m", "--imatrix", str(text), "--no-verify", "--no-report",
                    "--out", str(out), timeout=600)
    _refused(proc, out, "calib.txt is too short for this model: it tokenizes to", "needs two chunks of 512",
             before_prefect=False)


# ------------------------------------------------------------------ a real export with a matrix


def test_export_with_imatrix_auto(tmp_path):
    """`--imatrix auto` computes the matrix on Kiln's text; q4_k_m and iq2_xs (which needs one) are made with it,
    labelled `-imat`, measured by the report like any type, and the manifest records where the matrix came from."""
    out = tmp_path / "out"
    proc = run_kiln("export", "demo", "--quant", "q4_k_m,iq2_xs", "--imatrix", "auto", "--no-verify",
                    "--out", str(out), "--json", timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(proc.stdout)
    record = manifest["imatrix"]
    assert record["source"] == "auto" and record["text_sha256"] == CALIBRATION_SHA256
    assert sha256_file(Path(record["path"])) == record["sha256"]
    assert record["entries"] == 210  # SmolLM2-135M: 30 layers × 7 matrices
    assert record["computed_s"] > 0
    files = {o["quant"]: o["path"] for o in manifest["outputs"] if o["path"].endswith(".gguf")}
    assert files["q4_k_m-imat"].endswith("-q4_k_m-imat.gguf") and files["iq2_xs-imat"].endswith("-iq2_xs-imat.gguf")
    rows = {r["quant"]: r for r in manifest["report"]["rows"]}
    assert {"q4_k_m-imat", "iq2_xs-imat"} <= set(rows)
    assert rows["iq2_xs-imat"]["size_bytes"] < rows["q4_k_m-imat"]["size_bytes"]
    assert 0 < rows["q4_k_m-imat"]["kl_mean"] < rows["iq2_xs-imat"]["kl_mean"]
    # Up to date on a second run: the matrix's input is part of the request key.
    again = run_kiln("export", "demo", "--quant", "q4_k_m,iq2_xs", "--imatrix", "auto", "--no-verify",
                     "--out", str(out), timeout=300)
    assert again.returncode == 0 and "up to date" in again.stderr, again.stderr[-2000:]
