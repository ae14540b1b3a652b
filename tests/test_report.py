"""The quality/size/speed report: real measurements on SmolLM2-135M-Instruct, and the advice built on them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tasks import report as rp
from tasks.errors import KilnError
from tasks.files import sha256_file

QUANTS = ("q8_0", "q4_k_m", "q2_k")


@pytest.fixture(scope="module")
def demo_quants(demo_f16_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tasks.quantize import quantize_gguf

    out = tmp_path_factory.mktemp("report-quants")
    return {q: quantize_gguf(demo_f16_gguf, out / f"demo.{q}.gguf", q) for q in QUANTS}


@pytest.fixture(scope="module")
def demo_report(demo_f16_gguf: Path, demo_quants: dict[str, Path]) -> rp.QuantReport:
    return rp.measure_quants(demo_f16_gguf, demo_quants)


def test_quality_is_ordered_by_bits(demo_report: rp.QuantReport) -> None:
    q8, q4, q2 = (demo_report.row(q) for q in QUANTS)
    # Orderings, not fixed values: more bits, closer to f16.
    assert q8.kl_mean < q4.kl_mean < q2.kl_mean
    assert q8.top1_agreement > q4.top1_agreement > q2.top1_agreement
    assert q8.size_bytes > q4.size_bytes > q2.size_bytes
    assert q8.bits_per_weight > q4.bits_per_weight > q2.bits_per_weight
    assert q8.kl_mean > 0 and q8.kl_mean <= q8.kl_p99 <= q8.kl_max
    assert q8.chat_kl_mean is not None and q2.chat_kl_mean is not None and q8.chat_kl_mean < q2.chat_kl_mean


def test_reference_row_and_recorded_inputs(demo_report: rp.QuantReport, demo_f16_gguf: Path) -> None:
    ref = demo_report.row("f16")
    assert ref.is_reference and ref.kl_mean == 0 and ref.top1_agreement == 1
    assert ref.size_bytes == demo_f16_gguf.stat().st_size
    assert 15.9 < ref.bits_per_weight < 16.1
    assert 1 < ref.ppl < 100 and ref.ppl_ratio == pytest.approx(1)
    assert demo_report.eval_text_sha256 == sha256_file(rp.DEFAULT_EVAL_TEXT)
    assert demo_report.scored_tokens == demo_report.n_chunks * (demo_report.n_ctx - 1 - demo_report.n_ctx // 2)
    assert demo_report.chat_prompts == 1 and demo_report.chat_tokens > 0
    assert demo_report.n_threads >= 1
    for row in demo_report.rows:
        assert row.prompt_tps > 0 and row.gen_tps > 0
    # The record round-trips through JSON, as the manifest stores it.
    assert rp.QuantReport.model_validate_json(demo_report.model_dump_json()) == demo_report


def test_perplexity_matches_llama_cpp_python_high_level_api(demo_report: rp.QuantReport, demo_f16_gguf: Path) -> None:
    """An independent path (Llama.eval with logits_all) gives the same f16 perplexity on the same chunk."""
    import llama_cpp

    n_ctx = demo_report.n_ctx
    llm = llama_cpp.Llama(str(demo_f16_gguf), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False)
    try:
        tokens = llm.tokenize(rp.DEFAULT_EVAL_TEXT.read_text(encoding="utf-8").encode(), add_bos=True)
        nll = []
        for c in range(demo_report.n_chunks):
            chunk = tokens[c * n_ctx:(c + 1) * n_ctx]
            llm.reset()
            llm.eval(chunk)
            logits = np.asarray(llm.scores[:n_ctx], dtype=np.float64)
            for i in range(n_ctx // 2, n_ctx - 1):
                row = logits[i]
                lse = row.max() + math.log(np.exp(row - row.max()).sum())
                nll.append(lse - row[chunk[i + 1]])
    finally:
        llm.close()
    assert math.exp(float(np.mean(nll))) == pytest.approx(demo_report.row("f16").ppl, rel=2e-3)


def test_kl_and_agreement_match_a_naive_float64_computation() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(5, 300)).astype(np.float32) * 4
    other = base + rng.normal(size=base.shape).astype(np.float32)
    targets = rng.integers(0, 300, size=5)
    ref = rp._RefPart(base)
    kl, same, nll = rp._compare(ref, other.copy(), targets)

    def logsm(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        return x - (x.max(1, keepdims=True) + np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)))

    lp, lq = logsm(base), logsm(other)
    mask = lp > -16
    want_kl = (np.where(mask, np.exp(lp) * (lp - lq), 0.0)).sum(1)
    np.testing.assert_allclose(kl, want_kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(same, base.argmax(1) == other.argmax(1))
    np.testing.assert_allclose(nll, -lq[np.arange(5), targets], rtol=1e-5)


def test_markdown_table_is_sorted_by_size(demo_report: rp.QuantReport) -> None:
    md = rp.report_markdown(demo_report)
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| quant")
            and not line.startswith("| ---")]
    assert [r.split("|")[1].strip() for r in rows] == ["f16 (ref)", "q8_0", "q4_k_m", "q2_k"]
    assert demo_report.eval_text_sha256[:16] in md and "thread" in md


def test_plot_and_rich_table(demo_report: rp.QuantReport, tmp_path: Path) -> None:
    from rich.console import Console

    files = rp.write_report_files(demo_report, tmp_path)
    assert files["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| q4_k_m |" in files["markdown"].read_text()
    console = Console(record=True, width=200)
    console.print(rp.rich_table(demo_report))
    text = console.export_text()
    assert "q2_k" in text and "KL mean" in text


def test_choose_quant_on_measured_numbers(demo_report: rp.QuantReport) -> None:
    q8, q4, q2 = (demo_report.row(q) for q in QUANTS)
    by_size = rp.choose_quant(demo_report, max_size_bytes=q4.size_bytes + 1)
    assert by_size.quant == "q4_k_m" and "q8_0" in by_size.rejected
    assert "q4_k_m" in by_size.reason and "q8_0" in by_size.reason
    by_kl = rp.choose_quant(demo_report, max_kl=(q8.kl_mean + q4.kl_mean) / 2)
    assert by_kl.quant == "q8_0" and set(by_kl.rejected) == {"q4_k_m", "q2_k"}


def _row(quant: str, size_mb: float, kl: float, ref: bool = False) -> rp.QuantMetrics:
    return rp.QuantMetrics(
        quant=quant, file=f"m.{quant}.gguf", is_reference=ref, size_bytes=int(size_mb * 1e6), n_params=10**9,
        bits_per_weight=size_mb * 8e6 / 1e9, kl_mean=kl, kl_p99=kl * 5, kl_max=kl * 10,
        top1_agreement=1 - kl, ppl=10 * (1 + kl), ppl_ratio=1 + kl, prompt_tps=100, gen_tps=10, eval_seconds=1,
    )


@pytest.fixture()
def synthetic() -> rp.QuantReport:
    rows = [_row("f16", 2000, 0, ref=True), _row("q8_0", 1060, 0.002), _row("q6_k", 820, 0.006),
            _row("q5_k_m", 710, 0.015), _row("q4_k_m", 610, 0.04), _row("q3_k_m", 490, 0.12),
            _row("q2_k", 400, 0.35)]
    return rp.QuantReport(
        eval_text="kiln-eval-v1.txt", eval_text_sha256="0" * 64, n_ctx=512, n_chunks=2, scored_tokens=510,
        chat_prompts=1, chat_tokens=10, n_threads=2, load_average=0.1, machine="test", llama_cpp_python="x",
        measure_seconds=1.0, rows=rows,
    )


def test_choose_by_size_takes_the_most_faithful_that_fits(synthetic: rp.QuantReport) -> None:
    choice = rp.choose_quant(synthetic, max_size_bytes=rp.parse_size("500MB"))
    assert choice.quant == "q3_k_m"
    assert "lowest KL" in choice.reason and "q4_k_m" in choice.reason and "500.0 MB" in choice.reason
    assert choice.considered == ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k"]


def test_choose_by_kl_takes_the_smallest_good_enough(synthetic: rp.QuantReport) -> None:
    choice = rp.choose_quant(synthetic, max_kl=0.05)
    assert choice.quant == "q4_k_m"
    assert "smallest" in choice.reason and "q3_k_m" in choice.reason


def test_choose_with_both_bounds(synthetic: rp.QuantReport) -> None:
    assert rp.choose_quant(synthetic, max_size_bytes=int(900e6), max_kl=0.05).quant == "q6_k"
    with pytest.raises(rp.NoQuantFits, match="q2_k"):
        rp.choose_quant(synthetic, max_size_bytes=int(450e6), max_kl=0.05)


def test_choose_refuses_without_bounds_or_when_nothing_fits(synthetic: rp.QuantReport) -> None:
    with pytest.raises(KilnError, match="--max-size"):
        rp.choose_quant(synthetic)
    with pytest.raises(rp.NoQuantFits, match="smallest measured type, q2_k, is 400.0 MB"):
        rp.choose_quant(synthetic, max_size_bytes=int(100e6))
    with pytest.raises(rp.NoQuantFits, match="most faithful, q8_0"):
        rp.choose_quant(synthetic, max_kl=0.0001)


def test_parse_size() -> None:
    assert rp.parse_size("500MB") == 500_000_000
    assert rp.parse_size("1.5 GB") == 1_500_000_000
    assert rp.parse_size("800MiB") == 800 * 2**20
    assert rp.parse_size("123") == 123
    with pytest.raises(KilnError, match="500MB"):
        rp.parse_size("lots")


def test_auto_candidates_are_known_quant_types() -> None:
    from tasks.quantize import check_quant_types

    check_quant_types(list(rp.AUTO_CANDIDATES))


def test_measure_candidates_keeps_the_chosen_file(demo_f16_gguf: Path, tmp_path: Path) -> None:
    report, paths = rp.measure_candidates(
        demo_f16_gguf, tmp_path / "work", candidates=("q4_k_m",), n_ctx=64, chat_prompts=[], gen_tokens=4,
    )
    assert report.quantize_seconds is not None and report.row("q4_k_m").quantize_seconds is not None
    assert report.chat_tokens == 0 and report.row("q4_k_m").chat_kl_mean is None
    choice = rp.choose_quant(report, max_size_bytes=rp.parse_size("10GB"))
    final = rp.move_chosen(paths, choice, tmp_path / "out" / "demo.q4_k_m.gguf")
    assert final.is_file() and not paths["q4_k_m"].exists()


def test_refuses_missing_files_and_short_texts(demo_f16_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(rp.ReportError, match="does not exist"):
        rp.measure_quants(demo_f16_gguf, {"q8_0": tmp_path / "nope.gguf"})
    short = tmp_path / "short.txt"
    short.write_text("Too short to score.")
    with pytest.raises(rp.ReportError, match="fewer than one chunk"):
        rp.measure_quants(demo_f16_gguf, {}, eval_text_path=short, chat_prompts=[])


# ------------------------------------------------------------------ --quant auto's search (tasks/report/search.py)


def test_search_varies_the_types_at_the_bound(synthetic: rp.QuantReport) -> None:
    from tasks.report.search import boundary_types

    # Under a size bound: the best that fits and the next larger (a smaller recipe of it may fit).
    assert boundary_types(synthetic, rp.parse_size("500MB"), None) == ["q3_k_m", "q4_k_m"]
    # Under a KL bound: the smallest good enough and the next smaller (a matrix may bring it in).
    assert boundary_types(synthetic, None, 0.05) == ["q4_k_m", "q3_k_m"]
    assert boundary_types(synthetic, int(900e6), 0.05) == ["q6_k", "q8_0", "q5_k_m"]
    assert boundary_types(synthetic, int(100e6), None) == ["q2_k"]
    assert boundary_types(synthetic, None, 0.0001) == ["q8_0"]


def test_search_table_says_why_each_candidate_lost(synthetic: rp.QuantReport, tmp_path: Path) -> None:
    rows = synthetic.rows + [_row("q4_k_m-embed-q5", 480, 0.05)]
    report = synthetic.model_copy(update={"rows": rows})
    choice = rp.choose_quant(report, max_size_bytes=rp.parse_size("500MB")).model_copy(update={
        "candidates": {r.quant: r.quant for r in rows if not r.is_reference} | {"q4_k_m-attn-v-q8": "q4_k_m, recipe"},
        "unmeasured": ["q4_k_m-attn-v-q8"], "budget_seconds": 60.0, "search_seconds": 61.0})
    assert choice.quant == "q4_k_m-embed-q5"
    text = rp.report_markdown(report, choice)
    assert "| q4_k_m-embed-q5 | q4_k_m-embed-q5 | 480.0 MB | 0.0500 | **chosen** |" in text
    assert "| q3_k_m | q3_k_m | 490.0 MB | 0.1200 | within the bound, but KL 0.1200 > 0.0500 |" in text
    assert "| q4_k_m | q4_k_m | 610.0 MB | 0.0400 | 610.0 MB is over 500.0 MB |" in text
    assert "| q4_k_m-attn-v-q8 | q4_k_m, recipe | – | – | not measured: the search budget ran out |" in text
    assert "the search was cut short" in text
    png = rp.plot_report(report, tmp_path / "plot.png", choice)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_search_measures_recipes_and_skips_one_that_changes_nothing(demo_f16_gguf: Path, tmp_path: Path) -> None:
    from tasks.recipe import BUILTIN_DIR, load_recipe
    from tasks.report.search import search_quants

    recipes = [(BUILTIN_DIR / f"{name}.yaml", load_recipe(BUILTIN_DIR / f"{name}.yaml"))
               for name in ("attn-v-q8", "output-q8")]
    report, choice, chosen = search_quants(demo_f16_gguf, tmp_path, rp.parse_size("10GB"), None, recipes=recipes,
                                           standard=("q4_k_m",), n_ctx=64, chat_prompts=[], gen_tokens=4)
    assert list(choice.candidates) == ["q4_k_m", "q4_k_m-attn-v-q8", "q4_k_m-output-q8"]
    # SmolLM2's embedding is tied and its rows are not whole q6_k blocks: q4_k_m already stores it as q8_0.
    assert "the same file as q4_k_m" in choice.rejected["q4_k_m-output-q8"]
    attn_v = report.row("q4_k_m-attn-v-q8")
    assert attn_v.size_bytes > report.row("q4_k_m").size_bytes and attn_v.quantize_seconds is not None
    assert chosen.label == choice.quant and chosen.quant == "q4_k_m"
    assert not list(tmp_path.glob("*.gguf"))  # candidates are deleted once measured
