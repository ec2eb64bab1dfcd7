"""The cold start's step check (nanoseek/train/sft.py `wrong_step`): every checkable step of a trace must hold."""

import dataclasses

from nanoseek.config import load_preset
from nanoseek.data import splits
from nanoseek.train import sft


def test_reference_solutions_pass():
    """Every task's worked solution (the pretraining corpus's reasoning) passes: no false alarms on true steps."""
    data = dataclasses.replace(load_preset("cpu-tiny", []).section("data"), train_size=300)
    entries = splits(data)["train"]
    assert {e["task"] for e in entries} >= {"add", "sub", "mul", "chain_sum", "sort", "linear", "countdown"}
    assert [e["solution"] for e in entries if e["solution"] and sft.wrong_step(e["solution"])] == []


def test_wrong_steps_are_caught():
    """Right answers reached through wrong steps (seen in R1-Zero's samples) are named by their first false line."""
    assert sft.wrong_step("22-7=20\n20+5=20") == "22-7=20"
    assert sft.wrong_step("5*8 = 40\nso 4*8=40") == "so 4*8=40"
    assert sft.wrong_step("9x = 81 - 18 = 73\nx = 73 / 9 = 7") == "9x = 81 - 18 = 73"  # chained: 63 != 73
    assert sft.wrong_step("87*2 = 80*2 + 7*2 = 160 + 14 = 175") == "87*2 = 80*2 + 7*2 = 160 + 14 = 175"
    assert sft.wrong_step("5-7 borrow: 16-7=8 -> 8") is not None
    assert sft.wrong_step("6+0=6\n6-8=-3") == "6-8=-3"
    assert sft.wrong_step("-2+5=2") == "-2+5=2"  # a leading minus sign is a sign
    assert sft.wrong_step("x = 7 / 0 = 1") is None  # division by zero: nothing to compare, not an error
    # sorting by selection: the pick must be the extreme, the list must shrink by it, "last" must be what is left
    assert sft.wrong_step("largest of 4, 4: 5") == "largest of 4, 4: 5"
    assert sft.wrong_step("smallest of 9, 0, 4: 0\nsmallest of 9, 0: 0\nlast: 9") == "smallest of 9, 0: 0"
    assert sft.wrong_step("smallest of 9, 0, 4: 0\nsmallest of 9, 4: 4\nlast: 7") == "last: 7"


def test_true_steps_pass():
    assert sft.wrong_step("9+2=11 carry 1 -> 1\n8+1=9 -> 91\nso 89+2=91") is None
    assert sft.wrong_step("6x = 43 - 7 = 36\nx = 36 / 6 = 6") is None
    assert sft.wrong_step("6+0=6\n6-8=-2\n-2+5=3") is None
    assert sft.wrong_step("just thinking, no equation") is None


def test_readable_applies_the_step_check_only_when_asked():
    text = "22-7=20\n20+5=20\n</think>\n<answer>20</answer>"
    assert sft.readable(text, 12, False, 50) is None
    assert sft.readable(text, 12, False, 50, check_steps=True) == "wrong_step"
    assert sft.readable("22-7=15\n15+5=20\n</think>\n<answer>20</answer>", 12, False, 50, check_steps=True) is None
