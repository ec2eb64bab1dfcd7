"""`nanoseek report RUN_DIR`: the run's report card — `RUN_DIR/report.md` plus PNG plots in `RUN_DIR/plots/`.

Reads only what the stages left on disk, so it works on a finished run, a half-finished one (it says which stages
are missing) or a run made stage by stage by hand:

    RUN/<stage>/metrics.jsonl     one JSON object per step (pretrain, zero, sft, rl, student_*, distill)
    RUN/<stage>/stage.json        what `nanoseek speedrun` measured: seconds, tokens, peak RSS, key figure
    RUN/eval/<stage>.json         `nanoseek eval --out` results

    nanoseek report runs/cpu-tiny        # writes runs/cpu-tiny/report.md and runs/cpu-tiny/plots/*.png
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

# The run's stages in pipeline order: (directory, what the report calls it, what it is).
STAGES = [
    ("tokenizer", "tokenizer", "byte-level BPE trained on the task corpus"),
    ("pretrain", "base", "V3-style pretraining (MLA + DeepSeekMoE + MTP)"),
    ("zero", "R1-Zero", "GRPO straight from the base with rule rewards"),
    ("sft", "SFT", "cold-start SFT on R1-Zero's rejection-sampled correct traces"),
    ("rl", "R1", "GRPO from the SFT model: the teacher"),
    ("student_base", "student base", "the small dense student, pretrained like the base"),
    ("distill", "student", "the student after SFT on the teacher's correct traces (distillation)"),
    ("student_rl", "RL-only student", "the same student trained by GRPO alone (the paper's comparison arm)"),
]
LABEL = {d: label for d, label, _ in STAGES}
EVAL_ORDER = ["pretrain", "zero", "sft", "rl", "student_base", "distill", "student_rl"]
RL_STAGES = ["zero", "rl", "student_rl"]

# Key names differ a little between writers; the first present wins.
KEYS = {
    "loss": ("loss", "train_loss"),
    "mtp_loss": ("mtp_loss",),
    "val_loss": ("val_loss",),
    "reward": ("reward", "reward_mean"),
    "accuracy": ("accuracy", "acc", "accuracy_strict"),
    "length": ("length", "completion_length", "mean_length", "response_length"),
    "kl": ("kl",),
    "format": ("format", "format_rate"),
}


def read_jsonl(path: Path) -> list[dict]:
    """Records of a metrics.jsonl; a torn last line (a crash mid-write) is skipped, not fatal."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def series(records: list[dict], what: str) -> tuple[list[float], list[float]]:
    """(steps, values) of metric `what` (a KEYS name or a raw key), skipping records without it."""
    keys = KEYS.get(what, (what,))
    xs, ys = [], []
    for i, r in enumerate(records):
        v = next((r[k] for k in keys if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)), None)
        if v is not None and math.isfinite(v):
            xs.append(r.get("step", i))
            ys.append(float(v))
    return xs, ys


def layer_loads(records: list[dict]) -> tuple[list[int], list[str], list[list[float]]]:
    """(steps, layer names, [step][layer] max/mean expert load) from pretrain metrics: the `load_max_mean` record
    ({layer name: ratio}, as nanoseek/train/pretrain.py writes it), or a plain list under a key with "load"."""
    steps, names, rows = [], [], []
    for i, r in enumerate(records):
        v = r.get("load_max_mean")
        if v is None:
            v = next((x for k, x in r.items() if "load" in k and isinstance(x, (list, dict)) and x), None)
        if isinstance(v, dict) and v:
            names = list(v)
            row = [float(x) for x in v.values()]
        elif isinstance(v, list) and v:
            names = [f"moe{j}" for j in range(len(v))]
            row = [float(x) for x in v]
        else:
            continue
        steps.append(r.get("step", i))
        rows.append(row)
    return steps, names, rows


# ---- plots -------------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a server or in CI
    import matplotlib.pyplot as plt

    return plt


def plot_pretrain(records: list[dict], out: Path) -> bool:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for what, style in (("loss", "-"), ("mtp_loss", "--"), ("val_loss", "o-")):
        xs, ys = series(records, what)
        if ys:
            ax.plot(xs, ys, style, label=what, markersize=3)
            drawn = True
    if drawn:
        ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="Pretraining loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out, dpi=110)
    plt.close(fig)
    return drawn


