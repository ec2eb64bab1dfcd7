"""Eval: the estimators against direct counting, the bootstrap interval, and a real eval of a tiny model."""

import itertools
import math
import random

import pytest

from nanoseek.eval import EvalConfig, bootstrap_ci, majority_vote, pass_at_k, score_question, summarize


def direct_pass_at_k(outcomes: list[bool], k: int) -> float:
    """Share of all k-subsets of the samples that contain at least one correct sample."""
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (5, 0, 3), (5, 5, 2), (6, 2, 1), (6, 2, 4), (8, 1, 4),
                                   (8, 3, 8), (10, 4, 3), (10, 9, 2), (12, 5, 6)])
def test_pass_at_k_equals_counting_subsets(n, c, k):
    outcomes = [True] * c + [False] * (n - c)
    random.Random(n * 100 + c).shuffle(outcomes)  # order must not matter
    assert pass_at_k(n, c, k) == pytest.approx(direct_pass_at_k(outcomes, k), abs=1e-12)


def test_pass_at_k_closed_forms_and_errors():
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)  # pass@1 is the plain success rate
    assert pass_at_k(8, 3, 8) == 1.0  # all samples drawn: correct iff any is
    assert pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(200, 13, 50) == pytest.approx(1 - math.comb(187, 50) / math.comb(200, 50), rel=1e-9)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(4, 5, 1)


def test_majority_vote_hand_cases():
    assert majority_vote(["7", "5", "7", None, None, None]) == "7"  # None (no answer) never wins
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None
    assert majority_vote(["3", "4", "4", "3"]) == "3"  # a tie goes to the answer seen first
    assert majority_vote(["12", " 12 ", "12.0", "13", "13"]) == "12"  # equal numbers are one vote
    assert majority_vote(["1, 2, 3", "1,2,3", "3,2,1"]) == "1, 2, 3"  # whitespace does not split votes
    assert majority_vote(["x = 5", "6", "5"]) == "x = 5"  # "x = 5" and "5" are the same number


def test_maj_at_k_matches_brute_force_vote():
    from nanoseek import tasks

    entry = tasks.get("add").generate(seed=3, n=1)[0]
    right, wrong = entry["answer"], str(int(entry["answer"]) + 1)
    rng = random.Random(0)
    for _ in range(30):
        k = rng.randint(1, 7)
        answers = [rng.choice([right, wrong, str(int(right) + 2), None]) for _ in range(k)]
        texts = [f"x</think>\n<answer>{a}</answer>" if a is not None else "x</think> no answer" for a in answers]
        q = score_question(entry, texts, [10] * k, [False] * k, prompt_opens_think=True)
        given = [a for a in answers if a is not None]
        if not given:
            assert q.maj == 0.0
            continue
        counts = {a: given.count(a) for a in given}
        top = max(counts.values())
        winner = next(a for a in given if counts[a] == top)  # first-seen among the most frequent
        assert q.maj == float(winner == right)
        assert q.scores == [float(a == right) for a in answers]


def test_bootstrap_interval_contains_mean_and_shrinks():
    rng = random.Random(1)
    small = [float(rng.random() < 0.3) for _ in range(20)]
    big = [float(rng.random() < 0.3) for _ in range(2000)]
    a, b = bootstrap_ci(small, 500), bootstrap_ci(big, 500)
    for ci, xs in ((a, small), (b, big)):
        assert ci["lo"] <= ci["mean"] <= ci["hi"]
        assert ci["mean"] == pytest.approx(sum(xs) / len(xs))
    assert b["hi"] - b["lo"] < a["hi"] - a["lo"]  # 100x the questions: a much narrower interval
    assert 0 < a["hi"] - a["lo"] < 0.6
    const = bootstrap_ci([0.5] * 10, 200)
    assert const["lo"] == const["hi"] == const["mean"] == 0.5
    assert bootstrap_ci([], 10)["mean"] is None


