"""The one training loop that pretraining, SFT, distillation and GRPO updates share.

    trainer = Trainer(model, cfg, out_dir, loss_fn)    # loss_fn(model, batch) -> (loss, {"loss": float, ...})
    trainer.resume(loader)                             # --resume: newest complete checkpoint, if any
    trainer.fit(loader, val_batches)                   # or call trainer.train_step([batch, ...]) yourself

What it does, in order, each optimizer step: learning rate from the schedule (linear warmup, then cosine or WSD),
forward + backward of each micro-batch under bf16 autocast (the parameters, gradients and AdamW state stay fp32:
the "master weights"), gradient clipping, AdamW, the stage's `after_step` hooks (pretraining's balancing-bias
update), one JSON line in `out_dir/metrics.jsonl`, and every `ckpt_every` steps a checkpoint.

A checkpoint `out_dir/checkpoints/step_NNNNNN/` is an HF-format model directory (`nanoseek.load` reads it) plus
`train_state.safetensors` (AdamW moments, RNG states, every model buffer such as the balancing biases) and
`train_state.json` (step, data position, Python RNG, extra stage state), written together in one atomic rename
(`nanoseek.checkpoint.atomic_dir`, via `nanoseek.save`). A crash leaves the previous checkpoints intact; resume
reads the newest one and continues bit-for-bit: the same data, the same random numbers, the same losses.

Parallelism stays out of this file except for two hooks: `apply_parallel` wraps the model (DDP/FSDP later, each
as a small `apply_*` function) and `all_reduce_mean` averages numbers across ranks (identity on one process).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoseek.config import ConfigError

SCHEDULES = ("cosine", "wsd", "constant")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass
class LoopConfig:
    """Optimizer, schedule, precision, logging and checkpoint settings shared by every training stage."""

    steps: int = 1000  # optimizer steps
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 50  # linear warmup from 0
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    decay_frac: float = 0.2  # wsd: the last fraction of steps that decays linearly
    weight_decay: float = 0.1  # V3: AdamW weight decay 0.1 (not on norms, biases, embeddings)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    grad_accum: int = 1  # micro-batches per optimizer step
    dtype: str = "bf16"  # autocast dtype (bf16 | fp16 | fp32); weights and optimizer state stay fp32
    compile: bool = False  # torch.compile the model; falls back to eager if compiling fails
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # CPU threads for torch (0: torch's default, one per core); under torchrun, split over the
    # machine's ranks (2 threads, 2 local ranks: 1 each)
    seed: int = 0
    eval_every: int = 100  # steps between val losses (0: only at the end)
    ckpt_every: int = 100  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk (0: keep all)
    peak_tflops: float = 0.0  # one rank's matmul peak (MFU divides by it x the world size); 0: measured once, in
    # the run's dtype on the rank's threads
    progress: bool = True  # tqdm progress bar on stderr

    def validate(self) -> None:
        def bad(name, why, fix):
            raise ConfigError(f"{name}: {why}; {fix}")

        if self.schedule not in SCHEDULES:
            bad("schedule", f"unknown schedule {self.schedule!r}", f"use one of {', '.join(SCHEDULES)}")
        if self.dtype not in DTYPES:
            bad("dtype", f"unknown dtype {self.dtype!r}", f"use one of {', '.join(DTYPES)}")
        if self.steps < 1 or self.grad_accum < 1:
            bad("steps" if self.steps < 1 else "grad_accum", "must be >= 1", "set it to a positive integer")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            bad("lr" if self.lr <= 0 else "min_lr_ratio", "out of range", "use lr > 0 and 0 <= min_lr_ratio <= 1")
        if not 0 < self.decay_frac <= 1:
            bad("decay_frac", f"must be in (0, 1], got {self.decay_frac}", "e.g. 0.2 decays over the last 20%")
        if self.warmup_steps < 0 or self.eval_every < 0 or self.ckpt_every < 0 or self.keep_checkpoints < 0:
            bad("warmup_steps/eval_every/ckpt_every/keep_checkpoints", "must be >= 0", "use 0 or a positive integer")

    def __post_init__(self):
        self.validate()


# ---- hooks for parallelism (nanoseek/train/distributed.py; re-exported: config.SECTIONS names this module) ---
from nanoseek.train.distributed import (  # noqa: E402, F401
    ParallelConfig,
    all_reduce_mean,
    apply_parallel,
    grad_sync,
    reduce_metrics,
    world_size,
)
from nanoseek.train.distributed import is_main as is_main_process  # noqa: E402


def apply_compile(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    return torch.compile(model) if enabled else model


# ---- pieces --------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_at(cfg: LoopConfig, step: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine or WSD down to min_lr."""
    lo = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(cfg.steps - cfg.warmup_steps, 1)
        p = min((step - cfg.warmup_steps) / span, 1.0)
        return lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * p))
    # wsd: hold the peak, then decay linearly over the last decay_frac of the steps (MiniCPM; DeepSeek LLM's
    # multi-step schedule in spirit: a checkpoint before the decay can be continued).
    decay_start = max(cfg.warmup_steps, int(cfg.steps * (1 - cfg.decay_frac)))
    if step < decay_start:
        return cfg.lr
    p = min((step - decay_start) / max(cfg.steps - decay_start, 1), 1.0)
    return cfg.lr + (lo - cfg.lr) * p


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and stacked expert matrices); none on norms, biases and embeddings."""
    embeds = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in embeds else no_decay).append((name, p))
    return [{"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
            {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: LoopConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps)


def measure_peak_tflops(device: torch.device, dtype: torch.dtype = torch.float32, budget_s: float = 0.5) -> float:
    """Dense matmul throughput actually reachable here in `dtype` (the MFU denominator on machines without a spec
    sheet), in about `budget_s`. The size grows from 128 while one matmul is cheap: a CPU without native bf16 (no
    AVX512-BF16/AMX, such as an AVX2-only AMD EPYC) runs a 1024^3 bf16 matmul in ~2.5 s, and a fixed 1024 cost such a
    machine 89 s per training stage."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def once(a, b):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        return time.perf_counter() - t

    n = 128
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        once(a, b)  # warm-up
        dt = once(a, b)
        if dt > budget_s / 20 or n >= 4096:
            break
        n *= 2
    best, spent = dt, 0.0
    while spent < budget_s:
        t = once(a, b)
        best, spent = min(best, t), spent + t
    return 2 * n**3 / best / 1e12


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            tensors[f"rng.cuda.{i}"] = torch.cuda.get_rng_state(i)
    py = random.getstate()
    return tensors, {"python_rng": [py[0], list(py[1]), py[2]]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    for k, v in tensors.items():
        if k.startswith("rng.cuda.") and torch.cuda.is_available():
            torch.cuda.set_rng_state(v, int(k.rsplit(".", 1)[1]))
    v, state, gauss = meta["python_rng"]
    random.setstate((v, tuple(state), gauss))


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("_")[1])


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """Committed checkpoints, oldest first. In-flight writes are hidden dot-directories and never listed."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / "train_state.json").is_file()]
    return sorted(found, key=checkpoint_step)


def read_metrics(out_dir: str | Path) -> list[dict]:
    """The per-step records of metrics.jsonl (a torn last line from a crash is skipped)."""
    from nanoseek.report import read_jsonl

    return read_jsonl(Path(out_dir) / "metrics.jsonl")


class Trainer:
    """Owns the optimizer, the schedule, precision, logging and checkpoints of one training run.

    loss_fn(model, batch) -> (loss tensor, stats dict of floats); stats["loss"] is what val loss reports.
    after_step: callables f(trainer, record) run after each optimizer step (they may add keys to `record`).
    extra_files: name -> path copied into every checkpoint (e.g. the tokenizer files).
    flops_per_token: training FLOPs per token (forward + backward) for MFU; 0 leaves MFU out.
    """

    def __init__(self, model: torch.nn.Module, cfg: LoopConfig, out_dir: str | Path,
                 loss_fn: Callable, *, parallel: ParallelConfig | None = None, after_step: list[Callable] = (),
                 extra_files: dict[str, str] | None = None, flops_per_token: float = 0.0,
                 run_info: dict | None = None):
        cfg.validate()
        self.cfg = cfg
        self.out = Path(out_dir)
        self.device = resolve_device(cfg.device)
        if cfg.threads:  # this machine's CPU budget for the job: torchrun's local ranks share it
            torch.set_num_threads(max(1, cfg.threads // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        self.raw_model = model.to(self.device)  # fp32 master weights; what checkpoints save
        self.eager_model = apply_parallel(self.raw_model, parallel)
        self.model = apply_compile(self.eager_model, cfg.compile)
        self._compile_pending = cfg.compile
        self.loss_fn = loss_fn
        self.after_step = list(after_step)
        self.extra_files = dict(extra_files or {})
        self.opt = make_optimizer(self.raw_model, cfg)
        self.step = 0
        self.tokens = 0
        self.extra_state: dict = {}  # stage-specific JSON state saved in checkpoints
        self.flops_per_token = flops_per_token
        self.autocast_dtype = DTYPES[cfg.dtype]
        peak = cfg.peak_tflops
        if flops_per_token and not peak:  # once, before any step is timed, in the dtype matmuls run in
            peak = measure_peak_tflops(self.device, self.autocast_dtype or torch.float32)
        self.peak_tflops = peak * world_size()  # of all ranks: token counts are summed over them
        self.run_info = run_info or {}
        self.main = is_main_process()
        self.bar = None
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)

    # ---- precision ---------------------------------------------------------------------------------------
    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ---- one optimizer step ------------------------------------------------------------------------------
    def train_step(self, batches: list) -> dict:
        """Forward/backward each micro-batch, clip, AdamW; returns the step's record (also logged)."""
        t0, c0 = time.perf_counter(), time.process_time()
        lr = lr_at(self.cfg, self.step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.raw_model.train()
        if self._compile_pending:
            record = self._first_compiled_step(batches)
        else:
            record = self._forward_backward(batches)
        record = reduce_metrics(record)  # global over ranks: token counts summed, losses averaged
        params = [p for g in self.opt.param_groups for p in g["params"]]
        if self.cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        record = {"step": self.step, **record, "lr": lr, "grad_norm": float(grad_norm)}
        for hook in self.after_step:
            hook(self, record)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        ntok = int(record.pop("tokens", 0))
        self.tokens += ntok
        record["tokens"] = self.tokens
        record["tokens_per_s"] = ntok / dt if dt > 0 else 0.0
        record["step_time"] = dt
        record["cpu_time"] = time.process_time() - c0  # CPU seconds of this process (all threads): on a busy
        # shared machine, tokens / cpu_time with one thread estimates the quiet-machine speed
        if self.flops_per_token:
            record["mfu"] = record["tokens_per_s"] * self.flops_per_token / (self.peak_tflops * 1e12)
        return record

    def _forward_backward(self, batches: list) -> dict:
        sums: dict[str, float] = {}
        for i, batch in enumerate(batches):
            with grad_sync(self.eager_model, i == len(batches) - 1):  # ranks reduce gradients once per step
                with self.autocast():
                    loss, stats = self.loss_fn(self.model, batch)
                (loss / len(batches)).backward()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        # Means over micro-batches, except token counts, which add up.
        return {k: (v if k == "tokens" else v / len(batches)) for k, v in sums.items()}

    def _first_compiled_step(self, batches: list) -> dict:
        """Run the first step compiled; if compiling fails, undo its side effects and continue eagerly."""
        self._compile_pending = False
        buffers = {k: v.clone() for k, v in self.raw_model.named_buffers()}
        rng = torch.get_rng_state()
        try:
            return self._forward_backward(batches)
        except Exception as e:  # noqa: BLE001  (any compiler failure: fall back, say why)
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e)[:200]}); training eagerly",
                          stacklevel=2)
            self.opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for k, v in self.raw_model.named_buffers():
                    v.copy_(buffers[k])
            torch.set_rng_state(rng)
            self.model = self.eager_model
            return self._forward_backward(batches)

    # ---- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches) -> float:
        """Mean stats["loss"] over `batches`, in eval mode; model buffers (e.g. load counters) are left as found."""
        if not batches:
            return float("nan")
        buffers = {k: v.clone() for k, v in self.raw_model.named_buffers()}
        self.raw_model.eval()
        total = 0.0
        for batch in batches:
            with self.autocast():
                _, stats = self.loss_fn(self.raw_model, batch)
            total += float(stats["loss"])
        for k, v in self.raw_model.named_buffers():
            v.copy_(buffers[k])
        self.raw_model.train()
        return float(all_reduce_mean(torch.tensor(total / len(batches))))

    # ---- logging -----------------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self.bar is not None:
            self.bar.update(record["step"] - self.bar.n)
            post = {"loss": f"{record.get('loss', float('nan')):.3f}", "lr": f"{record['lr']:.1e}",
                    "tok/s": f"{record.get('tokens_per_s', 0):.0f}"}
            if "val_loss" in record:
                post["val"] = f"{record['val_loss']:.3f}"
            self.bar.set_postfix(post, refresh=False)

    def _truncate_metrics(self, step: int) -> None:
        """On resume: keep the records up to the checkpoint's step (later ones belong to the lost steps)."""
        path = self.out / "metrics.jsonl"
        kept = [r for r in read_metrics(self.out) if r.get("step", 0) <= step]
        tmp = path.with_suffix(f".tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)

    # ---- checkpoints -------------------------------------------------------------------------------------
    def save_checkpoint(self, data_state: dict | None = None) -> Path | None:
        """Model (HF format) + train state in one atomic directory; then prune old checkpoints. Every rank calls
        this (FSDP2 shards are gathered collectively); rank 0 writes whole tensors, loadable at any world size."""
        from nanoseek.checkpoint import save, write_json
        from nanoseek.train.distributed import FullModel, full_tensor

        root = self.out / "checkpoints"
        path = root / f"step_{self.step:06d}"
        tensors, meta = rng_state()
        names = {id(p): n for n, p in self.raw_model.named_parameters()}
        opt_meta = []
        for g in self.opt.param_groups:
            opt_meta.append({k: v for k, v in g.items() if k not in ("params", "names")})
            for p in g["params"]:
                for k, v in self.opt.state.get(p, {}).items():
                    tensors[f"opt.{names[id(p)]}.{k}"] = full_tensor(v).contiguous()
        for n, b in self.raw_model.named_buffers():
            tensors[f"buffer.{n}"] = b.detach().cpu().contiguous().clone()
        full_model = FullModel(self.raw_model)
        if not self.main:
            return None
        root.mkdir(parents=True, exist_ok=True)
        meta.update(step=self.step, tokens=self.tokens, data=data_state or {}, extra=self.extra_state,
                    param_groups=opt_meta, config=asdict(self.cfg), run=self.run_info)
        with tempfile.TemporaryDirectory(dir=root, prefix=".state-") as scratch:
            scratch = Path(scratch)
            save_file(tensors, scratch / "train_state.safetensors")
            write_json(scratch / "train_state.json", meta)
            files = {**self.extra_files, "train_state.safetensors": str(scratch / "train_state.safetensors"),
                     "train_state.json": str(scratch / "train_state.json")}
            save(full_model, path, extra_files=files)  # one atomic rename commits model + state together
        self._prune()
        return path

    def _prune(self) -> None:
        keep = self.cfg.keep_checkpoints
        if not keep:
            return
        for old in complete_checkpoints(self.out)[:-keep]:
            # Rename out of sight first (atomic), then delete: no half-deleted checkpoint is ever visible.
            trash = old.parent / f".trash-{old.name}-{uuid.uuid4().hex[:8]}"
            os.rename(old, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def load_checkpoint(self, path: str | Path) -> dict:
        """Restore model, optimizer, RNG and buffers from `path`; returns the data state saved with it."""
        from nanoseek.checkpoint import from_official, read_tensors
        from nanoseek.train.distributed import load_full_state, shard_like

        path = Path(path)
        meta = json.loads((path / "train_state.json").read_text())
        weights = from_official(read_tensors(path), self.raw_model.config)
        missing, unexpected = load_full_state(self.raw_model, weights)
        missing = [k for k in missing if not (k == "lm_head.weight" and self.raw_model.config.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(f"{path}: checkpoint does not match the model being trained: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}; resume with the same preset it was written with")
        with safe_open(path / "train_state.safetensors", framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        with torch.no_grad():
            for n, b in self.raw_model.named_buffers():
                if f"buffer.{n}" in tensors:
                    b.copy_(tensors[f"buffer.{n}"])
        by_name = dict(self.raw_model.named_parameters())
        for g, gm in zip(self.opt.param_groups, meta["param_groups"]):
            g.update(gm)
            for n, p in zip(g["names"], g["params"]):
                state = {k.rsplit(".", 1)[1]: shard_like(v, p) for k, v in tensors.items()
                         if k.startswith(f"opt.{n}.") and k.count(".") == n.count(".") + 2}
                if state:
                    if "step" in state:
                        state["step"] = state["step"].cpu()  # AdamW keeps its step counter on the CPU
                    self.opt.state[by_name[n]] = state
        set_rng_state({k: v for k, v in tensors.items() if k.startswith("rng.")}, meta)
        self.step = meta["step"]
        self.tokens = meta.get("tokens", 0)
        self.extra_state = meta.get("extra", {})
        return meta.get("data", {})

    def resume(self, loader=None) -> bool:
        """Continue from the newest complete checkpoint (restoring `loader`'s position); False if there is none."""
        ckpts = complete_checkpoints(self.out)
        if not ckpts:
            return False
        data_state = self.load_checkpoint(ckpts[-1])
        if loader is not None and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(data_state)
        if self.main:
            self._truncate_metrics(self.step)
        return True

    # ---- the loop ----------------------------------------------------------------------------------------
    def fit(self, loader, val_batches=None, on_eval: Callable | None = None) -> dict:
        """Train until cfg.steps: next(loader) gives a micro-batch; `loader.state_dict()` is its position.
        Returns the last record."""
        cfg = self.cfg
        if self.main and cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", file=sys.stderr,
                            dynamic_ncols=True, mininterval=1.0)
        record = {}
        try:
            while self.step < cfg.steps:
                batches = [next(loader) for _ in range(cfg.grad_accum)]
                record = self.train_step(batches)
                last = self.step == cfg.steps
                if val_batches is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0) or last):
                    record["val_loss"] = self.evaluate(val_batches)
                    if on_eval is not None:
                        on_eval(self, record)
                self.log(record)
                if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or last:
                    self.save_checkpoint(loader.state_dict() if hasattr(loader, "state_dict") else None)
        finally:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
        return record
