"""V3-style pretraining of the base model (DeepSeek-V3 §2, §4).

    nanoseek pretrain --out runs/x/pretrain                       # cpu-tiny, the default preset
    nanoseek pretrain --preset smoke --out /tmp/p --set pretrain.steps=20
    nanoseek pretrain --out runs/x/pretrain --resume              # after a crash: continues bit-for-bit

The loss is V3's: next-token cross-entropy + λ · MTP loss (eq. 24-25: the mean over the D depths of each depth's
cross-entropy on the token k+1 ahead) + α · the sequence-wise balance loss (eq. 17-20). After every optimizer step
each MoE layer's routing bias moves by γ toward balance (auxiliary-loss-free balancing, eq. 16). The optimizer,
schedule, bf16 autocast, checkpoints and resume are the shared loop's (nanoseek/train/loop.py).

Writes into --out: metrics.jsonl (one line per step: loss, mtp_loss, aux_loss, lr, grad_norm, tokens_per_s, mfu,
load_max_mean per MoE layer, val_loss every eval_every steps), checkpoints/step_N (HF format + train state),
tokenizer/ (trained on the corpus unless --tokenizer is given), model/ (the final base model, HF format with the
tokenizer files) and eval.json (greedy accuracy per task on held-out test questions).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoseek.train.loop import LoopConfig, Trainer, all_reduce_mean, complete_checkpoints, read_metrics

DISTRIBUTED = True  # runs under torchrun: data sharded by rank, DDP/FSDP2 from [parallel] (train/distributed.py)


@dataclass
class PretrainConfig(LoopConfig):
    batch_size: int = 16  # packed sequences per micro-batch (of data.seq_len tokens)
    mtp_weight: float = 0.3  # λ of V3 eq. 25 (0.3 for the first 10T tokens, then 0.1); 0 turns MTP off
    bias_gamma: float = 0.001  # γ: bias update speed of auxiliary-loss-free balancing (V3: 0.001)
    aux_alpha: float = 0.0001  # α: weight of the sequence-wise balance loss (V3: 0.0001)
    val_batches: int = 4  # batches of held-out val documents for val loss
    eval_n: int = 100  # test questions per task for the greedy accuracy after training (0: skip)
    eval_tasks: list[str] = field(default_factory=list)  # tasks for that eval ([] = data.tasks)
    eval_max_tokens: int = 160  # generated tokens per question
    student_steps: int = 0  # steps of `nanoseek pretrain --student` (the distillation student's base); 0 = steps
    student_threads: int = 0  # CPU threads of `pretrain --student` (0 = threads): the speedrun runs it beside
    # the teacher's R1 stages, one core each


# ---- the loss ------------------------------------------------------------------------------------------------
def pretrain_loss(model, batch, cfg: PretrainConfig, num_items: float | None = None):
    """batch = (x, y) [B, T] -> (loss, stats). MTP depth k predicts t_{i+k+1} = y_{i+k} from position i.
    num_items: divide the summed main cross-entropy by this instead of this batch's target count (masked SFT under
    torchrun passes global_count / W, so the DDP-averaged loss is the mean over the whole batch's tokens)."""
    x, y = batch
    x, y = x.to(model_device(model)), y.to(model_device(model))
    use_mtp = cfg.mtp_weight > 0 and model.training
    out = model(x, mtp=use_mtp)
    V = out.logits.shape[-1]
    if num_items is None:
        main = F.cross_entropy(out.logits.float().reshape(-1, V), y.reshape(-1))  # [B*T, V] vs [B*T]
    else:
        main = F.cross_entropy(out.logits.float().reshape(-1, V), y.reshape(-1), reduction="sum") / num_items
    loss = main
    stats = {"loss": main.detach(), "tokens": int((y != -100).sum())}
    if use_mtp and out.mtp_logits:
        depths = [F.cross_entropy(lg.float().reshape(-1, V), y[:, k:].reshape(-1))
                  for k, lg in enumerate(out.mtp_logits, start=1)]  # lg [B, T-k, V]
        mtp = torch.stack(depths).mean()
        loss = loss + cfg.mtp_weight * mtp
        stats["mtp_loss"] = mtp.detach()
    if out.aux_loss is not None:
        if cfg.aux_alpha > 0:
            loss = loss + cfg.aux_alpha * out.aux_loss
        stats["aux_loss"] = out.aux_loss.detach()
    return loss, stats


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def moe_layer_names(model) -> list[str]:
    """Names of model.moe_layers() in order: 'layerN' for main layers, 'mtpK' for MTP modules."""
    names = [f"layer{i}" for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    return names + [f"mtp{k}" for k in range(1, len(model.mtp) + 1)]


def balance_hook(gamma: float):
    """After each optimizer step: log max/mean expert load per MoE layer, then move the routing biases by γ."""
    from nanoseek.model.moe import update_balance_bias

    def hook(trainer: Trainer, record: dict) -> None:
        model = trainer.raw_model
        layers = model.moe_layers()
        loads = [all_reduce_mean(m.load.clone().float()) for m in layers]  # the global load under DDP
        update_balance_bias(layers, gamma, loads)
        ratios = {n: float(ld.max() / ld.mean().clamp(min=1e-9)) for n, ld in zip(moe_layer_names(model), loads)}
        record["load_max_mean"] = ratios

    return hook


# ---- greedy evaluation ---------------------------------------------------------------------------------------
def greedy_accuracy(model, tok, entries: list[dict], max_new: int = 160) -> dict:
    """Greedy accuracy per task on `entries` through the engine, asked with the R1 prompt (the one RL uses):
    {task: {acc, n, answer_rate}}. The answer is read strictly from <answer>…</answer> after </think> and scored
    by the task's scorer."""
    from nanoseek import tasks
    from nanoseek.data import prompt_messages
    from nanoseek.infer.engine import Engine, EngineConfig
    from nanoseek.infer.sampling import SamplingParams
    from nanoseek.train.rewards import extract_answer

    prompts = [tok.encode_chat(prompt_messages(e, r1=True)) for e in entries]
    engine = Engine(model.eval(), tok, EngineConfig(max_batch=64, max_model_len=max(map(len, prompts)) + max_new))
    done = engine.generate(prompts, SamplingParams(max_tokens=max_new, temperature=0.0))
    outs = [c[0].token_ids for c in done]
    per: dict[str, dict] = {}
    for e, ids in zip(entries, outs):
        text = tok.decode([i for i in ids if i != tok.eos_id])
        ans = extract_answer(text)
        r = per.setdefault(e["task"], {"correct": 0.0, "n": 0, "answered": 0})
        r["n"] += 1
        r["answered"] += ans is not None
        r["correct"] += tasks.score(ans, e) if ans is not None else 0.0
    return {t: {"acc": r["correct"] / r["n"], "n": r["n"], "answer_rate": r["answered"] / r["n"]}
            for t, r in per.items()}


def speed_summary(records: list[dict], trainer: Trainer) -> dict:
    """Whole-run throughput: tokens over summed step time (wall) and over summed CPU time, and MFU from the former."""
    step_s = sum(r.get("step_time", 0.0) for r in records)
    cpu_s = sum(r.get("cpu_time", 0.0) for r in records)
    tokens = sum(r.get("tokens_per_s", 0.0) * r.get("step_time", 0.0) for r in records)
    tps = tokens / step_s if step_s else 0.0
    mfu = tps * trainer.flops_per_token / (trainer.peak_tflops * 1e12) if trainer.peak_tflops else None
    return {"tokens_per_s": tps, "tokens_per_cpu_s": tokens / cpu_s if cpu_s else 0.0, "step_seconds": step_s,
            "cpu_seconds": cpu_s, "mfu": mfu, "peak_tflops": trainer.peak_tflops}


# ---- the stage -----------------------------------------------------------------------------------------------
def build_tokenizer(preset, out: Path, given: str | None):
    from nanoseek.data import corpus_texts
    from nanoseek.tokenizer import load_tokenizer, train_tokenizer

    if given:
        return load_tokenizer(given), Path(given)
    tdir = out / "tokenizer"
    if (tdir / "tokenizer.json").is_file():
        return load_tokenizer(tdir), tdir
    tcfg = preset.section("tokenizer")
    tok = train_tokenizer(corpus_texts(preset.section("data"), limit=tcfg.max_docs), tcfg.vocab_size,
                          tcfg.min_frequency)
    tok.save(tdir)
    return tok, tdir


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu-tiny", help="preset name or .toml path (default: cpu-tiny)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset value, e.g. --set pretrain.steps=100 (repeatable)")
    p.add_argument("--out", required=True, help="run directory (metrics, checkpoints, final model)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: train one into OUT/tokenizer)")
    p.add_argument("--student", action="store_true", help="pretrain the preset's [student] model (the dense base "
                   "that `nanoseek distill` and `nanoseek rl --student` start from) for pretrain.student_steps")


def run(args) -> int:
    from nanoseek.config import ConfigError, load_preset
    from nanoseek.data import PackedLoader, corpus_ids, splits, val_batches
    from nanoseek.info import train_flops_per_token
    from nanoseek.model.transformer import Transformer
    from nanoseek.train import distributed as D

    preset = load_preset(args.preset, args.set)
    cfg: PretrainConfig = preset.section("pretrain")
    data_cfg = preset.section("data")
    model_cfg = preset.model
    if args.student:  # the distillation student: the same recipe on the [student] model config
        model_cfg = preset.section("student")
        cfg.steps = cfg.student_steps or cfg.steps
        cfg.threads = cfg.student_threads or cfg.threads
    out = Path(args.out)
    if not args.resume and (complete_checkpoints(out) or (out / "metrics.jsonl").exists()):
        raise ConfigError(f"{out} already holds a pretraining run; pass --resume to continue it, or choose a new "
                          f"--out")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not D.is_main():
        D.barrier()  # under torchrun rank 0 trains (or finds) the tokenizer first; the other ranks then load it
    tok, tok_dir = build_tokenizer(preset, out, args.tokenizer)
    if D.is_main():
        D.barrier()
    if tok.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"tokenizer has {tok.vocab_size} tokens but model.vocab_size={model_cfg.vocab_size}; "
                          f"set model.vocab_size >= {tok.vocab_size} or tokenizer.vocab_size lower")
    docs = corpus_ids(data_cfg, tok, "train")
    loader = PackedLoader(docs, data_cfg.seq_len, cfg.batch_size, seed=data_cfg.seed, rank=D.rank(),
                          world_size=D.world_size())  # each rank: its rows of the same global batch
    val = val_batches(corpus_ids(data_cfg, tok, "val"), data_cfg.seq_len, cfg.batch_size, cfg.val_batches)
    n_tok = sum(len(d) for d in docs)
    epochs = cfg.steps * cfg.grad_accum * loader.tokens_per_batch / n_tok
    say = print if D.is_main() else (lambda *a, **k: None)  # one rank speaks under torchrun
    say(f"pretrain: {len(docs)} documents, {n_tok} tokens, {epochs:.2f} epochs planned; data+tokenizer "
        f"{time.time() - t0:.1f}s", file=sys.stderr)

    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg)
    files = {f.name: str(f) for f in tok_dir.iterdir() if f.is_file()}
    if D.is_main():
        (out / "preset.json").write_text(json.dumps(preset.raw, indent=2, sort_keys=True))
    trainer = Trainer(model, cfg, out, lambda m, b: pretrain_loss(m, b, cfg), after_step=[balance_hook(
        cfg.bias_gamma)], extra_files=files, flops_per_token=train_flops_per_token(
        model_cfg, data_cfg.seq_len, mtp=cfg.mtp_weight > 0), run_info={"preset": str(preset.path)},
        parallel=preset.section("parallel"))
    if args.resume and trainer.resume(loader):
        say(f"pretrain: resumed at step {trainer.step}", file=sys.stderr)
    t_train = time.time()
    last = trainer.fit(loader, val) if trainer.step < cfg.steps else {}
    train_s = time.time() - t_train

    from nanoseek.checkpoint import load, save

    full = D.FullModel(trainer.raw_model)  # every rank takes part in gathering FSDP shards; rank 0 writes and evals
    if not D.is_main():
        return 0
    save(full, out / "model", extra_files=files)
    eval_model = load(out / "model") if D.is_sharded(trainer.raw_model) else trainer.raw_model
    summary = {"steps": trainer.step, "train_seconds": train_s, "final_loss": last.get("loss"),
               "val_loss": last.get("val_loss"), "tokens": trainer.tokens, **speed_summary(read_metrics(out), trainer)}
    if cfg.eval_n:
        test = [e for e in splits(data_cfg)["test"] if not cfg.eval_tasks or e["task"] in cfg.eval_tasks]
        by_task: dict[str, list] = {}
        for e in test:
            by_task.setdefault(e["task"], []).append(e)
        test = [e for t in by_task.values() for e in t[: cfg.eval_n]]
        t_eval = time.time()
        summary["greedy"] = greedy_accuracy(eval_model, tok, test, cfg.eval_max_tokens)
        summary["eval_seconds"] = time.time() - t_eval
    (out / "eval.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0
