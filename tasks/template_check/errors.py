"""The errors of the template check."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tasks.errors import KilnError

if TYPE_CHECKING:
    from tasks.template_check.compare import TemplateCheck


class TemplateCheckError(KilnError):
    """A chat template could not be checked or matched."""


class NoChatTemplate(TemplateCheckError):
    """The source carries no chat template (no tokenizer.chat_template, no chat_template.jinja)."""


class ChatTemplateBroken(TemplateCheckError):
    """The model's Jinja chat template does not compile or crashes on ordinary messages."""


class NoDialectMatches(TemplateCheckError):
    """No Kiln dialect renders what the model's Jinja template renders."""

    def __init__(self, message: str, check: TemplateCheck) -> None:
        super().__init__(message)
        self.check = check


class GoToolchainMissing(KilnError):
    """`go` is needed to build the template renderer and is not on PATH."""


class GoRendererFailed(KilnError):
    """The Go template renderer could not be built or did not answer."""
