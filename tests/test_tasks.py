"""Tasks: generators are seeded and correct, scorers accept right and reject wrong answers, splits are disjoint."""

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek import tasks
from nanoseek.tasks.arithmetic import add_steps, sub_steps
from nanoseek.tasks.base import parse_number
from nanoseek.tasks.countdown import evaluate, score_expression
from nanoseek.tasks.ordering import parse_int_list

OURS = tasks.names()
KEYS = {"question", "answer", "solution", "task", "difficulty", "meta"}


def test_at_least_six_tasks_of_our_own():
    assert len(OURS) >= 6
    assert {"add", "sub", "mul", "chain_sum", "sort", "linear", "countdown"} <= set(OURS)


@pytest.mark.parametrize("name", OURS)
@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_entries_are_correct_and_scored(name, difficulty):
    task = tasks.get(name)
    entries = task.generate(seed=3, n=60, difficulty=difficulty)
    for e in entries:
        assert set(e) == KEYS and e["task"] == name and e["difficulty"] == difficulty
        json.dumps(e)  # JSON-able
        assert e["solution"].strip(), "our tasks always have a worked solution"
        assert len(e["solution"].splitlines()) >= 1
        assert tasks.score(e["answer"], e) == 1.0
        assert tasks.score(" " + e["answer"] + " ", e) == 1.0
        assert tasks.score("", e) == 0.0
        assert tasks.score("banana", e) == 0.0
    # a wrong answer: the answer of a different entry (skipping coincidences)
    wrong = [(a, b) for a, b in zip(entries, entries[1:]) if a["answer"] != b["answer"]]
    assert wrong
    for a, b in wrong:
        if name != "countdown":  # a countdown answer for another target cannot hit this target, checked below
            assert tasks.score(b["answer"], a) == 0.0


@pytest.mark.parametrize("name", OURS)
def test_answers_check_against_the_question(name):
    """Independent recomputation from the question text, not from the generator's own arithmetic."""
    for e in tasks.get(name).generate(seed=11, n=100, difficulty=2):
        q, m = e["question"], e["meta"]
        if name in ("add", "sub", "mul", "chain_sum"):
            expr = q.replace("What is ", "").replace("Calculate ", "").rstrip("?.").strip()
            want, _ = evaluate_signed(expr)
            assert int(e["answer"]) == want, q
        elif name == "sort":
            assert parse_int_list(e["answer"]) == sorted(m["numbers"], reverse=m["descending"])
        elif name == "linear":
            x = int(e["answer"])
            assert m["a"] * x + m["b"] == m["c"] * x + m["d"]
        elif name == "countdown":
            value, used = evaluate(e["answer"])
            assert value == m["target"]
            assert str(m["target"]) in q


def evaluate_signed(expr: str):
    """a - b where a < b makes a negative number; evaluate 'a + b - c' left to right by hand."""
    toks = expr.split()
    total = int(toks[0])
    for op, t in zip(toks[1::2], toks[2::2]):
        total = total + int(t) if op == "+" else total - int(t) if op == "-" else total * int(t)
    return total, None


@pytest.mark.parametrize("name", OURS)
def test_seeded_and_prefix_stable(name):
    t = tasks.get(name)
    a, b = t.generate(seed=5, n=30, difficulty=1), t.generate(seed=5, n=30, difficulty=1)
    assert a == b
    assert t.generate(seed=5, n=10, difficulty=1) == a[:10]
    c = t.generate(seed=6, n=30, difficulty=1)
    assert [e["question"] for e in a] != [e["question"] for e in c]


@pytest.mark.parametrize("name", OURS)
def test_difficulty_scales(name):
    """Harder levels have longer questions and longer worked solutions."""
    t = tasks.get(name)

    def mean_len(d, key):
        es = t.generate(seed=0, n=200, difficulty=d)
        return sum(len(e[key]) for e in es) / len(es)

    for key in ("question", "solution"):
        lens = [mean_len(d, key) for d in (1, 2, 3, 4)]
        assert lens[0] < lens[2] < lens[3] or lens[0] < lens[1] < lens[3], (key, lens)


@pytest.mark.parametrize("name", OURS)
def test_easiest_level_is_easy_and_short(name):
    for e in tasks.get(name).generate(seed=0, n=200, difficulty=1):
        nums = [abs(int(x)) for x in __import__("re").findall(r"-?\d+", e["question"])]
        assert max(nums) < 100, e["question"]  # 1-2 digit numbers only
        assert len(e["solution"]) <= 160, e["solution"]  # ~1 token per char at worst, usually far fewer


@given(st.integers(0, 10**6), st.integers(0, 10**6))
@settings(max_examples=200, deadline=None)
def test_column_addition_steps_reach_the_sum(a, b):
    lines = add_steps(a, b)
    assert lines[-1].split("-> ")[-1] == str(a + b)
    assert len(lines) in (max(len(str(a)), len(str(b))), max(len(str(a)), len(str(b))) + 1)


@given(st.integers(0, 10**6), st.integers(0, 10**6))
@settings(max_examples=200, deadline=None)
def test_column_subtraction_steps_reach_the_difference(a, b):
    a, b = max(a, b), min(a, b)
    lines = sub_steps(a, b)
    assert int(lines[-1].split("-> ")[-1]) == a - b
    assert len(lines) == len(str(a))


def test_carries_and_borrows_are_shown():
    assert add_steps(47, 85) == ["7+5=12 carry 1 -> 2", "4+8+1=13 carry 1 -> 32", "1 -> 132"]
    assert sub_steps(73, 25) == ["3-5 borrow: 13-5=8 -> 8", "7-1-2=4 -> 48"]
    assert sub_steps(100, 1) == ["0-1 borrow: 10-1=9 -> 9", "0-1 borrow: 10-1=9 -> 99", "1-1=0 -> 099"]


