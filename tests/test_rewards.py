"""Rule rewards on hand-written adversarial completions: the answer is read from one fixed place only."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanoseek.train.rewards import (
    extract_answer,
    format_ok,
    last_number,
    overlong_penalty,
    reward,
    rewards,
)


def exact(answer: str, entry) -> float:
    """A stand-in task scorer: exact match against entry["answer"]."""
    return float(answer.strip() == entry["answer"])


E = {"answer": "42"}

# A completion as sampled after a generation prompt ending in "<think>\n" (it starts inside the think block).
GOOD = "6 times 7 is 42.\n</think>\n<answer>42</answer>"


def test_good_completion_gets_everything():
    r = reward(GOOD, E, exact)
    assert (r.accuracy, r.lenient, r.format, r.overlong, r.answer) == (1.0, 1.0, 1.0, 0.0, "42")
    assert r.reward == pytest.approx(1.2)  # accuracy + 0.2 * format


def test_prompt_opens_think_flag():
    opened = "<think>\n6 times 7 is 42.\n</think>\n<answer>42</answer>\n"
    assert format_ok(opened, prompt_opens_think=False)
    assert not format_ok(opened, prompt_opens_think=True)  # the prompt already opened it: this is a second <think>
    assert format_ok(GOOD, prompt_opens_think=True)
    assert not format_ok(GOOD, prompt_opens_think=False)  # no think block opened anywhere
    # the strict answer does not depend on who opened the block
    assert extract_answer(opened) == extract_answer(GOOD) == "42"


@pytest.mark.parametrize("completion,why", [
    ("6*7=42 <answer>42</answer>\n</think>\n<answer>41</answer>", "answer inside the think block"),
    ("<answer>42</answer> thinking\n</think>\n<answer>41</answer>", "answer before the think block"),
    ("6*7 = 42 and I keep thinking about 42", "truncated: no closing </think>"),
    ("6*7\n</think>\n<answer>4", "truncated inside the answer: no </answer>"),
    ("6*7\n</think>\n<answer>   </answer>", "empty answer"),
    ("6*7\n</think>\n<answer></answer><answer>42</answer>", "first answer after </think> is empty"),
    ("6*7\n</think>\n42", "no answer tags at all"),
])
def test_no_strict_credit(completion, why):
    r = reward(completion, E, exact)
    assert r.accuracy == 0.0, why
    assert r.format == 0.0, why


def test_first_answer_after_first_think_close_wins():
    c = "hm\n</think>\n<answer>41</answer>\n<answer>42</answer>"
    assert extract_answer(c) == "41"
    assert reward(c, E, exact).accuracy == 0.0
    assert not format_ok(c)  # two answers
    c2 = "a\n</think>\n<answer>42</answer></think><answer>7</answer>"
    assert extract_answer(c2) == "42" and not format_ok(c2)  # a repeated </think> after the answer


@pytest.mark.parametrize("completion", [
    "a <think> b\n</think>\n<answer>42</answer>",  # nested <think> (the prompt opened one)
    "a\n</think><think>b</think>\n<answer>42</answer>",  # a second think block
    "a\n</think>\n<answer>42</answer> Done!",  # text after the answer
    "a\n</think>\nso: <answer>42</answer>",  # text between the think block and the answer
    "a\n</think>\n<answer>4<think>2</answer>",  # a tag inside the answer
    "a\n</think>\n<answer>42</answer>\n</answer>",  # a stray closing tag
])
def test_format_rejects(completion):
    assert not format_ok(completion)


def test_format_allows_whitespace_and_multiline_answer():
    assert format_ok("  line 1\nline 2\n</think>\n\n<answer>\n42\n</answer>\n\n  ")
    assert extract_answer("x</think><answer>\n 42 \n</answer>") == "42"


def test_require_reasoning():
    empty = "\n</think>\n<answer>42</answer>"
    assert format_ok(empty) and not format_ok(empty, require_reasoning=True)
    assert format_ok(GOOD, require_reasoning=True)


def test_answer_with_extra_text_goes_to_the_scorer_as_is():
    c = "6*7\n</think>\n<answer>The answer is 42.</answer>"
    assert extract_answer(c) == "The answer is 42."
    r = reward(c, E, exact)
    assert r.accuracy == 0.0  # exact scorer: extra text is wrong
    assert r.lenient == 1.0  # the last number is 42
    assert r.format == 1.0  # the format does not judge the answer's content


def test_lenient_last_number():
    assert last_number("first 3, then 5-3 = 2, so 17") == "17"
    assert last_number("x = -7") == "-7"
    assert last_number("5-3") == "3"  # a minus after a digit is subtraction, not a sign
    assert last_number("pi is 3.14.") == "3.14"
    assert last_number("no digits here") is None
    assert last_number("٤٢ (Arabic-Indic digits)") is None  # ASCII digits only
    big = "9" * 500
    assert last_number(f"the answer is {big}") == big
    # lenient credit for a wrong-format completion, but no strict credit
    r = reward("I think it is 42", E, exact)
    assert (r.accuracy, r.lenient, r.format) == (0.0, 1.0, 0.0)


def test_unicode_and_huge_numbers_in_the_answer():
    c = "Über-Rechnung: 6×7 → 42 ✓\n</think>\n<answer>42</answer>"
    assert reward(c, E, exact).accuracy == 1.0 and format_ok(c)
    big = "1" + "0" * 300
    c = f"big\n</think>\n<answer>{big}</answer>"
    assert extract_answer(c) == big and reward(c, {"answer": big}, exact).accuracy == 1.0
    assert extract_answer("x</think><answer>答案是四十二</answer>") == "答案是四十二"


def test_scorer_range_is_checked():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reward(GOOD, E, lambda a, e: 2.0)


def test_partial_scores_pass_through():
    r = reward(GOOD, E, lambda a, e: 0.5)
    assert r.accuracy == 0.5 and r.reward == pytest.approx(0.7)


def test_overlong_penalty():
    # DAPO eq. 13 with L_max = 100, L_cache = 20: free up to 80, linear to -1 at 100, -1 beyond
    assert overlong_penalty(80, 100, 20) == 0.0
    assert overlong_penalty(90, 100, 20) == pytest.approx(-0.5)
    assert overlong_penalty(100, 100, 20) == pytest.approx(-1.0)
    assert overlong_penalty(101, 100, 20) == -1.0
    assert overlong_penalty(100, 100, 0) == 0.0 and overlong_penalty(101, 100, 0) == -1.0
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(10, 100, 200)
    r = reward(GOOD, E, exact, length=95, max_len=100, overlong_buffer=20)
    assert r.overlong == pytest.approx(-0.75) and r.reward == pytest.approx(1.2 - 0.75)
    with pytest.raises(ValueError, match="length"):
        reward(GOOD, E, exact, overlong_buffer=20)


def test_batch():
    out = rewards([GOOD, "nope"], [E, E], exact, format_weight=0.0)
    assert [r.reward for r in out] == [1.0, 0.0]
    with pytest.raises(ValueError, match="entries"):
        rewards([GOOD], [E, E], exact)


PIECES = list("ab42 \n<>/") + ["<think>", "</think>", "<answer>", "</answer>"]


@given(st.lists(st.sampled_from(PIECES), max_size=30).map("".join))
def test_never_crashes_and_format_implies_answer(text):
    r = reward(text, E, exact)
    assert r.format in (0.0, 1.0) and 0.0 <= r.accuracy <= 1.0
    if r.format:  # a well-formed completion always has a strict answer, and it is the one in the answer tags
        assert r.answer is not None and r.answer == text.split("<answer>")[1].split("</answer>")[0].strip()


TAGLESS = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30).filter(lambda t: "<" not in t)


@given(TAGLESS, TAGLESS.filter(lambda t: t.strip()), st.sampled_from(["", "\n", " \n\n"]))
def test_well_formed_is_accepted(reasoning, answer, ws):
    c = f"{reasoning}</think>{ws}<answer>{answer}</answer>{ws}"
    assert format_ok(c)
    assert extract_answer(c) == answer.strip()
