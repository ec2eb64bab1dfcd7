"""reasoning-gym datasets as nanoseek tasks: `rg:<dataset_name>` (e.g. `rg:chain_sum`, `rg:basic_arithmetic`).

Entries come from reasoning-gym's own generator (`reasoning_gym.create_dataset(name, seed=..., size=...)`) and are
scored by its own `score_answer`. The difficulty level L maps to reasoning-gym's curriculum global level L-1 where
the dataset has a curriculum (level 1 = the curriculum's easiest); otherwise the dataset's default config is used
for every level. reasoning-gym gives no worked solutions, so `solution` is "" (corpus documents built from these
entries are plain question -> answer). Everything runs offline.
"""

from __future__ import annotations

import dataclasses
import functools
import json

from nanoseek.tasks.base import check_difficulty

PREFIX = "rg:"


def _rg():
    try:
        import reasoning_gym
        from reasoning_gym import factory
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise ImportError("rg: tasks need reasoning-gym: pip install reasoning-gym==0.1.25") from e
    return reasoning_gym, factory


def dataset_names() -> list[str]:
    return sorted(_rg()[1].DATASETS)


def config_for(name: str, difficulty: int) -> dict:
    """The dataset config (as kwargs) for a difficulty level; the curriculum's level L-1 when there is one."""
    _, factory = _rg()
    if not factory.has_curriculum(name):
        return {}
    cur = factory.create_curriculum(name)
    try:
        cur.set_global_level(difficulty - 1)
        cfg = cur.generate_configuration()
    except Exception as e:  # reasoning-gym raises various errors past its last level
        raise ValueError(f"rg:{name} has no curriculum level for difficulty {difficulty}: {e}; "
                         f"use a lower difficulty") from None
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in ("seed", "size")}
    return json.loads(json.dumps(out, default=list))  # tuples -> lists, so entries stay JSON-able


@functools.lru_cache(maxsize=64)
def _scorer(name: str, config_json: str):
    _, factory = _rg()
    config = json.loads(config_json)
    ds = factory.create_dataset(name, seed=0, size=1, **_tuples(name, config))
    return ds.score_answer


def _tuples(name: str, config: dict) -> dict:
    """JSON turned the config's tuples into lists; give them back as the config class declares."""
    _, factory = _rg()
    cls = factory.DATASETS[name][1]
    kinds = {f.name: f.default for f in dataclasses.fields(cls)}
    return {k: tuple(v) if isinstance(v, list) and isinstance(kinds.get(k), tuple) else v for k, v in config.items()}


class ReasoningGymTask:
    """Same interface as nanoseek.tasks.base.Task: generate(seed, n, difficulty) and score(answer, entry)."""

    def __init__(self, dataset: str):
        if dataset not in _rg()[1].DATASETS:
            import difflib

            near = difflib.get_close_matches(dataset, dataset_names(), n=3)
            raise KeyError(f"reasoning-gym has no dataset {dataset!r}"
                           + (f"; did you mean {', '.join(PREFIX + n for n in near)}?" if near else ""))
        self.dataset = dataset
        self.name = PREFIX + dataset
        self.description = f"reasoning-gym dataset {dataset!r}"

    def generate(self, seed: int, n: int, difficulty: int = 1) -> list[dict]:
        check_difficulty(self.name, difficulty)
        _, factory = _rg()
        config = config_for(self.dataset, difficulty)
        ds = factory.create_dataset(self.dataset, seed=seed, size=n, **_tuples(self.dataset, config))
        out = []
        for i in range(n):
            e = ds[i]
            meta = json.loads(json.dumps(e.get("metadata", {}), default=str))
            meta["rg_config"] = config
            out.append({"question": e["question"], "answer": str(e["answer"]), "solution": "",
                        "task": self.name, "difficulty": difficulty, "meta": meta})
        return out

    def score(self, model_answer: str, entry: dict) -> float:
        if model_answer is None:
            return 0.0
        meta = {k: v for k, v in entry["meta"].items() if k != "rg_config"}
        fn = _scorer(self.dataset, json.dumps(entry["meta"].get("rg_config", {}), sort_keys=True))
        try:
            s = fn(model_answer, {"question": entry["question"], "answer": entry["answer"], "metadata": meta})
        except Exception:  # a malformed model answer must not crash training
            return 0.0
        return float(min(1.0, max(0.0, s or 0.0)))
