"""Rule rewards for GRPO: accuracy, format, and DAPO's soft overlong penalty. No reward model (DeepSeek-R1 §2.2.2).

The answer format (the chat template asks for exactly this):

    <think>
    {reasoning}
    </think>
    <answer>{answer}</answer>

The generation prompt ends with `<think>\\n`, so a sampled completion normally starts INSIDE the think block and
contains no opening `<think>` of its own. `prompt_opens_think=True` says so; with False the completion itself must
open the block. Completions are text decoded with `<think>`/`</think>` kept and the end-of-sentence token removed.

The fixed place of the answer (strict): the text inside the FIRST `<answer>…</answer>` after the FIRST `</think>`,
stripped of surrounding whitespace; missing or empty means no answer. The first `</think>` is where vLLM's
`deepseek_r1` reasoning parser splits reasoning from content, so the API shows the same answer the reward saw.
Lenient: the last ASCII number anywhere in the completion, wherever it is (reported apart, never trained on by
default). Both go through the task's scorer `score(answer_text, entry) -> [0, 1]`, passed in as a callable.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

Scorer = Callable[[str, object], float]

# A number: optional sign (only when the '-' does not follow a digit/letter, so "5-3" gives "3"), ASCII digits,
# optional decimals. ASCII only on purpose: `\d` would accept e.g. Arabic-Indic digits that int() also parses.
_NUMBER = re.compile(r"(?:(?<![0-9A-Za-z_.])-)?[0-9]+(?:\.[0-9]+)?")
# The whole strict format, on the completion with the opening <think> restored:
# <think> reasoning </think> ws <answer> non-empty </answer> ws, with no other tag anywhere.
_FORMAT = re.compile(r"\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)


def _with_think(completion: str, prompt_opens_think: bool) -> str:
    # Restore the `<think>` that the generation prompt already emitted, so one rule covers both cases.
    return THINK_OPEN + completion if prompt_opens_think else completion


def extract_answer(completion: str) -> str | None:
    """The strict answer: inside the first `<answer>…</answer>` after the first `</think>`; None if absent/empty."""
    end_think = completion.find(THINK_CLOSE)
    if end_think < 0:
        return None  # still thinking (truncated) or never closed: no answer in the fixed place
    rest = completion[end_think + len(THINK_CLOSE):]
    start = rest.find(ANSWER_OPEN)
    if start < 0:
        return None
    body = rest[start + len(ANSWER_OPEN):]
    end = body.find(ANSWER_CLOSE)
    if end < 0:
        return None  # truncated inside the answer: an unterminated answer does not count
    answer = body[:end].strip()
    return answer or None


def last_number(completion: str) -> str | None:
    """The lenient answer: the last ASCII number anywhere in the completion, as written (sign and decimals kept)."""
    found = _NUMBER.findall(completion)
    return found[-1] if found else None


def format_ok(completion: str, prompt_opens_think: bool = True, require_reasoning: bool = False) -> bool:
    """Exactly one think block at the start, then one non-empty answer, then only whitespace; no stray tags.

    `require_reasoning` also demands non-whitespace text inside the think block (off by default: the R1 template
    asks for the tags, not for a minimum amount of thought).
    """
    text = _with_think(completion, prompt_opens_think)
    m = _FORMAT.fullmatch(text)
    if m is None:
        return False
    if any(text.count(tag) != 1 for tag in TAGS):
        return False  # nested or repeated tags, e.g. a second <think> inside the first or two answers
    if not m.group("answer").strip():
        return False
    return not (require_reasoning and not m.group("think").strip())


def overlong_penalty(length: int, max_len: int, cache_len: int) -> float:
    """DAPO's soft overlong punishment (eq. 13): 0 up to max_len - cache_len tokens, then linear down to -1 at
    max_len, and -1 beyond. `length` counts completion tokens; cache_len = 0 disables the ramp (then only > max_len
    is punished)."""
    if cache_len < 0 or cache_len > max_len:
        raise ValueError(f"overlong cache_len={cache_len} must be in [0, max_len={max_len}]; "
                         "set rl.overlong_buffer to a few tokens below max_completion_length")
    free = max_len - cache_len
    if length <= free:
        return 0.0
    if length <= max_len:
        return (free - length) / cache_len
    return -1.0


def _score(scorer: Scorer, answer: str | None, entry) -> float:
    if answer is None:
        return 0.0
    s = float(scorer(answer, entry))
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"scorer returned {s} for answer {answer!r}; a task scorer must return a value in [0, 1]")
    return s


@dataclass
class Reward:
    """One completion's reward and the parts that make it up (all logged)."""

    reward: float  # what GRPO trains on: accuracy + format_weight * format + overlong
    accuracy: float  # strict: scorer on the answer in the fixed place
    lenient: float  # scorer on the last number anywhere
    format: float  # 1.0 if format_ok else 0.0
    overlong: float  # DAPO soft penalty (<= 0); 0.0 when disabled
    answer: str | None  # the strict answer text, for logs


