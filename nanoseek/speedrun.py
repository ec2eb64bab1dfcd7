"""`nanoseek speedrun`: the whole pipeline in one command, resumable stage by stage.

    nanoseek speedrun                                  # cpu-tiny into runs/cpu-tiny (what `bash run.sh` does)
    nanoseek speedrun --preset smoke --out /tmp/smoke  # every stage in seconds (CI)
    nanoseek speedrun --out runs/a --until pretrain    # stop after a stage
    nanoseek speedrun --out runs/a --redo rl           # rerun rl and everything after it

    tasks → tokenizer → pretrain → zero (R1-Zero) → sft → rl (R1) → student_base → distill → student_rl
          → eval (every model) → report

Each stage writes `RUN/<stage>/`; when it finishes, the speedrun writes `RUN/<stage>/stage.json` (seconds,
tokens, peak RSS, key figure), the completion marker: a stage with one is skipped on the next run. A stage that
crashed (its directory but no marker) is resumed with `--resume` from its newest complete checkpoint when its
command has that flag (pretraining and RL do), and otherwise started again from an empty directory.

Why subprocesses: each stage runs as `python -m nanoseek <command> …`, the very command a person would type, so
the speedrun proves each stage's CLI and never depends on state a previous stage left in memory. A stage's peak RSS
is its own process's (os.wait4 gives it per child), its memory is returned to the OS when it ends (a 2-core, 8 GiB
budget has no room for a pretraining's allocator cache lingering through RL), and a crash in one stage leaves the
orchestrator alive to say which stage failed and where its log is. The price, about a second of Python + torch
import per stage, is under 2% of the cpu-tiny budget.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.config import ConfigError, load_preset


@dataclass
class SpeedrunConfig:
    """The [speedrun] section."""

    evaluate: list[str] = field(default_factory=lambda: ["pretrain", "zero", "sft", "rl", "student_base",
                                                         "distill", "student_rl"])  # stages whose model is evaluated
    student_rl: bool = True  # run the RL-only student arm (the paper's "distillation beats RL on a small model")
    budget_minutes: float = 20.0  # printed against the total; exceeding it is reported, not fatal
    budget_rss_gib: float = 8.0  # the same for the peak RSS of the stages running at once, summed
    jobs: int = 1  # stages run at once, as `make -j`: each also needs its section's `threads` of the free cores
    pretrain_ranks: int = 1  # >1: the base's pretraining runs under torchrun with this many processes (DDP), which
    # share pretrain.threads (on 2 cores, 2 ranks x 1 thread step 1.27x faster than 1 process x 2 threads)

    def __post_init__(self):
        unknown = [s for s in self.evaluate if s not in MODEL_STAGES]
        if unknown:
            raise ConfigError(f"speedrun.evaluate: unknown stage(s) {unknown}; choose from {', '.join(MODEL_STAGES)}")
        if self.pretrain_ranks < 1:
            raise ConfigError(f"speedrun.pretrain_ranks: must be >= 1, got {self.pretrain_ranks}; 1 is one process")
        if self.jobs < 1:
            raise ConfigError(f"speedrun.jobs: must be >= 1, got {self.jobs}; 1 runs the stages one after another")


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: a `nanoseek` subcommand run as a subprocess (or, for `command=None`, a step the
    speedrun does itself). `args` may use {run} (the run directory) and {model:<stage>} (that stage's checkpoint)."""

    name: str  # its directory under the run dir
    command: str | None
    args: tuple[str, ...] = ()
    model: str | None = None  # the checkpoint it leaves, relative to the run dir (None: no model)
    figure: Callable[[Path], str] | None = None  # the key figure of its progress line, read from its outputs
    after: tuple[str, ...] = ()  # stages whose outputs it reads: it starts once they are done
    threads: Callable | None = None  # preset -> the CPU threads it runs with (0: all cores); None: 1
    ranks: Callable | None = None  # preset -> torchrun processes (None: 1, plain `python -m nanoseek`)


