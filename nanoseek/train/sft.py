"""Cold-start SFT on rejection-sampled reasoning traces (DeepSeek-R1 §2.3.1 and §2.3.3).

    nanoseek sft --model runs/x/pretrain/model --traces-from runs/x/zero/model --out runs/x/sft
    nanoseek sft --model runs/x/rl/model --out runs/x/sft2          # traces from the model itself (R1 §2.3.3)
    ... --preset smoke --set sft.steps=5 [--resume]

R1's cold start fine-tunes the BASE model on a few thousand long, readable chains of thought before reasoning RL;
one of the sources the paper names is R1-Zero's own outputs, kept when correct and rewritten to be readable. Here:
1. Rejection sampling: the trace model (--traces-from, default --model) answers `n_questions` training questions
   k times each (temperature `temperature`, the R1 template); a sample is KEPT when it is correct (strict
   accuracy 1: the answer inside <answer>…</answer> after </think>, by the task's scorer) and READABLE:
   - well-formed: exactly `<think>\\n…\\n</think>\\n<answer>…</answer>` with non-empty reasoning and answer, no
     stray or repeated tags, nothing after the answer (rewards.format_ok with require_reasoning);
   - no repeated lines: no non-empty line of the reasoning occurs twice (the loops small RL models fall into);
   - bounded length: at most `max_trace_tokens` tokens and ended by the model itself (not truncated);
   - plain text: printable ASCII only (no stray bytes of a half-learned byte-level BPE);
   - consistent steps (`check_steps`): every step a rule can check holds — each `expression = value` of integer
     arithmetic (`17-9=8`, `80*2 + 7*2 = 160 + 14`, `63 / 9 = 7`) and each `smallest/largest of LIST: v` with
     the list shrinking by the picked number. R1-Zero is rewarded for the final answer only, so about half of its
     correct samples reach it through a wrong step (`22-7=20\n20+5=20`); SFT on those teaches the wrong
     arithmetic. This is our analogue of R1's readability and language-consistency filtering: the reasoning must
     agree with itself, not only end in the right answer.
   Exact duplicates of a kept trace for the same question are dropped, and at most `max_per_question` traces are
   kept per question, so the easy questions do not crowd out the rest.
2. SFT: chat examples (the R1 prompt, then the trace as the assistant reply, then EOS) with the loss only on the
   reply (`nanoseek.data.sft_example` masks the prompt), trained by the shared loop (nanoseek/train/loop.py) with
   pretraining's loss function (next-token cross-entropy ignoring masked targets, + MTP, + the balance terms).

Writes into --out: traces.jsonl (the kept traces) + traces.json (the sampling figures: sampled, correct, readable,
kept, per task), metrics.jsonl, checkpoints/step_N (resumable with --resume; the traces are reused) and model/ (HF
format + the tokenizer files). `nanoseek distill` uses the same two steps with a teacher and a small student.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanoseek.config import ConfigError
from nanoseek.train import distributed as D
from nanoseek.train.loop import LoopConfig
from nanoseek.train.rewards import THINK_CLOSE, extract_answer, format_ok, wrong_step

# Runs under torchrun: rank 0 samples the traces, every rank trains on its rows of each global batch (DDP/FSDP2
# from [parallel]), rank 0 writes the model (docs/scaling.md).
DISTRIBUTED = True


@dataclass
class SFTConfig(LoopConfig):
    """The [sft] section: rejection sampling, then the shared loop's settings (LoopConfig) for the fine-tune."""

    # --- rejection sampling
    n_questions: int = 512  # training questions to sample traces for
    samples_per_question: int = 4  # k samples per question
    temperature: float = 0.8
    top_p: float = 1.0
    max_tokens: int = 256  # generation budget per sample
    max_trace_tokens: int = 200  # readable: at most this many tokens
    max_per_question: int = 2  # kept traces per question (distinct texts)
    readable: bool = True  # apply the readability filter (False: keep every correct sample)
    check_steps: bool = True  # part of the filter: every checkable arithmetic / sorting step must hold
    tasks: list[str] = field(default_factory=list)  # [] = the data section's tasks
    min_traces: int = 8  # fewer kept traces than this is an error (the trace model cannot solve the tasks yet)
    # --- the fine-tune (plus LoopConfig: steps, lr, warmup_steps, schedule, ...)
    batch_size: int = 16  # examples per micro-batch
    max_len: int = 384  # tokens per example (longer ones lose their tail)
    mtp_weight: float = 0.0  # λ of the MTP loss during SFT (0: the MTP modules are left as they are)
    bias_gamma: float = 0.001  # auxiliary-loss-free balancing keeps running (V3 eq. 16)
    aux_alpha: float = 0.0001  # sequence-wise balance loss weight
    # LoopConfig defaults suited to fine-tuning a tiny model
    steps: int = 200
    lr: float = 1e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    ckpt_every: int = 50
    eval_every: int = 0

    def __post_init__(self):
        super().__post_init__()

        def bad(name, why, fix):
            raise ConfigError(f"sft.{name}: {why}; {fix}")

        for name in ("n_questions", "samples_per_question", "max_tokens", "max_trace_tokens", "max_per_question",
                     "batch_size", "max_len"):
            if getattr(self, name) < 1:
                bad(name, f"must be >= 1, got {getattr(self, name)}", "set it to a positive integer")
        if self.temperature < 0:
            bad("temperature", f"must be >= 0, got {self.temperature}", "use e.g. 0.8 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p}", "use 1.0")


