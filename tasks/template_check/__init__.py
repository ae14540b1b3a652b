"""Match a model's Jinja chat template with a Kiln dialect's Go template.

Ollama renders a Modelfile TEMPLATE (Go `text/template`); Hugging Face and
llama.cpp render the model's Jinja `chat_template`. A model exported with the
wrong TEMPLATE answers, but badly, and nothing says why. `check_template`
renders both over a fixed message matrix and picks the dialect whose Go
template produces exactly the Jinja text on every case:

- Jinja is rendered as `transformers`' `apply_chat_template` does
  (sandboxed, `trim_blocks`/`lstrip_blocks`, `raise_exception`,
  `strftime_now`, the JSON `tojson`, special tokens, `add_generation_prompt`).
- Go templates are rendered by a small Go program shipped in
  `templates/gorender/`, built on demand with `go build` into the Kiln cache.
  It assembles messages exactly as Ollama's `/api/chat` does (Modelfile
  SYSTEM prepended when the request has no system message, consecutive
  same-role messages merged, `.System` joined with blank lines).
- A Jinja template that injects a default system prompt when the
  conversation has none (SmolLM2, Qwen2.5) is matched by inferring that prompt
  and making it the Modelfile SYSTEM: Ollama then prepends it exactly when the
  Jinja template would have written it.

A case the Jinja template refuses (`raise_exception`, e.g. Gemma's "System
role not supported") is skipped, not counted, and reported.

A template that prints today's date (Llama 3.2) is compared with its clock set
to the fixed date the dialect's Go template prints: "exact apart from the
date". When no dialect is exact, nothing is refused unless a dialect was asked
for: the decision is then `ollama_format="jinja"`, Ollama rendering the GGUF's
own Jinja template (see `decide`).
"""

from tasks.template_check.compare import (
    CaseOutcome,
    Comparison,
    DialectTrial,
    TemplateCheck,
    TemplateMismatch,
    compare_with_dialects,
    prints_today,
)
from tasks.template_check.decide import (
    JINJA_FALLBACK,
    NEAR_MAX_MISMATCHES,
    check_template,
    check_template_text,
    outcome_lines,
)
from tasks.template_check.errors import (
    ChatTemplateBroken,
    GoRendererFailed,
    GoToolchainMissing,
    NoChatTemplate,
    NoDialectMatches,
    TemplateCheckError,
)
from tasks.template_check.gorender import (
    GoRenderer,
    GoRenderError,
    GoRenderJob,
    render_go_template,
)
from tasks.template_check.jinja import ConversationRefused, JinjaChatTemplate
from tasks.template_check.matrix import (
    DEFAULT_MATRIX,
    MESSAGE_MATRIX,
    TOOL_CALL_REPLY,
    TOOL_MATRIX,
    WEATHER_TOOL,
    ChatMessage,
    MatrixCase,
    ToolCall,
    ToolCallFunction,
)
from tasks.template_check.source import ChatTemplateSource, load_chat_template

__all__ = [
    "DEFAULT_MATRIX",
    "JINJA_FALLBACK",
    "MESSAGE_MATRIX",
    "TOOL_CALL_REPLY",
    "TOOL_MATRIX",
    "WEATHER_TOOL",
    "NEAR_MAX_MISMATCHES",
    "CaseOutcome",
    "Comparison",
    "ChatMessage",
    "ChatTemplateBroken",
    "ChatTemplateSource",
    "ConversationRefused",
    "DialectTrial",
    "GoRenderError",
    "GoRenderJob",
    "GoRenderer",
    "GoRendererFailed",
    "GoToolchainMissing",
    "JinjaChatTemplate",
    "MatrixCase",
    "NoChatTemplate",
    "NoDialectMatches",
    "TemplateCheck",
    "TemplateCheckError",
    "TemplateMismatch",
    "ToolCall",
    "ToolCallFunction",
    "check_template",
    "check_template_text",
    "compare_with_dialects",
    "load_chat_template",
    "outcome_lines",
    "prints_today",
    "render_go_template",
]
