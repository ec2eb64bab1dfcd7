"""Two ranks on CPU (gloo) give what one rank gives: the same pretraining losses with the same global batch, under
DDP and FSDP2; the same GRPO step; a two-rank checkpoint resumes on one rank; a killed rank ends the job.

In-process tests spawn ranks with torch.multiprocessing (one thread each: two cores); the CLI tests launch
`torchrun --nproc_per_node 2 -m nanoseek pretrain` as a user would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanoseek.config import load_preset
from nanoseek.data import PackedLoader
from nanoseek.model.transformer import Transformer
from nanoseek.train import distributed as D
from nanoseek.train.loop import Trainer, complete_checkpoints, read_metrics
from nanoseek.train.pretrain import PretrainConfig, balance_hook, pretrain_loss

TOL = 1e-5
STEPS = 3  # odd: the smoke model's biases oscillate ±γ, so after an odd number of steps they are non-zero


# ---- running a function on W ranks ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, fn, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results[rank] = fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def on_ranks(fn, world: int, *args) -> list:
    """fn(rank, world, *args) on `world` gloo ranks; returns each rank's result."""
    with mp.Manager() as m:
        results = m.dict()
        mp.spawn(_rank_main, args=(world, free_port(), fn, args, results), nprocs=world)
        return [results[r] for r in range(world)]


