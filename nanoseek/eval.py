"""`nanoseek eval`: how well a checkpoint reasons, per task, on the held-out test split and the harder OOD split.

The protocol of DeepSeek-R1 §3 (evaluation setup): k samples per question at temperature 0.6, top-p 0.95, and

    pass@1   = mean over questions of (correct samples / k)          (R1's "pass@1 averaged over k samples")
    pass@j   = mean over questions of 1 - C(k-c, j) / C(k, j)         (Chen et al. 2021, eq. 1: unbiased, j <= k)
    maj@k    = the majority answer of the k samples is correct        (R1's cons@64, here with k samples)
    greedy   = one temperature-0 sample is correct
    format   = share of samples in the exact <think>…</think><answer>…</answer> format
    steps    = share of samples in that format whose checkable reasoning steps all hold (rewards.wrong_step: every
               integer `expr = value`, every sorting pick): R1's readability, which the tag format alone cannot show
    length   = mean completion tokens; also for correct and wrong samples apart (R1-Zero's "length grows")

"correct" is the STRICT accuracy of `nanoseek.train.rewards` (the answer inside <answer>…</answer> after
</think>, scored by the task's scorer) — the very rule RL trained on; the lenient rate (the last number anywhere)
is reported beside it. A sample counts as correct for pass@j / maj@k when its score is 1 (scorers in [0, 1] may
give partial credit; pass@1 averages the raw scores). Every figure comes with a 95% percentile bootstrap
interval over questions (resampling questions, not samples: the questions are the random draw we generalise
over). The questions are the data section's test/ood splits (same seed and difficulty as training), so no eval
question was ever trained on.

    nanoseek eval --model runs/x/rl/model                # prints a table; writes runs/x/rl/model/eval.json
    nanoseek eval --model runs/x/rl --tasks add,sub --json --out runs/x/eval/rl.json   # a stage dir works too
    nanoseek eval --model runs/x/rl --preset smoke --set eval.k=4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from nanoseek.config import ConfigError, load_preset

METRICS = ("pass@1", "greedy", "maj@k", "format", "steps", "lenient", "length")  # the table's columns, in order


@dataclass
class EvalConfig:
    """The [eval] section."""

    tasks: list[str] = field(default_factory=list)  # empty: the data section's tasks
    splits: list[str] = field(default_factory=lambda: ["test", "ood"])  # held-out test, harder out-of-distribution
    n_questions: int = 64  # per task per split (capped by the data section's split size)
    k: int = 8  # samples per question (pass@1 averaged over k, pass@j for j in {1, 4, k}, maj@k)
    temperature: float = 0.6  # R1's evaluation setting
    top_p: float = 0.95
    max_tokens: int = 256  # completion budget; a sample that hits it is "truncated" (and usually wrong)
    greedy: bool = True  # also one temperature-0 sample per question
    bootstrap: int = 1000  # resamples for the 95% intervals; 0 disables them
    max_batch: int = 128  # engine slots while evaluating (more concurrent sequences = more tokens/s); 0 = [engine]
    seed: int = 0  # sampling and bootstrap seed

    def __post_init__(self):
        def bad(name, why, fix):
            raise ConfigError(f"eval.{name}: {why}; {fix}")

        if self.k < 1:
            bad("k", f"must be >= 1, got {self.k}", "use e.g. 8 (R1 used 64 for cons@64)")
        if self.n_questions < 1:
            bad("n_questions", f"must be >= 1, got {self.n_questions}", "use e.g. 64")
        if not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p}", "use 0.95 as R1 does")
        if self.temperature <= 0:
            bad("temperature", f"must be > 0 for sampling, got {self.temperature}",
                "use 0.6 as R1 does (greedy accuracy is reported separately)")
        if self.max_tokens < 1:
            bad("max_tokens", f"must be >= 1, got {self.max_tokens}", "use e.g. 256")
        if self.max_batch < 0:
            bad("max_batch", f"must be >= 0, got {self.max_batch}", "use e.g. 128, or 0 for the [engine] setting")
        if self.bootstrap < 0:
            bad("bootstrap", f"must be >= 0, got {self.bootstrap}", "use 1000, or 0 to skip the intervals")
        for s in self.splits:
            if s not in ("test", "ood", "val"):
                bad("splits", f"unknown split {s!r}", "use test and/or ood (val also works)")

    def pass_ks(self) -> list[int]:
        return sorted({j for j in (1, 4, self.k) if j <= self.k})


# ---- the estimators (pure functions; tests/test_eval.py checks them against direct counting) -------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, eq. 1).

    Computed as the product form of their numpy snippet, 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the
    huge binomials."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset contains a correct sample
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def vote_key(answer: str) -> str:
    """What two answers must share to count as the same vote: the text with whitespace removed and case folded,
    numbers canonical ("3.0" == "3" == "6/2"). Voting only; the scorer still judges the winner's raw text."""
    from nanoseek.tasks.base import parse_number

    num = parse_number(answer)
    if num is not None:
        return str(num)
    return "".join(answer.split()).casefold()


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent parsed answer (None = no answer, never a candidate); ties go to the answer seen first.
    Returns a representative raw answer text (its first occurrence), or None when no sample gave an answer."""
    keyed = [(vote_key(a), a) for a in answers if a is not None]
    if not keyed:
        return None
    counts = Counter(k for k, _ in keyed)  # Counter keeps first-seen order, so most_common breaks ties by it
    best = max(counts.values())
    winner = next(k for k, _ in keyed if counts[k] == best)
    return next(a for k, a in keyed if k == winner)


def bootstrap_ci(values: Sequence[float], n_boot: int = 1000, conf: float = 0.95, seed: int = 0) -> dict:
    """Mean of `values` with a percentile bootstrap interval: resample the values with replacement n_boot times."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    mean = float(x.mean())
    if n_boot == 0 or x.size == 1:
        return {"mean": mean, "lo": mean, "hi": mean, "n": int(x.size)}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)  # [n_boot]
    lo, hi = np.quantile(means, [(1 - conf) / 2, (1 + conf) / 2])
    # The percentile interval of a mean of bounded values always brackets the mean up to float rounding; clamp
    # so a reader never sees lo > mean from a 1e-17 wobble.
    return {"mean": mean, "lo": float(min(lo, mean)), "hi": float(max(hi, mean)), "n": int(x.size)}


