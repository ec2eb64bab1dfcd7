"""The engine: its tokens are the model's (greedy = full-forward argmax, logprobs = full-forward log_softmax), the
scheduler batches continuously and frees every slot, sampling is per request and reproducible, errors are clear."""

import pytest
import torch

from nanoseek.infer.engine import Engine, EngineConfig, EngineError
from nanoseek.infer.runner import Runner
from nanoseek.infer.sampling import BatchSampling, SamplingParams, sample
from nanoseek.model.transformer import Transformer
from tests.tiny import VARIANTS, tiny

EOS = 96


class CharTokenizer:
    """Token i decodes to a fixed piece of text; EOS is the last id."""

    eos_id = EOS
    PIECES = [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(EOS)] + [""]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.PIECES[i] for i in ids)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    m = Transformer(tiny(**kw)).eval()
    for moe in m.moe_layers():  # a non-zero correction bias changes which experts are chosen
        moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return m


@pytest.fixture(scope="module")
def model():
    return _model()


def _prompts(n, seed=0, lo=1, hi=12):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (int(torch.randint(lo, hi, (), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _full_logits(model, prompt, completion):
    with torch.no_grad():
        return model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]  # [len(completion), V]


RUNNER_VARIANTS = {**{k: VARIANTS[k] for k in ("q_lora", "no_q_lora", "yarn", "groups", "no_norm_topk")},
                   "many_experts": dict(n_routed_experts=32, num_experts_per_tok=2)}


@pytest.mark.parametrize("variant", list(RUNNER_VARIANTS))
def test_runner_decode_equals_full_forward(variant):
    """The lean decode step is the model's math (MoE both ways: with 32 experts, one token gathers its experts'
    weights and five run all experts)."""
    m = _model(seed=1, **RUNNER_VARIANTS[variant])
    cfg = m.config
    from nanoseek.infer.cache import LatentCache

    for B in (1, 5):
        x = torch.randint(0, cfg.vocab_size, (B, 20))
        cache = LatentCache(cfg, 6, 32)
        r = Runner(m, cache)
        r.sync()
        slots = torch.tensor([5, 1, 3, 0, 2][:B])
        with torch.no_grad():
            full = m(x).logits
            r.prefill(x[:, :8], slots)
            steps = [r.decode(x[:, t : t + 1], slots, torch.full((B,), t), t + 1)[0] for t in range(8, 17)]
            steps.append(r.decode(x[:, 17:20], slots, torch.full((B,), 17), 20)[0])  # a 3-token chunk
        diff = (torch.cat(steps, 1) - full[:, 8:]).abs().max().item()
        assert diff <= 1e-4, f"{variant} B={B}: {diff}"


def test_greedy_equals_full_forward_argmax_with_continuous_batching(model):
    """9 prompts of different lengths through 4 slots: requests wait, join and leave; every token is the argmax
    of the model's full forward over prompt + tokens so far, and every slot is free at the end."""
    prompts = _prompts(9)
    engine = Engine(model, None, EngineConfig(max_batch=4, max_model_len=64, threads=1))
    params = SamplingParams(max_tokens=12, temperature=0)
    seen_waiting = False
    rids = [engine.add_request(p, params) for p in prompts]
    got = {r: [] for r in rids}
    first_step_of = {}
    step = 0
    while engine.has_unfinished():
        seen_waiting |= engine.stats()["waiting"] > 0
        for out in engine.step():
            if out.request_id not in first_step_of:
                first_step_of[out.request_id] = step
            got[out.request_id] += out.token_ids
        step += 1
        assert engine.stats()["slots_used"] <= 4
    assert seen_waiting
    assert len(set(first_step_of.values())) > 1  # later requests joined a running batch
    for rid, p in zip(rids, prompts):
        toks = got[rid]
        assert len(toks) == 12
        assert toks == _full_logits(model, p, toks).argmax(-1).tolist()
    assert engine.stats() == dict(running=0, waiting=0, slots_used=0, slots_total=4)


def test_joining_mid_decode(model):
    """A request added while others decode starts at the next step without disturbing them."""
    engine = Engine(model, None, EngineConfig(max_batch=4, max_model_len=64, threads=1))
    p1, p2 = [3, 4, 5, 6], [7, 8]
    a = engine.add_request(p1, SamplingParams(max_tokens=10, temperature=0))
    toks = {a: []}
    for _ in range(4):
        for o in engine.step():
            toks[o.request_id] += o.token_ids
    b = engine.add_request(p2, SamplingParams(max_tokens=6, temperature=0))
    toks[b] = []
    outs = engine.step()
    assert {o.request_id for o in outs} == {a, b}  # one step: b's prefill and a's decode
    for o in outs:
        toks[o.request_id] += o.token_ids
    while engine.has_unfinished():
        for o in engine.step():
            toks[o.request_id] += o.token_ids
    assert toks[a] == _full_logits(model, p1, toks[a]).argmax(-1).tolist()
    assert toks[b] == _full_logits(model, p2, toks[b]).argmax(-1).tolist()


def test_logprobs_equal_full_forward(model):
    """GRPO's old log-probs: log_softmax(logits / T) of the full forward at the sampled tokens."""
    engine = Engine(model, None, EngineConfig(max_batch=8, max_model_len=64, threads=1))
    prompts = _prompts(3, seed=1)
    for T, top_p in ((0.7, 0.9), (1.0, 1.0), (0.0, 1.0)):
        outs = engine.generate(prompts, SamplingParams(max_tokens=10, temperature=T, top_p=top_p, n=2, seed=5,
                                                       logprobs=True))
        for p, group in zip(prompts, outs):
            for c in group:
                assert len(c.logprobs) == len(c.token_ids) == 10
                ref = (_full_logits(model, p, c.token_ids) / (T or 1.0)).log_softmax(-1)
                ref = ref.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
                assert (torch.tensor(c.logprobs) - ref).abs().max().item() <= 1e-4


def test_group_shares_one_prefill(model):
    """n samples prefill the prompt once (one row) and copy its latents to their slots."""
    engine = Engine(model, None, EngineConfig(max_batch=8, max_model_len=64, threads=1))
    rows = []
    orig = engine.runner.prefill

    def spy(ids, slots):
        rows.append(ids.shape[0])
        return orig(ids, slots)

    engine.runner.prefill = spy
    p = [5, 6, 7, 8, 9]
    out = engine.generate([p], SamplingParams(max_tokens=8, temperature=0, n=4))[0]
    assert rows == [1]
    ref = _full_logits(model, p, out[0].token_ids).argmax(-1).tolist()
    assert all(c.token_ids == ref for c in out)  # every sample decodes over a correct copy of the prompt
    sampled = engine.generate([p], SamplingParams(max_tokens=8, temperature=1.0, n=4, seed=1))[0]
    assert len({tuple(c.token_ids) for c in sampled}) > 1  # distinct streams per sample


def test_seeded_sampling_is_reproducible_whatever_the_batch(model):
    p = [11, 12, 13]
    params = SamplingParams(max_tokens=12, temperature=0.9, top_k=40, seed=123)
    e = Engine(model, None, EngineConfig(max_batch=8, max_model_len=64, threads=1))
    alone = e.generate([p], params)[0][0].token_ids
    for q in _prompts(3, seed=3):  # other requests share the batch with the seeded one
        e.add_request(q, SamplingParams(max_tokens=20, temperature=1.0))
    target = e.add_request(p, params)
    toks = []
    while e.has_unfinished():
        toks += [t for o in e.step() if o.request_id == target for t in o.token_ids]
    assert toks == alone
    other = e.generate([p], SamplingParams(max_tokens=12, temperature=0.9, top_k=40, seed=124))[0][0].token_ids
    assert other != alone


def test_sampler_filters():
    V = 50
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(0)) * 3
    params = [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6),
              SamplingParams(temperature=1.0, min_p=1.0), SamplingParams(temperature=0),
              SamplingParams(temperature=1.0, top_k=3), SamplingParams(temperature=1.0, top_p=0.5, min_p=0.2)]
    bs = BatchSampling.of(params, V)
    argmax = logits.argmax(-1)
    top3 = logits.topk(3, dim=-1).indices
    probs = logits.softmax(-1)
    sorted_p, order = probs.sort(-1, descending=True)
    nucleus = order[5, : int(((sorted_p[5].cumsum(0) - sorted_p[5]) < 0.5).sum())]
    nucleus = [t for t in nucleus.tolist() if probs[5, t] >= 0.2 * probs[5].max()]
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        tok, _ = sample(logits, bs, torch.rand(6, generator=g))
        assert tok[:4].tolist() == argmax[:4].tolist()
        assert tok[4] in top3[4]
        assert tok[5].item() in nucleus