def test_summarize_pools_questions():
    from nanoseek.eval import QuestionResult

    qs = [QuestionResult("add", [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [10, 20, 30, 40], [False] * 4, 0.0, 1.0),
          QuestionResult("add", [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [5, 5, 5, 5], [False] * 4, 1.0, 0.0)]
    s = summarize(qs, k=4, pass_ks=[1, 4], n_boot=100, seed=0)
    assert s["pass@1"]["mean"] == pytest.approx((0.25 + 1.0) / 2)
    assert s["pass@4"]["mean"] == pytest.approx(1.0)
    assert s["maj@k"]["mean"] == 0.5 and s["greedy"]["mean"] == 0.5
    assert s["format"]["mean"] == pytest.approx((0.75 + 1) / 2)
    assert s["lenient"]["mean"] == pytest.approx((0.5 + 1) / 2)
    assert s["length"]["mean"] == pytest.approx((25 + 5) / 2)
    assert s["length_correct"] == pytest.approx((10 + 5 * 4) / 5)
    assert s["length_wrong"] == pytest.approx(30)


def test_config_errors_name_the_field():
    from nanoseek.config import ConfigError

    with pytest.raises(ConfigError, match="eval.k"):
        EvalConfig(k=0)
    with pytest.raises(ConfigError, match="eval.splits"):
        EvalConfig(splits=["train"])
    assert EvalConfig(k=8).pass_ks() == [1, 4, 8]
    assert EvalConfig(k=2).pass_ks() == [1, 2]


# ---- the whole protocol through a scripted engine: every number is known in advance ------------------------------


class ScriptedEngine:
    """Stands in for nanoseek's Engine (add_request / step / has_unfinished): question i gets c_i = i % (k+1)
    correct samples (first), the rest one shared wrong answer, and a correct greedy answer when i is even. Each
    step hands out at most two tokens per sequence, as a real engine streams them."""

    max_model_len = 4096

    def __init__(self, tok, entries):
        from nanoseek.train.grpo import prompt_ids

        self.tok, self.entries, self.pending, self.seeds = tok, entries, {}, []
        self.index = {tuple(prompt_ids(tok, e)): i for i, e in enumerate(entries)}

    def add_request(self, prompt, params, stream_text=True):
        i, e = self.index[tuple(prompt)], self.entries[self.index[tuple(prompt)]]
        c = i % (params.n + 1) if params.temperature > 0 else (1 if i % 2 == 0 else 0)
        if params.temperature > 0:
            self.seeds.append(params.seed)
        rid = f"r{len(self.pending)}"
        self.pending[rid] = [self.tok.encode("some steps\n</think>\n<answer>" + (e["answer"] if j < c else "999999")
                                             + "</answer>") + [self.tok.eos_id] for j in range(params.n)]
        return rid

    def has_unfinished(self):
        return any(any(seqs) for seqs in self.pending.values())

    def step(self):
        from types import SimpleNamespace

        outs = []
        for rid, seqs in self.pending.items():
            for j, ids in enumerate(seqs):
                if ids:
                    chunk, seqs[j] = ids[:2], ids[2:]
                    outs.append(SimpleNamespace(request_id=rid, index=j, token_ids=chunk, finished=not seqs[j],
                                                finish_reason="stop" if not seqs[j] else None))
        return outs


def _tokenizer():
    from nanoseek.tokenizer import train_tokenizer

    return train_tokenizer(["What is 12 + 34? <think>\nsteps\n</think>\n<answer>46</answer>"] * 4, vocab_size=300)


def test_evaluate_end_to_end_numbers():
    from nanoseek import tasks
    from nanoseek.eval import evaluate

    tok = _tokenizer()
    entries = tasks.get("add").generate(seed=7, n=9) + tasks.get("sub").generate(seed=7, n=9)
    k = 4
    cfg = EvalConfig(k=k, bootstrap=200, splits=["test"])
    res = evaluate(ScriptedEngine(tok, entries), tok, {"test": entries}, cfg)
    cs = [i % (k + 1) for i in range(len(entries))]
    a = res["splits"]["test"]["all"]
    assert a["pass@1"]["mean"] == pytest.approx(sum(c / k for c in cs) / len(cs))
    assert a["pass@4"]["mean"] == pytest.approx(sum(c > 0 for c in cs) / len(cs))
    assert a["maj@k"]["mean"] == pytest.approx(sum(c >= k - c for c in cs) / len(cs))  # ties: correct came first
    assert a["greedy"]["mean"] == pytest.approx(sum(i % 2 == 0 for i in range(len(entries))) / len(entries))
    assert a["format"]["mean"] == 1.0  # "<think>\n" is in the prompt, so these completions are well formed
    assert a["pass@1"]["lo"] <= a["pass@1"]["mean"] <= a["pass@1"]["hi"]
    assert set(res["splits"]["test"]) == {"add", "sub", "all"}
    assert res["splits"]["test"]["add"]["pass@1"]["n"] == 9
    assert res["tokens_generated"] > 0 and res["examples"][0]["completion"].endswith("</answer>")


def test_each_question_samples_its_own_stream():
    """One seed for every request would give sample j of every question the same random draws: the questions would
    not be independent and the bootstrap over them would be wrong. Each question gets its own, reproducibly."""
    from nanoseek import tasks
    from nanoseek.eval import evaluate

    tok = _tokenizer()
    entries = tasks.get("add").generate(seed=3, n=6)
    seeds = []
    for _ in range(2):
        engine = ScriptedEngine(tok, entries)
        evaluate(engine, tok, {"test": entries[:3], "ood": entries[3:]}, EvalConfig(k=2, bootstrap=10, seed=5))
        seeds.append(engine.seeds)
    assert len(set(seeds[0])) == len(entries) and None not in seeds[0]
    assert seeds[0] == seeds[1]
    engine = ScriptedEngine(tok, entries)
    evaluate(engine, tok, {"test": entries}, EvalConfig(k=2, bootstrap=10, seed=6))
    assert not set(engine.seeds) & set(seeds[0])


def test_expert_load_counts_every_token_top_k_times():
    import torch

    from nanoseek.eval import expert_load
    from nanoseek.model.transformer import Transformer
    from tests.tiny import tiny

    torch.manual_seed(0)
    cfg = tiny()
    model = Transformer(cfg).eval()
    seqs = [[1, 2, 3, 4, 5], [7, 8], [9] * 11]
    names, counts = expert_load(model, seqs, batch=2)  # padded batches...
    n_moe = cfg.num_hidden_layers - cfg.first_k_dense_replace
    assert names == [f"layer{i}" for i in range(cfg.first_k_dense_replace, cfg.num_hidden_layers)]
    assert len(counts) == n_moe and all(len(c) == cfg.n_routed_experts for c in counts)
    assert all(sum(c) == 18 * cfg.num_experts_per_tok for c in counts)  # 18 real tokens, each to top-k experts
    assert all(int(m.load.sum()) == 0 for m in model.moe_layers())  # the model's own counters untouched
    # ... count exactly what one unpadded forward per sequence counts (the model's own load counters).
    for x in seqs:
        model(torch.tensor([x]))
    assert counts == [m.load.tolist() for m in model.moe_layers()][:n_moe]


def test_eval_questions_are_the_training_runs_held_out_splits():
    from nanoseek import data
    from nanoseek.config import load_preset
    from nanoseek.eval import eval_questions

    preset = load_preset("smoke")
    full = data.splits(preset.section("data"))
    cfg = EvalConfig(n_questions=2, splits=["test", "ood"])
    qs = eval_questions(cfg, preset)
    for split in ("test", "ood"):
        for t in preset.section("data").tasks:
            assert [e for e in qs[split] if e["task"] == t] == [e for e in full[split] if e["task"] == t][:2]
    train = {e["question"] for e in full["train"]}
    assert not any(e["question"] in train for s in qs.values() for e in s)  # never trained on


def test_steps_metric_counts_formatted_samples_whose_checkable_steps_hold():
    from nanoseek.eval import score_question

    entry = {"task": "add", "question": "What is 22 + 5?", "answer": "27"}
    texts = ["22 + 5 = 27\n</think>\n<answer>27</answer>",   # consistent, correct
             "22 + 5 = 26\n</think>\n<answer>27</answer>",   # correct answer through a false step
             "22 + 5 = 27\n<answer>27</answer>",             # no </think>: not in format
             "carry nothing\n</think>\n<answer>26</answer>"]  # nothing checkable, in format: consistent
    r = score_question(entry, texts, [8] * 4, [False] * 4, prompt_opens_think=True)
    assert r.consistent == [1.0, 0.0, 0.0, 1.0]
    assert r.scores[:2] == [1.0, 1.0] and r.formats[2] == 0.0
    s = summarize([r], k=4, pass_ks=[1], n_boot=50, seed=0)
    assert s["steps"]["mean"] == pytest.approx(0.5)


def test_eval_command_tasks_and_json(tmp_path, capsys):
    """`nanoseek eval --model DIR --tasks T --json` on a saved random model: only the named task is scored, the JSON
    printed is the JSON written, and a directory without a checkpoint is refused with a message naming the fix."""
    import json

    import torch

    import nanoseek
    from nanoseek.cli import main
    from nanoseek.config import load_preset
    from nanoseek.data import DataConfig, corpus_texts
    from nanoseek.model.transformer import Transformer
    from nanoseek.tokenizer import train_tokenizer

    tok_dir = tmp_path / "tok"
    train_tokenizer(corpus_texts(DataConfig(tasks=["add", "sort"], train_size=100, val_size=2, test_size=2,
                                            ood_size=2)), vocab_size=300).save(tok_dir)
    torch.manual_seed(0)
    cfg = load_preset("smoke").model
    cfg.vocab_size = 300
    model_dir = nanoseek.save(Transformer(cfg), tmp_path / "m" / "model",
                              extra_files={f.name: str(f) for f in tok_dir.iterdir()})
    argv = ["eval", "--model", str(model_dir.parent), "--preset", "smoke", "--tasks", "sort", "--json",
            "--set", "eval.k=2", "--set", "eval.max_tokens=8", "--set", "eval.n_questions=2"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads((model_dir / "eval.json").read_text())  # stage dir given: its model/ is used
    for split in ("test", "ood"):
        assert set(printed["splits"][split]) == {"sort", "all"}
        assert printed["splits"][split]["sort"]["pass@1"]["n"] == 2
    assert main(["eval", "--model", str(tmp_path / "tok"), "--preset", "smoke"]) == 2
    assert "no config.json" in capsys.readouterr().err
