"""The chat messages both engines render, and the fixed matrix of conversations."""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

class ToolCallFunction(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    index: int = 0


class ToolCall(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = ""
    function: ToolCallFunction


class ChatMessage(BaseModel):
    """One chat message as both Ollama's API and Hugging Face's templates see it.

    `thinking` is Ollama's field; Hugging Face templates read the same text as
    `reasoning_content`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str
    thinking: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_name: str | None = None
    tool_call_id: str | None = None

    def for_jinja(self) -> dict[str, Any]:
        # Keys are only present when set: templates test `'tool_calls' in message`.
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.thinking is not None:
            out["reasoning_content"] = self.thinking
        if self.tool_calls:
            out["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
                for call in self.tool_calls
            ]
        if self.tool_name is not None:
            out["name"] = self.tool_name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out

    def for_ollama(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.thinking is not None:
            out["thinking"] = self.thinking
        if self.tool_calls:
            out["tool_calls"] = [
                {
                    "id": call.id,
                    "function": {
                        "index": call.function.index,
                        "name": call.function.name,
                        "arguments": call.function.arguments,
                    },
                }
                for call in self.tool_calls
            ]
        if self.tool_name is not None:
            out["tool_name"] = self.tool_name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class MatrixCase(BaseModel):
    """One conversation of the matrix; `think` maps to Jinja `enable_thinking`
    and to Ollama's request `think` (None: not set)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    messages: tuple[ChatMessage, ...]
    think: bool | None = None
    tools: tuple[dict[str, Any], ...] | None = Field(
        None, description="tool definitions sent with the request (Jinja `tools`, Ollama's `.Tools`)")

    def applies_to(self, jinja_text: str) -> bool:
        """Tool conversations are checked only against templates that take tools."""
        return self.tools is None or "tool" in jinja_text

    @property
    def has_system(self) -> bool:
        return bool(self.messages) and self.messages[0].role == "system"


def _system(text: str) -> ChatMessage:
    return ChatMessage(role="system", content=text)


def _user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def _assistant(text: str, thinking: str | None = None) -> ChatMessage:
    return ChatMessage(role="assistant", content=text, thinking=thinking)


_SYSTEM_TEXT = "You are a terse assistant. Answer in one sentence."
_Q1 = "What is the capital of France?"
_A1 = "The capital of France is Paris."
_Q2 = "And of Italy?\nPlease answer briefly."
_A2 = "Rome."
_Q3 = "Which of the two is larger?"
# Text that looks like template syntax or control tokens must come out verbatim:
# messages are data to both engines, never template source.
_TRICKY_USER = (
    "Print these literally: {{ .System }} {{ .Content }} {% if x %}{{ messages }}{% endif %} "
    "<|im_end|> <|im_start|>assistant [INST] [/INST] <end_of_turn> <|eot_id|> </s> <|end|>"
)
_TRICKY_ASSISTANT = 'Here they are: {{ .System }} <|im_end|> [/INST] <|eot_id|> and a quote """ too.'

# Tool calls, where the model's template takes tools (MatrixCase.applies_to): a request with tools,
# an assistant turn that calls one, the tool's answer, and the reply after it. Part of the default
# matrix (DEFAULT_MATRIX): the tool-taking dialects print tools, calls and results as their models'
# templates do. The call id has 9 characters because Mistral's templates refuse any other length.
WEATHER_TOOL: Final[dict[str, Any]] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                       "required": ["city"]},
    },
}
TOOL_CALL_REPLY = ChatMessage(role="assistant", content="", tool_calls=(
    ToolCall(id="call00001", function=ToolCallFunction(name="get_weather", arguments={"city": "Paris"})),))
_RESULT = ChatMessage(role="tool", content='{"temperature": 18, "sky": "clear"}', tool_name="get_weather",
                      tool_call_id="call00001")
_WEATHER_Q = "What is the weather in Paris?"
TOOL_MATRIX: Final[tuple[MatrixCase, ...]] = (
    MatrixCase(name="tools-user", messages=(_user(_WEATHER_Q),), tools=(WEATHER_TOOL,)),
    MatrixCase(name="tools-system-user", messages=(_system(_SYSTEM_TEXT), _user(_WEATHER_Q)), tools=(WEATHER_TOOL,)),
    MatrixCase(name="tool-call-and-result", messages=(_user(_WEATHER_Q), TOOL_CALL_REPLY, _RESULT), tools=(WEATHER_TOOL,)),
    MatrixCase(
        name="tool-result-then-user",
        messages=(_user(_WEATHER_Q), TOOL_CALL_REPLY, _RESULT, _assistant("It is 18 degrees and clear."), _user(_Q2)),
        tools=(WEATHER_TOOL,),
    ),
)

# Contents never start or end with whitespace: Llama 3 and Gemma trim
# content in Jinja, and Go templates have no trim function (Ollama's FuncMap
# has none), so edge whitespace cannot round-trip for those dialects.
MESSAGE_MATRIX: Final[tuple[MatrixCase, ...]] = (
    MatrixCase(name="user", messages=(_user(_Q1),)),
    MatrixCase(name="system-user", messages=(_system(_SYSTEM_TEXT), _user(_Q1))),
    MatrixCase(name="user-assistant-user", messages=(_user(_Q1), _assistant(_A1), _user(_Q2))),
    MatrixCase(
        name="system-user-assistant-user",
        messages=(_system(_SYSTEM_TEXT), _user(_Q1), _assistant(_A1), _user(_Q2)),
    ),
    MatrixCase(
        name="several-turns",
        messages=(_user(_Q1), _assistant(_A1), _user(_Q2), _assistant(_A2), _user(_Q3)),
    ),
    MatrixCase(
        name="system-several-turns",
        messages=(_system(_SYSTEM_TEXT), _user(_Q1), _assistant(_A1), _user(_Q2), _assistant(_A2), _user(_Q3)),
    ),
    MatrixCase(name="final-assistant", messages=(_user(_Q1), _assistant(_A1))),
    MatrixCase(name="system-final-assistant", messages=(_system(_SYSTEM_TEXT), _user(_Q1), _assistant(_A1))),
    MatrixCase(name="empty-user", messages=(_user(""),)),
    MatrixCase(name="empty-system", messages=(_system(""), _user(_Q1))),
    MatrixCase(name="empty-assistant", messages=(_user(_Q1), _assistant(""), _user(_Q2))),
    MatrixCase(
        name="template-syntax-in-content",
        messages=(_user(_TRICKY_USER), _assistant(_TRICKY_ASSISTANT), _user(_Q3)),
    ),
    MatrixCase(
        name="thinking-in-history",
        messages=(_user(_Q1), _assistant(_A1, thinking="France's capital is Paris."), _user(_Q2)),
    ),
    MatrixCase(
        name="final-assistant-with-thinking",
        messages=(_user(_Q1), _assistant(_A1, thinking="France's capital is Paris.")),
    ),
    MatrixCase(name="think-off", messages=(_user(_Q1),), think=False),
    MatrixCase(
        name="think-off-several-turns",
        messages=(_user(_Q1), _assistant(_A1), _user(_Q2)),
        think=False,
    ),
)

# What check_template compares by default: every message case, plus the tool cases for
# templates that take tools.
DEFAULT_MATRIX: Final[tuple[MatrixCase, ...]] = MESSAGE_MATRIX + TOOL_MATRIX
