"""GRPO's pure functions against hand-computed values (the TRL comparison is tests/test_grpo_trl.py)."""

import math

import pytest
import torch

from nanoseek.config import ConfigError
from nanoseek.train.grpo import (
    GRPOConfig,
    dynamic_sampling_keep,
    group_advantages,
    kl_k3,
    per_token_loss,
    token_entropy,
    token_logprobs,
    zero_variance_groups,
)


def test_token_logprobs_match_log_softmax_and_are_stable():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    ref = torch.log_softmax(logits / 0.7, -1).gather(-1, ids[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, ids, 0.7), ref)
    # bf16 logits with huge values: computed in fp32, finite, and a dominant token has log-prob ~0
    big = torch.zeros(1, 1, 50000, dtype=torch.bfloat16)
    big[0, 0, 7] = 3e4
    out = token_logprobs(big, torch.tensor([[7]]))
    assert out.dtype == torch.float32 and out.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(token_logprobs(big, torch.tensor([[3]]))).all()


def test_token_entropy():
    uniform = torch.zeros(1, 2, 8)
    torch.testing.assert_close(token_entropy(uniform), torch.full((1, 2), math.log(8)))
    peaked = torch.tensor([[[100.0, 0.0, 0.0]]])
    assert token_entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.randn(3, 4, 6)
    p = torch.softmax(logits / 2.0, -1)
    torch.testing.assert_close(token_entropy(logits, 2.0), -(p * p.log()).sum(-1))


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    a = group_advantages(r, 4, "group")
    torch.testing.assert_close(a[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert torch.equal(a[4:], torch.zeros(4))  # an all-equal group has no signal and no division by zero
    torch.testing.assert_close(group_advantages(r, 4, "none")[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    torch.testing.assert_close(group_advantages(r, 4, "batch")[:4],
                               torch.tensor([0.5, -0.5, -0.5, 0.5]) / (r.std() + 1e-4))
    with pytest.raises(ValueError, match="groups of G=3"):
        group_advantages(r, 3)
    with pytest.raises(ValueError, match="unknown scale"):
        group_advantages(r, 4, "rank")


def test_zero_variance_and_dynamic_sampling():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    assert zero_variance_groups(r, 2).tolist() == [True, False, True]
    assert dynamic_sampling_keep(r, 2).tolist() == [False, False, True, True, False, False]


def test_config_named_variants_resolve():
    assert (GRPOConfig().scale_rewards, GRPOConfig().epsilon_high, GRPOConfig().dynamic_sampling) == ("group", 0.2,
                                                                                                      False)
    dapo = GRPOConfig(loss_type="dapo")
    assert dapo.epsilon_high == 0.28 and dapo.dynamic_sampling and dapo.scale_rewards == "group"
    assert GRPOConfig(loss_type="dr_grpo").scale_rewards == "none"
    assert GRPOConfig(loss_type="dr_grpo", scale_rewards="group").scale_rewards == "group"  # explicit wins
    for bad, field in [({"loss_type": "ppo"}, "loss_type"), ({"num_generations": 1}, "num_generations"),
                       ({"epsilon_low": 1.0}, "epsilon_low"), ({"beta": -1.0}, "beta"),
                       ({"scale_rewards": "std"}, "scale_rewards"), ({"overlong_buffer": 256}, "overlong_buffer")]:
        with pytest.raises(ConfigError, match=f"rl.{field}"):
            GRPOConfig(**bad)


def _batch():
    torch.manual_seed(0)
    logp = (torch.randn(4, 6) - 2).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]]).float()
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    return logp, mask, adv


def test_on_policy_loss_values():
    """With old = current (μ = 1) every ratio is 1, so each loss is -A averaged the loss_type's way."""
    logp, mask, adv = _batch()
    lens = mask.sum(1)
    tok_adv = adv[:, None] * mask
    expected = {
        "grpo": -(adv.mean()),
        "bnpo": -(tok_adv.sum() / lens.sum()),
        "dapo": -(tok_adv.sum() / lens.sum()),
        "dr_grpo": -(tok_adv.sum() / (4 * 8)),
    }
    for lt, want in expected.items():
        cfg = GRPOConfig(loss_type=lt, beta=0.0, max_completion_length=8)
        loss, stats = per_token_loss(logp, None, None, adv, mask, cfg)
        assert loss.item() == pytest.approx(want.item(), abs=1e-6), lt
        assert stats["clip_low"] == stats["clip_high"] == 0.0 and stats["ratio_mean"] == pytest.approx(1.0)
        assert "kl" not in stats  # beta = 0 and no reference given: no reference forward needed
    # dapo over a whole rollout batch split into micro-batches divides by the batch's token count
    cfg = GRPOConfig(loss_type="dapo", beta=0.0)
    loss, _ = per_token_loss(logp, None, None, adv, mask, cfg, num_items=100)
    assert loss.item() == pytest.approx(-(tok_adv.sum() / 100).item(), abs=1e-6)


def test_on_policy_gradient_is_the_policy_gradient():
    """At ratio 1 the clipped surrogate's gradient is -A/|o| * ∇logp per token (grpo)."""
    logp, mask, adv = _batch()
    cfg = GRPOConfig(beta=0.0)
    loss, _ = per_token_loss(logp, None, None, adv, mask, cfg)
    loss.backward()
    want = -(adv[:, None] * mask / mask.sum(1, keepdim=True)) / 4
    torch.testing.assert_close(logp.grad, want)


def test_clipping_stops_the_gradient_and_is_counted():
    logp = torch.zeros(2, 2, requires_grad=True)
    old = -torch.log(torch.tensor([[1.5, 0.5], [1.5, 0.5]]))  # ratios π/π_old = [[1.5, 0.5], [1.5, 0.5]]
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2)
    cfg = GRPOConfig(beta=0.0, epsilon_low=0.2, epsilon_high=0.28, loss_type="bnpo")
    loss, stats = per_token_loss(logp, old, None, adv, mask, cfg)
    loss.backward()
    # A > 0: ratio 1.5 > 1 + 0.28 is clipped (no grad); ratio 0.5 keeps the unclipped (smaller) term
    # A < 0: ratio 0.5 < 1 - 0.2 is clipped (no grad); ratio 1.5 keeps the unclipped (pessimistic) term
    assert logp.grad[0, 0] == 0 and logp.grad[1, 1] == 0
    assert logp.grad[0, 1] == pytest.approx(-0.5 / 4) and logp.grad[1, 0] == pytest.approx(1.5 / 4)
    assert stats["clip_high"] == 0.25 and stats["clip_low"] == 0.25 and stats["clip_region"] == 0.5
    assert stats["ratio_max"] == pytest.approx(1.5) and stats["ratio_mean"] == pytest.approx(1.0)


