"""Training-step throughput: nanoseek against transformers' DeepseekV3ForCausalLM, same config, same weights,
same batch, same process, interleaved rounds (so background load hits both arms alike).

One step = forward + cross-entropy + backward + AdamW, bf16 autocast over fp32 master weights, for both. Each in
its best setting: transformers with `experts_implementation="grouped_mm"` and sdpa attention; nanoseek with its
default (torch.compile when it works, eager otherwise; `--compile off` to force eager). A bf16 matmul peak is
measured in the same run, and MFU = model FLOPs/s / that peak, with model FLOPs per token counted as in
`nanoseek info`: 3 x (2 x matmul params a token goes through + causal attention 2·L·H·(d_qk+d_v)·(T+1)/2),
i.e. 6 x active matmul params + attention (embedding lookup excluded, output head included).

    python bench/train_step.py                         # configs/cpu-tiny.toml, batch 16 x 256
    python bench/train_step.py --threads 1             # on a shared, busy 2-core box: OpenMP's 2 threads collapse
    python bench/train_step.py --preset smoke --batch 8 --seq-len 128 --rounds 3

The bf16 peak is measured before and after the rounds, at the run's thread count (the higher one is used).
MTP is off for both (transformers' DeepseekV3ForCausalLM does not run it). `tokens_per_cpu_s` (tokens per
CPU-second of this process) is reported too: it moves less than wall-clock tokens/s when others load the machine.

Ends with one JSON line: {"tokens_per_s", "hf_tokens_per_s", "speedup_vs_hf", "mfu", ...}.
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import nanoseek  # noqa: E402
from nanoseek.config import load_preset  # noqa: E402
from nanoseek.info import matmul_params_per_token, train_flops_per_token  # noqa: E402
from nanoseek.model.transformer import Transformer  # noqa: E402


def bf16_peak(seconds: float = 1.0) -> float:
    """Best bf16 matmul FLOP/s over a few square sizes (AMX on this CPU)."""
    best = 0.0
    for n in (1024, 2048):
        a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
        for _ in range(2):
            a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2:
            a @ b
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def make_optimizer(model):
    try:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)


class Arm:
    """A model + optimizer + one jitted-or-not training step."""

    def __init__(self, name, model, forward):
        self.name, self.model, self.forward = name, model, forward
        self.opt = make_optimizer(model)
        self.tokens_per_s: list[float] = []
        self.tokens_per_cpu_s: list[float] = []  # per CPU-second of this process: less hurt by others' load

    def step(self, x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = self.forward(x, y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def time(self, x, y, steps):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step(x, y)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        self.tokens_per_s.append(x.numel() * steps / dt)
        self.tokens_per_cpu_s.append(x.numel() * steps / dc)


def nanoseek_arm(model, compile_mode: str, inductor_mode: str | None, aux_weight: float = 1e-4):
    """nanoseek's step; with compile, the model is torch.compile'd whole (one graph: see tests/test_fast_paths.py)
    and the first step falls back to eager if compiling fails (unless --compile on)."""
    compiled = torch.compile(model, mode=inductor_mode) if compile_mode != "off" else model
    state = {"fwd": compiled, "compiled": compile_mode != "off"}

    def loss_fn(x, y):
        out = state["fwd"](x)
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten())
        if out.aux_loss is not None:  # V3's sequence-wise balance loss, as the pretraining loop adds it
            loss = loss + aux_weight * out.aux_loss
        return loss

    arm = Arm("nanoseek", model, loss_fn)
    first_step = arm.step

    def step_with_fallback(x, y):
        try:
            return first_step(x, y)
        except Exception as e:  # any compiler failure: fall back, and say so
            if compile_mode == "on" or not state["compiled"]:
                raise
            print(f"torch.compile failed ({type(e).__name__}: {str(e)[:200]}); nanoseek runs eager", file=sys.stderr)
            arm.opt.zero_grad(set_to_none=True)
            state.update(fwd=model, compiled=False)
            return first_step(x, y)
        finally:
            arm.step = first_step

    arm.step = step_with_fallback
    arm.compiled = lambda: state["compiled"]
    return arm


def hf_arm(path):
    import transformers

    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa", experts_implementation="grouped_mm").train()

    def loss_fn(x, y):
        logits = hf(x, use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    return Arm("transformers", hf, loss_fn)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu-tiny")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round per arm")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median round is reported")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile nanoseek's step (auto: fall back to eager if compiling fails)")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode for nanoseek, e.g. max-autotune-no-cudagraphs (AMX GEMM templates)")
    p.add_argument("--no-hf", action="store_true", help="time nanoseek only")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    p.add_argument("--profile", metavar="DIR", help="write a torch.profiler table of nanoseek's step to DIR")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_preset(args.preset, args.set).model
    cfg.num_nextn_predict_layers = 0  # transformers' DeepseekV3ForCausalLM does not run MTP; compare like for like
    tmp = tempfile.TemporaryDirectory()
    nanoseek.save(Transformer(cfg), Path(tmp.name) / "ckpt")  # the same weights for both
    # both arms load that checkpoint the same way a user would
    model = nanoseek.load(Path(tmp.name) / "ckpt").train()
    arms = [nanoseek_arm(model, args.compile, None if args.compile_mode == "default" else args.compile_mode)]
    if not args.no_hf:
        arms.append(hf_arm(Path(tmp.name) / "ckpt"))
    B, T = args.batch, args.seq_len
    x = torch.randint(0, cfg.vocab_size, (B, T))
    y = torch.randint(0, cfg.vocab_size, (B, T))

    t0 = time.perf_counter()
    for arm in arms:
        for _ in range(args.warmup):
            arm.step(x, y)
    print(f"warmup {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    peaks = [bf16_peak()]
    for r in range(args.rounds):
        for arm in (arms if r % 2 == 0 else arms[::-1]):
            arm.time(x, y, args.steps)
        print(f"round {r}: " + "  ".join(f"{a.name} {a.tokens_per_s[-1]:,.0f} tok/s" for a in arms), file=sys.stderr)
    peaks.append(bf16_peak())
    peak = max(peaks)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(2):
                arms[0].step(x, y)
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        (Path(args.profile) / "nanoseek_step.txt").write_text(table)
        print(table, file=sys.stderr)

    tps = statistics.median(arms[0].tokens_per_s)
    flops_per_token = train_flops_per_token(cfg, T)
    result = {
        "tokens_per_s": round(tps, 1),
        "mfu": round(tps * flops_per_token / peak, 4),
        "bf16_peak_tflops": round(peak / 1e12, 3),
        "model_tflops": round(tps * flops_per_token / 1e12, 4),
        "train_flops_per_token": flops_per_token,
        "matmul_params_per_token": matmul_params_per_token(cfg),
        "preset": args.preset, "batch": B, "seq_len": T, "rounds": args.rounds, "steps": args.steps,
        "compile": arms[0].compiled() and args.compile_mode,
        "threads": torch.get_num_threads(),
        "nanoseek_rounds": [round(v) for v in arms[0].tokens_per_s],
        "tokens_per_cpu_s": round(statistics.median(arms[0].tokens_per_cpu_s), 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if not args.no_hf:
        hf_tps = statistics.median(arms[1].tokens_per_s)
        result.update(hf_tokens_per_s=round(hf_tps, 1), speedup_vs_hf=round(tps / hf_tps, 2),
                      hf_mfu=round(hf_tps * flops_per_token / peak, 4),
                      hf_rounds=[round(v) for v in arms[1].tokens_per_s],
                      hf_tokens_per_cpu_s=round(statistics.median(arms[1].tokens_per_cpu_s), 1))
    result = {"tokens_per_s": result.pop("tokens_per_s"), **({"hf_tokens_per_s": result.pop("hf_tokens_per_s"),
              "speedup_vs_hf": result.pop("speedup_vs_hf")} if not args.no_hf else {}), **result}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
