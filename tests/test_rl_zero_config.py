"""rl.zero: R1-Zero's own values for [rl] fields, leaving the R1 and student stages on the section's values."""

import pytest

from nanoseek.config import ConfigError, load_preset
from nanoseek.train.grpo import stage_config


def test_zero_overrides_apply_to_zero_only():
    p = load_preset("cpu-tiny", ["rl.lr=3e-5", "rl.temperature=1.0", "rl.zero={lr = 2e-4, temperature = 0.7}"])
    zero, rl, student = (stage_config(p, s) for s in ("zero", "rl", "student_rl"))
    assert (zero.lr, zero.temperature) == (2e-4, 0.7)
    assert (rl.lr, rl.temperature) == (3e-5, 1.0) and (student.lr, student.temperature) == (3e-5, 1.0)
    assert zero.num_generations == rl.num_generations  # fields not named in rl.zero are the section's


def test_zero_override_resolves_the_loss_types_defaults():
    # Built together with the section, so a loss_type in rl.zero gets that loss type's epsilon_high and sampling.
    p = load_preset("cpu-tiny", ["rl.loss_type='grpo'", "rl.dynamic_sampling=none", "rl.zero={loss_type='dapo'}"])
    zero, rl = stage_config(p, "zero"), stage_config(p, "rl")
    assert (zero.loss_type, zero.epsilon_high, zero.dynamic_sampling) == ("dapo", 0.28, True)
    assert (rl.loss_type, rl.epsilon_high, rl.dynamic_sampling) == ("grpo", rl.epsilon_low, False)


def test_zero_override_errors_name_the_problem():
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        stage_config(load_preset("cpu-tiny", ["rl.zero={lrr = 1e-4}"]), "zero")
    with pytest.raises(ConfigError, match="rl.zero must be a table"):
        stage_config(load_preset("cpu-tiny", ["rl.zero=3"]), "zero")
    with pytest.raises(ConfigError, match="temperature"):  # the merged values are validated like the section's
        stage_config(load_preset("cpu-tiny", ["rl.zero={temperature = 0.0}"]), "zero")
