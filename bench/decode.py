"""Greedy decode speed of the nanoseek engine against transformers' DeepseekV3ForCausalLM.generate with the same
weights (saved by nanoseek.save, loaded by from_pretrained), same prompts and lengths, in one process; then MTP
self-speculation against plain decoding at batch 1 (acceptance rate, speedup). Ends with ONE JSON line.

    python bench/decode.py                          # a random model of --preset cpu-tiny
    python bench/decode.py --model runs/x/base      # a trained checkpoint (MTP acceptance means something here)

Run it on a quiet machine (`uptime`): the figures are wall-clock, the two arms' repeats interleaved (so a load
that comes and goes hits both) and each arm's median taken; the JSON also gives each arm's CPU time (thread time
of this process, which other processes on a shared machine disturb less) and the load average before and after.
Both sides use the same torch thread count (--threads, default 1: at this size a step is dispatch overhead, and a
second thread only adds synchronisation).
A random model's MTP head rarely agrees with its main head, so speculation only pays on a trained checkpoint.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import nanoseek  # noqa: E402
from nanoseek.config import load_preset  # noqa: E402
from nanoseek.infer.engine import Engine, EngineConfig  # noqa: E402
from nanoseek.infer.sampling import SamplingParams  # noqa: E402
from nanoseek.model.transformer import Transformer  # noqa: E402


def timed(arms, repeats: int):
    """arms: {name: fn}. Calls the arms in turn `repeats` times (after the caller's warm-up); returns {name: (median
    wall seconds, median CPU seconds of this thread, last result)}."""
    wall, cpu, out = {k: [] for k in arms}, {k: [] for k in arms}, {}
    for _ in range(repeats):
        for k, fn in arms.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            out[k] = fn()
            cpu[k].append(time.thread_time() - c0)
            wall[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k]), out[k]) for k in arms}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint directory (default: a random model of --preset)")
    src.add_argument("--preset", default="cpu-tiny")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32", help="engine dtype (HF runs fp32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spec-drafts", type=int, default=1, help="MTP drafts per verify (engine.spec_drafts: 1 or 2)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()

    if args.model:
        model, source = nanoseek.load(args.model), args.model
    else:
        torch.manual_seed(args.seed)
        model, source = Transformer(load_preset(args.preset).model).eval(), f"random {args.preset}"
    cfg = model.config
    tmp = tempfile.TemporaryDirectory()
    nanoseek.save(model, Path(tmp.name) / "ckpt")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(Path(tmp.name) / "ckpt", dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # both sides generate exactly gen_len tokens
    hf.generation_config.pad_token_id = 0
    print(f"model: {source}, {model.num_params() / 1e6:.2f}M params; prompt {args.prompt_len}, "
          f"generate {args.gen_len}; threads {args.threads}; engine {args.dtype}", file=sys.stderr)

    g = torch.Generator().manual_seed(args.seed)
    result = dict(bench="decode", model=source, prompt_len=args.prompt_len, gen_len=args.gen_len,
                  threads=args.threads, dtype=args.dtype, load_before=[round(x, 2) for x in os.getloadavg()])
    greedy = SamplingParams(max_tokens=args.gen_len, temperature=0, ignore_eos=True)
    max_len = args.prompt_len + args.gen_len + 1
    for B in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=g)
        # the engine sets its own thread count while it steps (engine.threads): the same as transformers gets
        engine = Engine(model, None, EngineConfig(max_batch=B, max_model_len=max_len, dtype=args.dtype,
                                                  threads=args.threads))
        with torch.inference_mode():
            def run_hf(prompts=prompts):
                return hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.gen_len,
                                   do_sample=False)[:, args.prompt_len :]

            def run_ns(engine=engine, prompts=prompts):
                return engine.generate(prompts.tolist(), greedy)

            run_hf(), run_ns()  # warm-up
            res = timed(dict(hf=run_hf, ns=run_ns), args.repeats)
        (t_hf, c_hf, out_hf), (t_ns, c_ns, out_ns) = res["hf"], res["ns"]
        ns_tokens = [g_[0].token_ids for g_ in out_ns]
        same = sum(a == b for a, b in zip(ns_tokens, out_hf.tolist()))
        tps_hf, tps_ns = B * args.gen_len / t_hf, B * args.gen_len / t_ns
        result[f"b{B}"] = dict(hf_tok_s=round(tps_hf, 1), nanoseek_tok_s=round(tps_ns, 1),
                               speedup=round(tps_ns / tps_hf, 2), cpu_speedup=round(c_hf / c_ns, 2),
                               identical_sequences=f"{same}/{B}")
        print(f"batch {B}: transformers {tps_hf:8.1f} tok/s   nanoseek {tps_ns:8.1f} tok/s   "
              f"x{tps_ns / tps_hf:.2f} (CPU time x{c_hf / c_ns:.2f})   identical greedy sequences {same}/{B}",
              file=sys.stderr)

    # MTP self-speculation vs plain greedy, batch 1
    if getattr(model, "mtp", None):
        prompts = torch.randint(0, cfg.vocab_size, (4, args.prompt_len), generator=g).tolist()
        ecfg = dict(max_batch=1, max_model_len=max_len, dtype=args.dtype, threads=args.threads)
        plain = Engine(model, None, EngineConfig(**ecfg))
        spec = Engine(model, None, EngineConfig(**ecfg, speculative=True, spec_drafts=args.spec_drafts))

        def run_all(e):
            return [e.generate([q], greedy)[0][0].token_ids for q in prompts]

        run_all(plain), run_all(spec)  # warm-up
        spec.spec_drafted_by_depth = [0] * args.spec_drafts
        spec.spec_accepted_by_depth = [0] * args.spec_drafts
        res = timed(dict(plain=lambda: run_all(plain), spec=lambda: run_all(spec)), args.repeats)
        (t_plain, c_plain, out_plain), (t_spec, c_spec, out_spec) = res["plain"], res["spec"]
        by_depth = [a / max(d, 1) for a, d in zip(spec.spec_accepted_by_depth, spec.spec_drafted_by_depth)]
        acc = by_depth[0]  # of the first draft (V3's MTP acceptance); deeper chained drafts are listed apart
        n_tok = len(prompts) * args.gen_len
        result["mtp_b1"] = dict(plain_tok_s=round(n_tok / t_plain, 1), spec_tok_s=round(n_tok / t_spec, 1),
                                speedup=round(t_plain / t_spec, 2), cpu_speedup=round(c_plain / c_spec, 2),
                                acceptance=round(acc, 3), identical=out_plain == out_spec, drafts=args.spec_drafts)
        if args.spec_drafts > 1:
            result["mtp_b1"]["acceptance_by_depth"] = [round(a, 3) for a in by_depth]
        print(f"MTP speculation, batch 1: plain {n_tok / t_plain:8.1f} tok/s   speculative {n_tok / t_spec:8.1f} "
              f"tok/s   x{t_plain / t_spec:.2f} (CPU time x{c_plain / c_spec:.2f})   acceptance {acc:.1%}   "
              f"identical {out_plain == out_spec}"
              + ("   (random model: low acceptance expected)" if not args.model else ""), file=sys.stderr)
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
