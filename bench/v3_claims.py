"""Two DeepSeek-V3 claims about cheap training, measured at tiny scale, every arm side by side in one run.

    python bench/v3_claims.py                                    # cpu-tiny, pretrain.steps from the preset
    python bench/v3_claims.py --preset smoke --steps 30          # seconds, plumbing only
    python bench/v3_claims.py --steps 300 --out runs/v3_claims --set pretrain.threads=1

(a) Load balancing (V3 §2.1.2): auxiliary-loss-free balancing (bias speed γ of the preset, and V3's own 0.001,
    each plus the tiny sequence-wise loss α of the preset) vs a plain auxiliary balance loss (the same f·P loss at
    a conventional weight α = 0.01, no bias) vs no balancing at all. Reported: max/mean expert load per MoE layer
    (mean over the last quarter of the steps; 1.0 is perfect balance, E/K the worst) and the main head's val loss.
(b) Multi-token prediction (V3 §2.2): MTP loss weight λ = preset (0.3) vs 0 (the MTP module untrained and unused).
    Reported: the main head's val loss after the same number of steps (MTP adds compute per step; its CPU time is
    shown).

Every arm starts from the same initial weights and sees the same batches in the same order. The figures are
printed whatever they show; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanoseek.config import load_preset  # noqa: E402
from nanoseek.data import PackedLoader, corpus_ids, val_batches  # noqa: E402
from nanoseek.model.transformer import Transformer  # noqa: E402
from nanoseek.train.loop import Trainer, read_metrics  # noqa: E402
from nanoseek.train.pretrain import balance_hook, build_tokenizer, pretrain_loss  # noqa: E402

V3_GAMMA = 0.001  # V3's bias speed; meant for ~10^5 steps, so the tiny presets use a larger one
PLAIN_AUX_ALPHA = 0.01  # a conventional auxiliary-loss weight (DeepSeek-V2 used 0.003-0.01 for expert balance)


def arms(cfg) -> dict[str, dict]:
    return {
        "aux_free": {"bias_gamma": cfg.bias_gamma, "aux_alpha": cfg.aux_alpha, "mtp_weight": cfg.mtp_weight},
        "aux_free_v3": {"bias_gamma": V3_GAMMA, "aux_alpha": cfg.aux_alpha, "mtp_weight": cfg.mtp_weight},
        "aux_loss": {"bias_gamma": 0.0, "aux_alpha": PLAIN_AUX_ALPHA, "mtp_weight": cfg.mtp_weight},
        "no_balance": {"bias_gamma": 0.0, "aux_alpha": 0.0, "mtp_weight": cfg.mtp_weight},
        "mtp_off": {"bias_gamma": cfg.bias_gamma, "aux_alpha": cfg.aux_alpha, "mtp_weight": 0.0},
    }


def run_arm(name, overrides, base_cfg, model_cfg, docs, val, data_cfg, out: Path) -> dict:
    cfg = replace(base_cfg, **overrides, eval_every=0, ckpt_every=0, keep_checkpoints=1)
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg)
    loader = PackedLoader(docs, data_cfg.seq_len, cfg.batch_size, seed=data_cfg.seed)
    trainer = Trainer(model, cfg, out / name, lambda m, b: pretrain_loss(m, b, cfg),
                      after_step=[balance_hook(cfg.bias_gamma)])
    t0 = time.time()
    last = trainer.fit(loader, val)
    seconds = time.time() - t0
    recs = read_metrics(out / name)
    tail = recs[-max(1, len(recs) // 4):]
    layers = [n for n in tail[0]["load_max_mean"] if any(r["load_max_mean"][n] for r in tail)]  # unused MTP: out
    load = {n: sum(r["load_max_mean"][n] for r in tail) / len(tail) for n in layers}
    main_layers = [n for n in layers if n.startswith("layer")]
    return {"val_loss": last["val_loss"], "train_loss_tail": sum(r["loss"] for r in tail) / len(tail),
            "load_max_mean": load, "load_max_mean_main_avg": sum(load[n] for n in main_layers) / len(main_layers),
            "seconds": seconds, "cpu_seconds": sum(r.get("cpu_time", 0.0) for r in recs), **overrides}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu-tiny")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (default: pretrain.steps)")
    p.add_argument("--out", default="runs/v3_claims", help="per-arm metrics.jsonl go here")
    p.add_argument("--arms", default=None,
                   help="comma-separated subset of: aux_free,aux_free_v3,aux_loss,no_balance,mtp_off")
    args = p.parse_args(argv)

    sets = list(args.set) + ["pretrain.progress=false"] + ([f"pretrain.steps={args.steps}"] if args.steps else [])
    preset = load_preset(args.preset, sets)
    cfg, data_cfg, model_cfg = preset.section("pretrain"), preset.section("data"), preset.model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok, _ = build_tokenizer(preset, out, None)
    docs = corpus_ids(data_cfg, tok, "train")
    val = val_batches(corpus_ids(data_cfg, tok, "val"), data_cfg.seq_len, cfg.batch_size, cfg.val_batches)
    chosen = arms(cfg)
    if args.arms:
        chosen = {k: chosen[k] for k in args.arms.split(",")}
    results = {}
    for name, overrides in chosen.items():
        if (out / name / "metrics.jsonl").exists():
            (out / name / "metrics.jsonl").unlink()  # a fresh run per arm
        print(f"[{name}] {overrides}", file=sys.stderr, flush=True)
        results[name] = run_arm(name, overrides, cfg, model_cfg, docs, val, data_cfg, out)
        r = results[name]
        load = {k: round(v, 2) for k, v in r["load_max_mean"].items()}
        print(f"[{name}] val_loss {r['val_loss']:.4f}  max/mean load {load}  {r['seconds']:.0f}s",
              file=sys.stderr, flush=True)

    print(f"\nV3 claims at tiny scale: preset {args.preset}, {cfg.steps} steps x {cfg.batch_size} x "
          f"{data_cfg.seq_len} tokens per arm, same init and data order")
    print("\n(a) balancing               val loss   max/mean load per layer (last quarter)      mean")
    for name in ("aux_free", "aux_free_v3", "aux_loss", "no_balance"):
        if name in results:
            r = results[name]
            per = " ".join(f"{k}={v:.2f}" for k, v in r["load_max_mean"].items())
            print(f"  {name:<12} γ={r['bias_gamma']:<6g} α={r['aux_alpha']:<6g} {r['val_loss']:.4f}   {per:<40} "
                  f"{r['load_max_mean_main_avg']:.2f}")
    print("\n(b) MTP                     val loss (main head)   train CPU seconds (wall misleads on a shared CPU)")
    for name, label in (("aux_free", "mtp_on"), ("mtp_off", "mtp_off")):
        if name in results:
            r = results[name]
            print(f"  {label:<12} λ={r['mtp_weight']:<12g} {r['val_loss']:.4f}                 {r['cpu_seconds']:.0f}")
    print(json.dumps({"bench": "v3_claims", "preset": args.preset, "steps": cfg.steps, "arms": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
