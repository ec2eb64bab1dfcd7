"""What a task is: a seeded generator of entries with worked solutions, a difficulty knob, and a scorer.

An entry is a plain JSON-able dict:
    {"question": str, "answer": str, "solution": str (worked, step by step; "" if the source has none),
     "task": str (registry name), "difficulty": int, "meta": dict}
`score(model_answer, entry)` returns a float in [0, 1]; `model_answer` is the text already parsed out of the
model's `<answer>…</answer>` (parsing is the rewards' job, not the task's).
"""

from __future__ import annotations

import random
import re
from fractions import Fraction


class Task:
    """Base class of our own tasks. Subclasses set `name` and implement `make(rng, difficulty) -> entry`."""

    name: str = ""
    description: str = ""

    def make(self, rng: random.Random, difficulty: int) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def generate(self, seed: int, n: int, difficulty: int = 1) -> list[dict]:
        """`n` entries; entry i depends only on (task, difficulty, seed, i), so any prefix is reproducible."""
        check_difficulty(self.name, difficulty)
        return [self.make(random.Random(f"{self.name}/{difficulty}/{seed}/{i}"), difficulty) for i in range(n)]

    def score(self, model_answer: str, entry: dict) -> float:
        """Default: the answer is one number, compared exactly."""
        return score_number(model_answer, entry["answer"])

    def entry(self, question: str, answer, solution: str, difficulty: int, **meta) -> dict:
        return {"question": question, "answer": str(answer), "solution": solution, "task": self.name,
                "difficulty": difficulty, "meta": meta}


def check_difficulty(name: str, difficulty: int) -> None:
    if not isinstance(difficulty, int) or isinstance(difficulty, bool) or difficulty < 1:
        raise ValueError(f"task {name}: difficulty must be an integer >= 1 (1 is the easiest), got {difficulty!r}")


_NUM = re.compile(r"^[+-]?\d+(?:\.\d+)?(?:/\d+)?$")


def parse_number(text: str) -> Fraction | None:
    """'42', '-7', ' 3.50 ', 'x = 5', '1/2' -> Fraction; anything else -> None. No thousands separators."""
    if text is None:
        return None
    s = re.sub(r"\s+", "", str(text))
    s = re.sub(r"^[a-zA-Z]=", "", s)  # "x=5" is a fine answer to "solve for x"
    s = s.rstrip(".")
    if not _NUM.match(s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def score_number(model_answer: str, expected: str) -> float:
    got, want = parse_number(model_answer), parse_number(expected)
    return float(got is not None and want is not None and got == want)


def digits_range(rng: random.Random, lo_digits: int, hi_digits: int) -> int:
    """A number whose digit count is uniform in [lo_digits, hi_digits] (1-digit numbers include 0..9)."""
    d = rng.randint(lo_digits, hi_digits)
    return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)
