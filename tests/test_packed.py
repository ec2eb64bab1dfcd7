"""Packed rows (nanoseek/model/packed.py): the forward over distinct tokens (shared prompts once, no padding) gives
the padded forward's log-probs and gradients, and GRPO's update path (which uses it) gives the padded path's loss,
statistics and gradients."""

import dataclasses

import pytest
import torch

from nanoseek.config import ModelConfig, load_preset
from nanoseek.model.packed import pack_rows
from nanoseek.model.transformer import Transformer
from nanoseek.train import grpo
from nanoseek.train.grpo import GRPOConfig, Rollout, group_advantages, make_micro_batches

V = 40


def rows():
    """7 rows over 3 prompts of lengths 3, 5 and 1, not grouped, continuations of unequal lengths (one empty)."""
    g = torch.Generator().manual_seed(1)
    P = [torch.randint(3, V, (n,), generator=g).tolist() for n in (3, 5, 1)]
    prompts = [P[i % 3] for i in range(7)]
    comps = [torch.randint(3, V, (n,), generator=g).tolist() for n in (4, 0, 6, 2, 7, 1, 3)]
    return prompts, comps


def model(moe: bool = True):
    torch.manual_seed(0)
    raw = {**load_preset("smoke").raw["model"], "vocab_size": V}
    if not moe:
        raw["first_k_dense_replace"] = raw["num_hidden_layers"]
    return Transformer(ModelConfig(**raw)).train()


def test_pack_rows_layout():
    prompts, comps = [[5, 6], [7], [5, 6]], [[1, 2], [3, 4, 8], [9]]
    p = pack_rows(prompts, comps)
    # [5, 6] is stored once (tokens 0-1), then row 0's continuation, prompt [7], row 1's, row 2's
    assert p.ids.tolist() == [5, 6, 1, 2, 7, 3, 4, 8, 9]
    assert p.positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 2]
    assert p.rows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 8, 0]]
    assert p.prompts.tolist() == [[0, 1], [4, 0]] and p.queries.tolist() == [[2, 3, 0], [5, 6, 7], [8, 0, 0]]
    # row 2's continuation token 0 (position 2) sees keys 0..2 of its row
    assert p.mask[2, 0, 0].tolist() == [True, True, True, False]
    # every token's attention output is read from the copy that computes it
    flat = torch.cat([p.prompts.reshape(-1), p.queries.reshape(-1)])
    assert flat[p.first].tolist() == list(range(len(p.ids)))
    with pytest.raises(ValueError, match="non-empty prompt"):
        pack_rows([[]], [[1]])


@pytest.mark.parametrize("moe", [True, False])
def test_packed_forward_equals_padded(moe):
    m = model(moe)
    prompts, comps = rows()
    L = max(len(p) + len(c) for p, c in zip(prompts, comps))
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros(len(prompts), L - 1, dtype=torch.bool)
    for b, (p, c) in enumerate(zip(prompts, comps)):
        ids[b, : len(p) + len(c)] = torch.tensor(p + c)
        mask[b, len(p) - 1: len(p) - 1 + len(c)] = True  # positions that predict a continuation token

    def grads(logp):
        m.zero_grad(set_to_none=True)
        (logp * torch.linspace(-1, 2, len(logp))).sum().backward()  # a weighting, so rows and tokens differ
        return {n: q.grad.clone() for n, q in m.named_parameters() if q.grad is not None}

    ref = torch.log_softmax(m(ids[:, :-1]).logits, -1).gather(-1, ids[:, 1:, None])[..., 0][mask]  # [M]
    g_ref = grads(ref)
    p = pack_rows(prompts, comps)
    assert len(p.ids) == sum(map(len, comps)) + 3 + 5 + 1  # each prompt once, no padding
    new = torch.log_softmax(m(p.ids[None], packed=p, logits_for=p.rows[:, :-1][mask]).logits, -1)
    new = new.gather(-1, ids[:, 1:][mask][:, None])[:, 0]
    g_new = grads(new)
    torch.testing.assert_close(new, ref, atol=1e-5, rtol=0)
    assert g_new.keys() == g_ref.keys() and len(g_ref) > 0
    for n in g_ref:
        torch.testing.assert_close(g_new[n], g_ref[n], atol=1e-5, rtol=1e-4, msg=lambda s, n=n: f"{n}: {s}")
    assert max(g.abs().max().item() for g in g_ref.values()) > 1e-2


