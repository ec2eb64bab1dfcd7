"""The <think> split follows the cases of vLLM's deepseek_r1 reasoning parser (tests/reasoning/
test_deepseekr1_reasoning_parser.py there), streaming and not, and does not depend on how the text is chunked."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.serve.reasoning import ReasoningStream, reasoning_token_count, split_reasoning

# (output, non-streaming (reasoning, content), streaming (reasoning, content)); vLLM's expected values.
CASES = {
    "simple": ("This is a reasoning section</think>This is the rest",
               ("This is a reasoning section", "This is the rest"),
               ("This is a reasoning section", "This is the rest")),
    "complete": ("This is a reasoning section</think>",
                 ("This is a reasoning section", None), ("This is a reasoning section", None)),
    "no_end_tag": ("This is content", ("This is content", None), ("This is content", None)),
    "multiple_lines": ("This\nThat</think>This is the rest\nThat",
                       ("This\nThat", "This is the rest\nThat"), ("This\nThat", "This is the rest\nThat")),
    "shortest": ("</think>This is the rest", ("", "This is the rest"), (None, "This is the rest")),
    "with_think": ("<think>This is a reasoning section</think>This is the rest",
                   ("This is a reasoning section", "This is the rest"),
                   ("This is a reasoning section", "This is the rest")),
    "complete_with_think": ("<think>This is a reasoning section</think>",
                            ("This is a reasoning section", None), ("This is a reasoning section", None)),
    "multiple_lines_with_think": ("<think>This\nThat</think>This is the rest\nThat",
                                  ("This\nThat", "This is the rest\nThat"), ("This\nThat", "This is the rest\nThat")),
    "think_no_end": ("<think>This is a reasoning section",
                     ("This is a reasoning section", None), ("This is a reasoning section", None)),
    "empty": ("", ("", None), (None, None)),
    "new_line": ("\n<think>This is a reasoning section</think>\nThis is the rest",
                 ("This is a reasoning section", "\nThis is the rest"),
                 ("\nThis is a reasoning section", "\nThis is the rest")),
}


def stream(chunks: list[str]) -> tuple[str | None, str | None]:
    p = ReasoningStream()
    reasoning, content = None, None
    for r, c in [p.feed(x) for x in chunks] + [p.flush()]:
        if r is not None:
            reasoning = (reasoning or "") + r
        if c is not None:
            content = (content or "") + c
    return reasoning, content


def tokens_of(text: str) -> list[str]:
    """Split like a tokenizer with <think> and </think> as special tokens: the tags whole, the rest in 3-char bits."""
    out, i = [], 0
    while i < len(text):
        for tag in ("<think>", "</think>"):
            if text.startswith(tag, i):
                out.append(tag)
                i += len(tag)
                break
        else:
            out.append(text[i : i + 3])
            i += 3
    return out


@pytest.mark.parametrize("name", CASES)
def test_non_streaming(name):
    text, expected, _ = CASES[name]
    assert split_reasoning(text) == expected


@pytest.mark.parametrize("name", CASES)
def test_streaming_tokens(name):
    text, _, expected = CASES[name]
    assert stream(tokens_of(text)) == expected


@pytest.mark.parametrize("name", CASES)
def test_streaming_one_char_at_a_time(name):
    # Tags split across deltas ("</th" + "ink>") must not leak into either field.
    text, _, expected = CASES[name]
    assert stream(list(text)) == expected


def test_partial_tag_that_is_not_a_tag_is_kept():
    assert stream(["a </th", "e end"]) == ("a </the end", None)
    assert stream(["x</think>y </thi"]) == ("x", "y </thi")  # flushed at the end
    assert stream(["<thin", "g>"]) == ("<thing>", None)


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(st.sampled_from(["a", "b\n", " ", "<", "/", ">", "<think>", "</think>", "think", "</th"]),
               max_size=12),
    cuts=st.lists(st.integers(0, 60), max_size=6),
)
def test_any_chunking_gives_the_same_split(parts, cuts):
    text = "".join(parts)
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    whole = stream([text])
    assert stream(chunks) == whole
    assert stream(list(text)) == whole
    # Streaming differs from the one-shot split only by text before a late <think> (kept as reasoning, as vLLM).
    r, c = split_reasoning(text)
    sr, sc = whole
    assert sc == c
    if "<think>" in text.split("</think>")[0]:
        assert (sr or "") == text.split("<think>")[0] + r
    else:
        assert (sr or "") == r


def test_reasoning_token_count():
    END = 7
    assert reasoning_token_count([1, 2, END, 3, 4], END, "x") == 3  # the closing tag counts as thinking
    assert reasoning_token_count([1, 2, 3], END, "x") == 3  # never closed: all thinking
    assert reasoning_token_count([END, 3], END, "") == 1
    assert reasoning_token_count([], END, "") == 0
