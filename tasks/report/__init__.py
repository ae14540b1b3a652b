"""Choose a quant type by evidence: quality, size and speed of every GGUF against the f16 reference.

Split along the old module's banners; `from tasks.report import X` keeps working for every name:
- `measure`: `measure_quants` / `measure_candidates` and their definitions (the module docstring
  there says exactly how each number is computed, llama-perplexity compatible);
- `advise`: `choose_quant`, the `--quant auto` decision;
- `show`: the Markdown and rich tables, the plot, the files beside the outputs.
"""

from registry.models import QuantChoice, QuantMetrics, QuantReport
from tasks.report.advise import choose_quant
from tasks.report.measure import (
    _MIN_CONTEXT,
    AUTO_CANDIDATES,
    DEFAULT_CHAT_PROMPTS,
    DEFAULT_EVAL_TEXT,
    DEFAULT_GEN_TOKENS,
    DEFAULT_N_CHUNKS,
    DEFAULT_N_CTX,
    EVAL_TEXT_DIR,
    NoQuantFits,
    ReportError,
    _compare,
    _RefPart,
    default_threads,
    measure_candidates,
    measure_quants,
)
from tasks.report.show import move_chosen, plot_report, report_markdown, rich_table, write_report_files
from tasks.units import human_size, parse_size

__all__ = [
    "AUTO_CANDIDATES", "DEFAULT_CHAT_PROMPTS", "DEFAULT_EVAL_TEXT", "DEFAULT_GEN_TOKENS", "DEFAULT_N_CHUNKS",
    "DEFAULT_N_CTX", "EVAL_TEXT_DIR", "NoQuantFits", "QuantChoice", "QuantMetrics", "QuantReport", "ReportError",
    "_MIN_CONTEXT", "_RefPart", "_compare", "choose_quant", "default_threads", "human_size", "measure_candidates",
    "measure_quants", "move_chosen", "parse_size", "plot_report", "report_markdown", "rich_table",
    "write_report_files",
]