# ---- the readability filter ------------------------------------------------------------------------------------
def readable(text: str, n_tokens: int, truncated: bool, max_tokens: int, check_steps: bool = False) -> str | None:
    """None if the completion `text` (as decoded after the generation prompt `…<think>\\n`) is readable, else the
    reason it is not (one of "format", "repeated_line", "too_long", "truncated", "not_plain", "wrong_step")."""
    if truncated:
        return "truncated"
    if n_tokens > max_tokens:
        return "too_long"
    if not format_ok(text, prompt_opens_think=True, require_reasoning=True):
        return "format"
    if any(not (c.isascii() and (c.isprintable() or c == "\n")) for c in text):
        return "not_plain"
    lines = [ln.strip() for ln in text.split(THINK_CLOSE)[0].splitlines() if ln.strip()]
    if len(lines) != len(set(lines)):
        return "repeated_line"
    if check_steps and wrong_step(text.split(THINK_CLOSE)[0]) is not None:
        return "wrong_step"
    return None


# ---- rejection sampling ----------------------------------------------------------------------------------------
def questions(data_cfg, task_names: list[str], n: int, seed: int) -> list[dict]:
    """n training questions, spread evenly over the tasks (a seeded round-robin over per-task shuffles)."""
    from nanoseek.data import splits

    train = splits(data_cfg)["train"]
    names = task_names or list(data_cfg.tasks)
    unknown = [t for t in names if t not in data_cfg.tasks]
    if unknown:
        raise ConfigError(f"tasks {unknown} are not in data.tasks {data_cfg.tasks}; list tasks from data.tasks")
    rng = random.Random(f"traces/{seed}")
    per = {t: [e for e in train if e["task"] == t] for t in names}
    for t in per:
        rng.shuffle(per[t])
    out, i = [], 0
    while len(out) < n and any(i < len(v) for v in per.values()):
        out += [per[t][i] for t in names if i < len(per[t])][: n - len(out)]
        i += 1
    return out


