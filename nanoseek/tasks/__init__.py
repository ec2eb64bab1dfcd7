"""Procedural reasoning tasks: a registry of seeded generators with worked solutions and rule-based scorers.

    from nanoseek import tasks
    tasks.names()                              # our tasks: add, sub, mul, chain_sum, sort, linear, countdown
    t = tasks.get("add")                       # or "rg:<dataset>" for any reasoning-gym dataset
    entries = t.generate(seed=0, n=10, difficulty=1)
    tasks.score("132", entries[0])             # -> 0.0 or 1.0, dispatched on entry["task"]
    splits = tasks.make_splits(["add", "rg:chain_sum"], {"train": 1000, "test": 100}, seed=0, difficulty=1)

Entries are dicts {"question", "answer", "solution", "task", "difficulty", "meta"} (see tasks/base.py).
"""

from __future__ import annotations

import difflib

from nanoseek.tasks.algebra import Linear
from nanoseek.tasks.arithmetic import Addition, ChainSum, Multiplication, Subtraction
from nanoseek.tasks.base import Task
from nanoseek.tasks.countdown import Countdown
from nanoseek.tasks.ordering import Sort
from nanoseek.tasks.reasoning_gym import PREFIX as RG_PREFIX
from nanoseek.tasks.reasoning_gym import ReasoningGymTask
from nanoseek.tasks.splits import SPLITS, make_splits

__all__ = ["Task", "get", "names", "register", "score", "make_splits", "SPLITS"]

_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    if task.name in _REGISTRY or task.name.startswith(RG_PREFIX):
        raise ValueError(f"task name {task.name!r} is taken or reserved; choose another name")
    _REGISTRY[task.name] = task
    return task


for _cls in (Addition, Subtraction, Multiplication, ChainSum, Sort, Linear, Countdown):
    register(_cls())

_RG_CACHE: dict[str, ReasoningGymTask] = {}


def names() -> list[str]:
    """Our own tasks. Any reasoning-gym dataset is also available as 'rg:<name>' (not listed here)."""
    return list(_REGISTRY)


def get(name: str):
    """The task called `name`: one of names(), or 'rg:<dataset>' for a reasoning-gym dataset."""
    if name.startswith(RG_PREFIX):
        if name not in _RG_CACHE:
            _RG_CACHE[name] = ReasoningGymTask(name[len(RG_PREFIX):])
        return _RG_CACHE[name]
    if name not in _REGISTRY:
        near = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise KeyError(f"unknown task {name!r}; {hint}known: {', '.join(_REGISTRY)}, or rg:<reasoning-gym dataset>")
    return _REGISTRY[name]


def score(model_answer: str, entry: dict) -> float:
    """Score `model_answer` (the text inside <answer>…</answer>) against `entry` with its task's scorer."""
    return get(entry["task"]).score(model_answer, entry)