# ---- scoring one question's samples ------------------------------------------------------------------------------


@dataclass
class QuestionResult:
    """Everything eval keeps about one question (per-question values are what the bootstrap resamples)."""

    task: str
    scores: list[float]  # strict accuracy of each of the k samples
    lenient: list[float]
    formats: list[float]
    lengths: list[int]
    truncated: list[bool]
    maj: float  # score of the majority answer
    greedy: float | None  # score of the greedy sample (None when greedy is off)
    greedy_length: int | None = None
    consistent: list[float] = field(default_factory=list)  # in format with every checkable step true, per sample

    def correct(self) -> int:
        return sum(s >= 1.0 for s in self.scores)


def score_question(entry: dict, texts: Sequence[str], lengths: Sequence[int], truncated: Sequence[bool],
                   prompt_opens_think: bool, greedy_text: str | None = None,
                   greedy_length: int | None = None) -> QuestionResult:
    """Score k sampled completions (and optionally the greedy one) of one question with the RL reward rules."""
    from nanoseek import tasks
    from nanoseek.train.rewards import THINK_CLOSE, reward, wrong_step

    rs = [reward(t, entry, tasks.score, prompt_opens_think=prompt_opens_think) for t in texts]
    consistent = [float(r.format >= 1.0 and wrong_step(t.split(THINK_CLOSE)[0]) is None) for r, t in zip(rs, texts)]
    winner = majority_vote([r.answer for r in rs])
    maj = 0.0 if winner is None else float(tasks.score(winner, entry))
    greedy = None
    if greedy_text is not None:
        greedy = reward(greedy_text, entry, tasks.score, prompt_opens_think=prompt_opens_think).accuracy
    return QuestionResult(task=entry["task"], scores=[r.accuracy for r in rs], lenient=[r.lenient for r in rs],
                          formats=[r.format for r in rs], lengths=list(lengths), truncated=list(truncated),
                          maj=maj, greedy=greedy, greedy_length=greedy_length, consistent=consistent)


