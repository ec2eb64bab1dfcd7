"""The speedrun: the smoke preset runs the whole pipeline; every stage's checkpoint loads; the report names every
stage; a rerun skips finished stages; missing stages are named, not faked."""

import json
import os
import re

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_smoke_pipeline_end_to_end(tmp_path, capsys):
    import nanoseek
    from nanoseek.report import LABEL, STAGES
    from nanoseek.speedrun import BY_NAME, MODEL_STAGES, Speedrun

    run = tmp_path / "smoke"
    # First only the cheap front, then the whole pipeline: the second call must skip what the first finished.
    assert Speedrun(run, "smoke", [], until="tokenizer").execute() == 0
    first = json.loads((run / "tokenizer" / "stage.json").read_text())
    capsys.readouterr()
    assert Speedrun(run, "smoke", []).execute() == 0
    out = capsys.readouterr().out
    assert "tokenizer    done earlier" in out and "tasks        done earlier" in out
    assert json.loads((run / "tokenizer" / "stage.json").read_text()) == first  # not rerun

    for name in MODEL_STAGES:
        model = nanoseek.load(run / BY_NAME[name].model)  # every stage's checkpoint loads
        assert model.config.vocab_size > 0, name
        rec = json.loads((run / name / "stage.json").read_text())
        assert rec["seconds"] > 0 and rec["peak_rss"] > 0, name
        ev = json.loads((run / "eval" / f"{name}.json").read_text())
        p1 = ev["splits"]["test"]["all"]["pass@1"]
        assert 0.0 <= p1["lo"] <= p1["mean"] <= p1["hi"] <= 1.0
    # The distilled and RL-only students are dense (no MoE layers); the teacher is not.
    assert nanoseek.load(run / BY_NAME["distill"].model).moe_layers() == []
    assert nanoseek.load(run / BY_NAME["rl"].model).moe_layers() != []

    report = (run / "report.md").read_text()
    for d, label, _ in STAGES:
        assert f"`{d}/`" in report and label in report, d
    assert "Missing stages" not in report
    for label in (LABEL[s] for s in MODEL_STAGES):
        assert f"| {label} |" in report  # a row in the eval table
    for png in ("pretrain_loss", "rl", "stages", "expert_load_steps", "expert_load_eval"):
        assert (run / "plots" / f"{png}.png").stat().st_size > 0, png
    student_goal = next(line for line in report.splitlines() if "trained by RL alone:" in line)
    cpu = [json.loads((run / s / "stage.json").read_text())["cpu_seconds"] for s in ("distill", "student_rl")]
    assert f"CPU seconds {cpu[0]:.0f} vs {cpu[1]:.0f}" in student_goal  # 'at similar compute' can be read off
    state = json.loads((run / "speedrun.json").read_text())
    assert set(state["stages"]) >= {"tasks", "tokenizer", *MODEL_STAGES, "eval", "report"}

    # speedrun.jobs = 2: no stage started before the stages it reads had ended; never more than two at once; the
    # evals ran beside the stages, so the run took less wall-clock than its stages' seconds added up.
    recs = {s.name: state["stages"][s.name] for s in BY_NAME.values() if s.command}
    for name, rec in recs.items():
        for dep in BY_NAME[name].after:
            if dep in recs:
                assert rec["started"] >= recs[dep]["ended"] - 0.01, (name, dep)
        at_once = sum(r["started"] <= rec["started"] < r["ended"] for r in recs.values())
        assert at_once <= 2, name
    for name in MODEL_STAGES:  # an eval reads a finished checkpoint
        assert (run / "eval" / f"{name}.json").stat().st_mtime >= recs[name]["ended"] - 0.01, name
    total = sum(r["seconds"] for r in state["stages"].values())
    assert 0 < state["wall_seconds"] < total
    m = re.search(r"Total wall-clock: (\d+) s .*the stages' own seconds add up to (\d+) s", report)
    assert m and int(m[1]) <= state["wall_seconds"] + 1 and int(m[1]) < int(m[2])  # the report: when it was written

    # A stage without its completion marker (as after a crash) resumes from its newest complete checkpoint;
    # the finished stages around it are skipped.
    (run / "pretrain" / "stage.json").unlink()
    capsys.readouterr()
    assert Speedrun(run, "smoke", [], until="zero").execute() == 0
    out = capsys.readouterr().out
    assert json.loads((run / "pretrain" / "stage.json").read_text())["resumed"] is True
    assert "zero         done earlier" in out
    nanoseek.load(run / BY_NAME["pretrain"].model)

    # A rerun with other settings would mix two runs: refused, naming the fix.
    from nanoseek.config import ConfigError

    with pytest.raises(ConfigError, match="--redo STAGE"):
        Speedrun(run, "smoke", ["eval.k=2"]).execute()
    # ... unless the stages they affect are redone: here only the evals (and the report).
    assert Speedrun(run, "smoke", ["eval.k=2"], redo="eval").execute() == 0
    assert json.loads((run / "eval" / "rl.json").read_text())["config"]["k"] == 2
    state = json.loads((run / "speedrun.json").read_text())
    assert state["sets"] == ["eval.k=2"] and state["settings_history"][0]["sets"] == []


