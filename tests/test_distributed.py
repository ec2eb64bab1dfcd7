"""Two ranks on CPU (gloo) give what one rank gives: the same pretraining losses with the same global batch, under
DDP and FSDP2; the same GRPO step; a two-rank checkpoint resumes on one rank; a killed rank ends the job.

In-process tests spawn ranks with torch.multiprocessing (one thread each: two cores); the CLI tests launch
`torchrun --nproc_per_node 2 -m nanoseek pretrain` as a user would.
"""

from __future__ import annotations

import os
import shutil
import socket

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
                      parallel=D.ParallelConfig(strategy=strategy), after_step=[balance_hook(0.01)])
    if resume:
        assert trainer.resume(loader)
    trainer.fit(loader)
    biases = torch.stack([m.gate.e_score_correction_bias for m in model.moe_layers()])
    return {"losses": [(r["step"], r["loss"]) for r in read_metrics(out)], "biases": biases}


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    return pretrain(0, 1, tmp_path_factory.mktemp("one"), "ddp")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
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

    # The two-rank checkpoint at step 2 resumes on ONE rank and continues like the uninterrupted run.
    ckpts = complete_checkpoints(tmp_path / "two")
    assert [p.name for p in ckpts] == ["step_000002", "step_000003"]
    shutil.rmtree(ckpts[-1])
    resumed = pretrain(0, 1, tmp_path / "two", "ddp", resume=True)
    got = dict(resumed["losses"])
    for step in (3,):
        assert abs(got[step] - want[step]) <= TOL, ("resumed", step, got[step], want[step])
