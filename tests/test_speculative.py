"""MTP self-speculative decoding gives exactly plain greedy decoding's tokens.

A random model's MTP head almost never agrees with its main head (acceptance near 0, measured by bench/decode.py
on a trained checkpoint), so the accept branch is exercised here with an oracle draft (the true token after next)
and with a half-wrong one; the output must not depend on the drafts at all.
"""

import pytest
import torch

from nanoseek.infer.engine import Engine, EngineConfig, EngineError
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model.transformer import Transformer
from tests.tiny import VARIANTS, tiny

PROMPTS = [[1, 2, 3], [40, 41, 42, 43, 44, 45, 46], [7], [90, 3, 17, 17, 5]]


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    m = Transformer(tiny(**kw)).eval()
    for moe in m.moe_layers():
        moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return m


def _greedy(model, prompts, max_tokens, **kw):
    e = Engine(model, None, EngineConfig(max_batch=4, max_model_len=96, threads=1))
    return [g[0].token_ids for g in e.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, **kw))]


def _speculative(model, prompt, max_tokens, oracle=None, every=1, drafts=1, **kw):
    """Speculative greedy of one prompt; with `oracle` (the plain greedy tokens) the MTP drafts are replaced by the
    true token they guess on every `every`-th MTP call (others are left as the MTP head made them)."""
    e = Engine(model, None, EngineConfig(max_batch=4, max_model_len=96, threads=1, speculative=True,
                                         spec_drafts=drafts))
    if oracle is not None:
        seq_all = prompt + oracle
        real_mtp = e.runner.mtp
        calls = [0]

        def mtp(h_prev, next_ids, slots, start_pos, S, **kw):
            out = real_mtp(h_prev, next_ids, slots, start_pos, S, **kw)
            logits = out[0] if isinstance(out, tuple) else out
            calls[0] += 1
            j = int(start_pos[0]) + next_ids.shape[1] + 1  # the position the last row's logits predict
            if calls[0] % every == 0 and j < len(seq_all):
                logits[0, -1] = -1e9
                logits[0, -1, seq_all[j]] = 1e9
            return out

        e.runner.mtp = mtp
    c = e.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0, **kw))[0][0]
    return c, e


@pytest.mark.parametrize("drafts", [1, 2])
@pytest.mark.parametrize("variant", ["q_lora", "no_interleave_all_moe"])
def test_speculative_equals_greedy(variant, drafts):
    m = _model(**VARIANTS[variant])
    ref = _greedy(m, PROMPTS, 24)
    for p, r in zip(PROMPTS[:3], ref):
        c, e = _speculative(m, p, 24, drafts=drafts)
        assert c.token_ids == r
        assert e.spec_drafted > 0  # the speculative path ran
        # oracle drafts: every draft is accepted, drafts + 1 tokens per verify
        c, e = _speculative(m, p, 24, oracle=r, drafts=drafts)
        assert c.token_ids == r
        steps = e.spec_drafted // drafts
        assert e.spec_accepted == e.spec_drafted > 0 and steps <= -(-23 // (drafts + 1)) + 1
        assert e.spec_drafted_by_depth == [steps] * drafts
        # some MTP calls right, some wrong: accept and reject branches (at every depth) interleave
        for every in (2, 3) if drafts == 1 else (3, 5):  # (with 2 drafts, MTP calls alternate first/chained)
            c, e = _speculative(m, p, 24, oracle=r, every=every, drafts=drafts)
            assert c.token_ids == r
            assert 0 < e.spec_accepted < e.spec_drafted


@pytest.mark.parametrize("drafts", [1, 2])
def test_speculative_stops_and_logprobs(drafts):
    m = _model(seed=2)
    p = PROMPTS[1]
    ref = _greedy(m, [p], 20)[0]
    stop = ref[7]
    c, _ = _speculative(m, p, 20, oracle=ref, stop_token_ids=[stop], logprobs=True, drafts=drafts)
    assert c.token_ids == ref[: ref.index(stop) + 1] and c.finish_reason == "stop"
    with torch.no_grad():
        full = m(torch.tensor([p + c.token_ids])).logits[0, len(p) - 1 : -1].log_softmax(-1)
    ref_lp = full.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
    assert (torch.tensor(c.logprobs) - ref_lp).abs().max().item() <= 1e-4
    # max_tokens cuts an accepted pair in half
    c, _ = _speculative(m, p, 5, oracle=ref, drafts=drafts)
    assert c.token_ids == ref[:5] and c.finish_reason == "length"


def test_speculative_falls_back_when_others_join():
    """A speculating sequence that gets company decodes plainly from then on; all outputs stay greedy."""
    m = _model(seed=3)
    ref = _greedy(m, PROMPTS[:2], 16)
    e = Engine(m, None, EngineConfig(max_batch=4, max_model_len=96, threads=1, speculative=True))
    a = e.add_request(PROMPTS[0], SamplingParams(max_tokens=16, temperature=0))
    toks = {a: []}
    for _ in range(3):
        for o in e.step():
            toks[o.request_id] += o.token_ids
    assert e.spec_drafted > 0
    b = e.add_request(PROMPTS[1], SamplingParams(max_tokens=16, temperature=0))
    toks[b] = []
    while e.has_unfinished():
        for o in e.step():
            toks[o.request_id] += o.token_ids
    assert toks[a] == ref[0] and toks[b] == ref[1]


def test_speculative_needs_mtp():
    with pytest.raises(EngineError, match="MTP"):
        Engine(_model(num_nextn_predict_layers=0), None, EngineConfig(speculative=True, max_model_len=64, threads=1))
