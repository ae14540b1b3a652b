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


def test_quantizations_starting_together_install_one_log_route():
    """The flow submits every quantization at once. Two threads that each installed a libllama log
    callback left libllama calling one Python had freed: `kiln demo` died of SIGSEGV in CI."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import ctypes, threading
        import llama_cpp
        from tasks.quantize import _route_libllama_log, _slots
        barrier, routes, slots = threading.Barrier(8), [], []
        def start():
            barrier.wait()
            routes.append(_route_libllama_log())
            slots.append(_slots(2))
        threads = [threading.Thread(target=start) for _ in range(8)]
        [t.start() for t in threads]; [t.join() for t in threads]
        installed, data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
        llama_cpp.llama_log_get(ctypes.byref(installed), ctypes.byref(data))
        pointer = lambda f: ctypes.cast(f, ctypes.c_void_p).value
        print(len({id(r) for r in routes}), len({id(s) for s in slots}), pointer(installed) == pointer(routes[0]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == ["1", "1", "True"]


# ------------------------------------------------------------------ through llama-quantize (a matrix or a recipe)


def test_llama_quantize_without_a_matrix_writes_the_in_process_bytes(demo_f16_gguf, tmp_path):
    """The tool path and the in-process path are one quantizer: any difference an imatrix makes is the matrix's."""
    from tasks.files import sha256_file
    from tasks.quantize import _quantize_with_tool

    in_process = quantize_gguf(demo_f16_gguf, tmp_path / "a.gguf", "q4_0", 2)
    seen: list[float] = []
    _quantize_with_tool(demo_f16_gguf, tmp_path / "b.gguf", "q4_0", 2, None, None, seen.append)
    assert sha256_file(tmp_path / "b.gguf") == sha256_file(in_process)
    assert seen and seen == sorted(seen) and seen[-1] < 1  # llama-quantize's "[ n/ N]" lines as progress


@pytest.mark.parametrize("quant", ["iq2_xs", "iq1_s", "q2_k_s"])
def test_llama_quantize_refuses_what_kiln_refuses_without_a_matrix(demo_f16_gguf, tmp_path, quant):
    """NEEDS_IMATRIX holds llama.cpp's own list: run without a matrix, llama-quantize says why, in one line."""
    from tasks.quantize import NEEDS_IMATRIX, _quantize_with_tool

    assert quant in NEEDS_IMATRIX
    with pytest.raises(QuantizationFailed, match=f"to {quant}: this quantization requires an imatrix!$"):
        _quantize_with_tool(demo_f16_gguf, tmp_path / "x.gguf", quant, 2, None, None, lambda _f: None)


def test_without_a_matrix_types_that_need_one_are_refused_before_any_work():
    from tasks.errors import QuantTypeUnknown
    from tasks.quantize import check_quant_types

    with pytest.raises(QuantTypeUnknown, match="iq2_m need an importance matrix.*--imatrix auto"):
        check_quant_types(["q4_k_m", "iq2_m"])
    check_quant_types(["q4_k_m", "iq2_m"], have_imatrix=True)


def test_the_cache_key_holds_the_matrix_content(tmp_path):
    from tasks.quantize import _quantize_cache_key

    matrix = tmp_path / "m.gguf"
    params = {"src": tmp_path / "f16.gguf", "dst": tmp_path / "q.gguf"}
    plain = _quantize_cache_key(None, params)
    matrix.write_bytes(b"one")
    first = _quantize_cache_key(None, {**params, "imatrix": matrix})
    matrix.write_bytes(b"two")  # the same path recomputed: another input
    second = _quantize_cache_key(None, {**params, "imatrix": matrix})
    assert len({plain, first, second}) == 3 and first.startswith(plain)
