"""Every fast path of the model agrees with its plain-PyTorch fallback: values and gradients."""

import pytest
import torch

from nanoseek.model.moe import Experts, grouped_mm_ok
from nanoseek.model.transformer import Transformer
from tests.tiny import VARIANTS, tiny


def _experts(cfg, seed=0):
    torch.manual_seed(seed)
    e = Experts(cfg)
    for p in e.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return e


def _run(experts, x, idx, w, grouped, autocast):
    experts.grouped = grouped
    experts.zero_grad()
    xg = x.detach().clone().requires_grad_()
    wg = w.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, counts = experts(xg, idx, wg)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    grads = [xg.grad, wg.grad] + [p.grad.clone() for p in experts.parameters()]
    return y.detach(), counts, grads


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_grouped_experts_equal_loop(autocast):
    cfg = tiny(n_routed_experts=8, num_experts_per_tok=3)
    experts = _experts(cfg)
    N, K = 50, 3
    x = torch.randn(N, cfg.hidden_size)
    pool = torch.tensor([0, 1, 2, 3, 4, 6, 7])  # expert 5 gets no tokens: empty groups must work too
    idx = torch.stack([pool[torch.randperm(7)[:K]] for _ in range(N)])
    w = torch.rand(N, K)
    assert grouped_mm_ok(x, experts.gate_proj)
    y1, c1, g1 = _run(experts, x, idx, w, grouped=True, autocast=autocast)
    y0, c0, g0 = _run(experts, x, idx, w, grouped=False, autocast=autocast)
    assert torch.equal(c1, c0) and c0.tolist() == torch.bincount(idx.flatten(), minlength=8).tolist()
    assert c0[5] == 0
    tol = 1e-5 if not autocast else 2e-2
    assert (y1 - y0).abs().max() <= tol * y0.abs().max()
    for a, b in zip(g1, g0):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= tol * b.abs().max().clamp(min=1e-6)


def test_unaligned_shapes_fall_back_to_loop():
    cfg = tiny(moe_intermediate_size=10, hidden_size=66)  # 10 * 2 bytes is not a multiple of 16
    experts = _experts(cfg)
    x = torch.randn(7, 66)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not grouped_mm_ok(x, experts.gate_proj)
    idx = torch.randint(0, 8, (7, 2))
    y, counts = experts(x, idx, torch.rand(7, 2))
    assert y.shape == x.shape and counts.sum() == 14


