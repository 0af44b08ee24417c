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


def test_last_user_text_skips_harness_text_and_names_bad_parts() -> None:
    import pytest

    from tierpick.classifier import last_user_text, strip_harness

    codex = (
        "# AGENTS.md instructions for /repo\n\n<INSTRUCTIONS>\nRun make test.\n</INSTRUCTIONS>\n"
        "<environment_context>\n  <cwd>/repo</cwd>\n</environment_context>\n"
        "Rename the function parse to load."
    )
    assert strip_harness(codex) == "Rename the function parse to load."
    # an unclosed tag is prose about the tag, not a block
    assert strip_harness("what does <system-reminder> mean?") == "what does <system-reminder> mean?"
    # many openings that never close (hostile input) are left as they are, in linear time
    hostile = "<system-reminder>" * 2000 + "<command-name x" * 2000 + "tail"
    assert strip_harness(hostile) == hostile
    assert strip_harness("<SYSTEM-REMINDER>a</system-reminder >b") == "b"
    chat = [
        {"role": "system", "content": "You are a coding agent."},
        {"role": "user", "content": [{"type": "text", "text": codex}]},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "tool", "content": "file contents"},
        {"role": "user", "content": "<system-reminder>todo list is empty</system-reminder>"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
    ]
    assert last_user_text(chat) == "Rename the function parse to load."
    for bad, where in [
        ("not a list", "messages must be a list"),
        ([1], "messages[0] must be an object"),
        ([{"role": "user", "content": ["hi"]}], "messages[0].content[0] must be an object"),
        ([{"role": "user", "content": [{"type": "text", "text": 1}]}], "content[0].text"),
        ([{"role": "user", "content": 5}], "messages[0].content must be a string"),
        ([{"role": "system", "content": "x"}], "no user message with text"),
        (chat[4:], "no user message with text"),
    ]:
        with pytest.raises(ValueError) as err:
            last_user_text(bad)
        assert where in str(err.value), bad


RAFT = (
    "Design a Raft-based replicated key-value store in Rust with linearizable lease reads and "
    "joint-consensus membership changes; prove the read path safe under clock drift."
)


def test_a_follow_up_is_read_with_the_turns_it_continues() -> None:
    from tierpick.classifier import conversation_text, last_user_text

    chat = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": RAFT},
        {"role": "assistant", "content": "Here is a design ..."},
        {"role": "tool", "content": "tool output that is not the user's"},
        {"role": "user", "content": [{"type": "text", "text": "ok continue"}]},
    ]
    assert conversation_text(chat, 2000) == "ok continue\n\n" + RAFT  # newest first
    assert last_user_text(chat) == conversation_text(chat, 0) == "ok continue"
    # context is cut to the limit, never the turn asked; a sliver of a turn is not kept
    assert conversation_text(chat, 11 + 2 + 80) == "ok continue\n\n" + RAFT[:80]
    assert conversation_text(chat, 11 + 2 + 40) == "ok continue"
    long_ask = "x" * 500
    assert conversation_text([*chat[:-1], {"role": "user", "content": long_ask}], 100) == long_ask
    # turns further back come after nearer ones, while they fit
    three = [{"role": "user", "content": t} for t in ("first" * 20, "second" * 20, "go")]
    assert conversation_text(three, 10_000).split("\n\n") == [
        "go",
        "second" * 20,
        "first" * 20,
    ]
    # the older turn gets what is left (70 characters), the oldest nothing more
    assert conversation_text(three, 2 + 2 + 120 + 2 + 70).split("\n\n") == [
        "go",
        "second" * 20,
        ("first" * 20)[:70],
    ]


def test_an_agent_loop_is_read_on_the_task_its_user_gave() -> None:
    from tierpick.classifier import conversation_text

    loop = [
        {"role": "user", "content": "Refactor the parser to stream its input."},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "user", "content": [{"type": "tool_result", "content": "ok"}]},  # no text
        {"role": "user", "content": "<system-reminder>3 files changed</system-reminder>"},
    ]
    assert conversation_text(loop, 5000) == "Refactor the parser to stream its input."
