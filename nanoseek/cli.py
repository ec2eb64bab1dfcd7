"""`nanoseek` command line: one subcommand per stage. Each lives in its own module, which defines
`add_args(parser)` and `run(args) -> int | None`; it is imported only when its command runs."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from nanoseek.config import CheckpointError, ConfigError

COMMANDS = {
    "info": ("nanoseek.info", "parameters, active parameters, KV-cache bytes and FLOPs of a preset or checkpoint"),
    "generate": ("nanoseek.infer.engine", "generate text from a checkpoint (or a random model of a preset)"),
    "tokenizer": ("nanoseek.tokenizer", "train the byte-level BPE tokenizer on the task corpus"),
    "pretrain": ("nanoseek.train.pretrain", "V3-style pretraining of the base model"),
    "rl": ("nanoseek.train.grpo", "GRPO with rule rewards (--zero for R1-Zero from the base)"),
    "sft": ("nanoseek.train.sft", "cold-start SFT on rejection-sampled traces"),
    "distill": ("nanoseek.train.distill", "distil the teacher's correct traces into a small dense student"),
    "eval": ("nanoseek.eval", "pass@1, pass@k, maj@k, greedy accuracy, format rate per task"),
    "report": ("nanoseek.report", "report.md + plots for a run directory"),
    "speedrun": ("nanoseek.speedrun", "the whole pipeline: tasks -> tokenizer -> pretrain -> R1 -> distill -> report"),
    "chat": ("nanoseek.chat", "chat with a model in the terminal"),
    "serve": ("nanoseek.serve.api", "OpenAI-compatible server with a chat page"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek-V3 + R1, small.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name = argv[0]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; choose from {', '.join(COMMANDS)}")
    module = importlib.import_module(COMMANDS[name][0])
    p = argparse.ArgumentParser(prog=f"nanoseek {name}", description=COMMANDS[name][1])
    module.add_args(p)
    args = p.parse_args(argv[1:])
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: one process group for the command
            from nanoseek.train.distributed import session_for

            if not getattr(module, "DISTRIBUTED", False):  # a stage sets DISTRIBUTED = True once it shards its work
                raise ConfigError(f"`nanoseek {name}` does not split its work across ranks yet, so under torchrun "
                                  f"every rank would repeat it and write the same files; run it as one process "
                                  f"(python -m nanoseek {name} ...)")

            with session_for(getattr(args, "preset", None), getattr(args, "set", None)):
                return module.run(args) or 0
        return module.run(args) or 0
    except ConfigError as e:
        print(f"nanoseek {name}: config error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, FileNotFoundError) as e:  # a path the user passed: one line naming it, no traceback
        print(f"nanoseek {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nnanoseek {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