def reward(completion: str, entry, scorer: Scorer, *, length: int | None = None, prompt_opens_think: bool = True,
           format_weight: float = 0.2, max_len: int | None = None, overlong_buffer: int = 0,
           require_reasoning: bool = False) -> Reward:
    """Score one completion. The overlong penalty applies when `overlong_buffer > 0` (needs length and max_len)."""
    answer = extract_answer(completion)
    acc = _score(scorer, answer, entry)
    lenient = _score(scorer, last_number(completion), entry)
    fmt = 1.0 if format_ok(completion, prompt_opens_think, require_reasoning) else 0.0
    over = 0.0
    if overlong_buffer > 0:
        if length is None or max_len is None:
            raise ValueError("the overlong penalty needs the completion length in tokens and max_len; pass both")
        over = overlong_penalty(length, max_len, overlong_buffer)
    return Reward(reward=acc + format_weight * fmt + over, accuracy=acc, lenient=lenient, format=fmt,
                  overlong=over, answer=answer)


def rewards(completions: Sequence[str], entries: Sequence, scorer: Scorer, *, lengths: Sequence[int] | None = None,
            **kw) -> list[Reward]:
    """Score a batch; entries[i] is the task entry completion i answers (repeat each prompt's entry G times)."""
    if len(completions) != len(entries):
        raise ValueError(f"{len(completions)} completions but {len(entries)} entries; pass one entry per completion")
    if lengths is not None and len(lengths) != len(completions):
        raise ValueError(f"{len(lengths)} lengths for {len(completions)} completions; pass one length per completion")
    return [reward(c, e, scorer, length=None if lengths is None else lengths[i], **kw)
            for i, (c, e) in enumerate(zip(completions, entries))]


# ---- step consistency: the reasoning agrees with itself (the cold start's filter, eval's `steps` column) --------
_EXPR = r"\d+(?:\s*[-+*/]\s*\d+)*"  # integer arithmetic without parentheses: what the worked solutions write
_LHS = re.compile(r"(?:(?<![\w)])-)?" + _EXPR + r"\s*$")  # the expression ending a segment (a leading minus sign
# counts only where it cannot be a subtraction: not after a digit, letter or bracket)
_RHS = re.compile(r"^\s*-?" + _EXPR)  # the expression starting the next segment
_PICK = re.compile(r"^(smallest|largest) of ([-\d, ]+): (-?\d+)$")


def _value(expr: str) -> Fraction | None:
    """Exact value of an integer +-*/ expression (usual precedence), None if it divides by zero."""
    toks = re.findall(r"\d+|[-+*/]", expr.replace(" ", ""))
    neg = toks[:1] == ["-"]
    toks = toks[1:] if neg else toks
    terms, cur, op = [], Fraction(int(toks[0])) * (-1 if neg else 1), None
    for t in toks[1:]:
        if t in "+-*/":
            op = t
            continue
        v = Fraction(int(t))
        if op == "*":
            cur *= v
        elif op == "/":
            if v == 0:
                return None
            cur /= v
        else:
            terms.append(cur)
            cur = v if op == "+" else -v
    return sum(terms, cur)


def wrong_step(reasoning: str) -> str | None:
    """The first step of `reasoning` that a rule can check and that is false, else None. Checked: every `A = B`
    where the segment before `=` ends in an integer expression A and the one after starts with one (B); chained
    equalities are checked pair by pair; `6x = 43 - 7` has no expression before `=` and is skipped. And sorting
    by selection: `smallest of 31, 2, 5: 2` must pick the minimum, and each list must be the previous one without
    the number picked from it. Unchecked text (`-> 94`, `carry 1`) is allowed: absence of checks is not an error."""
    prev: list[int] | None = None
    for line in reasoning.splitlines():
        line = line.strip()
        segs = line.split("=")
        for a, b in zip(segs, segs[1:]):
            lhs, rhs = _LHS.search(a), _RHS.match(b)
            if lhs and rhs and (lhs_v := _value(lhs.group())) is not None:
                if lhs_v != _value(rhs.group()):
                    return line
        m = _PICK.match(line)
        if m:
            nums = [int(x) for x in m.group(2).replace(" ", "").split(",") if x.lstrip("-").isdigit()]
            pick = int(m.group(3))
            if not nums or pick != (min(nums) if m.group(1) == "smallest" else max(nums)):
                return line
            if prev is not None and sorted(nums) != sorted(prev):
                return line
            prev = list(nums)
            prev.remove(pick)
        elif line.startswith("last:") and prev is not None:
            if [x.strip() for x in line[5:].split(",")] != [str(v) for v in prev]:
                return line
    return None
