"""Render the pack's chat template (Jinja, sandboxed) into the prompt text.

Operator and sensor text go in as message content only; the template decides the
framing, so nothing in the content can change roles or inject template code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from agent.errors import BadRequest


@dataclass(frozen=True)
class Message:
    role: str
    content: str


def _raise(message: str) -> NoReturn:
    raise BadRequest(f"chat template refused the conversation: {message}")


class ChatTemplate:
    def __init__(self, source: str) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(source)

    def render_parts(self, messages: list[Message]) -> list[tuple[str, bool]]:
        """The rendered prompt as (text, is_content) pieces, so content can be tokenized
        without special-token parsing: each content goes in as a private-use sentinel that
        no template alters, and comes back out at the split."""
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        rendered = self.render([Message(m.role, mark) for m, mark in zip(messages, marks, strict=True)])
        parts: list[tuple[str, bool]] = []
        for i, m in enumerate(messages):
            before, found, rendered = rendered.partition(marks[i])
            if not found:  # a template that rewrites content: fall back to plain text, content marked
                return [(self.render(messages), False)]
            parts += [(before, False), (m.content, True)]
        return [*parts, (rendered, False)]

    def render(self, messages: list[Message], **extra: Any) -> str:
        try:
            return str(
                self._template.render(
                    messages=[{"role": m.role, "content": m.content} for m in messages],
                    add_generation_prompt=True,
                    **extra,
                )
            )
        except TemplateError as exc:
            raise BadRequest(f"chat template failed: {exc}") from None


def chat_messages(question: str, system_prompt: str) -> list[Message]:
    msgs = [Message("system", system_prompt)] if system_prompt else []
    return [*msgs, Message("user", question)]
