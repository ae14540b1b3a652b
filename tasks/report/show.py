"""Showing: the report as a Markdown table, a rich table, a size-against-KL plot, files beside the outputs."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from registry.models import QuantChoice, QuantMetrics, QuantReport
from tasks.files import atomic_path
from tasks.units import human_size

if TYPE_CHECKING:
    from rich.table import Table

_COLUMNS = ("quant", "size", "BPW", "KL mean", "KL p99", "top-1", "PPL", "chat KL", "chat top-1",
            "prompt t/s", "gen t/s")


def _cells(r: QuantMetrics) -> list[str]:
    ref = " (ref)" if r.is_reference else ""
    return [
        f"{r.quant}{ref}",
        human_size(r.size_bytes),
        f"{r.bits_per_weight:.2f}",
        "0" if r.is_reference else f"{r.kl_mean:.4f}",
        "0" if r.is_reference else f"{r.kl_p99:.4f}",
        f"{r.top1_agreement:.1%}",
        f"{r.ppl:.3f}",
        "–" if r.chat_kl_mean is None else ("0" if r.is_reference else f"{r.chat_kl_mean:.4f}"),
        "–" if r.chat_top1_agreement is None else f"{r.chat_top1_agreement:.1%}",
        f"{r.prompt_tps:.0f}",
        f"{r.gen_tps:.1f}",
    ]


def _footer(report: QuantReport) -> str:
    cost = f"measured in {report.measure_seconds:.1f} s"
    if report.quantize_seconds is not None:
        cost += f" after {report.quantize_seconds:.1f} s quantizing the candidates"
    return (
        f"KL divergence and top-1 agreement against {report.reference}, PPL on {report.scored_tokens} scored "
        f"tokens ({report.n_chunks} chunk(s) of {report.n_ctx}, second halves, as llama-perplexity) of "
        f"`{report.eval_text}` (sha256 {report.eval_text_sha256[:16]}…)"
        + (f" and {report.chat_tokens} tokens of {report.reference}'s answers to {report.chat_prompts} chat "
           "prompt(s)" if report.chat_tokens else "")
        + f"; speed with {report.n_threads} thread(s) on {report.machine} (load average "
        f"{report.load_average:.1f}), llama-cpp-python "
        f"{report.llama_cpp_python}; {cost}."
    )


def report_markdown(report: QuantReport, choice: QuantChoice | None = None) -> str:
    """A Markdown table, largest file first, for the Prefect artifact and `kiln report DIR`."""
    lines = ["| " + " | ".join(_COLUMNS) + " |", "| " + " | ".join("---" for _ in _COLUMNS) + " |"]
    for r in report.by_size():
        lines.append("| " + " | ".join(_cells(r)) + " |")
    text = "### Quant types: quality, size, speed\n\n" + "\n".join(lines) + "\n\n" + _footer(report) + "\n"
    if choice is not None:
        text += f"\n**Chosen: {choice.quant}.** {choice.reason}.\n"
        if choice.candidates:
            text += "\n" + search_markdown(report, choice)
    return text


def verdict(report: QuantReport, choice: QuantChoice, label: str) -> str:
    """Why a candidate of the search was or was not chosen, in a few words."""
    if label == choice.quant:
        return "**chosen**"
    if label in choice.unmeasured:
        return "not measured: the search budget ran out"
    if label in choice.rejected:
        return choice.rejected[label]
    try:
        row = report.row(label)
    except KeyError:
        return "not measured"
    if choice.max_size_bytes is not None:  # the lowest KL within the bounds wins
        return f"within the bound, but KL {row.kl_mean:.4f} > {choice.kl_mean:.4f}"
    return f"within the bound, but {human_size(row.size_bytes)} > {human_size(choice.size_bytes)}"


def search_markdown(report: QuantReport, choice: QuantChoice) -> str:
    """Every candidate `--quant auto` considered, what it is, and why it lost (or won)."""
    lines = ["### Search: every candidate", "", "| candidate | what it is | size | KL mean | verdict |",
             "| --- | --- | ---: | ---: | --- |"]
    for label, what in choice.candidates.items():
        try:
            row = report.row(label)
            size, kl = human_size(row.size_bytes), f"{row.kl_mean:.4f}"
        except KeyError:
            size = kl = "–"
        lines.append(f"| {label} | {what} | {size} | {kl} | {verdict(report, choice, label)} |")
    took = f" in {choice.search_seconds:.0f} s" if choice.search_seconds is not None else ""
    lines += ["", f"{len(choice.candidates)} candidate(s){took}"
              + (f"; budget {choice.budget_seconds:g} s" if choice.budget_seconds else "")
              + (f"; **the search was cut short**: {len(choice.unmeasured)} candidate(s) not measured, the chosen "
                 "one is the best so far" if choice.unmeasured else "") + "."]
    return "\n".join(lines) + "\n"


def rich_table(report: QuantReport, choice: QuantChoice | None = None) -> Table:
    """The same table for the terminal (`rich.console.Console().print(rich_table(report))`)."""
    from rich.markup import escape
    from rich.table import Table

    # Names and labels come from outside Kiln (file names, the machine): printed literally, not as markup.
    table = Table(title="Quant types: quality, size, speed", caption=escape(_footer(report)), caption_justify="left")
    for col in _COLUMNS:
        table.add_column(col, justify="left" if col == "quant" else "right")
    for r in report.by_size():
        style = "bold green" if choice is not None and r.quant == choice.quant else ("dim" if r.is_reference else None)
        table.add_row(*(escape(cell) for cell in _cells(r)), style=style)
    return table


def _mark_choice(ax, report: QuantReport, choice: QuantChoice, floor: float) -> None:
    """The bounds as lines and the chosen candidate as a star: the plot shows why it won."""
    if choice.max_size_bytes is not None:
        ax.axvline(choice.max_size_bytes / 1e6, color="tab:green", linestyle=":", linewidth=1.2,
                   label=f"--max-size {human_size(choice.max_size_bytes)}")
    if choice.max_kl is not None:
        ax.axhline(choice.max_kl, color="tab:green", linestyle="-.", linewidth=1.2, label=f"--max-kl {choice.max_kl:g}")
    ax.scatter([choice.size_bytes / 1e6], [max(choice.kl_mean, floor)], marker="*", s=220, color="tab:green",
               zorder=4, label=f"chosen: {choice.quant}")
    ax.legend(loc="upper right", fontsize=8)


def plot_report(report: QuantReport, png_path: Path, choice: QuantChoice | None = None) -> Path:
    """PNG: file size against mean KL divergence, one labelled point a quant type, f16 as the reference."""
    # The Agg canvas on a bare Figure: no pyplot, no global backend switch in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    quants = [r for r in report.rows if not r.is_reference]
    positive = [r.kl_mean for r in quants if r.kl_mean > 0]
    floor = min(positive) / 3 if positive else 1e-4
    xs = [r.size_bytes / 1e6 for r in quants]
    ys = [max(r.kl_mean, floor) for r in quants]
    line = sorted((x, y) for r, x, y in zip(quants, xs, ys) if "-" not in r.quant)  # the standard types' curve
    ax.plot(*zip(*line) if line else ([], []), color="0.75", zorder=1)
    # Standard types blue; the search's variants (an importance matrix, a recipe: labels with a '-') orange.
    ax.scatter(xs, ys, zorder=2, color=["tab:orange" if "-" in r.quant else "tab:blue" for r in quants])
    for r, x, y in zip(quants, xs, ys):
        ax.annotate(r.quant, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=9)
    for r in report.rows:
        if r.is_reference:
            # KL 0 has no place on a log axis: f16 sits on the floor, with a dashed line at its size.
            x = r.size_bytes / 1e6
            ax.axvline(x, color="tab:red", linestyle="--", linewidth=1, zorder=1)
            ax.scatter([x], [floor], marker="D", color="tab:red", zorder=3, clip_on=False)
            ax.annotate(f"{r.quant} (reference, KL 0)", (x, floor), textcoords="offset points",
                        xytext=(-6, 8), ha="right", fontsize=9, color="tab:red")
    if choice is not None:
        _mark_choice(ax, report, choice, floor)
    ax.set_yscale("log")
    top = max(ys + [floor * 10])
    ax.set_ylim(floor / 1.5, top * 2)
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel(f"mean KL divergence from {report.reference} (nats/token, log scale)")
    ax.set_title(f"Size against quality: {report.scored_tokens} tokens of {report.eval_text}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    return png_path


def write_report_files(report: QuantReport, out_dir: Path, choice: QuantChoice | None = None,
                       stem: str = "quant-report") -> dict[str, Path]:
    """`quant-report.md` and `quant-report.png` beside the outputs; returns their paths."""
    out_dir = Path(out_dir)
    md = out_dir / f"{stem}.md"
    with atomic_path(md) as tmp:
        tmp.write_text(report_markdown(report, choice), encoding="utf-8")
    png = plot_report(report, out_dir / f"{stem}.png", choice)
    return {"markdown": md, "plot": png}


def move_chosen(paths: dict[str, Path], choice: QuantChoice, dst: Path) -> Path:
    """Move the chosen candidate into place (no second quantization); delete the other candidates."""
    src = paths[choice.quant]
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(dst))
    for quant, path in paths.items():
        if quant != choice.quant:
            path.unlink(missing_ok=True)
    return dst
