"""Countdown: reach a target with the given numbers (each at most once) and + - * (and exact / from level 2).

The generator builds the target from a random left-to-right expression over a subset of the numbers, so a
solution always exists; the worked solution is that expression one operation per line. The scorer does not
compare strings: any expression that uses only the given numbers (each at most once) and evaluates exactly to
the target scores 1. It is evaluated by walking the Python AST with exact fractions, never with eval().
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from fractions import Fraction

from nanoseek.tasks.base import Task

_OPS = {ast.Add: lambda x, y: x + y, ast.Sub: lambda x, y: x - y, ast.Mult: lambda x, y: x * y,
        ast.Div: lambda x, y: x / y}


class BadExpression(ValueError):
    pass


def evaluate(expression: str) -> tuple[Fraction, list[int]]:
    """Value of an arithmetic expression of non-negative integers, + - * / and parentheses, and the numbers it
    uses. Raises BadExpression for anything else (names, calls, powers, unary minus, floats, division by 0)."""
    text = expression.replace("×", "*").replace("÷", "/").replace("x", "*").strip()
    if len(text) > 200:
        raise BadExpression("expression longer than 200 characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise BadExpression(f"not an expression: {e}") from None
    used: list[int] = []

    def walk(node) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise BadExpression("division by zero")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
            used.append(node.value)
            return Fraction(node.value)
        raise BadExpression(f"not allowed: {ast.dump(node)[:40]}")

    return walk(tree.body), used


def score_expression(expression: str, numbers: list[int], target: int) -> float:
    """1.0 if `expression` uses each of `numbers` at most once (as a multiset) and equals `target`."""
    if expression is None:
        return 0.0
    expression = re.sub(rf"=\s*{target}\s*$", "", expression.strip())  # allow "5*3+4 = 19"
    try:
        value, used = evaluate(expression)
    except BadExpression:
        return 0.0
    if Counter(used) - Counter(numbers):  # a number not given, or used too often
        return 0.0
    return float(value == target)


class Countdown(Task):
    name = "countdown"
    description = "make the target from L+2 numbers with + - * (exact / from level 2), each number at most once"

    def make(self, rng: random.Random, difficulty: int) -> dict:
        n = difficulty + 2
        top = [9, 20, 50][difficulty - 1] if difficulty <= 3 else 100
        ops = "+-*/" if difficulty >= 2 else "+-*"
        for _ in range(1000):
            numbers = [rng.randint(1, top) for _ in range(n)]
            k = rng.randint(2, n)
            chosen = rng.sample(numbers, k)
            value, expr, prev, steps = chosen[0], str(chosen[0]), None, []
            for x in chosen[1:]:
                op = rng.choice([o for o in ops if _ok(o, value, x)])
                new = value + x if op == "+" else value - x if op == "-" else value * x if op == "*" else value // x
                steps.append(f"{value}{op}{x}={new}")
                expr = f"({expr}){op}{x}" if op in "*/" and prev in ("+", "-") else f"{expr}{op}{x}"
                value, prev = new, op
            if 1 <= value <= 10 * top and value not in numbers:
                break
        question = (f"Use the numbers {', '.join(map(str, numbers))} to make {value}. Use {' '.join(ops)} "
                    f"and each number at most once.")
        return self.entry(question, expr, "\n".join(steps), difficulty, numbers=numbers, target=value)

    def score(self, model_answer: str, entry: dict) -> float:
        return score_expression(model_answer, entry["meta"]["numbers"], entry["meta"]["target"])


def _ok(op: str, value: int, x: int) -> bool:
    """Keep every intermediate result a positive integer, as in the game."""
    if op == "-":
        return value > x
    if op == "/":
        return x > 1 and value % x == 0
    if op == "*":
        return x > 1 and value > 1
    return True