def rejection_sample(engine, tok, entries: list[dict], k: int, temperature: float, top_p: float, max_tokens: int,
                     max_trace_tokens: int, max_per_question: int, use_filter: bool = True, seed: int = 0,
                     batch: int = 64, check_steps: bool = False) -> tuple[list[dict], dict]:
    """Sample k completions per entry; keep the correct (strict) and, with use_filter, readable ones (with
    check_steps, only those whose checkable steps all hold).
    Returns (traces [{question, answer, task, completion, tokens}], figures)."""
    from nanoseek import tasks
    from nanoseek.infer.sampling import SamplingParams
    from nanoseek.train.grpo import prompt_ids, reseed

    figures = {"questions": len(entries), "sampled": 0, "correct": 0, "kept": 0, "rejected": {}, "per_task": {}}
    traces = []
    for s in range(0, len(entries), batch):
        chunk = entries[s: s + batch]
        prompts = [prompt_ids(tok, e) for e in chunk]
        reseed(engine, seed * 7919 + s)
        outs = engine.generate(prompts, SamplingParams(n=k, temperature=temperature, top_p=top_p,
                                                       max_tokens=max_tokens))
        for e, group in zip(chunk, outs):
            pt = figures["per_task"].setdefault(e["task"], {"questions": 0, "sampled": 0, "correct": 0, "kept": 0})
            pt["questions"] += 1
            seen: set[str] = set()
            for c in group:
                ids = list(c.token_ids)
                if ids and ids[-1] == tok.eos_id:
                    ids = ids[:-1]
                text = tok.decode(ids, skip_special_tokens=True)
                figures["sampled"] += 1
                pt["sampled"] += 1
                ans = extract_answer(text)
                if ans is None or tasks.score(ans, e) < 1.0:
                    continue
                figures["correct"] += 1
                pt["correct"] += 1
                why = (readable(text, len(ids), c.finish_reason != "stop", max_trace_tokens, check_steps)
                       if use_filter else None)
                if why is None and (text in seen or len(seen) >= max_per_question):
                    why = "duplicate" if text in seen else "per_question_cap"
                if why is not None:
                    figures["rejected"][why] = figures["rejected"].get(why, 0) + 1
                    continue
                seen.add(text)
                figures["kept"] += 1
                pt["kept"] += 1
                traces.append({"question": e["question"], "answer": e["answer"], "task": e["task"],
                               "entry": e, "completion": text, "tokens": len(ids)})
    figures["correct_rate"] = figures["correct"] / max(figures["sampled"], 1)
    figures["kept_rate"] = figures["kept"] / max(figures["sampled"], 1)
    return traces, figures