def test_sampler_matches_the_distribution():
    """Temperature sampling draws from softmax(logits / T): compare frequencies over many draws."""
    V, N = 8, 20000
    logits = torch.randn(V, generator=torch.Generator().manual_seed(2))
    bs = BatchSampling.of([SamplingParams(temperature=0.5)] * N, V)
    tok, _ = sample(logits.expand(N, V).contiguous(), bs, torch.rand(N, generator=torch.Generator().manual_seed(3)))
    freq = torch.bincount(tok, minlength=V).float() / N
    assert (freq - (logits / 0.5).softmax(-1)).abs().max().item() < 0.015


def test_stop_strings_stop_tokens_and_streaming_text(model):
    tok = CharTokenizer()
    engine = Engine(model, tok, EngineConfig(max_batch=4, max_model_len=64, threads=1))
    p = [1, 2, 3]
    free = engine.generate([p], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0][0]
    text = tok.decode(free.token_ids)
    assert free.text == text and free.finish_reason == "length"
    # a stop string from the middle of the free-running text: output ends right before it, never shows it
    stop = text[10:13]
    cut = text.index(stop)
    rid = engine.add_request(p, SamplingParams(max_tokens=30, temperature=0, stop=[stop], ignore_eos=True))
    streamed, outs = "", []
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id == rid
            streamed += o.text
            outs.append(o)
    assert streamed == text[:cut]
    assert outs[-1].finished and outs[-1].finish_reason == "stop" and not any(o.finished for o in outs[:-1])
    # a stop token id: included in token_ids, finish_reason "stop", not in the text
    t5 = free.token_ids[5]
    c = engine.generate([p], SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[t5], ignore_eos=True))
    c = c[0][0]
    assert c.token_ids == free.token_ids[: free.token_ids.index(t5) + 1] and c.finish_reason == "stop"
    assert c.text == tok.decode(c.token_ids[:-1])
    assert engine.stats()["slots_used"] == 0