def _last(path: Path, *keys: str) -> dict:
    """The last metrics.jsonl record that has all of `keys` (or {})."""
    from nanoseek.report import read_jsonl

    return next((r for r in reversed(read_jsonl(path / "metrics.jsonl")) if all(k in r for k in keys)), {})


def _fig_tokenizer(d: Path) -> str:
    from nanoseek.tokenizer import load_tokenizer

    return f"vocab {load_tokenizer(d).vocab_size}"


def _fig_train(d: Path) -> str:
    r = _last(d, "loss")
    v = _last(d, "val_loss")
    s = f"loss {r['loss']:.3f}" if r else "no metrics"
    return s + (f", val {v['val_loss']:.3f}" if v else "")


def _fig_sft(d: Path) -> str:
    """Rejection sampling's yield (traces.json, written by sft and distill) and the fine-tune's last loss."""
    t = read_json(d / "traces.json") or {}
    s = f"kept {t.get('kept', 0)}/{t.get('sampled', 0)} traces ({t.get('correct', 0)} correct)" if t else ""
    r = _last(d, "loss")
    s += (", " if s else "") + (f"loss {r['loss']:.3f}" if r else "no SFT steps (model passed through unchanged)")
    return s


def _fig_rl(d: Path) -> str:
    from nanoseek.report import KEYS

    r = _last(d)
    parts = []
    for what in ("reward", "accuracy", "length"):
        k = next((k for k in KEYS[what] if isinstance(r.get(k), (int, float))), None)
        if k:
            parts.append(f"{what} {r[k]:.3g}")
    return ", ".join(parts) or "no metrics"


def _threads(section: str, field: str = "threads") -> Callable:
    return lambda preset: getattr(preset.section(section), field)


def _student_threads(preset) -> int:
    cfg = preset.section("pretrain")
    return cfg.student_threads or cfg.threads


STAGES: list[Stage] = [
    Stage("tasks", None, figure=lambda d: (d / "figure.txt").read_text()),
    Stage("tokenizer", "tokenizer", ("--out", "{run}/tokenizer"), figure=_fig_tokenizer, after=("tasks",)),
    Stage("pretrain", "pretrain", ("--out", "{run}/pretrain", "--tokenizer", "{run}/tokenizer"), model="pretrain/model",
          figure=_fig_train, after=("tokenizer",), threads=_threads("pretrain"),
          ranks=_threads("speedrun", "pretrain_ranks")),
    Stage("zero", "rl", ("--zero", "--model", "{model:pretrain}", "--out", "{run}/zero"), model="zero/model",
          figure=_fig_rl, after=("pretrain",), threads=_threads("rl")),
    Stage("sft", "sft", ("--model", "{model:pretrain}", "--traces-from", "{model:zero}", "--out", "{run}/sft"),
          model="sft/model", figure=_fig_sft, after=("pretrain", "zero"), threads=_threads("sft")),
    Stage("rl", "rl", ("--model", "{model:sft}", "--out", "{run}/rl"), model="rl/model", figure=_fig_rl,
          after=("sft",), threads=_threads("rl")),
    Stage("student_base", "pretrain", ("--student", "--out", "{run}/student_base", "--tokenizer", "{run}/tokenizer"),
          model="student_base/model", figure=_fig_train, after=("tokenizer",), threads=_student_threads),
    Stage("distill", "distill", ("--teacher", "{model:rl}", "--student", "{model:student_base}", "--out",
                                 "{run}/distill"), model="distill/model", figure=_fig_sft,
          after=("rl", "student_base"), threads=_threads("distill")),
    Stage("student_rl", "rl", ("--student", "--model", "{model:student_base}", "--out", "{run}/student_rl"),
          model="student_rl/model", figure=_fig_rl, after=("student_base",), threads=_threads("rl")),
]
BY_NAME = {s.name: s for s in STAGES}
MODEL_STAGES = [s.name for s in STAGES if s.model]
ORDER = [s.name for s in STAGES] + ["eval", "report"]


# ---- bookkeeping -------------------------------------------------------------------------------------------------


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)  # atomic: the marker exists completely or not at all


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def model_dir(run: Path, stage: str) -> Path:
    return run / BY_NAME[stage].model