def summarize(results: Sequence[QuestionResult], k: int, pass_ks: Sequence[int], n_boot: int, seed: int) -> dict:
    """{metric: {"mean", "lo", "hi", "n"}} over a list of questions (one task, or all of them pooled)."""
    per_q: dict[str, list[float]] = {m: [] for m in ("pass@1", *[f"pass@{j}" for j in pass_ks if j > 1], "maj@k",
                                                    "greedy", "format", "steps", "lenient", "length",
                                                    "truncated")}
    correct_len, wrong_len = [], []
    for r in results:
        per_q["pass@1"].append(float(np.mean(r.scores)))
        for j in pass_ks:
            if j > 1:
                per_q[f"pass@{j}"].append(pass_at_k(len(r.scores), r.correct(), j))
        per_q["maj@k"].append(r.maj)
        if r.greedy is not None:
            per_q["greedy"].append(r.greedy)
        per_q["format"].append(float(np.mean(r.formats)))
        if r.consistent:
            per_q["steps"].append(float(np.mean(r.consistent)))
        per_q["lenient"].append(float(np.mean(r.lenient)))
        per_q["length"].append(float(np.mean(r.lengths)))
        per_q["truncated"].append(float(np.mean(r.truncated)))
        correct_len += [n for s, n in zip(r.scores, r.lengths) if s >= 1.0]
        wrong_len += [n for s, n in zip(r.scores, r.lengths) if s < 1.0]
    out = {m: bootstrap_ci(v, n_boot, seed=seed) for m, v in per_q.items() if v}
    out["length_correct"] = float(np.mean(correct_len)) if correct_len else None
    out["length_wrong"] = float(np.mean(wrong_len)) if wrong_len else None
    out["k"] = k
    return out


# ---- questions, prompts, generation ------------------------------------------------------------------------------


def eval_questions(cfg: EvalConfig, preset) -> dict[str, list[dict]]:
    """{split: entries} — the first n_questions per task of the data section's held-out splits.

    These are `nanoseek.data.splits`, the very splits training drew from (same seed and difficulty), filled before
    train and deduplicated against it, so no eval question was trained on."""
    import dataclasses

    from nanoseek import data

    data_cfg = preset.section("data")
    if cfg.tasks:
        data_cfg.tasks = list(cfg.tasks)  # a subset of tasks keeps each task's own split (splits are per task)
    # Held-out splits are filled first (test, ood, then val, then train), so they do not depend on the val and
    # train sizes: skip building train (seconds at cpu-tiny) — the questions are identical (tests/test_eval.py).
    splits = data.splits(dataclasses.replace(data_cfg, train_size=0, val_size=0 if "val" not in cfg.splits
                                             else data_cfg.val_size))
    out = {}
    for s in cfg.splits:
        by_task: dict[str, list[dict]] = {}
        for e in splits[s]:
            by_task.setdefault(e["task"], []).append(e)
        out[s] = [e for name in data_cfg.tasks for e in by_task.get(name, [])[: cfg.n_questions]]
        if not out[s]:
            raise ConfigError(f"the {s} split is empty (data.{s}_size={getattr(data_cfg, s + '_size')}); raise it "
                              f"or drop {s} from eval.splits")
    return out


def run_requests(engine, jobs: list[tuple[list[int], object]]) -> list[list[tuple[list[int], str]]]:
    """Submit every (prompt ids, SamplingParams) to the engine at once and step it until all finish; returns, per
    job, its n samples as (token ids, finish reason). One continuous batch for sampled and greedy requests of
    every split: the decode steps are shared instead of paid once per `generate` call."""
    rids = [engine.add_request(p, params, stream_text=False) for p, params in jobs]
    got: dict[str, list] = {r: [[[], None] for _ in range(params.n)] for r, (_, params) in zip(rids, jobs)}
    while engine.has_unfinished():
        for o in engine.step():
            seq = got[o.request_id][o.index]
            seq[0].extend(o.token_ids)
            if o.finished:
                seq[1] = o.finish_reason
    return [[(ids, reason) for ids, reason in got[r]] for r in rids]