# ---- pretraining with the real loop and model ----------------------------------------------------------------
def synthetic_docs(n=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (int(torch.randint(10, 60, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def pretrain(rank, world, out, strategy, steps=STEPS, resume=False):
    """The shared Trainer on the smoke model: global batch 4 (B/W rows per rank), 2 micro-batches per step,
    fp32 (the test is about the parallel math, not bf16 rounding). Returns the per-step losses."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = Transformer(load_preset("smoke").model)
    cfg = PretrainConfig(steps=steps, batch_size=4, lr=3e-3, warmup_steps=1, dtype="fp32", progress=False,
                         ckpt_every=2, keep_checkpoints=0, eval_every=0, device="cpu", peak_tflops=1.0,
                         grad_accum=2)
    loader = PackedLoader(synthetic_docs(), 32, cfg.batch_size, seed=0, rank=rank, world_size=world)
    trainer = Trainer(model, cfg, out, lambda m, b: pretrain_loss(m, b, cfg),
                      parallel=D.ParallelConfig(strategy=strategy), after_step=[balance_hook(0.01)],
                      flops_per_token=1e6)
    if resume:
        assert trainer.resume(loader)
    trainer.fit(loader)
    biases = torch.stack([m.gate.e_score_correction_bias for m in model.moe_layers()])
    recs = read_metrics(out)
    return {"losses": [(r["step"], r["loss"]) for r in recs], "biases": biases,
            "mfu": [(r["mfu"], r["tokens_per_s"] * trainer.flops_per_token) for r in recs if "mfu" in r]}


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    return pretrain(0, 1, tmp_path_factory.mktemp("one"), "ddp")


@pytest.mark.parametrize("strategy", ["ddp"])  # fsdp: through torchrun below (in-process too: 20 s more)
def test_two_ranks_pretrain_like_one_and_resume_on_one(strategy, one_rank, tmp_path):
    two = on_ranks(pretrain, 2, tmp_path / "two", strategy)
    want = dict(one_rank["losses"])
    got = dict(two[0]["losses"])
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert abs(got[step] - want[step]) <= TOL, (strategy, step, got[step], want[step])
    # Biases move from the global load, so they agree across ranks and with one rank.
    assert torch.equal(two[0]["biases"], two[1]["biases"])
    assert torch.allclose(two[0]["biases"], one_rank["biases"])
    assert two[0]["biases"].abs().sum() > 0  # they did move
    # MFU: global tokens/s (summed over ranks) over the peak of all ranks (peak_tflops is one rank's: 1.0)
    for run, w in ((one_rank, 1), (two[0], 2)):
        assert len(run["mfu"]) == STEPS
        for mfu, flops_per_s in run["mfu"]:
            assert mfu == pytest.approx(flops_per_s / (w * 1e12), rel=1e-9)

    # The two-rank checkpoint at step 2 resumes on ONE rank and continues like the uninterrupted run.
    ckpts = complete_checkpoints(tmp_path / "two")
    assert [p.name for p in ckpts] == ["step_000002", "step_000003"]
    shutil.rmtree(ckpts[-1])
    resumed = pretrain(0, 1, tmp_path / "two", "ddp", resume=True)
    got = dict(resumed["losses"])
    for step in (3,):
        assert abs(got[step] - want[step]) <= TOL, ("resumed", step, got[step], want[step])


# ---- one GRPO step: groups split across ranks ----------------------------------------------------------------
GROUPS, G = 4, 4


def synthetic_rollout(groups: range):
    """The `groups` of GROUPS prompts x G completions of random lengths, with 0/1 rewards (differing inside most
    groups). Every rank draws all groups from the same seed and keeps its own."""
    from nanoseek.train.grpo import Rollout
    from nanoseek.train.rewards import Reward

    g = torch.Generator().manual_seed(1)
    cols = {k: [] for k in ("prompts", "completions", "entries", "texts", "rewards", "truncated")}
    for i in range(GROUPS):
        prompt = torch.randint(3, 500, (int(torch.randint(4, 9, (1,), generator=g)),), generator=g).tolist()
        for _ in range(G):
            n = int(torch.randint(3, 12, (1,), generator=g))
            completion = torch.randint(3, 500, (n,), generator=g).tolist()
            r = float(torch.rand(1, generator=g) < 0.5)
            if i in groups:
                cols["prompts"].append(prompt)
                cols["completions"].append(completion)
                cols["entries"].append({})
                cols["texts"].append("")
                cols["truncated"].append(False)
                cols["rewards"].append(Reward(reward=r, accuracy=r, lenient=r, format=0.0, overlong=0.0,
                                              answer=None))
    return Rollout(**cols)


def grpo_step(rank, world, loss_type, strategy="ddp"):
    """One optimizer step of nanoseek's GRPO loss through the shared Trainer (DDP or FSDP2 across the ranks), this
    rank holding GROUPS/world whole groups. Returns the step's loss and the updated main-model weights (whole)."""
    from nanoseek.train.grpo import GRPOConfig, fill_logprobs, group_advantages, grpo_loss_fn, make_micro_batches
    from nanoseek.train.loop import LoopConfig

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = GRPOConfig(loss_type=loss_type, num_generations=G, beta=0.0, micro_batch_size=2 * G // world)
    model = Transformer(load_preset("smoke").model)
    # A large AdamW eps makes the first update proportional to the gradient (not its sign, which float noise flips
    # where the gradient is ~0), so comparing weights compares gradients.
    loop = LoopConfig(steps=1, lr=1e-2, eps=1e-2, warmup_steps=0, schedule="constant", dtype="fp32", progress=False,
                      device="cpu", grad_clip=1.0)
    mine = synthetic_rollout(D.shard_range(GROUPS))
    adv = group_advantages(torch.tensor([r.reward for r in mine.rewards]), G, cfg.scale_rewards)  # whole groups
    mbs = make_micro_batches(mine, adv, cfg, pad_id=0)
    num_items = D.dapo_num_items(sum(len(c) for c in mine.completions))  # DAPO: tokens of the WHOLE batch
    # π_old differs from π_θ by a fixed per-token offset (as after a first update when μ > 1): the ratio leaves 1,
    # some tokens clip, and the loss is not the trivial 0 of an on-policy first step.
    fill_logprobs(model, mbs, cfg, "old_logp", contextlib.nullcontext)
    for mb in mbs:
        mb.num_items = num_items
        pos = torch.arange(mb.ids.shape[1] - 1)
        mb.old_logp = mb.old_logp + 0.3 * torch.sin(1.7 * mb.ids[:, 1:].float() + pos)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, loop, out, grpo_loss_fn(cfg), parallel=D.ParallelConfig(strategy=strategy))
        assert D.is_sharded(model) == (strategy == "fsdp" and world > 1)
        record = trainer.train_step(mbs)
    mtp_untouched = all(p.grad is None for p in model.mtp.parameters())
    return {"loss": record["loss"] if "loss" in record else record["policy_loss"], "mtp_untouched": mtp_untouched,
            "weights": {k: v for k, v in D.full_state_dict(model).items() if not k.startswith("mtp")}}


def grpo_steps(rank, world, cases):
    return {(s, t): grpo_step(rank, world, t, s) for s, t in cases}


LOSS_TYPES = ("grpo", "dapo")  # per-sequence mean; token-level over the whole batch (needs the global count)
GRPO_CASES = [(s, t) for s in ("ddp", "fsdp") for t in LOSS_TYPES]


@pytest.fixture(scope="module")
def grpo_two_ranks():
    return on_ranks(grpo_steps, 2, GRPO_CASES)  # one spawn for every case


@pytest.mark.parametrize("strategy,loss_type", GRPO_CASES)
def test_grpo_step_two_ranks_like_one(strategy, loss_type, grpo_two_ranks):
    one = grpo_step(0, 1, loss_type)
    two = [r[(strategy, loss_type)] for r in grpo_two_ranks]
    dw = max((two[0]["weights"][k] - w).abs().max().item() for k, w in one["weights"].items())
    print(f"grpo step {strategy}/{loss_type}: |loss 2 ranks - 1 rank| {abs(two[0]['loss'] - one['loss']):.2e}, "
          f"max |weight 2 ranks - 1 rank| {dw:.2e}")
    assert abs(two[0]["loss"] - one["loss"]) <= TOL, (two[0]["loss"], one["loss"])
    assert abs(one["loss"]) > 1e-4  # a real loss, not a trivially equal zero
    assert one["mtp_untouched"] and two[0]["mtp_untouched"]
    for k, w in one["weights"].items():
        assert torch.allclose(two[0]["weights"][k], w, atol=1e-6), k
        assert torch.equal(two[0]["weights"][k], two[1]["weights"][k]), k
    torch.manual_seed(0)
    init = Transformer(load_preset("smoke").model).state_dict()
    assert not torch.equal(init["lm_head.weight"], one["weights"]["lm_head.weight"])  # the step did update


# ---- the command line under torchrun -------------------------------------------------------------------------
def cli_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def pretrain_cmd(out, *extra, nproc: int = 1) -> list[str]:
    sets = ["pretrain.eval_n=0", "pretrain.progress=false", "pretrain.dtype=fp32", f"pretrain.steps={STEPS}",
            "pretrain.ckpt_every=2", "pretrain.keep_checkpoints=0", "pretrain.grad_accum=2", *extra]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    return [*launch, "-m", "nanoseek", "pretrain", "--preset", "smoke", "--out", str(out),
            *[a for s in sets for a in ("--set", s)]]


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out)}


def test_torchrun_fsdp_pretrain_equals_one_process_and_resumes_on_one(tmp_path):
    import nanoseek

    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(pretrain_cmd(one), check=True, env=cli_env(), capture_output=True, timeout=300)
    r = subprocess.run(pretrain_cmd(two, "parallel.strategy=fsdp", nproc=2), env=cli_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    want, got = losses(one), losses(two)
    assert sorted(got) == list(range(1, STEPS + 1)) and sorted(want) == sorted(got)
    for step in want:
        assert abs(got[step] - want[step]) <= TOL, (step, got[step], want[step])
    assert r.stdout.count('"steps"') == 1  # one summary line: only rank 0 speaks
    # The final model was gathered from the shards and is a whole HF checkpoint.
    a, b = nanoseek.load(one / "model"), nanoseek.load(two / "model")
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(va, vb, atol=1e-5), k
    # Resume the two-rank run on one process from its step-2 checkpoint.
    shutil.rmtree(complete_checkpoints(two)[-1])
    subprocess.run(pretrain_cmd(two) + ["--resume"], check=True, env=cli_env(), capture_output=True, timeout=300)
    got = losses(two)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert abs(got[STEPS] - want[STEPS]) <= TOL


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids = (task / "children").read_text().split()
        for k in map(int, kids):
            out += [k, *children(k)]
    return out


def rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e[5:]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def test_killed_rank_ends_the_job_with_a_clear_error(tmp_path):
    out = tmp_path / "run"
    cmd = pretrain_cmd(out, "pretrain.steps=100000", "pretrain.ckpt_every=0", "pretrain.eval_every=0", nproc=2)
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while len(read_metrics(out)) < 3:  # mid-run: a few optimizer steps done
            assert proc.poll() is None and time.time() < deadline, "the two-rank run did not start"
            time.sleep(0.2)
        victims = [p for p in children(proc.pid) if rank_of(p) == 1]
        assert victims, "no rank-1 worker found"
        os.kill(victims[0], signal.SIGKILL)
        log, _ = proc.communicate(timeout=90)  # bounded: the job must end, not hang
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    # torchrun names the root cause; the surviving rank says in one line why it stopped.
    assert "SIGKILL" in log and "rank      : 1" in log, log[-3000:]
    assert "nanoseek: rank 0 of 2: lost contact with another rank" in log or "SIGTERM" in log, log[-3000:]


HANG = """
import os, sys, time, torch
import torch.distributed as dist
from nanoseek.train import distributed as D
with D.session(D.ParallelConfig(timeout_s=3)):
    if D.rank() == 1:
        time.sleep(40)  # stuck, not dead: only the timeout can notice
    dist.all_reduce(torch.ones(1))
print("finished")
"""


def test_stuck_rank_times_out_with_a_clear_error():
    port = free_port()
    procs = []
    t0 = time.time()
    for r in range(2):
        env = {**cli_env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", HANG], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        _, err = procs[0].communicate(timeout=60)
        assert procs[0].returncode == 1, err[-2000:]
        assert "rank 0 of 2: lost contact with another rank" in err and "timeout_s=3s" in err, err[-2000:]
        assert time.time() - t0 < 40  # it gave up on the timeout, not when the stuck rank woke up
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_command_that_does_not_shard_is_refused_under_torchrun(monkeypatch, capsys):
    from nanoseek.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["eval", "--model", "nowhere"]) == 2  # refused before any process group or model is touched
    assert "does not split its work across ranks" in capsys.readouterr().err


# ---- `nanoseek sft` under torchrun: masked loss over ranks holding different token counts ----------------------
SFT_DATA = ["data.tasks=['add','sub']", "data.train_size=40", "data.val_size=4", "data.test_size=4",
            "data.ood_size=4"]


def sft_inputs(root: Path) -> tuple[Path, list[dict]]:
    """A smoke model with a small tokenizer (a random init stands in for the pretrained base) and correct traces
    (the worked solutions) as rejection sampling would have written them."""
    import nanoseek
    from nanoseek.data import DataConfig, corpus_texts, splits
    from nanoseek.tokenizer import train_tokenizer

    tok_dir = root / "tok"
    train_tokenizer(corpus_texts(DataConfig(tasks=["add", "sub"], train_size=200, val_size=4, test_size=4,
                                            ood_size=4)), vocab_size=300).save(tok_dir)
    torch.manual_seed(0)
    model_dir = nanoseek.save(Transformer(load_preset("smoke").model), root / "base",
                              extra_files={f.name: str(f) for f in tok_dir.iterdir()})
    entries = splits(load_preset("smoke", SFT_DATA).section("data"))["train"][:12]
    traces = [{"question": e["question"], "answer": e["answer"], "task": e["task"], "entry": e, "tokens": 0,
               "completion": e["solution"] + "\n</think>\n<answer>" + e["answer"] + "</answer>"} for e in entries]
    return model_dir, traces


def sft_cmd(model_dir, out, nproc: int) -> list[str]:
    sets = [*SFT_DATA, "sft.steps=3", "sft.batch_size=4", "sft.lr=3e-3", "sft.warmup_steps=1", "sft.dtype=fp32",
            "sft.ckpt_every=3", "sft.keep_checkpoints=0", "sft.progress=false", "sft.device=cpu"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    # --resume: the traces written below are reused (no sampling); there is no checkpoint, so training starts at 0.
    return [*launch, "-m", "nanoseek", "sft", "--model", str(model_dir), "--out", str(out), "--preset", "smoke",
            "--resume", *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(scope="module")
def smoke_base(tmp_path_factory):
    return sft_inputs(tmp_path_factory.mktemp("base"))


def test_torchrun_sft_equals_one_process(smoke_base, tmp_path):
    import nanoseek
    from nanoseek.train.sft import write_traces

    model_dir, traces = smoke_base
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"sft{nproc}"
        write_traces(out, traces, {"kept": len(traces)})
        r = subprocess.run(sft_cmd(model_dir, out, nproc), env=cli_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count('"stage": "sft"') == 1  # one summary line: only rank 0 speaks
        runs[nproc] = read_metrics(out)
        # Exactly one checkpoint (written once, by rank 0) and a final model that loads at world size 1.
        assert [p.name for p in complete_checkpoints(out)] == ["step_000003"]
        assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
        nanoseek.load(out / "model")
    one, two = runs[1], runs[2]
    assert [r["step"] for r in two] == [1, 2, 3] == [r["step"] for r in one]
    for a, b in zip(one, two):
        # Globally reduced: the trained-token count is the sum over both ranks, the loss the mean over all tokens.
        assert a["tokens"] == b["tokens"] > 0, (a["tokens"], b["tokens"])
        assert abs(a["loss"] - b["loss"]) <= TOL, (a["step"], a["loss"], b["loss"])
    assert one[-1]["loss"] < one[0]["loss"]  # it trained
    a, b = nanoseek.load(tmp_path / "sft1" / "model"), nanoseek.load(tmp_path / "sft2" / "model")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-5), k


def test_torchrun_rl_zero_two_ranks_fsdp(smoke_base, tmp_path):
    """`nanoseek rl --zero` on two ranks with FSDP2 (each rank's engine reads the gathered weights): each rank samples
    its whole groups; DAPO's token count and the batch-std advantage scale are global (collectives); rank 0 alone
    logs, checkpoints and saves; the two-rank checkpoint resumes in one process."""
    import nanoseek

    out = tmp_path / "zero"
    sets = [*SFT_DATA, "rl.zero_steps=2", "rl.num_generations=3", "rl.prompts_per_step=4",
            "rl.max_completion_length=8", "rl.ckpt_every=0", "rl.dtype=fp32", "rl.loss_type=dapo",
            "rl.scale_rewards=batch", "parallel.strategy=fsdp"]
    one = [sys.executable, "-m", "nanoseek", "rl", "--zero", "--model", str(smoke_base[0]), "--out", str(out),
           "--preset", "smoke", *[a for s in sets for a in ("--set", s)]]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *one[1:]]
    r = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('"stage": "zero"') == 1 and r.stderr.count("zero step 2/2") == 1  # rank 0 speaks
    recs = read_metrics(out)
    assert [x["step"] for x in recs] == [1, 2]
    for x in recs:  # globally reduced: both ranks' samples counted (a random model earns no reward, so dynamic
        # sampling, on for dapo, makes every rank sample max_sample_rounds rounds, then top up with flat groups)
        assert x["sample_rounds"] == 3 and x["samples"] == 3 * 4 * 3 and x["train_groups"] == 4, x
    assert [p.name for p in complete_checkpoints(out)] == ["step_000002"]  # written once, at the last step
    assert nanoseek.load(out / "model").config.num_hidden_layers == load_preset("smoke").model.num_hidden_layers
    # One process resumes the two-rank run from its checkpoint and takes a third step.
    r = subprocess.run([*one, "--set", "rl.zero_steps=3", "--resume"], env=cli_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "resumed at RL step 2" in r.stderr, r.stderr[-3000:]
    assert [x["step"] for x in read_metrics(out)] == [1, 2, 3] and read_metrics(out)[-1]["samples"] == 3 * 4 * 3
    assert [p.name for p in complete_checkpoints(out)] == ["step_000002", "step_000003"]
    # prompts_per_step must split over the ranks: a clear error, not a hang.
    bad = [a if a != "rl.prompts_per_step=4" else "rl.prompts_per_step=3" for a in cmd]
    bad[bad.index(str(out))] = str(tmp_path / "bad")
    r = subprocess.run(bad, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "does not split over 2 ranks" in r.stderr, r.stderr[-3000:]


# ---- `nanoseek rl` under FSDP2: every rank's engine samples from the whole, freshly updated weights ----------------
def varied_rewards(texts, entries, score, lengths, **_):
    """Stands in for the rule rewards, which a random model never earns (all-zero groups: no update, so stale
    rollout weights would go unnoticed): the share of digits in the completion, which differs inside a group."""
    from nanoseek.train.rewards import Reward

    out = []
    for text in texts:
        r = sum(ch.isdigit() for ch in text) / max(len(text), 1)
        out.append(Reward(reward=r, accuracy=0.0, lenient=0.0, format=0.0, overlong=0.0, answer=None))
    return out


def rl_runs(rank, world, model_dir, root):
    """grpo.train (the loop `nanoseek rl` runs) twice on the same ranks, with DDP then FSDP2: same seeds, so the
    same rollouts if and only if each FSDP rank's engine sees the same (updated) weights as DDP's."""
    from nanoseek.infer.engine import EngineConfig
    from nanoseek.train import grpo
    from nanoseek.train import rewards as R

    torch.set_num_threads(1)
    R.rewards = varied_rewards  # this spawned process only
    preset = load_preset("smoke", SFT_DATA)
    for strategy in ("ddp", "fsdp"):
        cfg = grpo.GRPOConfig(loss_type="grpo", num_generations=4, prompts_per_step=4, max_completion_length=8,
                              beta=0.04, dynamic_sampling=False, lr=3e-3, dtype="fp32", steps=RL_STEPS, ckpt_every=0,
                              log_every=1)
        grpo.train(model_dir, root / strategy, cfg, preset.section("data"),
                   EngineConfig(max_batch=16, max_model_len=256), stage="rl", log=lambda s: None,
                   parallel=D.ParallelConfig(strategy=strategy))


RL_STEPS = 2


def test_rl_fsdp_rollouts_see_updated_weights_and_match_ddp(smoke_base, tmp_path):
    import nanoseek

    on_ranks(rl_runs, 2, smoke_base[0], tmp_path)
    ddp, fsdp = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "fsdp")
    assert [r["step"] for r in fsdp] == [r["step"] for r in ddp] == list(range(1, RL_STEPS + 1))
    for a, b in zip(ddp, fsdp):
        print(f"rl step {a['step']}: ddp vs fsdp |policy_loss| diff {abs(a['policy_loss'] - b['policy_loss']):.2e}, "
              f"kl {b['kl']:.2e}, sampler_logp_diff {b['sampler_logp_diff']:.2e}, reward {b['reward']:.4f}")
        # The same completions (rewards, lengths) and the same losses: the FSDP engines sampled what DDP's did.
        for k in ("reward", "reward_std", "length", "zero_variance_groups", "samples"):
            assert a[k] == b[k], (a["step"], k, a[k], b[k])
        for k in ("policy_loss", "kl", "entropy", "grad_norm"):
            assert abs(a[k] - b[k]) <= TOL, (a["step"], k, a[k], b[k])
        assert b["zero_variance_groups"] < 1 and b["grad_norm"] > 0  # a real update, not all-flat groups
    # Step 2 sampled from the step-1 update: the engine's log-probs match the trainer's (which reads the live
    # shards), while the policy has moved measurably away from the initial weights (the KL to the reference).
    last = fsdp[-1]
    assert last["sampler_logp_diff"] < 1e-4 and last["kl"] > 100 * last["sampler_logp_diff"], last
    # Written once (rank 0, the last step), whole: the checkpoint and the final model load on one process.
    ckpts = complete_checkpoints(tmp_path / "fsdp")
    assert [p.name for p in ckpts] == [f"step_{RL_STEPS:06d}"]
    assert not [p for p in (tmp_path / "fsdp" / "checkpoints").iterdir() if p.name.startswith(".")]
    final, ckpt = nanoseek.load(tmp_path / "fsdp" / "model"), nanoseek.load(ckpts[-1])
    want = nanoseek.load(tmp_path / "ddp" / "model").state_dict()
    start = nanoseek.load(smoke_base[0]).state_dict()
    for k, v in final.state_dict().items():
        assert torch.equal(v, ckpt.state_dict()[k]), k
        assert torch.allclose(v, want[k], atol=1e-5), k
    assert not torch.equal(final.state_dict()["lm_head.weight"], start["lm_head.weight"])  # it trained