@pytest.mark.parametrize("loss_type,micro", [("grpo", 0), ("bnpo", 3), ("dapo", 4), ("dr_grpo", 2)])
def test_grpo_loss_packed_equals_padded(loss_type, micro):
    """grpo_loss_fn over make_micro_batches (packed) = the same micro-batches with packing off (padded rows)."""
    m = model()
    prompts, comps = rows()
    prompts, comps = prompts[:6], [c or [7] for c in comps[:6]]
    ro = Rollout(prompts, comps, [{}] * 6, [""] * 6, [], [False] * 6)
    adv = group_advantages(torch.tensor([1.0, 0.0, 2.0, 0.5, 0.0, 1.0]), 3)
    cfg = GRPOConfig(num_generations=3, loss_type=loss_type, beta=0.04, micro_batch_size=micro,
                     max_completion_length=8, temperature=0.7)
    mbs = make_micro_batches(ro, adv, cfg, pad_id=2)
    assert all(mb.packed is not None for mb in mbs)
    g = torch.Generator().manual_seed(3)
    for mb in mbs:  # off-policy old and reference log-probs, so ratios clip and the KL term has a gradient
        mb.old_logp = -2.0 + 0.5 * torch.randn(mb.mask.shape, generator=g)
        mb.ref_logp = -2.0 + 0.5 * torch.randn(mb.mask.shape, generator=g)
    fn = grpo.grpo_loss_fn(cfg)

    def run(batches):
        m.zero_grad(set_to_none=True)
        stats = []
        for mb in batches:
            loss, s = fn(m, mb)
            (loss / len(batches)).backward()
            stats.append({**s, "loss": float(loss)})
        return stats, {n: q.grad.clone() for n, q in m.named_parameters() if q.grad is not None}

    s_packed, g_packed = run(mbs)
    s_padded, g_padded = run([dataclasses.replace(mb, packed=None) for mb in mbs])
    for a, b in zip(s_packed, s_padded):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-5), k
    assert any(s["clip_low"] > 0 or s["clip_high"] > 0 for s in s_packed)
    for n in g_padded:
        torch.testing.assert_close(g_packed[n], g_padded[n], atol=1e-5, rtol=1e-4, msg=lambda s, n=n: f"{n}: {s}")


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_whole_group_chunks_give_the_whole_batch_gradient(loss_type):
    """micro_batch_size a multiple of G: chunks hold whole groups (each prompt packed once per step), and the
    shared loop's mean over them is still the whole batch's gradient."""
    m = model()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (2, 4, 3, 1)]
    prompts = [p for p in prompts for _ in range(3)]  # 4 groups of G = 3
    comps = [torch.randint(3, V, (int(n),), generator=g).tolist() for n in torch.randint(1, 9, (12,), generator=g)]
    ro = Rollout(prompts, comps, [{}] * 12, [""] * 12, [], [False] * 12)
    adv = group_advantages(torch.rand(12, generator=g), 3)

    def grads(micro):
        cfg = GRPOConfig(num_generations=3, loss_type=loss_type, beta=0.0, micro_batch_size=micro,
                         max_completion_length=8)
        mbs = make_micro_batches(ro, adv, cfg, pad_id=2)
        m.zero_grad(set_to_none=True)
        fn = grpo.grpo_loss_fn(cfg)
        for mb in mbs:
            (fn(m, mb)[0] / len(mbs)).backward()
        return mbs, [q.grad.clone() for q in m.parameters() if q.grad is not None]

    mbs, split = grads(6)
    assert [len(mb.packed.prompts) for mb in mbs] == [2, 2]  # two whole groups per chunk: two distinct prompts
    _, whole = grads(0)
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