def evaluate(engine, tokenizer, entries_by_split: dict[str, list[dict]], cfg: EvalConfig, model=None) -> dict:
    """Run the protocol through `engine` (nanoseek's Engine: add_request / step / has_unfinished). Returns the
    JSON-able result: {"splits": {split: {task | "all": {metric: {mean, lo, hi, n}}}}, "config", "examples",
    "seconds", "tokens_generated"}, plus "expert_load" (see `expert_load`) when `model` is given."""
    from nanoseek.infer.sampling import SamplingParams, sample_seed
    from nanoseek.train.grpo import prompt_ids

    t0 = time.perf_counter()
    prompts = {split: [prompt_ids(tokenizer, e) for e in entries] for split, entries in entries_by_split.items()}
    longest = max(len(p) for ps in prompts.values() for p in ps)
    budget = min(cfg.max_tokens, engine.max_model_len - longest)
    if budget < 1:
        raise ConfigError(f"the longest prompt ({longest} tokens) leaves no room in engine.max_model_len="
                          f"{engine.max_model_len}; raise engine.max_model_len")
    # Each question gets its own seed: one SamplingParams.seed for all would give sample j of every question the
    # same random stream, so questions would not be independent draws and the bootstrap intervals would be off.
    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=budget)
    jobs = []
    for q, p in enumerate(p for ps in prompts.values() for p in ps):
        sample = SamplingParams(n=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=budget,
                                seed=sample_seed(cfg.seed, q))
        jobs += [(p, sample), (p, greedy)] if cfg.greedy else [(p, sample)]
    torch.manual_seed(cfg.seed)
    outs = iter(run_requests(engine, jobs))
    generated = 0
    routed: list[list[int]] = []  # prompt + first sample of each question, for the expert-load measurement
    out = {"splits": {}, "config": asdict(cfg)}
    for split, entries in entries_by_split.items():
        results = []
        for e, p in zip(entries, prompts[split]):
            comps = next(outs)
            g = next(outs)[0] if cfg.greedy else None
            generated += sum(len(ids) for ids, _ in comps) + (len(g[0]) if g else 0)
            routed.append(p + comps[0][0])
            results.append(score_question(
                e, [completion_text(tokenizer, ids) for ids, _ in comps], [len(ids) for ids, _ in comps],
                [reason == "length" for _, reason in comps], _prompt_opens_think(tokenizer, p),
                greedy_text=completion_text(tokenizer, g[0]) if g else None,
                greedy_length=len(g[0]) if g else None))
            if split == cfg.splits[0] and len(out.setdefault("examples", [])) < 3:
                out["examples"].append({"task": e["task"], "question": e["question"], "answer": e["answer"],
                                        "completion": completion_text(tokenizer, comps[0][0])})
        task_names = list(dict.fromkeys(r.task for r in results))
        table = {t: summarize([r for r in results if r.task == t], cfg.k, cfg.pass_ks(), cfg.bootstrap, cfg.seed)
                 for t in task_names}
        table["all"] = summarize(results, cfg.k, cfg.pass_ks(), cfg.bootstrap, cfg.seed)
        out["splits"][split] = table
    out["seconds"] = time.perf_counter() - t0
    out["tokens_generated"] = generated
    out["tokens_per_s"] = generated / max(out["seconds"], 1e-9)
    if model is not None:
        # 32 answers spread over the tasks: ~5k tokens, ~1k per (layer, expert) cell at cpu-tiny; a full forward
        # costs as much per token as training, so re-reading every answer would rival the generation itself.
        out["expert_load_layers"], out["expert_load"] = expert_load(model, routed[:: max(1, len(routed) // 32)])
    return out


@torch.no_grad()
def expert_load(model, sequences: list[list[int]], batch: int = 32) -> tuple[list[str], list[list[int]]]:
    """Tokens routed to each expert of each main-model MoE layer when `model` reads `sequences` (its own answers
    to eval questions): ([layer names], [layer][expert] counts), for the report's heatmap. The engine's decode
    path deliberately keeps no load statistics, so this re-reads them: right-padded batches (causal attention
    keeps padding from touching real tokens), the router's choices caught by a hook, padding positions dropped."""
    layers = [(f"layer{i}", layer.mlp) for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    counts = [torch.zeros(m.gate.weight.shape[0], dtype=torch.long) for _, m in layers]
    real = torch.zeros(0, dtype=torch.bool)
    hooks = []
    for j, (_, m) in enumerate(layers):
        def hook(_mod, _inp, out, j=j):  # out = (weights [N, K], expert ids [N, K], scores [N, E])
            counts[j] += torch.bincount(out[1][real].reshape(-1).cpu(), minlength=len(counts[j]))
        hooks.append(m.gate.register_forward_hook(hook))
    saved = [m.load.clone() for _, m in layers]
    try:
        for s in range(0, len(sequences), batch):
            chunk = sequences[s: s + batch]
            T = max(len(x) for x in chunk)
            ids = torch.zeros(len(chunk), T, dtype=torch.long)  # [B, T], right-padded
            mask = torch.zeros(len(chunk), T, dtype=torch.bool)
            for i, x in enumerate(chunk):
                ids[i, : len(x)] = torch.tensor(x)
                mask[i, : len(x)] = True
            real = mask.reshape(-1)  # [B*T], the gate sees tokens flattened in this order
            model(ids)
    finally:
        for h in hooks:
            h.remove()
        for (_, m), old in zip(layers, saved):
            m.load.copy_(old)  # leave the model's own balance counters as they were
    return [n for n, _ in layers], [c.tolist() for c in counts]


def completion_text(tokenizer, ids: list[int]) -> str:
    """What the rewards read, decoded exactly as GRPO decodes its rollouts: EOS dropped, tags kept."""
    ids = list(ids)
    if ids and ids[-1] == tokenizer.eos_id:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True)


def _prompt_opens_think(tokenizer, ids: list[int]) -> bool:
    # The R1 template's generation prompt ends with "<think>\n": then completions start inside the think block.
    return tokenizer.decode(ids[-3:], skip_special_tokens=False).rstrip().endswith("<think>")


# ---- output ------------------------------------------------------------------------------------------------------


def fmt_ci(m: dict | None, pct: bool = True) -> str:
    if not m or m.get("mean") is None:
        return "–"
    if pct:
        return f"{100 * m['mean']:.1f} [{100 * m['lo']:.0f}–{100 * m['hi']:.0f}]"
    return f"{m['mean']:.1f}"


def table(result: dict) -> str:
    """A plain-text (also valid markdown) table: one row per split and task."""
    k = result["config"]["k"]
    ks = [j for j in sorted({1, 4, k}) if 1 < j <= k]
    head = ["split", "task", "n", "pass@1", *[f"pass@{j}" for j in ks], f"maj@{k}", "greedy", "format",
            "steps", "lenient", "length"]
    rows = []
    for split, tasks_ in result["splits"].items():
        for task, m in tasks_.items():
            rows.append([split, task, str(m["pass@1"]["n"]), fmt_ci(m["pass@1"]),
                         *[fmt_ci(m.get(f"pass@{j}")) for j in ks], fmt_ci(m["maj@k"]), fmt_ci(m.get("greedy")),
                         fmt_ci(m["format"]), fmt_ci(m.get("steps")), fmt_ci(m["lenient"]),
                         fmt_ci(m["length"], pct=False)])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (HF model files + tokenizer files)")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: the data section's tasks)")
    p.add_argument("--preset", default="cpu-tiny", help="preset whose [data] splits and [eval] settings to use")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset field, e.g. --set eval.k=16")
    p.add_argument("--out", default=None, help="where to write the JSON result (default: MODEL/eval.json)")
    p.add_argument("--json", action="store_true", help="print the JSON result instead of the table")


def run(args) -> int:
    import nanoseek
    from nanoseek.tokenizer import load_tokenizer

    preset = load_preset(args.preset, args.sets)
    cfg = preset.section("eval")
    if args.tasks:
        cfg.tasks = [t for t in args.tasks.split(",") if t]
    from nanoseek.checkpoint import model_dir as checkpoint_dir

    model_dir = checkpoint_dir(args.model)
    torch.manual_seed(cfg.seed)
    model = nanoseek.load(model_dir)
    tokenizer = load_tokenizer(model_dir)
    questions = eval_questions(cfg, preset)
    from nanoseek.infer.engine import Engine

    engine_cfg = preset.section("engine")
    if cfg.max_batch:
        engine_cfg.max_batch = cfg.max_batch
    engine = Engine(model, tokenizer, engine_cfg)
    result = evaluate(engine, tokenizer, questions, cfg, model=model)
    result["model"] = str(model_dir)
    result["preset"] = str(preset.path)
    out = Path(args.out) if args.out else model_dir / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)  # atomic: a reader (the report, a resumed speedrun) never sees half a file
    if args.json:
        print(json.dumps(result))
    else:
        print(table(result))
        print(f"{result['tokens_generated']} tokens in {result['seconds']:.1f}s "
              f"({result['tokens_per_s']:.0f} tok/s); written to {out}", file=sys.stderr)
    return 0


def headline(result: dict, split: str = "test") -> float | None:
    """The one number a progress line shows: pooled pass@1 on the test split."""
    m = result.get("splits", {}).get(split, {}).get("all", {}).get("pass@1")
    return None if not m else m["mean"]