@pytest.mark.parametrize("variant", ["q_lora", "groups", "no_norm_topk"])
def test_model_grouped_equals_loop(variant):
    """Whole model, training mode (aux loss on), one backward: grouped and looped experts give the same."""
    cfg = tiny(**VARIANTS[variant])
    torch.manual_seed(0)
    m = Transformer(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (2, 20))
    results = []
    for grouped in (True, False):
        for moe in m.moe_layers():
            moe.experts.grouped = grouped
        m.zero_grad()
        out = m(x, mtp=True)
        loss = out.logits.square().mean() + sum(t.square().mean() for t in out.mtp_logits) + out.aux_loss
        loss.backward()
        results.append((out.logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (l1, g1), (l0, g0) = results
    assert (l1 - l0).abs().max() <= 1e-5
    for n in g0:
        assert (g1[n] - g0[n]).abs().max() <= 1e-5 * max(1.0, g0[n].abs().max().item()), n


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_padded_value_attention_equals_math_path(autocast):
    from nanoseek.model.attention import causal_attention

    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 40, 24, requires_grad=True), torch.randn(2, 3, 40, 24, requires_grad=True)
    v = torch.randn(2, 3, 40, 16, requires_grad=True)
    g = torch.randn(2, 3, 40, 16)
    outs = []
    for pad in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            o = causal_attention(q, k, v, 0.2, pad_v=pad)
        grads = torch.autograd.grad(o, (q, k, v), g)
        outs.append((o.detach().float(), [t.float() for t in grads]))
    tol = 1e-5 if not autocast else 3e-2
    (o1, g1), (o0, g0) = outs
    assert o1.shape == o0.shape == (2, 3, 40, 16)
    assert (o1 - o0).abs().max() <= tol * o0.abs().max()
    for a, b in zip(g1, g0):
        assert (a - b).abs().max() <= tol * b.abs().max()


def _train_loss(model, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        return out.logits.float().square().mean() + out.aux_loss


def test_training_forward_is_one_compile_graph():
    """bf16 training forward (grouped experts, aux loss, load counts) traces to ONE graph: no graph breaks."""
    cfg = tiny(n_group=2, topk_group=2, num_experts_per_tok=2)
    m = Transformer(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    torch._dynamo.reset()
    exp = torch._dynamo.explain(lambda x: _train_loss(m, x))(x)
    assert exp.graph_break_count == 0, [b.reason for b in exp.break_reasons]
    assert exp.graph_count == 1


def test_compiled_training_step_equals_eager():
    """Through torch.compile's graph capture and autograd tracing (aot_eager: the same kernels, no codegen),
    loss and gradients equal eager. Routing is pinned by a large correction bias so bf16 rounding cannot flip an
    expert choice."""
    cfg = tiny(n_group=2, topk_group=2, num_experts_per_tok=2)
    torch.manual_seed(0)
    m = Transformer(cfg).train()
    for moe in m.moe_layers():
        moe.gate.e_score_correction_bias.copy_(torch.tensor([5.0, 0, 0, 0, 0, 5.0, 0, 0]))
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    results = []
    for model in (compiled, m):
        m.zero_grad()
        loss = _train_loss(model, x)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (l1, g1), (l0, g0) = results
    assert abs(l1 - l0) <= 1e-5 * abs(l0)
    assert g1.keys() == g0.keys() and len(g0) > 20
    for n in g0:
        assert (g1[n] - g0[n]).abs().max() <= 1e-2 * max(1e-3, g0[n].abs().max().item()), n


# ---- the engine's decode step (nanoseek/infer/runner.py): each of its paths against another and the model ----
def _runner_setup(variant, n_slots=8, max_len=40, seed=3):
    from nanoseek.infer.cache import LatentCache
    from nanoseek.infer.runner import Runner

    torch.manual_seed(seed)
    m = Transformer(tiny(**VARIANTS[variant])).eval()
    for moe in m.moe_layers():  # a non-zero correction bias changes which experts are chosen
        moe.gate.e_score_correction_bias.normal_(0, 0.05)
    cache = LatentCache(m.config, n_slots, max_len)
    r = Runner(m, cache)
    r.sync()
    return m, cache, r


@pytest.mark.parametrize("variant", ["q_lora", "no_q_lora", "no_norm_topk"])
def test_decode_gathered_experts_equal_all_experts(variant):
    """MoE of a decode step: copying out each token's experts equals running every expert with zero gates, and
    (from runner.grouped_rows tokens on) running each expert on its own tokens by grouped matmuls, at 1, 2, 5, 40
    and 70 tokens; all equal the model's MoE module."""
    m, _, r = _runner_setup(variant)
    torch.manual_seed(1)
    blocks = list(m.model.layers) + [mod.block for mod in m.mtp]  # the runner's order
    for b, blk in zip(r.w["blocks"], blocks):
        if b["moe"] is None:
            continue
        moe = blk.mlp
        for N in (1, 2, 5, 40, 70):
            x = torch.randn(N, m.config.hidden_size)
            outs = []
            for ratio, grouped in ((0.0, 10**9), (1e9, 10**9), (1e9, 1)):  # gather, all experts, grouped
                r.gather_ratio, r.grouped_rows = ratio, grouped
                with torch.no_grad():
                    outs.append(r._moe(b, x))
            assert (outs[2] - outs[1]).abs().max() <= 1e-5, (variant, N)
            # the model's MoE reads post_attention_layernorm(y); the runner reads y * rsqrt(mean(y²) + eps), the
            # norm's weight being folded into its router and experts
            y = x * 3.0
            with torch.no_grad():
                ref = moe(blk.post_attention_layernorm(y)[None])[0]
                r.gather_ratio, r.grouped_rows = 0.0, 10**9
                got = r._moe(b, y * torch.rsqrt(y.square().mean(-1, keepdim=True) + blk.post_attention_layernorm.eps))
            assert (outs[0] - outs[1]).abs().max() <= 1e-5, (variant, N)
            assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), (variant, N)


@pytest.mark.parametrize("variant", ["q_lora", "no_q_lora", "yarn"])
def test_decode_cache_views_equal_gathered_rows(variant):
    """Attention of a decode step reads a contiguous range of slots as views of the pool and other slot sets by
    index_select; rows of equal length skip the causal mask. All four combinations give the full forward's logits."""
    m, cache, r = _runner_setup(variant)
    cfg = m.config
    torch.manual_seed(2)
    x = torch.randint(0, cfg.vocab_size, (3, 14))
    with torch.no_grad():
        full = m(x).logits
    for slots in ([2, 3, 4], [4, 0, 2]):
        for lens in ([6, 6, 6], [5, 7, 6]):
            s = torch.tensor(slots)
            ctx = r._step_context(s, torch.tensor(lens), 1, max(lens) + 1)
            assert ("lat" in ctx) == (slots == [2, 3, 4]) and (ctx["mask"] is None) == (lens == [6, 6, 6])
            cache.buf.zero_()
            with torch.no_grad():
                r.prefill(x[:, :8], s)  # positions past a row's length are overwritten as it decodes
                pos = torch.tensor(lens)
                for _ in range(4):
                    logits = r.decode(x.gather(1, pos[:, None]), s, pos, int(pos.max()) + 1)[0][:, 0]
                    ref = full[torch.arange(3), pos]
                    assert (logits - ref).abs().max() <= 1e-4, (variant, slots, lens)
                    pos = pos + 1


@pytest.mark.parametrize("variant", ["q_lora", "no_interleave_all_moe"])
def test_mtp_last_only_equals_all_rows(variant):
    """A draft needs only the MTP logits of the last position: last_only runs attention output, MoE and head for
    that row alone, yet writes every row's latent. Its logits and the cache equal the all-rows pass, and both equal
    the model's own MTP step."""
    m, cache, r = _runner_setup(variant)
    cfg = m.config
    torch.manual_seed(4)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    slots, L = torch.tensor([1, 5]), cfg.num_hidden_layers
    with torch.no_grad():
        _, hidden = r.prefill(x[:, :10], slots)
        outs = []
        for last_only in (False, True):
            cache.buf[L].zero_()
            r.mtp(hidden[:, :6], x[:, 1:7], slots, torch.zeros(2, dtype=torch.long), 6)  # positions 0..5
            logits = r.mtp(hidden[:, 6:9], x[:, 7:10], slots, torch.full((2,), 6), 9, last_only=last_only)
            outs.append((logits[:, -1].clone(), cache.buf[L].clone()))
        ref, _ = m.mtp_step(hidden[:, :9], x[:, 1:10], cache, slots, torch.zeros(2, dtype=torch.long))
    (all_rows, cache_all), (last, cache_last) = outs
    assert logits.shape == (2, 1, cfg.vocab_size)
    assert (all_rows - last).abs().max() <= 1e-5 and torch.equal(cache_all, cache_last)
    assert (last - ref[:, -1]).abs().max() <= 1e-4


@pytest.mark.parametrize("variant", ["q_lora", "no_q_lora", "no_interleave_all_moe"])
def test_decode_rope_block_matrix_equals_in_place_rotation(variant):
    """RoPE of a decode step: block matrices diag(I, R) (few rows) and R on the rope parts in place (many rows) give
    the same logits, cache rows and MTP drafts."""
    m, cache, r = _runner_setup(variant)
    cfg = m.config
    torch.manual_seed(5)
    x = torch.randint(0, cfg.vocab_size, (3, 12))
    slots, pos = torch.tensor([0, 1, 2]), torch.tensor([8, 6, 7])
    outs = []
    for rows in (0, 1000):  # 0: always in place, 1000: always block matrices
        r.rope_block_rows, r._ctx = rows, None
        cache.buf.zero_()
        with torch.no_grad():
            _, hidden = r.prefill(x[:, :9], slots)
            logits, h = r.decode(x[:, 9:11], slots, pos, 10)  # 2 tokens a row: the in-place path at 6 rows
            mtp = r.mtp(h, x[:, 10:12], slots, pos, 10, last_only=True)
        outs.append((logits, mtp, cache.buf.clone()))
    (l0, m0, c0), (l1, m1, c1) = outs
    assert (l0 - l1).abs().max() <= 1e-5 and (m0 - m1).abs().max() <= 1e-5
    assert (c0 - c1).abs().max() <= 1e-5
    with torch.no_grad():
        full = m(x[:, :11]).logits
    for b in range(3):  # row b's tokens 9, 10 sit at positions pos[b], pos[b] + 1 of its cache
        p = int(pos[b])
        ref = m(torch.cat([x[b, :p], x[b, 9:11]])[None]).logits[0, p:] if p != 9 else full[b, 9:11]
        assert (l0[b] - ref).abs().max() <= 1e-4
