"""Progress while a long step runs, not only when it ends: the terminal's side (the UI's is in test_ui_browser.py).

One place (tasks/progress.py) feeds the progress artifacts, the run's log and the `kiln`
command's display; these tests read the terminal and the callback itself.
"""

from __future__ import annotations

import os
import re
import shutil

from tasks.progress import progress_reporter, show_in_terminal
from tests.support.kiln_cli import run_kiln


def test_a_quantization_reports_progress_per_tensor_while_it_runs(demo_f16_gguf, tmp_path):
    """libllama logs a line as it starts each tensor; the quantization's progress climbs with them."""
    from tasks.quantize import quantize_gguf

    seen: list[tuple[str, int]] = []
    with show_in_terminal(lambda description, percent: seen.append((description, percent))):
        quantize_gguf(demo_f16_gguf, tmp_path / "q4_0.gguf", "q4_0", 2)
    percents = [p for d, p in seen if d == "quantize to q4_0"]
    assert percents == sorted(percents) and percents[-1] == 100
    assert len([p for p in percents if 0 < p < 100]) > 50, percents  # 272 tensors: nearly every percent


def test_outside_a_run_with_no_display_progress_costs_nothing():
    report = progress_reporter("nothing is watching")
    report(0.5)  # no Prefect run, no terminal: ignored
    seen: list[int] = []
    with show_in_terminal(lambda _description, percent: seen.append(percent)):
        report = progress_reporter("watched")
        for fraction in (0.0, 0.004, 0.2, 0.2, 0.75, 1.2):
            report(fraction)
    assert seen == [0, 20, 75, 100]  # whole percents, once each, clamped


def test_kiln_export_shows_conversion_and_quantization_progress_without_a_tty(kiln_cache, demo_model_dir, tmp_path):
    """`kiln export` in a pipe (a CI log): a plain `progress:` line every 10 % of each long step.

    A cache of its own (the session's converter, probe and demo folder linked in, no GGUFs), so
    that the conversion and the quantization really run and nothing comes from a cache; the
    session's kept Prefect server (flows/local_server.py) is shared, not a second one left running.
    """
    cache = tmp_path / "cache"
    for name in ("demo", "toolchain", "probe", "gorender"):
        if (kiln_cache / name).is_dir():
            shutil.copytree(kiln_cache / name, cache / name, copy_function=os.link)
    (kiln_cache / "prefect-server").mkdir(exist_ok=True)
    (cache / "prefect-server").symlink_to(kiln_cache / "prefect-server", target_is_directory=True)
    out = tmp_path / "out"
    proc = run_kiln("export", "demo", "--quant", "q4_0", "--no-verify", "--no-report", "--out", str(out),
                    env={"KILN_CACHE_DIR": str(cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = re.findall(r"^progress: (.+): (\d+)%$", proc.stderr, flags=re.M)
    by_step: dict[str, list[int]] = {}
    for step, percent in lines:
        by_step.setdefault(step, []).append(int(percent))
    convert = next((p for s, p in by_step.items() if s.startswith("convert ") and s.endswith(" to f16 GGUF")), None)
    assert convert is not None, proc.stderr[-3000:]
    assert convert[-1] == 100 and any(0 < p < 100 for p in convert), convert
    quantize = by_step.get("quantize to q4_0")
    assert quantize is not None and quantize[-1] == 100 and len([p for p in quantize if 0 < p < 100]) >= 5, by_step
    assert (out / "smollm2-135m-instruct-q4_0.gguf").is_file()