def write_traces(out: Path, traces: list[dict], figures: dict) -> None:
    """traces.jsonl then traces.json (the marker that the traces are complete), each via an atomic rename."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("traces.jsonl", "".join(json.dumps(t) + "\n" for t in traces)),
                       ("traces.json", json.dumps(figures, indent=2))):
        tmp = out / f".{name}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out / name)


def read_traces(out: Path) -> tuple[list[dict], dict] | None:
    if not (out / "traces.json").is_file():
        return None
    traces = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines() if line.strip()]
    return traces, json.loads((out / "traces.json").read_text())


def sample_traces(model_dir: str | Path, out: Path, data_cfg, cfg, engine_cfg=None, *, n_questions: int,
                  k: int, use_filter: bool, task_names: list[str], seed: int, log) -> tuple[list[dict], dict]:
    """Rejection-sample traces from the model in `model_dir` (or reuse out/traces.* from an earlier run)."""
    import nanoseek
    from nanoseek.infer.engine import Engine, EngineConfig
    from nanoseek.tokenizer import load_tokenizer

    done = read_traces(out)
    if done is not None:
        log(f"reusing {len(done[0])} traces from {out / 'traces.jsonl'}")
        return done
    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = nanoseek.load(model_dir, mtp=False)
    tok = load_tokenizer(model_dir)
    engine_cfg = engine_cfg or EngineConfig()
    engine_cfg.max_batch = max(engine_cfg.max_batch, 64 * k)  # one wave per chunk of 64 questions
    engine = Engine(model, tok, engine_cfg)
    entries = questions(data_cfg, task_names, n_questions, seed)
    traces, figures = rejection_sample(engine, tok, entries, k, cfg.temperature, cfg.top_p, cfg.max_tokens,
                                       cfg.max_trace_tokens, cfg.max_per_question, use_filter, seed,
                                       check_steps=cfg.check_steps)
    figures.update(seconds=time.time() - t0, model=str(model_dir),
                   tokens_generated=None)
    write_traces(out, traces, figures)
    log(f"traces: {figures['sampled']} samples of {len(entries)} questions, {figures['correct']} correct, "
        f"{figures['kept']} kept (rejected: {figures['rejected']}) in {figures['seconds']:.1f}s")
    del engine, model
    return traces, figures


# ---- the fine-tune ---------------------------------------------------------------------------------------------
def trace_examples(traces: list[dict], tok) -> list:
    """Chat SFT examples: the R1 prompt, then `<think>\\n{trace}` as the assistant reply (loss on the reply only)."""
    from nanoseek.data import prompt_messages, sft_example
    from nanoseek.tokenizer import THINK

    return [sft_example(prompt_messages(t["entry"], r1=True) + [{"role": "assistant",
                                                                 "content": THINK + "\n" + t["completion"]}], tok)
            for t in traces]


class SFTLoader:
    """Endless seeded batches of SFT examples, reshuffled every epoch; resumable from one integer. Under torchrun
    every rank picks the same global batch of batch_size examples, pads it as one, and keeps its own rows
    (D.shard_range): the rows, padding included, are exactly one process's."""

    def __init__(self, examples: list, batch_size: int, pad_id: int, max_len: int, seed: int = 0):
        if not examples:
            raise ValueError("no SFT examples")
        self.examples, self.batch_size, self.pad_id, self.max_len = examples, batch_size, pad_id, max_len
        self.seed, self.pos = seed, 0
        self.rows = D.shard_range(batch_size)  # this rank's rows of each global batch (all rows on one process)

    def __iter__(self):
        return self

    def __next__(self):
        from nanoseek.data import sft_batch

        n = len(self.examples)
        picked = []
        for _ in range(self.batch_size):
            epoch, i = divmod(self.pos, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            picked.append(self.examples[int(order[i])])
            self.pos += 1
        x, y = sft_batch(picked, self.pad_id, self.max_len)  # [B, T] for the global batch
        return x[self.rows.start: self.rows.stop], y[self.rows.start: self.rows.stop]  # [B/W, T]

    def state_dict(self) -> dict:
        return {"pos": self.pos, "n": len(self.examples), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n") != len(self.examples):
            raise ValueError(f"cannot resume SFT: the checkpoint saw {state.get('n')} examples, this run has "
                             f"{len(self.examples)}; resume with the same traces (OUT/traces.jsonl)")
        self.pos = int(state["pos"])


def sft_loss(model, batch, cfg):
    """pretrain_loss on masked targets. Under torchrun the ranks hold different numbers of trained tokens, so each
    divides its summed cross-entropy by global_tokens / W: DDP's average is then the mean over the whole global
    batch's tokens, as on one process (a plain per-rank mean, averaged, would weight the ranks' tokens unequally).
    The logged loss (averaged over ranks by the loop) is that global mean too."""
    from nanoseek.train.pretrain import pretrain_loss

    if D.world_size() == 1:
        return pretrain_loss(model, batch, cfg)
    return pretrain_loss(model, batch, cfg, num_items=D.dapo_num_items(int((batch[1] != -100).sum())))


def finetune(model, tok, examples: list, cfg, out: Path, files: dict[str, str], resume: bool, stage: str,
             log, parallel=None) -> dict:
    """Masked-loss SFT of `model` on `examples` with the shared loop; saves out/model (rank 0 under torchrun).
    Returns the last record."""
    from nanoseek.checkpoint import save
    from nanoseek.train.loop import Trainer
    from nanoseek.train.pretrain import balance_hook

    if not examples:  # allowed only with min_traces = 0 (the smoke preset's random models solve nothing)
        log(f"{stage}: no traces to train on; the model is saved unchanged")
        if D.is_main():
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.jsonl").write_text(json.dumps({"step": 0, "examples": 0}) + "\n")
            save(model, out / "model", extra_files=files)
        return {}
    loader = SFTLoader(examples, cfg.batch_size, tok.pad_id, cfg.max_len, cfg.seed)
    hooks = [balance_hook(cfg.bias_gamma)] if model.moe_layers() else []
    trainer = Trainer(model, cfg, out, lambda m, b: sft_loss(m, b, cfg), after_step=hooks, extra_files=files,
                      run_info={"stage": stage, "examples": len(examples)}, parallel=parallel)
    if resume and trainer.resume(loader):
        log(f"{stage}: resumed at step {trainer.step}")
    elif (out / "metrics.jsonl").exists():
        if not resume:
            raise ConfigError(f"{out} already holds a training run; pass --resume to continue it, or a new --out")
        D.barrier()  # every rank has seen the file before rank 0 removes it
        if D.is_main():
            (out / "metrics.jsonl").unlink()  # crashed before its first checkpoint: train again from the start
    n_tok = sum(len(e.completion_ids) for e in examples)
    log(f"{stage}: {len(examples)} examples ({n_tok} trained tokens), {cfg.steps} steps of {cfg.batch_size}")
    last = trainer.fit(loader) if trainer.step < cfg.steps else {}
    full = D.FullModel(trainer.raw_model)  # every rank gathers (FSDP2 shards); rank 0 writes
    if D.is_main():
        save(full, out / "model", extra_files=files)
    return last


# ---- `nanoseek sft` ----------------------------------------------------------------------------------------------
def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="stage directory: traces, metrics.jsonl, checkpoints/, model/")
    p.add_argument("--preset", default="cpu-tiny", help="preset name or .toml path (default: cpu-tiny)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset value (repeatable)")
    p.add_argument("--resume", action="store_true", help="reuse the traces and continue from the newest checkpoint")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the model to fine-tune (R1's cold start: the base model)")
    p.add_argument("--traces-from", default=None,
                   help="the model whose samples become the SFT data (R1's cold start: R1-Zero); default --model")
    add_common_args(p)


def log_stderr(s: str) -> None:
    if D.is_main():  # one rank speaks under torchrun
        print(s, file=sys.stderr, flush=True)


def check_out(args, what: str) -> Path:
    """--out of a trace stage (sft, distill): refused if it holds a run and --resume is not given."""
    out = Path(args.out)
    if not args.resume and (out / "traces.json").exists():
        raise ConfigError(f"{out} already holds {what}; pass --resume to continue it, or choose a new --out")
    return out


def stage_traces(source, out: Path, preset, section: str) -> tuple[list[dict], dict]:
    """The correct traces of `source` for a trace stage, as its [section] (sft or distill) asks; at least
    min_traces of them."""
    cfg = preset.section(section)
    traces, figures = shared_traces(source, out, preset.section("data"), cfg, preset.section("engine"),
                                    n_questions=cfg.n_questions, k=cfg.samples_per_question,
                                    use_filter=cfg.readable, task_names=cfg.tasks, seed=cfg.seed, log=log_stderr)
    if len(traces) < cfg.min_traces:
        kind = "correct readable" if cfg.readable else "correct"
        raise ConfigError(f"only {len(traces)} {kind} traces from {source} ({section}.min_traces = {cfg.min_traces});"
                          f" train that model longer, sample more ({section}.n_questions, "
                          f"{section}.samples_per_question) or lower {section}.min_traces")
    return traces, figures


def shared_traces(model_dir, out: Path, data_cfg, cfg, engine_cfg, **kw) -> tuple[list[dict], dict]:
    """sample_traces on rank 0 (or one process); under torchrun the other ranks wait, then read what it wrote."""
    D.barrier()  # every rank has checked --out before rank 0 writes traces into it
    if D.is_main():
        done = sample_traces(model_dir, out, data_cfg, cfg, engine_cfg, **kw)
    D.barrier()
    if not D.is_main():
        done = read_traces(out)
        if done is None:
            raise ConfigError(f"rank {D.rank()} finds no {out / 'traces.json'} after rank 0 sampled; --out must be "
                              "on a file system every rank sees")
    return done


def run(args) -> int:
    import nanoseek
    from nanoseek.checkpoint import model_dir
    from nanoseek.config import load_preset
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.grpo import tokenizer_files

    preset = load_preset(args.preset, args.set)
    cfg: SFTConfig = preset.section("sft")
    args.model = str(model_dir(args.model))
    source = str(model_dir(args.traces_from, "--traces-from")) if args.traces_from else args.model
    out = check_out(args, "an SFT run")
    t0 = time.time()
    traces, figures = stage_traces(source, out, preset, "sft")
    tok = load_tokenizer(args.model)
    torch.manual_seed(cfg.seed)
    model = nanoseek.load(args.model)
    last = finetune(model, tok, trace_examples(traces, tok), cfg, out, tokenizer_files(args.model), args.resume,
                    "sft", log_stderr, parallel=preset.section("parallel"))
    if not D.is_main():
        return 0
    print(json.dumps({"stage": "sft", "traces": len(traces), "kept_rate": figures.get("kept_rate"),
                      "loss": last.get("loss"), "seconds": time.time() - t0}))
    return 0
