"""Linear equations in one unknown with an integer solution, solved by moving terms then dividing.

Level 1: a*x + b = c with small positive numbers (a 2-9, x 0-9, b 1-19, c < 100); level 2: negative numbers;
level 3 and up: x on both sides, a*x + b = c*x + d, with coefficients growing with the level.
"""

from __future__ import annotations

import random

from nanoseek.tasks.base import Task


def _lin(a: int, b: int) -> str:
    """'3x + 4', '3x - 4', '-2x', 'x + 1'."""
    ax = "x" if a == 1 else "-x" if a == -1 else f"{a}x"
    if b == 0:
        return ax
    return f"{ax} {'+' if b > 0 else '-'} {abs(b)}"


class Linear(Task):
    name = "linear"
    description = "solve a*x + b = c (level 1-2) or a*x + b = c*x + d (level 3+) for integer x"

    def make(self, rng: random.Random, difficulty: int) -> dict:
        if difficulty == 1:
            a, x = rng.randint(2, 9), rng.randint(0, 9)
            b = rng.randint(1, min(19, 99 - a * x))  # keep every number below 100
            c_, d = 0, a * x + b
        else:
            m = 3 * difficulty
            a = rng.choice([v for v in range(-m, m + 1) if v not in (0, 1)])
            x, b = rng.randint(-m, m), rng.randint(-4 * m, 4 * m)
            c_ = 0 if difficulty == 2 else rng.choice([v for v in range(-m, m + 1) if v not in (0, a)])
            d = (a - c_) * x + b
        steps = []
        if c_ == 0:
            question = f"Solve for x: {_lin(a, b)} = {d}"
            k = a
        else:
            question = f"Solve for x: {_lin(a, b)} = {_lin(c_, d)}"
            k = a - c_
            steps.append(f"{a}x - ({c_})x = {k}x, so {_lin(k, b)} = {d}")
        rhs = d - b
        if b:
            steps.append(f"{k}x = {d} {'-' if b > 0 else '+'} {abs(b)} = {rhs}")
        steps.append(f"x = {rhs} / {k} = {x}")
        return self.entry(question, x, "\n".join(steps), difficulty, a=a, b=b, c=c_, d=d)
