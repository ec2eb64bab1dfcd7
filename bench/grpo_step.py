"""GRPO step benchmark: wall-clock seconds per GRPO step (rollouts + update) of nanoseek (`nanoseek.train.grpo.train`:
the shared Engine samples, the shared Trainer updates) against TRL's `GRPOTrainer` (transformers `generate` for
rollouts) on the same model with the same weights, group size G, prompts per step, max completion length,
sampling temperature, loss, rewards, optimizer and precision, in one run. Ends with ONE JSON line.

    python bench/grpo_step.py                        # a random model of --preset cpu-tiny, its [rl] settings
    python bench/grpo_step.py --model runs/x/sft/model --steps 3

What one step is, on both sides: sample G completions for each of prompts_per_step training questions (R1 prompt
through the chat template; TRL renders it from the tokenizer's Jinja template, which gives the same ids), score
them with nanoseek's rule rewards (TRL calls them as its reward function), group advantages, one optimizer step
(μ = 1) over the batch in micro-batches of rl.micro_batch_size completions (TRL: gradient accumulation over the
same micro-batch size; 0 = the whole batch at once). How each side runs a micro-batch is its own choice: TRL
left-pads prompts and right-pads completions; nanoseek puts whole groups in a micro-batch and runs its forward over
the distinct tokens (each prompt once, no padding outside attention; nanoseek/model/packed.py), which gives the
same loss and gradients (tests/test_packed.py).

Each side runs --warmup steps first; the figure is the mean of the next --steps steps, each timed end to end
(nanoseek: between the progress lines `train` logs after every step; TRL: between consecutive `on_step_end`
callbacks), so logging and bookkeeping count on both sides. Wall seconds are the headline; CPU seconds of the
process per step are reported next to them (steadier on a shared machine), and each side's split into rollout and
update. Completions of a random model rarely stop early, so both sides mostly generate max_completion_length
tokens; the mean lengths are reported.

TRL is configured to do the same work: no gradient checkpointing (its default is on; nanoseek does not recompute),
the preset's rl.dtype on both sides (bf16 autocast or fp32; fp32 master weights either way), AdamW with
β2 = 0.99 and constant lr after the same warmup, no reference model when β = 0, top-k and top-p off. Both sides
use the same torch thread count (--threads, default 1: on a shared 2-core machine a second thread mostly adds
synchronisation at this size).

A random model's vocabulary is cut to the tokenizer's (the cpu-tiny tokenizer has fewer tokens than the preset's
vocab_size); a checkpoint is used as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(args, workdir: Path):
    """(HF-format model directory with tokenizer files, nanoseek tokenizer, description)."""
    import torch

    import nanoseek
    from nanoseek.data import corpus_texts
    from nanoseek.model.transformer import Transformer
    from nanoseek.tokenizer import load_tokenizer, train_tokenizer

    if args.model:
        return Path(args.model), load_tokenizer(args.model), args.model
    tcfg = args.preset_obj.section("tokenizer")
    t0 = time.perf_counter()
    tok = train_tokenizer(corpus_texts(args.data_cfg, limit=tcfg.max_docs), tcfg.vocab_size, tcfg.min_frequency)
    log(f"tokenizer: {tok.vocab_size} tokens trained on the {args.preset} corpus in {time.perf_counter() - t0:.1f}s")
    mcfg = args.preset_obj.model
    mcfg.vocab_size = min(mcfg.vocab_size, tok.vocab_size)
    torch.manual_seed(args.seed)
    model = Transformer(mcfg)
    d = workdir / "ckpt"
    tok.save(d)
    nanoseek.save(model, d, extra_files={f.name: str(f) for f in d.glob("tokenizer*")})
    return d, tok, f"random {args.preset} (vocab cut to the tokenizer's {tok.vocab_size})"


def timing(stamps: list[tuple[float, float]], warmup: int) -> dict:
    """Mean wall and CPU seconds per step from (perf_counter, process_time) at the start and at the end of every
    step, warm-up steps dropped. CPU seconds (this process, all threads) are what the step costs whatever else the
    machine runs: on a shared machine they are the steadier figure."""
    wall = [b[0] - a[0] for a, b in zip(stamps[:-1], stamps[1:])][warmup:]
    cpu = [b[1] - a[1] for a, b in zip(stamps[:-1], stamps[1:])][warmup:]
    return dict(s_per_step=statistics.mean(wall), cpu_s_per_step=statistics.mean(cpu),
                step_seconds=[round(t, 2) for t in wall])


# ---- nanoseek ----


def bench_nanoseek(model_dir: Path, cfg, args, workdir: Path) -> dict:
    from nanoseek.train.grpo import train
    from nanoseek.train.loop import read_metrics

    engine_cfg = args.preset_obj.section("engine")
    engine_cfg.dtype = cfg.engine_dtype
    # as `nanoseek rl` does: one rollout batch runs as one wave, a cache slot per completion
    engine_cfg.max_batch = max(engine_cfg.max_batch, cfg.prompts_per_step * cfg.num_generations)
    engine_cfg.threads = args.threads
    out = workdir / "nanoseek_rl"
    stamps = [(time.perf_counter(), time.process_time())]

    def on_log(msg: str) -> None:  # train() logs once per step with log_every = 1, right after the step's record
        if " step " in msg:
            stamps.append((time.perf_counter(), time.process_time()))
        log(f"  nanoseek: {msg}")

    train(model_dir, out, cfg, args.data_cfg, engine_cfg, steps=args.warmup + args.steps, stage="bench", log=on_log)
    recs = read_metrics(out)
    n = args.warmup + args.steps
    if len(recs) != n or len(stamps) != n + 1:
        raise RuntimeError(f"nanoseek logged {len(recs)} records and {len(stamps) - 1} steps, expected {n}")
    meas = recs[args.warmup:]
    t = timing(stamps, args.warmup)
    update_cpu = statistics.mean(r["cpu_time"] for r in meas)  # the Trainer's optimizer step
    return dict(t, rollout_s=statistics.mean(r["rollout_seconds"] for r in meas),
                update_s=statistics.mean(r["update_seconds"] for r in meas),
                rollout_cpu_s=t["cpu_s_per_step"] - update_cpu, update_cpu_s=update_cpu,
                mean_completion_tokens=statistics.mean(r["length"] for r in meas),
                completions_per_step=statistics.mean(r["samples"] for r in meas),
                reward=statistics.mean(r["reward"] for r in meas))


# ---- TRL ----


def bench_trl(model_dir: Path, cfg, args, workdir: Path) -> dict:
    import datasets
    import torch
    import transformers
    import trl

    from nanoseek import tasks
    from nanoseek.data import prompt_messages
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train import rewards as R
    from nanoseek.train.grpo import PromptStream, train_questions

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    tok = load_tokenizer(model_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    G, P = cfg.num_generations, cfg.prompts_per_step
    n_steps = args.warmup + args.steps
    # the same questions nanoseek trains on, in nanoseek's order (TRL's sampler reshuffles them)
    entries = PromptStream(train_questions(args.data_cfg, cfg.tasks), cfg.seed).take(P * n_steps)
    rows = datasets.Dataset.from_dict({"prompt": [prompt_messages(e, r1=True) for e in entries],
                                       "entry": [json.dumps(e) for e in entries]})
    first = hf_tok.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, tokenize=True)
    first = list(first["input_ids"] if hasattr(first, "keys") else first)
    if first != tok.encode_chat(rows[0]["prompt"]):
        raise RuntimeError("transformers' chat template gives other ids than nanoseek's; the prompts would differ")

    lengths_seen: list[float] = []

    def reward_fn(completions, entry, completion_ids=None, **kw):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        lens = [len(c) for c in completion_ids] if completion_ids is not None else None
        if lens:
            lengths_seen.append(statistics.mean(lens))
        rs = R.rewards(texts, [json.loads(e) for e in entry], tasks.score, lengths=lens,
                       prompt_opens_think=cfg.prompt_opens_think, format_weight=cfg.format_weight,
                       require_reasoning=cfg.require_reasoning,
                       max_len=cfg.max_completion_length, overlong_buffer=cfg.overlong_buffer)
        return [r.reward for r in rs]

    stamps: list[tuple[float, float]] = []
    rollout: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            stamps.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, a, state, control, **kw):
            stamps.append((time.perf_counter(), time.process_time()))

    # The same micro-batches as nanoseek: gradient accumulation over micro_batch_size completions (TRL then samples
    # the whole step's P * G completions at once, steps_per_generation = gradient_accumulation_steps).
    mbs = cfg.micro_batch_size if cfg.micro_batch_size and (P * G) % cfg.micro_batch_size == 0 else P * G
    targs = trl.GRPOConfig(
        output_dir=str(workdir / "trl_out"), per_device_train_batch_size=mbs, gradient_accumulation_steps=P * G // mbs,
        num_generations=G, max_completion_length=cfg.max_completion_length, temperature=cfg.temperature,
        top_p=cfg.top_p, top_k=0, beta=cfg.beta, loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards,
        epsilon=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, num_iterations=cfg.mu,
        use_bias_correction_kl=cfg.kl_bias_correction, learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
        adam_beta1=0.9, adam_beta2=0.99, max_grad_norm=cfg.grad_clip, lr_scheduler_type="constant_with_warmup",
        warmup_steps=cfg.warmup_steps,
        max_steps=n_steps, bf16=cfg.dtype == "bf16", gradient_checkpointing=False, use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=cfg.seed, dataloader_num_workers=0)
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward_fn, args=targs, train_dataset=rows,
                              processing_class=hf_tok, callbacks=[Clock()])
    trainer.remove_callback(transformers.PrinterCallback)  # its per-step dicts would go to stdout
    generate_and_score = trainer._generate_and_score_completions

    def timed_rollout(*a, **kw):  # TRL's rollout: generate, decode, reward, advantages (and old/ref log-probs)
        t0, c0 = time.perf_counter(), time.process_time()
        out = generate_and_score(*a, **kw)
        rollout.append((time.perf_counter() - t0, time.process_time() - c0))
        return out

    trainer._generate_and_score_completions = timed_rollout
    torch.set_num_threads(args.threads)
    trainer.train()
    if len(stamps) != n_steps + 1:
        raise RuntimeError(f"TRL ran {len(stamps) - 1} steps, expected {n_steps}")
    hist = [h for h in trainer.state.log_history if "loss" in h]
    t = timing(stamps, args.warmup)
    if len(rollout) != n_steps:
        raise RuntimeError(f"TRL sampled {len(rollout)} rollout batches in {n_steps} steps; expected one per step")
    rollout_s = statistics.mean(r[0] for r in rollout[args.warmup:])
    rollout_cpu = statistics.mean(r[1] for r in rollout[args.warmup:])
    return dict(t, rollout_s=rollout_s, update_s=t["s_per_step"] - rollout_s, rollout_cpu_s=rollout_cpu,
                update_cpu_s=t["cpu_s_per_step"] - rollout_cpu,
                mean_completion_tokens=statistics.mean(lengths_seen[args.warmup:]) if lengths_seen else None,
                completions_per_step=P * G,
                reward=statistics.mean(h.get("reward", float("nan")) for h in hist[args.warmup:]) if hist else None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint directory with tokenizer files (default: a random model of --preset)")
    src.add_argument("--preset", default="cpu-tiny", help="preset of the random model, its [rl] and [data]")
    p.add_argument("--steps", type=int, default=3, help="measured steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    p.add_argument("--num-generations", type=int, default=None, help="G (default: the preset's rl.num_generations)")
    p.add_argument("--prompts-per-step", type=int, default=None, help="default: the preset's rl.prompts_per_step")
    p.add_argument("--max-completion-length", type=int, default=None, help="default: the preset's")
    p.add_argument("--dtype", default=None, help="training autocast dtype, both sides: bf16 | fp32 (default: "
                   "the preset's rl.dtype)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    import torch

    from nanoseek.config import load_preset

    torch.set_num_threads(args.threads)
    args.preset_obj = load_preset(args.preset if not args.model else "cpu-tiny")
    args.data_cfg = args.preset_obj.section("data")
    cfg = args.preset_obj.section("rl")
    for name in ("num_generations", "prompts_per_step", "max_completion_length", "dtype"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    cfg.threads, cfg.seed, cfg.ckpt_every, cfg.log_every, cfg.steps = args.threads, args.seed, 0, 1, args.steps
    cfg.dynamic_sampling = False  # TRL samples once per step
    cfg.validate()
    if cfg.dtype not in ("bf16", "fp32"):
        p.error(f"--dtype {cfg.dtype}: TRL on CPU runs bf16 or fp32; pass one of those")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, tok, source = build(args, Path(tmp))
        log(f"model: {source}; G {cfg.num_generations} x {cfg.prompts_per_step} prompts per step, max completion "
            f"{cfg.max_completion_length}, loss {cfg.loss_type}, beta {cfg.beta}, {cfg.dtype}; {args.warmup} warm-up "
            f"+ {args.steps} timed steps per side; torch threads {torch.get_num_threads()}; load average "
            f"{os.getloadavg()[0]:.1f}")
        ns = bench_nanoseek(model_dir, cfg, args, Path(tmp))
        log(f"nanoseek: {ns}")
        torch.set_num_threads(args.threads)
        tr = bench_trl(model_dir, cfg, args, Path(tmp))
        log(f"TRL:      {tr}")
    result = dict(bench="grpo_step", speedup_vs_trl=round(tr["s_per_step"] / ns["s_per_step"], 2),
                  nanoseek_s_per_step=round(ns["s_per_step"], 3), trl_s_per_step=round(tr["s_per_step"], 3),
                  speedup_vs_trl_cpu=round(tr["cpu_s_per_step"] / ns["cpu_s_per_step"], 2),
                  nanoseek_cpu_s_per_step=round(ns["cpu_s_per_step"], 3),
                  trl_cpu_s_per_step=round(tr["cpu_s_per_step"], 3),
                  model=source, num_generations=cfg.num_generations, prompts_per_step=cfg.prompts_per_step,
                  max_completion_length=cfg.max_completion_length, loss_type=cfg.loss_type, beta=cfg.beta,
                  micro_batch_size=cfg.micro_batch_size, dtype=cfg.dtype, threads=torch.get_num_threads(),
                  warmup_steps=args.warmup, steps=args.steps,
                  nanoseek={k: (round(v, 3) if isinstance(v, float) else v) for k, v in ns.items()},
                  trl={k: (round(v, 3) if isinstance(v, float) else v) for k, v in tr.items()},
                  load_avg_1m=round(os.getloadavg()[0], 1), seconds=round(time.perf_counter() - t_start, 1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
