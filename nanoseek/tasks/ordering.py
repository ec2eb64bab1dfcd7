"""Comparison and sorting: put a list of distinct integers in ascending or descending order.

The worked solution is selection sort, one comparison pass per line ("smallest of 47, 12, 85: 12"), which is
short and shows every comparison the answer rests on. Level L sorts L+2 numbers of 1 to L+1 digits; from level 3
some numbers are negative.
"""

from __future__ import annotations

import random
import re

from nanoseek.tasks.base import Task, digits_range

_INT = re.compile(r"-?\d+")


def parse_int_list(text: str) -> list[int] | None:
    """'12, 47, 85' / '[12,47,85]' / '12 47 85' -> [12, 47, 85]; None if anything but integers and separators."""
    if text is None:
        return None
    nums = _INT.findall(text)
    rest = _INT.sub("", text)
    if not nums or re.sub(r"[\s,;\[\]()]", "", rest):
        return None
    return [int(n) for n in nums]


class Sort(Task):
    name = "sort"
    description = "sort L+2 distinct integers ascending or descending by repeated selection"

    def make(self, rng: random.Random, difficulty: int) -> dict:
        n, hi = difficulty + 2, difficulty + 1
        nums: list[int] = []
        while len(nums) < n:
            x = digits_range(rng, 1, hi)
            if difficulty >= 3 and rng.random() < 0.3:
                x = -x
            if x not in nums:
                nums.append(x)
        desc = rng.random() < 0.5
        word, pick = ("largest", max) if desc else ("smallest", min)
        left, steps = list(nums), []
        while len(left) > 1:
            best = pick(left)
            steps.append(f"{word} of {', '.join(map(str, left))}: {best}")
            left.remove(best)
        steps.append(f"last: {left[0]}")
        answer = ", ".join(map(str, sorted(nums, reverse=desc)))
        question = f"Sort in {'descending' if desc else 'ascending'} order: {', '.join(map(str, nums))}"
        return self.entry(question, answer, "\n".join(steps), difficulty, numbers=nums, descending=desc)

    def score(self, model_answer: str, entry: dict) -> float:
        got = parse_int_list(model_answer)
        return float(got is not None and got == parse_int_list(entry["answer"]))