def expand(arg: str, run: Path) -> str:
    if arg.startswith("{model:"):
        return str(model_dir(run, arg[len("{model:"):-1]))
    return arg.replace("{run}", str(run))


def has_flag(command: str, flag: str) -> bool:
    """Does `nanoseek <command>` accept `flag`? Asked of the command's own argument parser."""
    from nanoseek.cli import COMMANDS

    p = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[command][0]).add_args(p)
    return any(flag in a.option_strings for a in p._actions)


def check_available(stages: list[Stage]) -> None:
    """Fail before spending any time if a stage's command is not implemented yet (naming the stage and file)."""
    from nanoseek.cli import COMMANDS

    missing = []
    for s in stages:
        if s.command is None:
            continue
        mod = COMMANDS[s.command][0]
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if not (e.name and mod.startswith(e.name)):
                raise
            missing.append(f"{s.name} (`nanoseek {s.command}`: {mod.replace('.', '/')}.py does not exist yet)")
            continue
        if not (hasattr(m, "add_args") and hasattr(m, "run")):
            missing.append(f"{s.name} (`nanoseek {s.command}`: {mod} has no add_args/run yet)")
            continue
        flags = [a for a in s.args if a.startswith("--")]
        lacking = [f for f in flags if not has_flag(s.command, f)]
        if lacking:
            missing.append(f"{s.name} (`nanoseek {s.command}` does not accept {', '.join(lacking)} yet)")
    if missing:
        raise ConfigError("the pipeline cannot run: missing stage(s): " + "; ".join(missing)
                          + ". Run the stages before them with --until, or wait for these to land.")


# ---- running one stage -------------------------------------------------------------------------------------------


