"""Column arithmetic with every step written out: addition (carries), subtraction (borrows), multiplication
(partial products) and chain sums (running totals).

The worked solutions are what a person writes on paper, one line per step, ending in the answer, so a small
model can learn the algorithm instead of memorising sums. Digits are single tokens (tokenizer.py), which keeps
the columns visible to the model. Level 1 is 1-2 digit numbers; each level adds a digit or a term.
"""

from __future__ import annotations

import random

from nanoseek.tasks.base import Task, digits_range


def _digits(n: int) -> list[int]:
    """Least significant digit first: 472 -> [2, 7, 4]."""
    return [int(c) for c in reversed(str(n))]


def add_steps(a: int, b: int) -> list[str]:
    """One line per column, units first: the column sum, the carry, and the answer digits so far.

    47 + 85 -> ["7+5=12 carry 1 -> 2", "4+8+1=13 carry 1 -> 32", "1 -> 132"]
    """
    da, db = _digits(a), _digits(b)
    lines, carry, done = [], 0, ""
    for k in range(max(len(da), len(db))):
        terms = [d[k] for d in (da, db) if k < len(d)] + ([carry] if carry else [])
        s = sum(terms)
        carry, digit = divmod(s, 10)
        done = str(digit) + done
        expr = f"{'+'.join(map(str, terms))}={s}" if len(terms) > 1 else f"{s}"
        lines.append(f"{expr}{' carry 1' if carry else ''} -> {done}")
    if carry:
        lines.append(f"1 -> 1{done}")
    return lines


def sub_steps(a: int, b: int) -> list[str]:
    """a - b for a >= b >= 0, one line per column, units first, borrowing from the next column.

    73 - 25 -> ["3-5 borrow: 13-5=8 -> 8", "7-1-2=4 -> 48"]; the "-1" is the borrow paid back.
    """
    da, db = _digits(a), _digits(b)
    lines, borrow, done = [], 0, ""
    for k in range(len(da)):
        top, bot = da[k], db[k] if k < len(db) else None
        expr = f"{top}" + ("-1" if borrow else "") + (f"-{bot}" if bot is not None else "")
        v = top - borrow - (bot or 0)
        if v < 0:
            line = f"{expr} borrow: 1{expr}={v + 10}"  # "3-5 borrow: 13-5=8", "0-1-2 borrow: 10-1-2=7"
            v, borrow = v + 10, 1
        else:
            line = f"{expr}={v}" if (borrow or bot is not None) else f"{v}"
            borrow = 0
        done = str(v) + done
        lines.append(f"{line} -> {done}")
    return lines


class Addition(Task):
    name = "add"
    description = "a + b, column by column with carries; level L has (L)- to (L+1)-digit numbers"

    def make(self, rng: random.Random, difficulty: int) -> dict:
        a, b = digits_range(rng, difficulty, difficulty + 1), digits_range(rng, difficulty, difficulty + 1)
        steps = add_steps(a, b) + [f"so {a}+{b}={a + b}"]
        return self.entry(f"What is {a} + {b}?", a + b, "\n".join(steps), difficulty, a=a, b=b)


class Subtraction(Task):
    name = "sub"
    description = "a - b, column by column with borrows; from level 3 the result may be negative"

    def make(self, rng: random.Random, difficulty: int) -> dict:
        a, b = digits_range(rng, difficulty, difficulty + 1), digits_range(rng, difficulty, difficulty + 1)
        big, small = max(a, b), min(a, b)
        if difficulty < 3 or rng.random() < 0.5:
            a, b = big, small
        else:
            a, b = small, big
        steps = [] if a >= b else [f"{a}<{b}, so {a}-{b}=-({b}-{a})"]
        steps += sub_steps(big, small) + [f"so {a}-{b}={a - b}"]
        return self.entry(f"What is {a} - {b}?", a - b, "\n".join(steps), difficulty, a=a, b=b)


def _place_parts(n: int) -> list[int]:
    """472 -> [400, 70, 2] (zero digits dropped; 0 -> [0])."""
    s = str(n)
    parts = [int(c) * 10 ** (len(s) - 1 - i) for i, c in enumerate(s) if c != "0"]
    return parts or [0]


def mul_by_parts(a: int, b: int) -> str:
    """a * b with a split into place values: '47*8 = 40*8 + 7*8 = 320 + 56 = 376'."""
    parts = _place_parts(a)
    if len(parts) == 1:
        return f"{a}*{b} = {a * b}"
    return (f"{a}*{b} = {' + '.join(f'{p}*{b}' for p in parts)} = "
            f"{' + '.join(str(p * b) for p in parts)} = {a * b}")


class Multiplication(Task):
    name = "mul"
    description = "a * b by partial products; b has 1 digit up to level 2, 2 digits up to level 4, then 3"

    def make(self, rng: random.Random, difficulty: int) -> dict:
        lo, hi = (difficulty, difficulty + 1) if difficulty <= 2 else (difficulty - 1, difficulty)
        b_digits = 1 if difficulty <= 2 else 2 if difficulty <= 4 else 3
        a, b = digits_range(rng, lo, hi), digits_range(rng, b_digits, b_digits)
        if b_digits == 1:
            b = max(b, 2)  # x0 and x1 teach nothing
        bparts = _place_parts(b)
        if len(bparts) == 1:
            steps = [mul_by_parts(a, b)]
        else:
            steps = [f"{a}*{b} = {' + '.join(f'{a}*{p}' for p in bparts)}"]
            steps += [mul_by_parts(a, p) for p in bparts]
            steps.append(f"{' + '.join(str(a * p) for p in bparts)} = {a * b}")
        steps.append(f"so {a}*{b}={a * b}")
        return self.entry(f"What is {a} * {b}?", a * b, "\n".join(steps), difficulty, a=a, b=b)


class ChainSum(Task):
    name = "chain_sum"
    description = "a ± b ± c ..., one running total per line; level L has 3 + L//2 terms of 1 to 1+(L+1)//2 digits"

    def make(self, rng: random.Random, difficulty: int) -> dict:
        n_terms, hi = 3 + difficulty // 2, 1 + (difficulty + 1) // 2
        terms = [digits_range(rng, 1, hi) for _ in range(n_terms)]
        ops = [rng.choice("+-") for _ in range(n_terms - 1)]
        total, steps = terms[0], []
        for op, t in zip(ops, terms[1:]):
            new = total + t if op == "+" else total - t
            steps.append(f"{total}{op}{t}={new}")
            total = new
        expr = " ".join([str(terms[0])] + [f"{op} {t}" for op, t in zip(ops, terms[1:])])
        return self.entry(f"Calculate {expr}.", total, "\n".join(steps), difficulty, terms=terms, ops=ops)