def test_countdown_scorer_is_safe_and_strict():
    e = {"task": "countdown", "answer": "(5-1)*2", "meta": {"numbers": [5, 2, 1], "target": 8}}
    assert tasks.score("(5-1)*2", e) == 1.0
    assert tasks.score("2*(5-1)", e) == 1.0  # any correct expression, not only ours
    assert tasks.score("(5-1)*2 = 8", e) == 1.0
    assert tasks.score("5+2+1", e) == 1.0
    assert tasks.score("(5-1)*2+1-1", e) == 0.0  # 1 used twice
    assert tasks.score("4*2", e) == 0.0  # 4 not given
    assert tasks.score("8", e) == 0.0
    assert tasks.score("5+2", e) == 0.0  # wrong value
    assert tasks.score("__import__('os').system('true')", e) == 0.0
    assert tasks.score("2**3", e) == 0.0
    assert tasks.score("5/(1-1)+2", e) == 0.0
    assert tasks.score("-5+2+1", e) == 0.0  # unary minus is not a game move
    assert tasks.score("(" * 5000 + "1" + ")" * 5000, e) == 0.0
    assert tasks.score("8.0", e) == 0.0
    assert score_expression("6/3*4", [6, 3, 4], 8) == 1.0  # exact fractions


def test_number_and_list_parsing():
    assert parse_number("x = 5") == 5 and parse_number(" -12 ") == -12 and parse_number("5.") == 5
    assert parse_number("5 apples") is None and parse_number("") is None and parse_number("1,000") is None
    assert parse_int_list("[1, 2,3]") == [1, 2, 3] and parse_int_list("1 2 three") is None


def test_unknown_task_names_the_fix():
    with pytest.raises(KeyError, match="did you mean 'add'"):
        tasks.get("addd")
    with pytest.raises(KeyError, match="rg:chain_sum"):
        tasks.get("rg:chain_summ")
    with pytest.raises(ValueError, match="difficulty"):
        tasks.get("add").generate(0, 3, difficulty=0)


@pytest.mark.parametrize("name", ["rg:basic_arithmetic", "rg:chain_sum", "rg:countdown"])
def test_reasoning_gym_adapter_offline(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = tasks.get(name)
    es = t.generate(seed=1, n=20, difficulty=1)
    assert es == t.generate(seed=1, n=20, difficulty=1)
    for e in es:
        assert set(e) == KEYS and e["task"] == name and e["solution"] == ""
        json.loads(json.dumps(e))
        assert tasks.score(e["answer"], json.loads(json.dumps(e))) == 1.0  # survives a JSON round trip
        assert tasks.score("not an answer", e) < 1.0
    # difficulty maps onto reasoning-gym's curriculum: a harder config
    assert es[0]["meta"]["rg_config"] != t.generate(seed=1, n=1, difficulty=3)[0]["meta"]["rg_config"]


SIZES = {"train": 300, "val": 40, "test": 40, "ood": 20}


def test_splits_are_disjoint_deduplicated_and_deterministic():
    names = ["add", "sort", "countdown", "rg:chain_sum"]
    s = tasks.make_splits(names, SIZES, seed=0, difficulty=2)  # rg:chain_sum level 1 has only ~200 questions
    assert s == tasks.make_splits(names, SIZES, seed=0, difficulty=2)
    for split, n in SIZES.items():
        assert len(s[split]) == n * len(names), split
    q = {k: [e["question"].strip() for e in v] for k, v in s.items()}
    for split in ("val", "test", "ood"):  # train is sampled with replacement (see make_splits)
        assert len(set(q[split])) == len(q[split]), f"duplicates inside {split}"
    assert not set(q["test"]) & set(q["train"])
    assert not set(q["test"]) & set(q["val"])
    assert not set(q["val"]) & set(q["train"])
    assert not set(q["ood"]) & (set(q["train"]) | set(q["val"]) | set(q["test"]))
    assert {e["difficulty"] for e in s["ood"]} == {3} and {e["difficulty"] for e in s["test"]} == {2}
    other = tasks.make_splits(names, SIZES, seed=1, difficulty=2)
    assert [e["question"] for e in other["test"]] != [e["question"] for e in s["test"]]


def test_dedup_actually_removes_collisions():
    """At level 1 single-digit sums repeat across seeds: the raw streams DO collide, the splits do not."""
    t = tasks.get("sub")
    raw_test = {e["question"] for e in t.generate(tasks.splits.split_seed(0, "test"), 200, 1)}
    raw_train = {e["question"] for e in t.generate(tasks.splits.split_seed(0, "train"), 3000, 1)}
    assert raw_test & raw_train, "expected collisions in the raw streams (else this test proves nothing)"
    s = tasks.make_splits(["sub"], {"train": 3000, "test": 200}, seed=0)
    assert not {e["question"] for e in s["test"]} & {e["question"] for e in s["train"]}


def test_small_task_space_fails_loudly_for_held_out_splits_and_train_resamples():
    with pytest.raises(ValueError, match="too few distinct questions"):
        tasks.make_splits(["mul"], {"test": 2000}, seed=0, difficulty=1)  # ~800 products of 1-2 x 1 digits
    s = tasks.make_splits(["mul"], {"train": 2000, "test": 300}, seed=0, difficulty=1)
    train = [e["question"] for e in s["train"]]
    assert len(train) == 2000 and len(set(train)) < 2000  # sampled with replacement from what is left
    assert not set(train) & {e["question"] for e in s["test"]}


def test_random_module_state_untouched():
    random.seed(123)
    before = random.random()
    random.seed(123)
    tasks.get("add").generate(0, 10, 1)
    assert random.random() == before