def test_tokenizer_eos_stops_unless_ignored(model):
    """Make EOS the greedy choice at some step by biasing the head; the engine stops there."""
    m = _model()
    free = Engine(m, CharTokenizer(), EngineConfig(max_batch=2, max_model_len=64, threads=1)).generate(
        [[1, 2]], SamplingParams(max_tokens=10, temperature=0))[0][0]
    with torch.no_grad():
        m.lm_head.weight[EOS] = m.lm_head.weight[free.token_ids[3]] * 1.5  # EOS outranks that token
    e = Engine(m, CharTokenizer(), EngineConfig(max_batch=2, max_model_len=64, threads=1))
    c = e.generate([[1, 2]], SamplingParams(max_tokens=10, temperature=0))[0][0]
    assert c.finish_reason == "stop" and c.token_ids[-1] == EOS and len(c.token_ids) < 10
    c2 = e.generate([[1, 2]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0][0]
    assert c2.finish_reason == "length" and len(c2.token_ids) == 10


def test_abort_frees_slots(model):
    e = Engine(model, None, EngineConfig(max_batch=3, max_model_len=64, threads=1))
    a = e.add_request([1, 2, 3], SamplingParams(max_tokens=40, temperature=1.0, n=2))
    b = e.add_request([4, 5], SamplingParams(max_tokens=40, temperature=1.0, n=2))  # waits: 1 slot left
    e.step()
    e.step()
    assert e.stats() == dict(running=1, waiting=1, slots_used=2, slots_total=3)
    assert e.abort(a)
    assert e.stats()["slots_used"] == 0
    outs = e.step()  # the abort outputs, and b admitted into the freed slots
    aborted = [o for o in outs if o.request_id == a]
    assert sorted(o.index for o in aborted) == [0, 1]
    assert all(o.finished and o.finish_reason == "abort" for o in aborted)
    assert e.stats()["slots_used"] == 2
    assert e.abort(b) and not e.abort(b) and not e.abort("nope")
    c = e.add_request([6], SamplingParams(max_tokens=5))
    assert e.abort(c)  # a waiting (never admitted) request
    while e.has_unfinished():
        e.step()
    assert e.stats() == dict(running=0, waiting=0, slots_used=0, slots_total=3)


def test_errors_are_clear(model):
    e = Engine(model, None, EngineConfig(max_batch=4, max_model_len=32, threads=1))
    cases = [
        ([], SamplingParams(), "empty"),
        ([1] * 30, SamplingParams(max_tokens=5), "exceeds the context length 32"),
        ([1, 97], SamplingParams(), "outside the vocabulary"),
        ([1, -1], SamplingParams(), "outside the vocabulary"),
        ([1], SamplingParams(temperature=-1), "temperature"),
        ([1], SamplingParams(top_p=0), "top_p"),
        ([1], SamplingParams(max_tokens=0), "max_tokens"),
        ([1], SamplingParams(n=5, max_tokens=4), "max_batch"),
        ([1], SamplingParams(n=0, max_tokens=4), "n"),
        ("hello", SamplingParams(max_tokens=4), "integers"),
    ]
    for prompt, params, words in cases:
        with pytest.raises(EngineError, match=words):
            e.add_request(prompt, params)
    e.add_request([1], SamplingParams(max_tokens=2), request_id="x")
    with pytest.raises(EngineError, match="already in use"):
        e.add_request([1], SamplingParams(max_tokens=2), request_id="x")
    with pytest.raises(EngineError, match="idle"):
        e.generate([[1]], SamplingParams(max_tokens=2))
    assert isinstance(EngineError("x"), ValueError)


def test_generate_does_not_touch_load_statistics(model):
    for m in model.moe_layers():
        m.load.zero_()
    Engine(model, None, EngineConfig(max_batch=4, max_model_len=64, threads=1)).generate(
        _prompts(3), SamplingParams(max_tokens=5, temperature=0))
    assert all(int(m.load.sum()) == 0 for m in model.moe_layers())


def test_bf16_copy_follows_live_weights():
    """dtype=bfloat16 decodes with a bf16 copy; an in-place weight update (an optimizer step) reaches it."""
    m = _model(seed=4)
    e = Engine(m, None, EngineConfig(max_batch=2, max_model_len=64, threads=1, dtype="bfloat16"))
    p = [1, 2, 3, 4]
    c = e.generate([p], SamplingParams(max_tokens=8, temperature=0, logprobs=True))[0][0]
    ref = _full_logits(m, p, c.token_ids).log_softmax(-1).gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
    assert (torch.tensor(c.logprobs) - ref).abs().max().item() < 0.1  # bf16 noise, not a different model
    with torch.no_grad():
        m.lm_head.weight.mul_(-1.0)  # flips every preference
    c2 = e.generate([p], SamplingParams(max_tokens=8, temperature=0))[0][0]
    assert c2.token_ids[0] != c.token_ids[0]
    assert c2.token_ids[0] == _full_logits(m, p, c2.token_ids[:1]).argmax(-1).item()


def test_engine_seed_reproduces_unseeded_requests(model):
    e = Engine(model, None, EngineConfig(max_batch=8, max_model_len=64, threads=1))
    prompts = _prompts(3, seed=4)
    params = SamplingParams(max_tokens=10, temperature=1.0, n=2)
    runs = []
    for _ in range(2):
        e.seed(7)
        runs.append([[c.token_ids for c in g] for g in e.generate(prompts, params)])
    assert runs[0] == runs[1]
    assert runs[0][0][0] != runs[0][1][0]  # prompts do not share a stream
    e.seed(8)
    assert [[c.token_ids for c in g] for g in e.generate(prompts, params)] != runs[0]


def test_folded_weights_rederived_only_when_parameters_change(model):
    """The decode weights are derived once and kept while the model's parameters stay put (prefill's restoring of
    the MoE load counters is no change); an in-place update of any parameter re-derives them at the next admit."""
    e = Engine(model, None, EngineConfig(max_batch=2, max_model_len=64, threads=1))
    params = SamplingParams(max_tokens=4, temperature=0)
    e.generate(_prompts(2), params)
    w = e.runner.w
    e.generate(_prompts(2, seed=1), params)
    assert e.runner.w is w
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.add_(0.0)  # bumps its version, as an optimizer step does
    e.generate(_prompts(2), params)
    assert e.runner.w is not w


def test_running_sequences_stay_in_contiguous_slots(model):
    """Sequences that end at different steps (different max_tokens, a group of n=2, an abort) leave holes; the
    engine moves the sequence in the highest slot into each hole, so the running slots are always 0..B-1 (the
    decode step reads them as views of the pool), and every token is still the full forward's argmax."""
    engine = Engine(model, None, EngineConfig(max_batch=5, max_model_len=64, threads=1))
    prompts = _prompts(7, seed=5)
    rids = [engine.add_request(p, SamplingParams(max_tokens=3 + 2 * i, temperature=0, n=1 + (i == 2)))
            for i, p in enumerate(prompts)]
    got = {(r, i): [] for r in rids for i in range(2)}
    moved, step = False, 0
    while engine.has_unfinished():
        if step == 4:
            engine.abort(rids[3])
        before = {id(s): s.slot for s in engine._running}
        for out in engine.step():
            got[out.request_id, out.index] += out.token_ids
        slots = [s.slot for s in engine._running]
        assert slots == list(range(len(slots))), slots
        moved |= any(before.get(id(s), s.slot) != s.slot for s in engine._running)
        step += 1
    assert moved  # some sequence was moved to a lower slot
    for i, (rid, p) in enumerate(zip(rids, prompts)):
        for j in range(1 + (i == 2)):
            toks = got[rid, j]
            if i != 3:
                assert len(toks) == 3 + 2 * i
            assert toks == _full_logits(model, p, toks).argmax(-1).tolist()
    assert engine.stats()["slots_used"] == 0


def test_new_requests_share_one_prefill(model):
    """Different prompts added before one step are admitted together: ONE right-padded prefill forward with a row
    per request (padding must not change any of them: greedy tokens are each prompt's own full-forward argmax)."""
    engine = Engine(model, None, EngineConfig(max_batch=8, max_model_len=64, threads=1))
    shapes = []
    orig = engine.runner.prefill

    def spy(ids, slots):
        shapes.append(tuple(ids.shape))
        return orig(ids, slots)

    engine.runner.prefill = spy
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (3, 9, 1, 6)]
    params = SamplingParams(max_tokens=8, temperature=0)
    rids = [engine.add_request(p, params) for p in prompts]
    got = {r: [] for r in rids}
    outs = engine.step()
    assert shapes == [(4, 9)]  # one forward, 4 rows padded to the longest prompt
    assert {o.request_id for o in outs} == set(rids)  # every request got its first token from it
    while True:
        for o in outs:
            got[o.request_id] += o.token_ids
        if not engine.has_unfinished():
            break
        outs = engine.step()
    assert shapes == [(4, 9)]  # decoding ran no further prefill
    for rid, p in zip(rids, prompts):
        assert len(got[rid]) == 8
        assert got[rid] == _full_logits(model, p, got[rid]).argmax(-1).tolist()
