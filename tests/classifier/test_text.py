import pytest

from tierpick.classifier import messages_to_prompt, normalize_prompt, prompt_key


def test_normalize_keeps_layout_but_drops_noise() -> None:
    raw = "\ufeff  Ｑuestion:\r\nline two   \r\n\r\n\r\n\r\nA. x\x00\t\n  "
    assert normalize_prompt(raw) == "Question:\nline two\n\nA. x"


def test_normalize_is_idempotent() -> None:
    text = "  a\r\n\n\n\nb\t \n c  "
    once = normalize_prompt(text)
    assert normalize_prompt(once) == once


def test_prompt_key_folds_case_and_space_only() -> None:
    assert prompt_key("What is  2+2?\n") == prompt_key("what is 2+2?")
    assert prompt_key("What is 2+2?") != prompt_key("What is 2+3?")
    assert len(prompt_key("x")) == 64


def test_messages_to_prompt_takes_last_user_turn() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "second"}, {"type": "image_url"}]},
    ]
    assert messages_to_prompt(messages) == "second"


def test_messages_without_user_turn_is_an_error() -> None:
    with pytest.raises(ValueError, match="no user message"):
        messages_to_prompt([{"role": "system", "content": "x"}])