@dataclass
class Child:
    """One `python -m nanoseek argv` running in the background, its output appended to `log`."""

    argv: list[str]
    log: Path
    ranks: int = 1  # >1: under torchrun, this many processes on this machine
    proc: subprocess.Popen | None = None
    t0: float = 0.0
    started: float = 0.0  # Unix time

    def start(self) -> Child:
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        self.t0, self.started = time.perf_counter(), time.time()
        with open(self.log, "a") as f:
            f.write(f"\n$ {self.shown()}\n")
            f.flush()
            self.proc = subprocess.Popen(self.command(), stdout=f, stderr=subprocess.STDOUT, env=env)
        return self

    def command(self) -> list[str]:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.ranks}"]
        return [sys.executable, *(launcher if self.ranks > 1 else []), "-m", "nanoseek", *self.argv]

    def shown(self) -> str:
        """The command as a person would type it."""
        launcher = f"torchrun --standalone --nproc_per_node={self.ranks} -m " if self.ranks > 1 else ""
        return launcher + "nanoseek " + " ".join(self.argv)

    def poll(self, block: bool = False) -> tuple[int, float, int, float] | None:
        """None while it runs; then (exit code, wall seconds, peak RSS in bytes, CPU seconds) of this child alone.
        wait4, not Popen.wait: it returns the child's own rusage. CPU seconds say what the stage costs when the
        machine is shared (wall-clock does not)."""
        pid, status, usage = os.wait4(self.proc.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return None
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        cpu = usage.ru_utime + usage.ru_stime
        return self.proc.returncode, time.perf_counter() - self.t0, usage.ru_maxrss * 1024, cpu  # ru_maxrss: KiB

    def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            self.poll(block=True)


def tail(log: Path, n: int = 25) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return ""


def stage_tokens(d: Path) -> int | None:
    """Tokens a stage trained on (the loop's cumulative `tokens`) plus tokens it generated, if it logged them."""
    from nanoseek.report import read_jsonl

    recs = read_jsonl(d / "metrics.jsonl")
    trained = next((r["tokens"] for r in reversed(recs) if isinstance(r.get("tokens"), int)), 0)
    # RL logs samples per step and their mean length: what its rollouts generated.
    generated = sum(r["samples"] * r["length"] for r in recs
                    if isinstance(r.get("samples"), int) and isinstance(r.get("length"), (int, float)))
    return int(trained + generated) or None


def run_tasks_stage(run: Path, preset) -> str:
    """The task splits the whole run uses, written down (and checked) before any training."""
    from nanoseek import data

    cfg = preset.section("data")
    sp = data.splits(cfg)
    d = run / "tasks"
    d.mkdir(parents=True, exist_ok=True)
    per = {s: {t: sum(e["task"] == t for e in es) for t in cfg.tasks} for s, es in sp.items()}
    examples = {t: next(({"question": e["question"], "answer": e["answer"]} for e in sp["train"] if e["task"] == t),
                        None) for t in cfg.tasks}
    write_json(d / "splits.json", {"tasks": cfg.tasks, "difficulty": cfg.difficulty,
                                   "ood_difficulty": cfg.ood_difficulty, "per_split": per, "examples": examples})
    fig = f"{len(cfg.tasks)} tasks, " + " / ".join(f"{len(es)} {s}" for s, es in sp.items())
    (d / "figure.txt").write_text(fig)
    return fig


@dataclass
class Job:
    """What the scheduler runs: a stage, one model's eval (`eval:<stage>`), or a quick step done in-process
    (`inline`: the task splits, the eval summary, the report)."""

    name: str
    after: tuple[str, ...]  # jobs that must be done first
    threads: int  # cores it holds while it runs
    ranks: int = 1  # torchrun processes
    inline: Callable[[], dict | None] | None = None
    resumed: bool = False


def peak_together(intervals: list[tuple[float, float, int]]) -> int:
    """The largest sum of peak RSS over children that ran at the same time: (start, end, peak) each. An upper
    bound of the machine's peak (each child's own peak counts for its whole life)."""
    return max((sum(r for s, e, r in intervals if s <= t < e) for t, _, _ in intervals), default=0)


class Speedrun:
    def __init__(self, run: Path, preset_name: str, sets: list[str], until: str | None = None,
                 redo: str | None = None, quiet: bool = False):
        self.run, self.preset_name, self.sets = run, preset_name, sets
        self.preset = load_preset(preset_name, sets)
        self.cfg: SpeedrunConfig = self.preset.section("speedrun")
        self.until, self.redo, self.quiet = until, redo, quiet
        self.logs = run / "logs"
        self.state_path = run / "speedrun.json"
        self.eval_costs: dict[str, tuple[float, int, float]] = {}  # this session's evals: seconds, RSS, CPU s

    def say(self, text: str, end: str = "\n") -> None:
        if not self.quiet:
            print(text, end=end, flush=True)

    def stages(self) -> list[str]:
        names = [n for n in ORDER if n != "student_rl" or self.cfg.student_rl]
        if self.until:
            if self.until not in names:
                raise ConfigError(f"--until {self.until}: that stage is switched off in this preset "
                                  "(speedrun.student_rl = false); choose another stage")
            names = names[: names.index(self.until) + 1]
        return names

    def check_same_config(self) -> dict:
        """The run's recorded settings. Other settings are accepted only with --redo: the stages from there on are
        made with the new ones (each stage.json records its own command); without --redo they would mix silently."""
        state = read_json(self.state_path) or {}
        old = (state.get("preset"), state.get("sets", []))
        if state and old != (self.preset_name, self.sets):
            if self.redo is None:
                raise ConfigError(f"{self.run} was started with --preset {old[0]} "
                                  f"{' '.join('--set ' + s for s in old[1])}; continuing it with other settings would "
                                  "mix two runs. Use the same settings, add --redo STAGE to remake that stage and "
                                  "all after it with the new ones, or choose a new --out")
            state.setdefault("settings_history", []).append({"preset": old[0], "sets": old[1],
                                                             "until_redo_of": self.redo})
        return state

    def invalidate_from(self, name: str) -> None:
        """--redo: delete the outputs of `name` and every stage after it, so they are redone from scratch."""
        names = ORDER[ORDER.index(name):]
        for n in names:
            if n in BY_NAME:  # the whole directory: its checkpoints would otherwise be resumed, not redone
                shutil.rmtree(self.run / n, ignore_errors=True)
                (self.run / "eval" / f"{n}.json").unlink(missing_ok=True)  # its model changes; earlier evals stay
        if name == "eval":
            shutil.rmtree(self.run / "eval", ignore_errors=True)

    def execute(self) -> int:
        self.run.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        state = self.check_same_config()
        if self.redo:
            self.invalidate_from(self.redo)
        names = self.stages()
        check_available([BY_NAME[n] for n in names if n in BY_NAME])
        state.update(preset=self.preset_name, sets=self.sets, preset_path=str(self.preset.path))
        state.setdefault("stages", {})
        self.state, self.names = state, names
        cores = len(os.sched_getaffinity(0))
        jobs = self.plan(names, cores)
        self.say(f"speedrun: preset {self.preset_name} -> {self.run} (logs in {self.logs}/)"
                 + (f"; up to {self.cfg.jobs} stages at once on {cores} cores, a line as each ends"
                    if self.cfg.jobs > 1 else ""))
        done = set()
        for job in jobs:  # finished in an earlier session: said once, up front, in pipeline order
            rec = self.earlier(job.name)
            if rec is not None:
                done.add(job.name)
                if job.name in BY_NAME:
                    state["stages"][job.name] = rec
                    self.say(f"{self.prefix(job.name)} done earlier ({rec.get('seconds') or 0:.1f}s)  "
                             f"{rec.get('figure', '')}")
        pending = [j for j in jobs if j.name not in done]
        running: dict[str, tuple[Job, Child]] = {}
        failed: list[str] = []
        t_start = time.perf_counter()
        self.intervals: list[tuple[float, float, int]] = []  # (start, end, peak RSS) of each child this session
        self.wall_before = state.get("wall_seconds", 0.0)
        self.t_start = t_start
        try:
            while pending or running:
                started = True
                while started and not failed:  # start every job whose inputs are done and that fits, in priority
                    started = False
                    for job in pending:
                        if not all(d in done for d in job.after):
                            continue
                        used = sum(j.threads for j, _ in running.values())
                        full = len(running) >= self.cfg.jobs or used + job.threads > cores
                        if running and full and not job.inline:
                            continue
                        pending.remove(job)
                        started = True
                        if job.inline:  # quick steps the speedrun does itself
                            rec = job.inline()
                            if rec is None:
                                failed.append(job.name)
                            else:
                                done.add(job.name)
                        else:
                            running[job.name] = (job, self.start(job).start())
                        break
                if not running:
                    break
                time.sleep(0.1)
                for name, (job, child) in list(running.items()):
                    result = child.poll()
                    if result is None:
                        continue
                    del running[name]
                    end = time.perf_counter() - t_start
                    self.intervals.append((end - result[1], end, result[2]))
                    if self.finish(job, child, *result):
                        done.add(name)
                    else:
                        failed.append(name)
                        if running:
                            self.say(f"speedrun: waiting for the stages still running ({', '.join(running)})")
        except KeyboardInterrupt:
            for _, child in running.values():
                child.stop()
            raise
        finally:
            state["wall_seconds"] = self.wall_before + time.perf_counter() - t_start
            state["peak_rss_together"] = max(state.get("peak_rss_together") or 0, peak_together(self.intervals))
            write_json(self.state_path, state)
        if failed:
            return 1
        total = sum((r or {}).get("seconds") or 0 for r in state["stages"].values())
        peak = max(((r or {}).get("peak_rss") or 0 for r in state["stages"].values()), default=0)
        peak = max(peak, state["peak_rss_together"])
        state["seconds"] = total
        write_json(self.state_path, state)
        wall = state["wall_seconds"]
        self.say(f"speedrun: done in {time.perf_counter() - t_start:.0f}s this session; the whole run "
                 f"{wall:.0f}s = {wall / 60:.1f} min (budget {self.cfg.budget_minutes:g}; the stages' own seconds "
                 f"add up to {total:.0f}), peak RSS {peak / 2**30:.2f} GiB (budget {self.cfg.budget_rss_gib:g}); "
                 f"report: {self.run / 'report.md'}")
        if wall > 60 * self.cfg.budget_minutes or peak > self.cfg.budget_rss_gib * 2**30:
            self.say("speedrun: OVER BUDGET (see the stage table in report.md)")
        return 0

    # ---- the plan --------------------------------------------------------------------------------------------
    def prefix(self, name: str) -> str:
        return f"[{self.names.index(name) + 1:2d}/{len(self.names)}] {name:<12s}"

    def plan(self, names: list[str], cores: int) -> list[Job]:
        """Every job of this run in priority order: the stages in pipeline order (the teacher's chain is the
        longest path, so it goes first), then each model's eval, then the eval summary and the report."""
        def need(stage: Stage) -> int:
            t = stage.threads(self.preset) if stage.threads else 1
            return min(t or cores, cores)  # 0 threads: torch's default, every core

        jobs = []
        for n in names:
            if n in BY_NAME:
                s = BY_NAME[n]
                jobs.append(Job(n, tuple(a for a in s.after if a in names), need(s),
                                ranks=s.ranks(self.preset) if s.ranks else 1,
                                inline=(lambda: self.tasks_stage()) if s.command is None else None))
        if "eval" in names:
            evals = [s for s in self.cfg.evaluate if s in names]
            t = min(self.preset.section("engine").threads or cores, cores)
            jobs += [Job(f"eval:{s}", (s,), t) for s in evals]
            jobs.append(Job("eval", tuple(f"eval:{s}" for s in evals), 0, inline=self.eval_summary))
        if "report" in names:
            jobs.append(Job("report", tuple(j.name for j in jobs), 0, inline=self.report_stage))
        return jobs

    def earlier(self, name: str) -> dict | None:
        """The record of a job finished before this call (its completion marker), or None."""
        if name.startswith("eval:"):
            return read_json(self.run / "eval" / f"{name[5:]}.json")
        if name in BY_NAME:
            return read_json(self.run / name / "stage.json")
        return None  # the eval summary and the report are remade every time

    # ---- starting and finishing a job ------------------------------------------------------------------------
    def start(self, job: Job) -> Child:
        if job.name.startswith("eval:"):
            s = job.name[5:]
            (self.run / "eval").mkdir(exist_ok=True)
            argv = ["eval", "--model", str(model_dir(self.run, s)), "--out", str(self.run / "eval" / f"{s}.json"),
                    "--preset", self.preset_name]
            for x in self.sets:
                argv += ["--set", x]
            return Child(argv, self.logs / f"eval_{s}.log")
        stage = BY_NAME[job.name]
        d = self.run / stage.name
        argv = [stage.command, *[expand(a, self.run) for a in stage.args], "--preset", self.preset_name]
        for s in self.sets:
            argv += ["--set", s]
        job.resumed = False
        if d.exists():
            from nanoseek.train.loop import complete_checkpoints

            if has_flag(stage.command, "--resume") and complete_checkpoints(d):
                argv.append("--resume")
                job.resumed = True
            else:  # nothing to resume from (crashed before its first checkpoint, or no --resume): start clean
                shutil.rmtree(d)
        return Child(argv, self.logs / f"{stage.name}.log", ranks=job.ranks)

    def finish(self, job: Job, child: Child, code: int, secs: float, rss: int, cpu: float) -> bool:
        """Check what a child left, write its completion marker and its progress line; False if it failed."""
        name = job.name
        if name.startswith("eval:"):
            s = name[5:]
            result = read_json(self.run / "eval" / f"{s}.json")
            if code != 0 or result is None:
                self.say(f"{self.prefix('eval')} FAILED on {s} (exit {code})")
                self.say(tail(child.log))
                self.say(f"speedrun: eval of {s} failed; log: {child.log}; rerun to resume.")
                return False
            self.eval_costs[s] = (secs, rss, cpu)
            return True
        stage = BY_NAME[name]
        if code != 0:
            self.say(f"{self.prefix(name)} FAILED (exit {code} after {secs:.0f}s)")
            self.say(tail(child.log))
            self.say(f"speedrun: stage {name} failed; its log: {child.log}. Fix the cause and rerun the same "
                     "command: finished stages are skipped and this one resumes.")
            return False
        if stage.model and not (self.run / stage.model / "config.json").is_file():
            self.say(f"{self.prefix(name)} FAILED: exited 0 but left no checkpoint at {self.run / stage.model}")
            return False
        d = self.run / name
        try:
            fig = stage.figure(d) if stage.figure else ""
        except (OSError, ValueError, KeyError, TypeError) as e:
            fig = f"(no key figure: {e})"
        rec = {"seconds": secs, "cpu_seconds": cpu, "tokens": stage_tokens(d), "peak_rss": rss, "figure": fig,
               "resumed": job.resumed, "command": child.shown(),
               "started": child.started, "ended": child.started + secs}  # Unix times: what ran beside what
        self.record(name, rec)
        return True

    def record(self, name: str, rec: dict) -> None:
        if name in BY_NAME:
            d = self.run / name
            d.mkdir(parents=True, exist_ok=True)
            write_json(d / "stage.json", rec)
        self.state["stages"][name] = rec
        write_json(self.state_path, self.state)
        extra = [f"cpu {rec['cpu_seconds']:.0f}s" if rec.get("cpu_seconds") else "",
                 f"{rec['tokens'] / 1e6:.2f}M tok" if rec.get("tokens") else "",
                 f"peak {rec['peak_rss'] / 2**30:.2f} GiB" if rec.get("peak_rss") else ""]
        extra = ", ".join(x for x in extra if x)
        self.say(f"{self.prefix(name)} {rec['seconds']:7.1f}s  {rec['figure']}" + (f"  ({extra})" if extra else ""))

    # ---- the steps the speedrun does itself -------------------------------------------------------------------
    def tasks_stage(self) -> dict:
        t0 = time.perf_counter()
        fig = run_tasks_stage(self.run, self.preset)
        rec = {"seconds": time.perf_counter() - t0, "tokens": None, "peak_rss": None, "figure": fig}
        self.record("tasks", rec)
        return rec

    def eval_summary(self) -> dict:
        """One line for `nanoseek eval` of every model: this session's cost plus the earlier results' seconds."""
        from nanoseek.eval import headline

        secs, peak, figs, tokens, cpu_total = 0.0, 0, [], 0, 0.0
        for s in (s for s in self.cfg.evaluate if s in self.names):
            result = read_json(self.run / "eval" / f"{s}.json") or {}
            if s in self.eval_costs:
                t, rss, cpu = self.eval_costs[s]
                secs, peak, cpu_total = secs + t, max(peak, rss), cpu_total + cpu
            else:
                secs += result.get("seconds", 0.0)
            tokens += result.get("tokens_generated", 0)
            p = headline(result) if result else None
            figs.append(f"{s} {100 * p:.0f}%" if p is not None else f"{s} –")
        rec = {"seconds": secs, "cpu_seconds": cpu_total or None, "tokens": tokens or None, "peak_rss": peak or None,
               "figure": "test pass@1: " + ", ".join(figs)}
        self.record("eval", rec)
        return rec

    def report_stage(self) -> dict:
        from nanoseek.report import write_report

        t0 = time.perf_counter()
        self.state["seconds"] = sum((r or {}).get("seconds") or 0 for r in self.state["stages"].values())
        self.state["wall_seconds"] = self.wall_before + t0 - self.t_start
        self.state["peak_rss_together"] = max(self.state.get("peak_rss_together") or 0,
                                              peak_together(self.intervals))
        write_json(self.state_path, self.state)
        out = write_report(self.run)
        rec = {"seconds": time.perf_counter() - t0, "figure": str(out)}
        self.record("report", rec)
        return rec


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu-tiny", help="preset name or .toml path (default: cpu-tiny)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset field for every stage, e.g. --set rl.steps=50")
    p.add_argument("--out", default=None, help="run directory (default: runs/<preset>)")
    p.add_argument("--until", choices=ORDER, default=None, help="stop after this stage")
    p.add_argument("--redo", choices=ORDER, default=None, help="rerun this stage and every stage after it")


def run(args) -> int:
    out = Path(args.out) if args.out else Path("runs") / Path(args.preset).stem
    return Speedrun(out, args.preset, args.sets, until=args.until, redo=args.redo).execute()
