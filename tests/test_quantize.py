"""Quantization through libllama, as the convert-quantize flow runs it."""

from __future__ import annotations

import pytest

from tasks.errors import QuantizationFailed
from tasks.quantize import quantize_gguf


def test_fallback_tensors_are_counted_in_one_line_not_printed_one_by_one(demo_f16_gguf, tmp_path, capfd, monkeypatch):
    """libllama warns about every tensor it cannot store as asked (SmolLM2's 576 columns are not
    whole 256-wide k-quant blocks); the user gets one line that says how many and as what."""
    logged: list[str] = []
    monkeypatch.setattr("tasks.quantize.log_in_run", lambda message, *args: logged.append(message % args))

    quantize_gguf(demo_f16_gguf, tmp_path / "q4_k_m.gguf", "q4_k_m", 2)

    assert "falling back" not in capfd.readouterr().err
    assert logged == ["q4_k_m: 180 of 272 tensors stored as q5_0 ×166, q8_0 ×14 instead: "
                      "their rows are not whole q4_k_m blocks"]


def test_a_failed_quantization_gives_libllamas_reason(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf at all")
    with pytest.raises(QuantizationFailed, match=r"could not quantize broken.gguf to q8_0: .*failed to load model"):
        quantize_gguf(broken, tmp_path / "out.gguf", "q8_0", 1)
    assert not (tmp_path / "out.gguf").exists()
