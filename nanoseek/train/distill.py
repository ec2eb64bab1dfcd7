"""Distillation: the teacher's correct reasoning traces, learned by a small DENSE student through SFT (DeepSeek-R1
§2.4: "distillation from DeepSeek-R1 to smaller dense models"; §4.1: it beats large-scale RL on the small model).

    nanoseek distill --teacher runs/x/rl/model --student runs/x/student_base/model --out runs/x/distill
    ... --preset smoke --set distill.steps=5 [--resume]

The student is the preset's [student] model: no MoE (first_k_dense_replace = num_hidden_layers) and no MTP module,
pretrained on the same corpus with the same code (`nanoseek pretrain --student`). Its base matters twice: it is
what distillation starts from, and the same base trained by GRPO instead (`nanoseek rl --student`) is the arm the
paper compares against.

1. The teacher answers `n_questions` training questions k times each (R1 used 800k samples from R1 and V3); a
   sample is kept when its strict answer is correct and (with `readable`, on in cpu-tiny) it passes the cold start's
   readability filter including the step check (nanoseek/train/sft.py): R1's reasoning data was filtered for
   readability the same way (§2.3.3), and at cpu-tiny the cold start trained on R1-Zero's traces without the step
   check scored 3 points lower (configs/cpu-tiny.toml [sft]).
2. The student is fine-tuned on them with the masked chat loss by the shared loop (the very code `nanoseek sft`
   runs; only the config section, [distill], differs).

Writes into --out: traces.jsonl + traces.json, metrics.jsonl, checkpoints/ and model/ (HF format + tokenizer).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek.config import ConfigError
from nanoseek.train import distributed as D
from nanoseek.train.sft import SFTConfig

DISTRIBUTED = True  # under torchrun: rank 0 samples the teacher, every rank trains its rows (see train/sft.py)


@dataclass
class DistillConfig(SFTConfig):
    """The [distill] section: the same knobs as [sft] (sampling from the teacher, then the fine-tune), with
    defaults for many samples per question and no per-question cap beyond distinct texts."""

    samples_per_question: int = 8
    max_per_question: int = 4
    temperature: float = 0.8
    readable: bool = False  # R1 distils correct samples; cpu-tiny turns the filter (and its step check) on


def check_student(model, tok_student_dir: str | Path, teacher_dir: str | Path) -> None:
    """The student must be dense and read the teacher's tokens."""
    cfg = model.config
    if model.moe_layers():
        raise ConfigError(f"the student has {len(model.moe_layers())} MoE layers; distillation trains a DENSE student "
                          f"(set student.first_k_dense_replace = student.num_hidden_layers = "
                          f"{cfg.num_hidden_layers} and student.num_nextn_predict_layers = 0)")
    a = Path(tok_student_dir) / "tokenizer.json"
    b = Path(teacher_dir) / "tokenizer.json"
    if a.is_file() and b.is_file() and a.read_bytes() != b.read_bytes():
        raise ConfigError(f"{a} differs from the teacher's {b}: the student must use the teacher's tokenizer "
                          "(pretrain it with `nanoseek pretrain --student --tokenizer <the teacher's tokenizer>`)")


def add_args(p: argparse.ArgumentParser) -> None:
    from nanoseek.train.sft import add_common_args

    p.add_argument("--teacher", required=True, help="the teacher model directory (R1)")
    p.add_argument("--student", required=True, help="the student base model directory (dense, [student] preset)")
    add_common_args(p)


def run(args) -> int:
    import nanoseek
    from nanoseek.checkpoint import model_dir
    from nanoseek.config import load_preset
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.grpo import tokenizer_files
    from nanoseek.train.sft import check_out, finetune, log_stderr, stage_traces, trace_examples

    preset = load_preset(args.preset, args.set)
    cfg: DistillConfig = preset.section("distill")
    args.teacher, args.student = str(model_dir(args.teacher, "--teacher")), str(model_dir(args.student, "--student"))
    out = check_out(args, "a distillation run")
    torch.manual_seed(cfg.seed)
    student = nanoseek.load(args.student)
    check_student(student, args.student, args.teacher)  # before the teacher samples for minutes
    t0 = time.time()
    traces, figures = stage_traces(args.teacher, out, preset, "distill")
    tok = load_tokenizer(args.teacher)
    last = finetune(student, tok, trace_examples(traces, tok), cfg, out, tokenizer_files(args.teacher),
                    args.resume, "distill", log_stderr, parallel=preset.section("parallel"))
    if not D.is_main():
        return 0
    print(json.dumps({"stage": "distill", "traces": len(traces), "correct_rate": figures.get("correct_rate"),
                      "loss": last.get("loss"), "seconds": time.time() - t0}))
    return 0