def test_kl_k3_and_beta():
    logp = torch.log(torch.tensor([[0.5, 0.2]]))
    ref = torch.log(torch.tensor([[0.25, 0.2]]))
    kl = kl_k3(logp, ref)
    assert kl[0, 0].item() == pytest.approx(0.5 - math.log(0.5) - 1) and kl[0, 1].item() == 0.0
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()
    mask = torch.ones(1, 2)
    adv = torch.zeros(1)
    cfg = GRPOConfig(beta=0.1, loss_type="bnpo")
    loss, stats = per_token_loss(logp, None, ref, adv, mask, cfg)
    assert loss.item() == pytest.approx(0.1 * kl.mean().item()) and stats["kl"] == pytest.approx(kl.mean().item())
    with pytest.raises(ValueError, match="ref_logp"):
        per_token_loss(logp, None, None, adv, mask, cfg)


def test_empty_mask_is_safe():
    logp = torch.randn(2, 3, requires_grad=True)
    for lt in ("grpo", "bnpo", "dapo", "dr_grpo"):
        loss, _ = per_token_loss(logp, None, None, torch.ones(2), torch.zeros(2, 3), GRPOConfig(loss_type=lt, beta=0.0))
        assert loss.item() == 0.0


def test_rollout_stats():
    from nanoseek.train.grpo import rollout_stats
    from nanoseek.train.rewards import Reward

    def R(acc, fmt, lenient=None):
        return Reward(reward=acc + 0.2 * fmt, accuracy=acc, lenient=acc if lenient is None else lenient, format=fmt,
                      overlong=0.0, answer=None)

    rs = [R(1, 1), R(0, 1, lenient=1), R(0, 0), R(0, 0)]  # group 1 mixed, group 2 all-equal
    s = rollout_stats(rs, lengths=[10, 30, 50, 70], truncated=[False, False, False, True], G=2)
    assert s["accuracy"] == 0.25 and s["accuracy_lenient"] == 0.5 and s["format"] == 0.5
    assert s["zero_variance_groups"] == 0.5 and s["truncated"] == 0.25
    assert s["length_correct"] == 10 and s["length_wrong"] == 50 and s["length"] == 40
    assert s["reward"] == pytest.approx((1.2 + 0.2) / 4)
    assert math.isnan(rollout_stats([R(0, 0)] * 2, [5, 5], [False] * 2, G=2)["length_correct"])
    with pytest.raises(ValueError, match="one length"):
        rollout_stats(rs, [1], [False] * 4, G=2)