def plot_rl(runs: dict[str, list[dict]], out: Path) -> bool:
    plt = _plt()
    panels = ("reward", "accuracy", "length", "kl")
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    drawn = False
    for ax, what in zip(axes.flat, panels):
        for stage, records in runs.items():
            xs, ys = series(records, what)
            if ys:
                ax.plot(xs, ys, label=LABEL.get(stage, stage))
                drawn = True
        ax.set(xlabel="RL step", title={"reward": "mean reward", "accuracy": "strict accuracy",
                                        "length": "mean completion length (tokens)",
                                        "kl": "KL to the reference (k3)"}[what])
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if drawn:
        fig.tight_layout()
        fig.savefig(out, dpi=110)
    plt.close(fig)
    return drawn


def plot_heatmap(matrix: list[list[float]], out: Path, title: str, xlabel: str, ylabel: str,
                 xticks: list | None = None, ylabels: list[str] | None = None) -> bool:
    if not matrix or not matrix[0]:
        return False
    import numpy as np

    plt = _plt()
    width = max(len(r) for r in matrix)
    m = np.full((len(matrix), width), np.nan)
    for i, r in enumerate(matrix):
        m[i, : len(r)] = r
    fig, ax = plt.subplots(figsize=(min(12, 2 + 0.5 * width) if xticks is None else 8, 1.5 + 0.45 * len(matrix)))
    im = ax.imshow(m, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.set_yticks(range(len(matrix)), ylabels if ylabels and len(ylabels) == len(matrix) else None)
    if xticks is not None:
        idx = np.linspace(0, len(xticks) - 1, min(8, len(xticks))).astype(int)
        ax.set_xticks(idx, [str(xticks[i]) for i in idx])
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def plot_expert_loads(loads: list[tuple[str, dict]], out: Path) -> bool:
    """One heatmap per MoE stage, side by side: [layer][expert] tokens routed / the layer's mean."""
    import numpy as np

    plt = _plt()
    n = len(loads)
    layers = max(len(e["expert_load"]) for _, e in loads)
    fig, axes = plt.subplots(1, n, figsize=(min(16, 1 + 3.2 * n), 1.6 + 0.45 * layers), squeeze=False)
    vmax = max(max(max(r) / max(sum(r) / len(r), 1e-9) for r in e["expert_load"]) for _, e in loads)
    im = None
    for ax, (s, e) in zip(axes[0], loads):
        m = np.array([[x / max(sum(r) / len(r), 1e-9) for x in r] for r in e["expert_load"]])
        im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set(title=LABEL.get(s, s), xlabel="routed expert")
        names = e.get("expert_load_layers") or [str(i) for i in range(len(m))]
        ax.set_yticks(range(len(m)), names if ax is axes[0][0] else [""] * len(m))
    fig.colorbar(im, ax=list(axes[0]), label="load / mean")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_stage_costs(records: dict[str, dict], out: Path) -> bool:
    names = [n for n in records if records[n].get("seconds") is not None]
    if not names:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    axes[0].barh(names, [records[n]["seconds"] for n in names])
    axes[0].set(xlabel="seconds", title="Wall-clock per stage")
    axes[1].barh(names, [(records[n].get("tokens") or 0) / 1e6 for n in names])
    axes[1].set(xlabel="million tokens", title="Tokens per stage (trained or generated)")
    for ax in axes:
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


# ---- markdown ------------------------------------------------------------------------------------------------------


def pct(m) -> str:
    if not isinstance(m, dict) or m.get("mean") is None:
        return "–"
    return f"{100 * m['mean']:.1f} [{100 * m['lo']:.0f}–{100 * m['hi']:.0f}]"


def _mean(result: dict | None, split: str, task: str, metric: str) -> float | None:
    m = ((result or {}).get("splits", {}).get(split, {}).get(task, {}) or {}).get(metric)
    return m.get("mean") if isinstance(m, dict) else None


def eval_table(evals: dict[str, dict], split: str) -> list[str]:
    ks = sorted({j for r in evals.values() for j in (1, 4, r["config"]["k"]) if 1 < j <= r["config"]["k"]})
    head = ["stage", "n", "pass@1", *[f"pass@{j}" for j in ks], "maj@k", "greedy", "format", "steps",
            "lenient", "length", "len. correct / wrong"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for stage in EVAL_ORDER:
        r = evals.get(stage)
        a = (r or {}).get("splits", {}).get(split, {}).get("all")
        if not a:
            continue
        lc, lw = a.get("length_correct"), a.get("length_wrong")
        lens = f"{lc:.0f} / {lw:.0f}" if lc is not None and lw is not None else "–"
        length = a.get("length", {}).get("mean")
        lines.append("| " + " | ".join([
            LABEL[stage], str(a["pass@1"]["n"]), pct(a["pass@1"]), *[pct(a.get(f"pass@{j}")) for j in ks],
            pct(a["maj@k"]) + f" (k={r['config']['k']})", pct(a.get("greedy")), pct(a.get("format")),
            pct(a.get("steps")), pct(a.get("lenient")), "–" if length is None else f"{length:.0f}", lens]) + " |")
    return lines


def per_task_table(evals: dict[str, dict], split: str) -> list[str]:
    stages = [s for s in EVAL_ORDER if s in evals and split in evals[s].get("splits", {})]
    tasks = list(dict.fromkeys(t for s in stages for t in evals[s]["splits"][split] if t != "all"))
    if not tasks:
        return []
    lines = ["| task | " + " | ".join(LABEL[s] for s in stages) + " |", "|" + "---|" * (len(stages) + 1)]
    for t in tasks:
        cells = []
        for s in stages:
            p1, g = _mean(evals[s], split, t, "pass@1"), _mean(evals[s], split, t, "greedy")
            cells.append("–" if p1 is None else f"{100 * p1:.1f}" + ("" if g is None else f" / {100 * g:.0f}"))
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return lines


def _steps(z: float | None, r: float | None) -> str:
    """R1's readability in this setting: the tags are near 100% for every stage, so the share of samples whose
    checkable steps all hold is what shows whether the cold start made the reasoning cleaner."""
    return "" if None in (z, r) else f"; step-consistent samples {100 * z:.1f} → {100 * r:.1f}"


def goals(evals: dict[str, dict], stage_rec: dict[str, dict | None] | None = None) -> list[str]:
    """Issue 4's goals at cpu-tiny, checked on the test split's pooled pass@1, whatever they show. `stage_rec`
    (stage.json by stage) adds the two student arms' CPU seconds: the RL-only arm should cost what distilling did."""
    def p(stage, metric="pass@1"):
        return _mean(evals.get(stage), "test", "all", metric)

    out = []

    def goal(text, ok, detail):
        mark = "—  not measured" if ok is None else ("**met**" if ok else "**not met**")
        out.append(f"- {text}: {mark} ({detail})")

    b, z = p("pretrain"), p("zero")
    goal("R1-Zero raises held-out pass@1 by ≥ 20 points over the base",
         None if None in (b, z) else (z - b) >= 0.20,
         "missing stage" if None in (b, z) else f"base {100 * b:.1f} → R1-Zero {100 * z:.1f}, "
         f"{100 * (z - b):+.1f} points" + _overlap(evals, "pretrain", "zero"))
    bk, zk = _passk(evals.get("pretrain")), _passk(evals.get("zero"))
    if bk and zk:
        out.append(f"  - pass@{bk[0]}: base {100 * bk[1]:.1f} → R1-Zero {100 * zk[1]:.1f}. If pass@k rises about as "
                   "much as pass@1, RL taught new solutions; if pass@k stays while pass@1 rises, RL sharpened the "
                   "distribution onto answers the base could already sample.")
    r, rf, zf = p("rl"), p("rl", "format"), p("zero", "format")
    # format with two decimals: near 100% one decimal shows 99.9 → 99.9 for a difference the check counts
    goal("R1 ≥ R1-Zero on pass@1, with a higher format rate",
         None if None in (r, z, rf, zf) else (r >= z and rf > zf),
         "missing stage" if None in (r, z, rf, zf) else f"pass@1 {100 * z:.1f} → {100 * r:.1f}; "
         f"format {100 * zf:.2f} → {100 * rf:.2f}" + _steps(p("zero", "steps"), p("rl", "steps"))
         + _overlap(evals, "zero", "rl"))
    s, srl = p("distill"), p("student_rl")
    goal("the distilled student reaches ≥ 90% of the teacher's pass@1",
         None if None in (s, r) else (r > 0 and s >= 0.9 * r),
         "missing stage" if None in (s, r) else f"student {100 * s:.1f} vs teacher {100 * r:.1f}"
         + (f" = {100 * s / r:.0f}%" if r else ""))
    goal("the distilled student beats the same student trained by RL alone",
         None if None in (s, srl) else s > srl,
         "missing stage" if None in (s, srl) else f"distilled {100 * s:.1f} vs RL-only {100 * srl:.1f}"
         + _compute(stage_rec or {}, "distill", "student_rl") + _overlap(evals, "distill", "student_rl"))
    return out


def _compute(stage_rec: dict, a: str, b: str) -> str:
    """The compute of two arms, from their stage.json CPU seconds, so 'at similar compute' can be checked."""
    ca, cb = ((stage_rec.get(x) or {}).get("cpu_seconds") for x in (a, b))
    return "" if None in (ca, cb) else f"; CPU seconds {ca:.0f} vs {cb:.0f}"


def _overlap(evals: dict, a: str, b: str) -> str:
    """A warning when two stages' 95% pass@1 intervals overlap: then the comparison is within the noise."""
    ma = ((evals.get(a) or {}).get("splits", {}).get("test", {}).get("all") or {}).get("pass@1")
    mb = ((evals.get(b) or {}).get("splits", {}).get("test", {}).get("all") or {}).get("pass@1")
    if not ma or not mb:
        return ""
    return "; the 95% intervals overlap, so this is within the noise" if ma["lo"] <= mb["hi"] and mb["lo"] <= ma["hi"] \
        else ""


def _passk(result: dict | None) -> tuple[int, float] | None:
    if not result:
        return None
    k = result["config"]["k"]
    v = _mean(result, "test", "all", f"pass@{k}")
    return None if v is None else (k, v)


def _fmt_rss(b) -> str:
    return "–" if not b else f"{b / 2**30:.2f} GiB"


def _fmt_tokens(n) -> str:
    if not n:
        return "–"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def write_report(run_dir: str | Path) -> Path:
    """Write RUN/report.md and RUN/plots/*.png from whatever the run directory holds. Returns report.md's path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run directory; run `nanoseek speedrun --out {run}` first")
    plots = run / "plots"
    plots.mkdir(exist_ok=True)
    present = {d: (run / d).is_dir() for d, _, _ in STAGES}
    stage_rec = {d: read_json(run / d / "stage.json") for d, _, _ in STAGES}
    evals = {s: r for s in EVAL_ORDER if (r := read_json(run / "eval" / f"{s}.json"))}
    metrics = {d: read_jsonl(run / d / "metrics.jsonl") for d, _, _ in STAGES}
    speed = read_json(run / "speedrun.json") or {}

    md = [f"# nanoseek report: `{run.name}`", ""]
    preset = speed.get("preset")
    md.append(f"Run directory `{run}`" + (f", preset `{preset}`" if preset else "")
              + f". Written {time.strftime('%Y-%m-%d %H:%M')} by `nanoseek report`.")
    md.append("")
    missing = [LABEL[d] + f" (`{d}/`)" for d, _, _ in STAGES if not present[d]]
    not_eval = [LABEL[s] for s in EVAL_ORDER if present.get(s) and s not in evals]
    md.append("The pipeline: tasks → tokenizer → pretrain (base) → R1-Zero → cold-start SFT → R1 → distillation "
              "into a small dense student, with the same student trained by RL alone as the comparison arm.")
    md.append("")
    if missing:
        md.append(f"**Missing stages** (no output directory): {', '.join(missing)}.")
    else:
        md.append("All stages are present.")
    if not_eval:
        md.append(f"Present but not evaluated (no `eval/<stage>.json`): {', '.join(not_eval)}.")
    md.append("")

    # ---- stages: what each cost
    md += ["## Stages", "", "Wall-clock seconds, and CPU seconds of the stage's process (user + system: what it cost "
           "even when other work shared the machine).", "",
           "| stage | directory | status | seconds | CPU s | tokens | peak RSS | key figure |",
           "|---|---|---|---|---|---|---|---|"]
    costs = {}
    rows = [("tasks", "tasks", "the task splits (train / val / test / OOD)", read_json(run / "tasks" / "stage.json"),
             (run / "tasks").is_dir())]
    rows += [(d, label, what, stage_rec[d], present[d]) for d, label, what in STAGES]
    rows += [("eval", "eval", "`nanoseek eval` of every model", speed.get("stages", {}).get("eval"),
              (run / "eval").is_dir())]
    for d, label, what, rec, here in rows:
        rec = rec or {}
        status = "done" if rec else ("present" if here else "missing")
        md.append(f"| {label} — {what} | `{d}/` | {status} | "
                  f"{'–' if rec.get('seconds') is None else format(rec['seconds'], '.1f')} | "
                  f"{'–' if rec.get('cpu_seconds') is None else format(rec['cpu_seconds'], '.0f')} | "
                  f"{_fmt_tokens(rec.get('tokens'))} | {_fmt_rss(rec.get('peak_rss'))} | {rec.get('figure') or '–'} |")
        if rec:
            costs[label] = rec
    total = sum(r.get("seconds") or 0 for r in costs.values())
    wall = speed.get("wall_seconds") or total  # stages that ran side by side (speedrun.jobs > 1) overlap
    line = f"Total wall-clock: {wall:.0f} s ({wall / 60:.1f} min)" if wall else ""
    if wall and abs(wall - total) > 1:
        line += f"; the stages' own seconds add up to {total:.0f} s (some ran side by side)"
    if speed.get("peak_rss_together"):
        line += f"; peak RSS of the stages running at once, summed: {_fmt_rss(speed['peak_rss_together'])}"
    md += ["", line + "." if line else "", ""]
    if plot_stage_costs(costs, plots / "stages.png"):
        md += ["![wall-clock and tokens per stage](plots/stages.png)", ""]

    # ---- pretraining
    md += ["## Pretraining (the base model)", ""]
    pre = metrics["pretrain"]
    if pre:
        xs, ys = series(pre, "loss")
        vx, vy = series(pre, "val_loss")
        line = f"{len(pre)} logged steps; train loss {ys[0]:.3f} → {ys[-1]:.3f}" if ys else f"{len(pre)} records"
        if vy:
            line += f"; val loss {vy[-1]:.3f} at step {vx[-1]}"
        md += [line + ".", ""]
        if plot_pretrain(pre, plots / "pretrain_loss.png"):
            md += ["![pretraining loss](plots/pretrain_loss.png)", ""]
        steps, names, rows = layer_loads(pre)
        if rows:
            matrix = [list(col) for col in zip(*rows)]  # [layer][step]
            if plot_heatmap(matrix, plots / "expert_load_steps.png", "max/mean expert load per MoE layer over "
                            "pretraining (1.0 = perfectly balanced)", "step", "MoE layer", xticks=steps,
                            ylabels=names):
                k = max(1, len(rows) // 10)  # average the first and last tenth: single steps are noisy
                first = [sum(r[i] for r in rows[:k]) / k for i in range(len(names))]
                last = [sum(r[i] for r in rows[-k:]) / k for i in range(len(names))]
                md += ["Auxiliary-loss-free balancing at work: each row is one MoE layer, the colour its most "
                       "loaded expert's load relative to the mean (1 = balanced). Max/mean, first → last tenth of "
                       "training: " + ", ".join(f"{n} {a:.2f} → {b:.2f}" for n, a, b in zip(names, first, last))
                       + ".", "",
                       "![expert load over pretraining](plots/expert_load_steps.png)", ""]
    else:
        md += ["No `pretrain/metrics.jsonl`: the pretraining stage is missing or wrote no metrics.", ""]
    loads = [(s, evals[s]) for s in EVAL_ORDER if s in evals and evals[s].get("expert_load")]
    if loads and plot_expert_loads(loads, plots / "expert_load_eval.png"):
        worst = ", ".join(f"{LABEL[s]} {max(max(r) / max(sum(r) / len(r), 1e-9) for r in e['expert_load']):.2f}"
                          for s, e in loads)
        md += ["Expert load of each MoE model while re-reading its own eval answers: tokens per routed expert "
               f"divided by the layer's mean (1 = balanced). Worst max/mean: {worst}.", "",
               "![expert load per stage](plots/expert_load_eval.png)", ""]

    # ---- RL
    md += ["## Reinforcement learning", ""]
    rl_runs = {s: metrics[s] for s in RL_STAGES if metrics[s]}
    if rl_runs:
        for s, recs in rl_runs.items():
            parts = []
            for what in ("reward", "accuracy", "length", "kl"):
                _, ys = series(recs, what)
                if ys:
                    parts.append(f"{what} {ys[0]:.3g} → {ys[-1]:.3g}")
            md.append(f"- **{LABEL[s]}** ({len(recs)} steps): " + ("; ".join(parts) or "no known metrics"))
        md += ["", "R1-Zero's signature is accuracy and response length rising together; KL shows how far each "
               "policy moved from its reference.", ""]
        if plot_rl(rl_runs, plots / "rl.png"):
            md += ["![RL curves](plots/rl.png)", ""]
    else:
        md += ["No RL metrics yet (`zero/`, `rl/`, `student_rl/` missing or empty).", ""]

    # ---- eval
    md += ["## Evaluation", ""]
    if evals:
        cfg = next(iter(evals.values()))["config"]
        md += [f"k = {cfg['k']} samples per question at temperature {cfg['temperature']}, top-p {cfg['top_p']}, "
               f"at most {cfg['max_tokens']} tokens; pass@1 is averaged over the k samples, pass@j is the unbiased "
               "estimator of Chen et al. (2021), maj@k the majority answer, greedy one temperature-0 sample. "
               "Accuracy is strict (the answer inside `<answer>` after `</think>`); lenient takes the last number "
               "anywhere. Format: the exact `<think>…</think><answer>…</answer>` shape; steps: samples in that "
               "format whose checkable steps (every integer `a op b = c`, every sorting pick) all hold — the "
               "readability the cold start filters for. Percentages with 95% bootstrap intervals over questions.", ""]
        splits = list(dict.fromkeys(sp for r in evals.values() for sp in r.get("splits", {})))
        for sp in splits:
            title = {"test": "Held-out test split", "ood": "Out-of-distribution split (harder difficulty)"}.get(sp, sp)
            md += [f"### {title}", ""] + eval_table(evals, sp) + [""]
            per = per_task_table(evals, sp)
            if per:
                md += [f"Per task, {sp} split: pass@1 / greedy (%).", ""] + per + [""]
        missing_eval = [LABEL[s] for s in EVAL_ORDER if s not in evals]
        if missing_eval:
            md += [f"Not evaluated: {', '.join(missing_eval)}.", ""]
        ex = next((evals[s].get("examples") for s in reversed(EVAL_ORDER) if s in evals and evals[s].get("examples")),
                  None)
        if ex:
            md += ["One sampled answer of the last evaluated stage:", "", "```",
                   f"Q: {ex[0]['question']}   (expected {ex[0]['answer']})", ex[0]["completion"][:600], "```", ""]
    else:
        md += ["No eval results (`eval/<stage>.json`) yet.", ""]

    # ---- goals
    md += ["## Goals", "", "Issue 4's goals, set for the cpu-tiny preset" + (f" (this run: {preset})" if preset and
           Path(str(preset)).stem != "cpu-tiny" else "") + "; checked on the held-out test split, whatever they show.",
           ""] + goals(evals, stage_rec) + [""]
    md += ["## Files", "", f"Plots in `{plots.name}/`; per-step metrics in each stage's `metrics.jsonl`; eval "
           "results in `eval/<stage>.json`; stage logs in `logs/`.", ""]
    out = run / "report.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(md))
    tmp.replace(out)
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the run directory, e.g. runs/cpu-tiny")


def run(args) -> int:
    out = write_report(args.run_dir)
    print(f"report: {out}")
    return 0
