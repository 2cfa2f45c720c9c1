"""Turning chat messages into a prompt the model can continue.

Instruction-tuned GGUFs carry a chat template and are trained to answer inside it. Base models
(the bundled Gemma 3 270M is one) are not: through a chat template they answer with nothing,
but they continue a plain transcript well. The format is decided once per model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from serai.types import Message

PromptFormatName = Literal["transcript", "template"]

# Words model publishers put in the names of instruction-tuned releases.
_INSTRUCT_MARKER = re.compile(r"(?:^|[-_ .])(it|instruct|chat|sft|dpo|rlhf)(?:$|[-_ .])", re.I)


@dataclass(frozen=True, slots=True)
class Prompt:
    text: str
    stops: tuple[str, ...]
    # Whether `text` already holds the tokenizer's special tokens (a template writes its own BOS).
    has_special_tokens: bool
    # Transcript answers come after "Assistant:" and start with a space nobody wants to see.
    strip_leading_space: bool


class PromptFormat(Protocol):
    name: PromptFormatName

    def render(self, messages: Sequence[Message]) -> Prompt: ...


class Transcript:
    """A plain 'User:/Assistant:' transcript; stop sequences end the answer at the next turn."""

    name: PromptFormatName = "transcript"
    STOPS = ("\nUser:", "\nAssistant:")

    def render(self, messages: Sequence[Message]) -> Prompt:
        system = "\n\n".join(m.content for m in messages if m.role == "system")
        lines = [f"{system}\n\n"] if system else []
        for m in messages:
            if m.role != "system":
                speaker = "User" if m.role == "user" else "Assistant"
                lines.append(f"{speaker}: {m.content}\n")
        lines.append("Assistant:")
        return Prompt("".join(lines), self.STOPS, has_special_tokens=False,
                      strip_leading_space=True)


class ChatTemplate:
    """The model's own Jinja chat template, as its publisher intended."""

    name: PromptFormatName = "template"

    def __init__(self, template: str, *, bos_token: str, eos_token: str) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._formatter = Jinja2ChatFormatter(template, eos_token=eos_token, bos_token=bos_token,
                                              add_generation_prompt=True)

    def render(self, messages: Sequence[Message]) -> Prompt:
        # llama-cpp-python types each role's message as its own TypedDict; ours are all
        # role and content.
        chat: list[Any] = [{"role": m.role, "content": m.content} for m in messages]
        result = self._formatter(messages=chat)
        stop = result.stop or ()
        stops = (stop,) if isinstance(stop, str) else tuple(stop)
        return Prompt(result.prompt, stops, has_special_tokens=True, strip_leading_space=False)


def is_instruction_tuned(metadata: Mapping[str, str], file_name: str) -> bool:
    """Whether a GGUF looks instruction-tuned, from its metadata names and its file name."""
    names = [metadata.get(k, "") for k in ("general.finetune", "general.name", "general.basename")]
    return any(_INSTRUCT_MARKER.search(n) for n in [*names, file_name] if n)


def choose_prompt_format(
    requested: Literal["auto", "transcript", "template"],
    metadata: Mapping[str, str],
    file_name: str,
    *,
    bos_token: str,
    eos_token: str,
) -> PromptFormat:
    template = metadata.get("tokenizer.chat_template")
    if requested == "template" and not template:
        raise ValueError(f"{file_name} has no chat template; use prompt_format 'transcript'")
    use_template = requested == "template" or (
        requested == "auto" and bool(template) and is_instruction_tuned(metadata, file_name)
    )
    if use_template:
        assert template is not None
        return ChatTemplate(template, bos_token=bos_token, eos_token=eos_token)
    return Transcript()
