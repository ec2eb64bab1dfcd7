"""The R1 stages on the smoke preset: `nanoseek rl [--zero|--student]`, `nanoseek sft`, `nanoseek distill`.

A tiny tokenizer (trained here on a few hundred documents) and random smoke-sized models stand in for the
pretrained ones, so every test runs in seconds; what they check is the plumbing (checkpoints that load, metrics,
resume, the filters), plus one learning check: GRPO updates raise the log-probability of the rewarded completions
of a fixed batch. Rejection sampling is driven by a scripted engine whose answers are known, so its counts are exact.
"""

import json
import os
from argparse import Namespace
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import nanoseek  # noqa: E402
from nanoseek.config import ConfigError, ModelConfig, load_preset  # noqa: E402
from nanoseek.model.transformer import Transformer  # noqa: E402
from nanoseek.train import distill, grpo, sft  # noqa: E402
from nanoseek.train.grpo import GRPOConfig, Rollout, group_advantages, make_micro_batches  # noqa: E402
from nanoseek.train.loop import LoopConfig, Trainer, read_metrics  # noqa: E402

TASKS = ["add", "sub"]
DATA = ["data.tasks=['add','sub']", "data.train_size=40", "data.val_size=4", "data.test_size=4",
        "data.ood_size=4"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from nanoseek.data import DataConfig, corpus_texts
    from nanoseek.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    texts = corpus_texts(DataConfig(tasks=TASKS, train_size=200, val_size=4, test_size=4, ood_size=4))
    train_tokenizer(texts, vocab_size=300).save(d)
    return d


def save_model(cfg: ModelConfig, tok_dir: Path, out: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    files = {f.name: str(f) for f in tok_dir.iterdir()}
    return nanoseek.save(Transformer(cfg), out, extra_files=files)


@pytest.fixture(scope="module")
def base_dir(tok_dir, tmp_path_factory):
    return save_model(load_preset("smoke").model, tok_dir, tmp_path_factory.mktemp("base") / "model")


@pytest.fixture(scope="module")
def student_dir(tok_dir, tmp_path_factory):
    return save_model(load_preset("smoke").section("student"), tok_dir,
                      tmp_path_factory.mktemp("student") / "model", seed=1)


def rl_args(model, out, *extra, zero=False, student=False, resume=False):
    sets = [*DATA, "rl.steps=2", "rl.zero_steps=2", "rl.student_steps=1", "rl.num_generations=3",
            "rl.prompts_per_step=2", "rl.max_completion_length=12", "rl.ckpt_every=1", *extra]
    return Namespace(model=str(model), out=str(out), zero=zero, student=student, preset="smoke", set=sets,
                     resume=resume)


def assert_stage_dir(d: Path, files_from: Path):
    """A stage directory: model/ loads with nanoseek.load and carries the tokenizer files; metrics.jsonl exists."""
    m = nanoseek.load(d / "model")
    assert isinstance(m, Transformer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (d / "model" / name).read_bytes() == (files_from / name).read_bytes()
    assert read_metrics(d)
    return m


# ---- nanoseek rl ---------------------------------------------------------------------------------------------------
def parity_rewards(texts, entries, scorer, **kw):
    """A stand-in reward with variance inside groups even for a random model (which never answers correctly)."""
    from nanoseek.train.rewards import Reward

    return [Reward(reward=float(len(t) % 2), accuracy=0.0, lenient=0.0, format=0.0, overlong=0.0, answer=None)
            for t in texts]


def test_rl_zero_runs_logs_and_resumes(base_dir, tmp_path, monkeypatch):
    from nanoseek.train import rewards

    monkeypatch.setattr(rewards, "rewards", parity_rewards)
    out = tmp_path / "zero"
    assert grpo.run(rl_args(base_dir, out, zero=True)) == 0
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [1, 2]
    for key in ("reward", "reward_std", "accuracy", "accuracy_lenient", "format", "kl", "entropy", "clip_low",
                "clip_high", "zero_variance_groups", "length", "length_correct", "length_wrong", "truncated",
                "rollout_seconds", "update_seconds"):
        assert key in recs[0], key
    assert recs[0]["samples"] == 2 * 3
    model = assert_stage_dir(out, base_dir)
    base = nanoseek.load(base_dir)
    moved = [n for (n, p), q in zip(model.named_parameters(), base.parameters()) if not torch.equal(p, q)]
    assert moved, "two GRPO steps changed no weight"
    # Rerunning without --resume refuses; with --resume and more steps it continues from step 2.
    with pytest.raises(ConfigError, match="--resume"):
        grpo.run(rl_args(base_dir, out, zero=True))
    assert grpo.run(rl_args(base_dir, out, "rl.zero_steps=3", zero=True, resume=True)) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


def test_rl_dapo_dynamic_sampling_and_student(student_dir, tmp_path):
    # The student arm (dense model, rl.student_steps) with DAPO: dynamic sampling, token-level loss, no reference.
    out = tmp_path / "student_rl"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "reward": 9.0}\n')  # a run that died before its checkpoint
    assert grpo.run(rl_args(student_dir, out, "rl.loss_type='dapo'", "rl.beta=0.0", "rl.max_sample_rounds=2",
                            "rl.mu=2", student=True, resume=True)) == 0
    recs = read_metrics(out)
    assert len(recs) == 1 and recs[0]["reward"] != 9.0  # --resume without a checkpoint started over
    assert recs[0]["optimizer_step"] == 2  # μ = 2 optimizer steps per rollout batch
    assert 1 <= recs[0]["sample_rounds"] <= 2 and recs[0]["train_groups"] == 2
    assert "kl" not in recs[0]  # β = 0: the reference model is never run
    assert_stage_dir(out, student_dir)


class ListStream:
    """A question stream in a fixed order (collect_rollout only calls take)."""

    def __init__(self, entries):
        self.entries, self.pos, self.taken = entries, 0, []

    def take(self, n):
        self.taken.append(n)
        out = self.entries[self.pos: self.pos + n]
        self.pos += n
        return out


def scripted_rollout(calls):
    """A stand-in for grpo.sample_rollout: each entry's G rewards are its "rewards" field (flat or mixed)."""
    from nanoseek.train.rewards import Reward

    def sample(engine, tok, entries, cfg, seed=None):
        calls.append(([e["id"] for e in entries], seed))
        G = cfg.num_generations
        ro = Rollout([], [], [], [], [], [], [])
        for e in entries:
            assert len(e["rewards"]) == G
            for r in e["rewards"]:
                ro.prompts.append([e["id"]])
                ro.completions.append([7])
                ro.entries.append(e)
                ro.texts.append("")
                ro.rewards.append(Reward(reward=r, accuracy=r, lenient=r, format=0.0, overlong=0.0, answer=None))
                ro.truncated.append(False)
                ro.sampler_logprobs.append([0.0])
        return ro

    return sample


FLAT0, FLAT1, MIXED, NEAR = [0.0] * 4, [1.0] * 4, [0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.5]


@pytest.mark.parametrize("case", ["fills", "round_limit", "off"])
def test_dynamic_sampling_keeps_mixed_groups_and_samples_more(case, monkeypatch):
    """collect_rollout with scripted rewards (G = 4, 4 groups per step): only groups whose rewards differ are
    kept; each extra round asks for just the missing groups; at max_sample_rounds it tops up with the first flat
    groups sampled; the logged zero-variance share covers everything sampled, and sample_rounds the rounds."""
    calls = []
    monkeypatch.setattr(grpo, "sample_rollout", scripted_rollout(calls))
    plans = {  # entries in stream order, the groups each round asks for, the kept ids, rounds
        "fills": ([FLAT0, MIXED, FLAT1, NEAR, FLAT1, MIXED, MIXED, FLAT0], [4, 2, 1], [1, 3, 5, 6], 3),
        "round_limit": ([FLAT0, MIXED, FLAT1, FLAT0, FLAT1, NEAR, FLAT0, MIXED], [4, 3], [1, 5, 0, 2], 2),
        "off": ([FLAT0, MIXED, FLAT1, NEAR, MIXED], [4], [0, 1, 2, 3], 1),
    }
    rewards, asked, kept_ids, want_rounds = plans[case]
    entries = [{"id": i, "rewards": r} for i, r in enumerate(rewards)]
    cfg = GRPOConfig(num_generations=4, prompts_per_step=4, max_sample_rounds=2 if case == "round_limit" else 5,
                     dynamic_sampling=case != "off", seed=1)
    stream = ListStream(entries)
    batch, seen, rounds = grpo.collect_rollout(None, None, stream, cfg, step=3)
    assert rounds == want_rounds and stream.taken == asked
    assert [ids for ids, _ in calls] == [list(range(sum(asked[:k]), sum(asked[:k + 1]))) for k in range(len(asked))]
    assert len({seed for _, seed in calls}) == len(calls)  # every round draws fresh samples
    assert batch.prompts[::4] == [[i] for i in kept_ids] and len(batch) == 16
    assert [r.reward for r in batch.rewards] == [r for i in kept_ids for r in rewards[i]]  # whole groups, in order
    n_seen = sum(asked)
    assert seen.prompts[::4] == [[i] for i in range(n_seen)]  # everything sampled, for the logs
    stats = grpo.rollout_stats(seen.rewards, [len(c) for c in seen.completions], seen.truncated, 4)
    flat = sum(rewards[i] in (FLAT0, FLAT1) for i in range(n_seen))
    assert stats["zero_variance_groups"] == pytest.approx(flat / n_seen)  # fills: 3/7; round_limit: 5/7


def test_grpo_updates_raise_rewarded_completions():
    """A fixed toy batch: for each prompt, completion "a a a" is rewarded and "b b b" is not. A few GRPO steps must
    raise log π of the rewarded ones and lower the others (the sign and wiring of the whole update path)."""
    torch.manual_seed(0)
    cfg_m = ModelConfig(**{**load_preset("smoke").raw["model"], "vocab_size": 16})
    model = Transformer(cfg_m)
    cfg = GRPOConfig(num_generations=2, prompts_per_step=3, lr=3e-3, beta=0.0, max_completion_length=4)
    prompts = [[0, 3, 4], [0, 5], [0, 6, 7, 8]]
    good, bad = [9, 9, 9, 1], [10, 10, 10, 1]
    ro = Rollout(prompts=[p for p in prompts for _ in range(2)], completions=[good, bad] * 3,
                 entries=[{}] * 6, texts=[""] * 6, rewards=[], truncated=[False] * 6)
    adv = group_advantages(torch.tensor([1.0, 0.0] * 3), 2)

    def logps():
        mb = make_micro_batches(ro, adv, cfg, pad_id=2)[0]
        with torch.no_grad():
            lp, _ = grpo.sequence_logprobs(model, mb, cfg.temperature)
        per = (lp * mb.mask).sum(-1)
        return per[0::2], per[1::2]  # rewarded, not rewarded

    g0, b0 = logps()
    trainer = Trainer(model, LoopConfig(steps=10, lr=cfg.lr, warmup_steps=0, schedule="constant", dtype="fp32",
                                        progress=False), "/tmp/unused-grpo-toy", grpo.grpo_loss_fn(cfg))
    for _ in range(5):
        trainer.train_step(make_micro_batches(ro, adv, cfg, pad_id=2))
    g1, b1 = logps()
    assert bool((g1 > g0 + 0.5).all()) and bool((b1 < b0).all()), (g0, g1, b0, b1)


def test_micro_batches_mask_the_completion():
    ro = Rollout(prompts=[[0, 5, 6], [0, 7]], completions=[[8, 9, 1], [4]], entries=[{}, {}], texts=["", ""],
                 rewards=[], truncated=[False, True])
    cfg = GRPOConfig(num_generations=2, micro_batch_size=1)
    mbs = make_micro_batches(ro, torch.tensor([1.0, -1.0]), cfg, pad_id=2)
    assert len(mbs) == 2 and mbs[0].num_items == 4 and mbs[0].n_micro == 2
    # Sorted by length: the short row first. Row 0: ids 0 5 6 8 9 1; targets ids[1:]; completion at positions 2..4.
    assert mbs[1].ids.tolist() == [[0, 5, 6, 8, 9, 1]] and mbs[1].mask.tolist() == [[0, 0, 1, 1, 1]]
    assert mbs[0].ids.tolist() == [[0, 7, 4]] and mbs[0].mask.tolist() == [[0, 1]]
    assert mbs[0].adv.tolist() == [-1.0] and mbs[1].adv.tolist() == [1.0]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_micro_batching_gives_the_whole_batch_gradient(loss_type):
    """Splitting a rollout batch into unequal, length-sorted micro-batches (as the shared loop averages them) gives
    the gradient of the whole batch in one piece."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**load_preset("smoke").raw["model"], "vocab_size": 16}))
    g = torch.Generator().manual_seed(1)
    prompts = [[0] + torch.randint(3, 16, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 6, (6,), generator=g)]
    comps = [torch.randint(3, 16, (int(n),), generator=g).tolist() for n in torch.randint(1, 9, (6,), generator=g)]
    ro = Rollout(prompts, comps, [{}] * 6, [""] * 6, [], [False] * 6)
    adv = group_advantages(torch.tensor([1.0, 0.0, 2.0, 0.5, 0.0, 1.0]), 3)

    def grads(micro):
        cfg = GRPOConfig(num_generations=3, loss_type=loss_type, beta=0.0, micro_batch_size=micro,
                         max_completion_length=8)
        model.zero_grad()
        mbs = make_micro_batches(ro, adv, cfg, pad_id=2)
        fn = grpo.grpo_loss_fn(cfg)
        for mb in mbs:
            (fn(model, mb)[0] / len(mbs)).backward()  # what Trainer._forward_backward does
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    whole, split = grads(0), grads(4)  # chunks of 4 and 2 rows
    assert len(whole) == len(split)
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---- rejection sampling ---------------------------------------------------------------------------------------------
class ScriptedEngine:
    """Answers each prompt with a fixed list of completions (cycled over the n samples)."""

    max_model_len = 1024

    def __init__(self, replies, tok):
        self.replies, self.tok, self.eos_id = replies, tok, tok.eos_id

    def generate(self, prompts, params):
        from types import SimpleNamespace

        out = []
        for p in prompts:
            group = []
            for j in range(params.n):
                text, reason = self.replies(p)[j % len(self.replies(p))]
                group.append(SimpleNamespace(token_ids=self.tok.encode(text) + ([self.eos_id] if reason == "stop"
                                                                                  else []), finish_reason=reason))
            out.append(group)
        return out


def test_readable_filter():
    ok = "9+9=18 carry 1\nso 18\n</think>\n<answer>18</answer>"
    assert sft.readable(ok, 20, False, 50) is None
    assert sft.readable(ok, 20, True, 50) == "truncated"
    assert sft.readable(ok, 60, False, 50) == "too_long"
    assert sft.readable("</think>\n<answer>18</answer>", 5, False, 50) == "format"  # no reasoning
    assert sft.readable("x\n</think>\n<answer>18</answer> and more", 9, False, 50) == "format"
    assert sft.readable("a=1\nb=2\na=1\n</think>\n<answer>1</answer>", 9, False, 50) == "repeated_line"
    assert sft.readable("a=1 \u00e9\n</think>\n<answer>1</answer>", 9, False, 50) == "not_plain"


def test_rejection_sampling_keeps_correct_readable_distinct(tok_dir):
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    entries = [{"question": "What is 2 + 3?", "answer": "5", "task": "add"},
               {"question": "What is 7 - 4?", "answer": "3", "task": "sub"}]
    by_prompt = {}
    for e in entries:
        a = e["answer"]
        by_prompt[tuple(grpo.prompt_ids(tok, e))] = [
            (f"step one\nso {a}\n</think>\n<answer>{a}</answer>", "stop"),  # correct, readable
            (f"step one\nso {a}\n</think>\n<answer>{a}</answer>", "stop"),  # the same text again: duplicate
            (f"other way\nso {a}\n</think>\n<answer>{a}</answer>", "stop"),  # correct, readable, distinct
            ("so 0\n</think>\n<answer>0</answer>", "stop"),  # wrong
            (f"x\nx\n</think>\n<answer>{a}</answer>", "stop"),  # correct but a repeated line
            (f"x\n</think>\n<answer>{a}", "length"),  # truncated: no closed answer, not correct
        ]
    eng = ScriptedEngine(lambda p: by_prompt[tuple(p)], tok)
    traces, fig = sft.rejection_sample(eng, tok, entries, k=6, temperature=1.0, top_p=1.0, max_tokens=64,
                                       max_trace_tokens=64, max_per_question=5)
    assert fig["sampled"] == 12 and fig["correct"] == 8 and fig["kept"] == 4
    assert fig["rejected"] == {"duplicate": 2, "repeated_line": 2}
    assert {t["completion"].split("\n")[0] for t in traces} == {"step one", "other way"}
    cap, fig2 = sft.rejection_sample(eng, tok, entries, 6, 1.0, 1.0, 64, 64, max_per_question=1)
    assert fig2["kept"] == 2 and fig2["rejected"]["per_question_cap"] == 2
    _, fig3 = sft.rejection_sample(eng, tok, entries, 6, 1.0, 1.0, 64, 64, 5, use_filter=False)
    assert fig3["kept"] == 6  # without the filter only duplicates go
    # The SFT examples train on the reply only, which is the trace after "<think>\n", ending in EOS.
    ex = sft.trace_examples(traces[:1], tok)[0]
    assert tok.decode(ex.completion_ids[:-1]) == traces[0]["completion"] and ex.completion_ids[-1] == tok.eos_id
    assert tok.decode(ex.prompt_ids).endswith("<｜Assistant｜><think>\n")


# ---- nanoseek sft and nanoseek distill ---------------------------------------------------------------------------
def script_correct(tok, data_sets):
    """A scripted engine that answers every training question with its worked solution (correct, readable)."""
    from nanoseek.data import splits

    data_cfg = load_preset("smoke", data_sets).section("data")
    by_prompt = {tuple(grpo.prompt_ids(tok, e)): [(e["solution"] + "\n</think>\n<answer>" + e["answer"]
                                                   + "</answer>", "stop")] for e in splits(data_cfg)["train"]}
    return ScriptedEngine(lambda p: by_prompt[tuple(p)], tok)


def test_sft_stage(base_dir, tok_dir, tmp_path, monkeypatch):
    from nanoseek.infer import engine as engine_mod
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    monkeypatch.setattr(engine_mod, "Engine", lambda model, tok_, cfg=None: script_correct(tok, DATA))
    out = tmp_path / "sft"
    sets = [*DATA, "sft.n_questions=12", "sft.samples_per_question=2", "sft.max_trace_tokens=200", "sft.steps=8",
            "sft.batch_size=4", "sft.lr=3e-3", "sft.ckpt_every=4", "sft.min_traces=4", "sft.progress=false"]
    args = Namespace(model=str(base_dir), traces_from=None, out=str(out), preset="smoke", set=sets, resume=False)
    assert sft.run(args) == 0
    fig = json.loads((out / "traces.json").read_text())
    assert fig["sampled"] == 24 and fig["kept"] == 12  # distinct texts only: one per question
    recs = read_metrics(out)
    assert len(recs) == 8 and recs[-1]["loss"] < recs[0]["loss"]  # the masked SFT loss goes down
    assert_stage_dir(out, base_dir)
    with pytest.raises(ConfigError, match="--resume"):
        sft.run(args)


def test_distill_stage(base_dir, student_dir, tok_dir, tmp_path, monkeypatch):
    from nanoseek.infer import engine as engine_mod
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    monkeypatch.setattr(engine_mod, "Engine", lambda model, tok_, cfg=None: script_correct(tok, DATA))
    sets = [*DATA, "distill.n_questions=8", "distill.samples_per_question=2", "distill.steps=4",
            "distill.batch_size=4", "distill.min_traces=4", "distill.progress=false"]
    # A student with MoE layers is refused: distillation trains a dense student.
    args = Namespace(teacher=str(base_dir), student=str(base_dir), out=str(tmp_path / "bad"), preset="smoke",
                     set=sets, resume=False)
    with pytest.raises(ConfigError, match="DENSE"):
        distill.run(args)
    # Too few traces for distill.min_traces: the error counts them and names the knobs.
    few = Namespace(teacher=str(base_dir), student=str(student_dir), out=str(tmp_path / "few"), preset="smoke",
                    set=[*sets, "distill.min_traces=1000"], resume=False)
    with pytest.raises(ConfigError, match=r"only 8 correct traces from \S+ \(distill\.min_traces = 1000\); "
                                          r".*distill\.n_questions"):
        distill.run(few)
    out = tmp_path / "distill"
    args = Namespace(teacher=str(base_dir), student=str(student_dir), out=str(out), preset="smoke", set=sets,
                     resume=False)
    assert distill.run(args) == 0
    model = assert_stage_dir(out, base_dir)
    assert not model.moe_layers() and len(model.mtp) == 0
    assert model.config.num_hidden_layers == load_preset("smoke").section("student").num_hidden_layers
    # --resume after the end: the traces are reused, nothing is retrained, the model is rewritten unchanged.
    args.resume = True
    assert distill.run(args) == 0
    assert len(read_metrics(out)) == 4
