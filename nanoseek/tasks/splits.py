"""Train / val / test / ood splits from disjoint seed ranges, deduplicated on the question text.

Each (task, split) draws from its own seed range: split k of seed s uses generator seed (8*s + k) * 10**6, and
entry i of a split is generated from that seed and i alone (reasoning-gym seeds entry i with seed + i, so ranges a
million apart never overlap). Splits are filled in the order test, ood, val, train, each skipping every question
already taken, so no test or ood question appears in val or train, and no val question in train. Held-out splits
have no repeats; train may repeat a question (sampling with replacement) when the level has few questions. `ood` is
the same tasks at a harder difficulty (difficulty + 1 unless given). Everything is deterministic given the seed.
"""

from __future__ import annotations

SPLITS = ("test", "ood", "val", "train")  # fill order: held-out splits claim their questions first
_RANGE = 1_000_000


def split_seed(seed: int, split: str) -> int:
    return (8 * seed + SPLITS.index(split)) * _RANGE


def _draw(task, seed: int, n: int, difficulty: int, held_out: set[str], unique: bool) -> list[dict]:
    """The first n entries of the seeded stream whose question is not held out (and, if unique, not repeated)."""
    if n <= 0:
        return []
    want = n + n // 4 + 16
    while True:
        stream = task.generate(seed, want, difficulty)  # a prefix-stable stream: entry i depends on (seed, i)
        out, seen = [], set()
        for e in stream:
            q = e["question"].strip()
            if q in held_out or (unique and q in seen):
                continue
            seen.add(q)
            out.append(e)
            if len(out) == n:
                return out
        if want >= 8 * n + 256:
            raise ValueError(f"task {task.name} at difficulty {difficulty} gave only {len(out)} usable questions "
                             f"of {n} asked (from {want} draws): it has too few distinct questions at this level; "
                             f"ask for fewer (data.test_size / val_size / ood_size) or raise the difficulty")
        want *= 3


def make_splits(task_names: list[str], sizes: dict[str, int], seed: int = 0, difficulty: int = 1,
                ood_difficulty: int | None = None) -> dict[str, list[dict]]:
    """{split: entries} for split in train/val/test/ood; `sizes` gives entries PER TASK per split (missing = 0).

    Held-out splits (test, ood, val) hold distinct questions and must be filled exactly (else ValueError). Train
    is a sample of the task's distribution minus every held-out question, so it may repeat a question when the
    task has few distinct questions at this level (e.g. 1-digit products); it always has the size asked.
    """
    from nanoseek import tasks as registry

    bad = set(sizes) - set(SPLITS)
    if bad:
        raise ValueError(f"unknown split(s) {sorted(bad)} in sizes; use {', '.join(SPLITS)}")
    ood_difficulty = difficulty + 1 if ood_difficulty is None else ood_difficulty
    out: dict[str, list[dict]] = {s: [] for s in ("train", "val", "test", "ood")}
    for name in task_names:
        task = registry.get(name)
        taken: set[str] = set()
        for split in SPLITS:
            level = ood_difficulty if split == "ood" else difficulty
            got = _draw(task, split_seed(seed, split), sizes.get(split, 0), level, taken, unique=split != "train")
            taken.update(e["question"].strip() for e in got)
            out[split].extend(got)
    return out
