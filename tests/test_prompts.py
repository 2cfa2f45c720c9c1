"""Chat messages to a prompt: the transcript for base models, the model's template otherwise."""

from __future__ import annotations

import pytest

from serai.engines.decoding import TextAssembler
from serai.engines.prompts import ChatTemplate, Transcript, choose_prompt_format, is_instruction_tuned
from serai.types import Message

# A tiny template in the shape publishers ship (Gemma's, shortened).
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.role }}\n"
    "{{ m.content }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>"}


def test_transcript_puts_system_first_then_alternating_turns() -> None:
    prompt = Transcript().render([
        Message("system", "You answer in one word."),
        Message("user", "Capital of France?"),
        Message("assistant", "Paris."),
        Message("user", "Of Japan?"),
    ])
    assert prompt.text == (
        "You answer in one word.\n\n"
        "User: Capital of France?\n"
        "Assistant: Paris.\n"
        "User: Of Japan?\n"
        "Assistant:"
    )
    assert prompt.strip_leading_space
    assert not prompt.has_special_tokens


def test_transcript_gathers_every_system_message_into_the_opening_paragraph() -> None:
    prompt = Transcript().render([
        Message("user", "Hi"),
        Message("system", "Be brief."),
        Message("system", "Be kind."),
    ])
    assert prompt.text == "Be brief.\n\nBe kind.\n\nUser: Hi\nAssistant:"


def test_transcript_without_system_starts_with_the_user() -> None:
    assert Transcript().render([Message("user", "Hi")]).text == "User: Hi\nAssistant:"


def test_transcript_stops_end_the_answer_before_the_model_writes_the_next_turn() -> None:
    prompt = Transcript().render([Message("user", "Capital of Japan?")])
    for continuation in (" Tokyo.\nUser: And of France?", " Tokyo.\nAssistant: Paris."):
        assembler = TextAssembler(prompt.stops)
        answer = assembler.feed(continuation.encode()) + assembler.finish()
        assert answer == " Tokyo."


@pytest.mark.parametrize(
    ("metadata", "file_name", "expected"),
    [
        ({}, "gemma-3-270m-it-Q4_K_M.gguf", True),
        ({}, "gemma-3-270m-q4_k_m.gguf", False),
        ({}, "Qwen2.5-0.5B-Instruct", True),
        ({}, "qwen2.5-0.5b-instruct-q4_k_m.gguf", True),
        ({}, "Meta-Llama-3-8B.Q4_0.gguf", False),
        ({}, "TinyLlama-1.1B-Chat-v1.0.Q4_K_M.gguf", True),
        ({}, "italian-base.gguf", False),
        ({}, "italian-base", False),
        ({}, "bitnet-b1.58-2B.gguf", False),
        ({"general.finetune": "instruct"}, "model.gguf", True),
        ({"general.finetune": "Instruct"}, "model.gguf", True),
        ({"general.name": "Gemma 3 270m It"}, "model.gguf", True),
        ({"general.basename": "italian-base"}, "model.gguf", False),
        ({"general.finetune": "", "general.name": "Gemma 3 270m"}, "gemma-3-270m.gguf", False),
    ],
)
def test_is_instruction_tuned(metadata: dict[str, str], file_name: str, expected: bool) -> None:
    assert is_instruction_tuned(metadata, file_name) is expected


def test_auto_uses_the_template_of_an_instruction_tuned_model() -> None:
    fmt = choose_prompt_format("auto", {"tokenizer.chat_template": TEMPLATE},
                               "gemma-3-270m-it-Q4_K_M.gguf", **TOKENS)
    assert isinstance(fmt, ChatTemplate)
    assert fmt.name == "template"


def test_auto_gives_a_base_model_a_transcript_even_if_it_ships_a_template() -> None:
    fmt = choose_prompt_format("auto", {"tokenizer.chat_template": TEMPLATE},
                               "gemma-3-270m-q4_k_m.gguf", **TOKENS)
    assert isinstance(fmt, Transcript)


def test_auto_without_a_template_gives_a_transcript() -> None:
    fmt = choose_prompt_format("auto", {}, "Qwen2.5-0.5B-Instruct", **TOKENS)
    assert isinstance(fmt, Transcript)


def test_transcript_requested_wins_over_an_instruct_template() -> None:
    fmt = choose_prompt_format("transcript", {"tokenizer.chat_template": TEMPLATE},
                               "gemma-3-270m-it-Q4_K_M.gguf", **TOKENS)
    assert isinstance(fmt, Transcript)


def test_template_requested_is_used_even_for_a_base_model() -> None:
    fmt = choose_prompt_format("template", {"tokenizer.chat_template": TEMPLATE},
                               "gemma-3-270m-q4_k_m.gguf", **TOKENS)
    assert isinstance(fmt, ChatTemplate)


def test_template_requested_without_a_template_names_the_file_and_the_way_out() -> None:
    with pytest.raises(ValueError, match=r"gemma-3-270m-q4_k_m\.gguf.*'transcript'"):
        choose_prompt_format("template", {}, "gemma-3-270m-q4_k_m.gguf", **TOKENS)


def test_chat_template_renders_turns_and_the_generation_prompt() -> None:
    prompt = ChatTemplate(TEMPLATE, **TOKENS).render([
        Message("system", "Be brief."),
        Message("user", "Hi"),
    ])
    assert prompt.text == (
        "<bos><start_of_turn>system\nBe brief.<end_of_turn>\n"
        "<start_of_turn>user\nHi<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert prompt.stops == ("<eos>",)
    assert prompt.has_special_tokens
    assert not prompt.strip_leading_space