def test_missing_stage_is_named(monkeypatch):
    from nanoseek import cli
    from nanoseek.config import ConfigError
    from nanoseek.speedrun import Stage, check_available

    monkeypatch.setitem(cli.COMMANDS, "later", ("nanoseek.train.not_written_yet", "a stage still being written"))
    with pytest.raises(ConfigError, match=r"missing stage\(s\): future .*not_written_yet\.py does not exist"):
        check_available([Stage("future", "later")])
    with pytest.raises(ConfigError, match="does not accept --no-such-flag"):
        check_available([Stage("tok", "tokenizer", ("--no-such-flag",))])


def test_report_on_a_partial_run_names_what_is_missing(tmp_path):
    from nanoseek.report import write_report

    (tmp_path / "pretrain").mkdir()
    with open(tmp_path / "pretrain" / "metrics.jsonl", "w") as f:
        for s in range(1, 6):
            f.write(json.dumps({"step": s, "loss": 5 - s / 2, "load_max_mean": {"layer1": 1 + 1 / s}}) + "\n")
        f.write('{"step": 6, "loss": 2.')  # a torn last line (crash mid-write) is skipped
    md = write_report(tmp_path).read_text()
    assert "**Missing stages**" in md
    for d in ("zero", "sft", "rl", "distill", "student_rl"):
        assert f"`{d}/`" in md.split("## Stages")[0], d  # listed as missing before the tables
    assert "train loss 4.500 → 2.500" in md
    assert (tmp_path / "plots" / "pretrain_loss.png").is_file()
    assert (tmp_path / "plots" / "expert_load_steps.png").is_file()
    assert "not measured" in md  # goals that need missing stages say so instead of guessing


def test_redo_deletes_the_stage_and_everything_after(tmp_path):
    from nanoseek.speedrun import MODEL_STAGES, STAGES, Speedrun

    for s in STAGES:
        (tmp_path / s.name).mkdir()
        (tmp_path / s.name / "stage.json").write_text("{}")
    (tmp_path / "eval").mkdir()
    for s in MODEL_STAGES:
        (tmp_path / "eval" / f"{s}.json").write_text("{}")
    Speedrun(tmp_path, "smoke", [], redo="rl").invalidate_from("rl")
    after = ["rl", "student_base", "distill", "student_rl"]
    for s in STAGES:
        assert (tmp_path / s.name).exists() == (s.name not in after), s.name
    for s in MODEL_STAGES:
        assert (tmp_path / "eval" / f"{s}.json").exists() == (s not in after), s


def test_a_failed_stage_lets_the_running_one_finish(tmp_path, capsys):
    """As `make -j`: when a stage fails, the stages already running beside it finish (their work is kept), nothing
    new starts, and the speedrun exits 1 naming the failed stage."""
    from nanoseek.speedrun import Speedrun

    run = tmp_path / "run"
    sets = ["pretrain.student_threads=1", "rl.threads=1"]  # zero and the student's base fit on one core each
    assert Speedrun(run, "smoke", sets, until="pretrain").execute() == 0
    (run / "pretrain" / "model" / "model.safetensors").unlink()  # R1-Zero cannot load its base
    capsys.readouterr()
    assert Speedrun(run, "smoke", sets, until="student_base").execute() == 1
    out = capsys.readouterr().out
    assert "zero         FAILED" in out and "waiting for the stages still running (student_base)" in out
    assert json.loads((run / "student_base" / "stage.json").read_text())["seconds"] > 0  # finished and kept
    assert not (run / "zero" / "stage.json").exists() and not (run / "sft").exists()
    state = json.loads((run / "speedrun.json").read_text())
    assert "zero" not in state["stages"] and "student_base" in state["stages"]
