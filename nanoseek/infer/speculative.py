"""MTP self-speculative decoding (DeepSeek-V3 §2.2 and §5.4.3): the MTP module drafts, the main model verifies,
greedy, batch 1.

State of a sequence between steps: the main cache holds positions 0..p-1, `last` is the token at position p (not
cached yet) and `drafts` the MTP module's guesses for positions p+1..p+D. One step:
  1. the main model runs [last, d_1..d_D] at positions p..p+D (ONE forward of D+1 tokens over the latent cache);
     g_i = argmax at p+i is the true token p+i+1 as long as d_1..d_i were right;
  2. accept the longest run of drafts equal to g: n drafts, emit [d_1..d_n, g_n] (n+1 tokens for one forward);
     the latents written at p+n+1.. are overwritten by the next step before anything attends to them;
  3. the MTP module (its own cache layer) reads the main hidden state of each newly verified position i and the
     embedding of token i+1 and writes its latents; its logits at the last one are the next d_1. With D = 2 the
     module runs once more on its own normed output and d_1 to guess d_2 (the module is trained for one step
     ahead, so chaining it is an approximation: d_2 is right less often; its latent at that position is a
     placeholder that step 3 of the next step overwrites with the one from the verified main hidden state).
The emitted tokens are exactly greedy decoding's (up to float noise between a multi-token and a 1-token forward).
V3 reports 85-90% acceptance of the drafted token on its trained model; a random model's MTP head agrees with the
main head rarely, so acceptance and speedup are only meaningful on a trained checkpoint (bench/decode.py).
What a step costs next to a plain one on a small model: the verify forward costs little more than a 1-token step
(a step is mostly op dispatch), the MTP pass about one more block and a head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SpecState:
    pos: int  # main-cache tokens of the sequence (positions 0..pos-1)
    last: int  # token at position pos (not cached yet)
    drafts: list[int] = field(default_factory=list)  # MTP's guesses for positions pos+1..
    drafted: list[int] = field(default_factory=list)  # per draft depth: drafts verified so far
    accepted: list[int] = field(default_factory=list)  # per draft depth: drafts accepted so far

    def __post_init__(self):
        self.drafted = self.drafted or [0] * len(self.drafts)
        self.accepted = self.accepted or [0] * len(self.drafts)

    @property
    def draft(self) -> int:  # the first draft (one-draft speculation's only one)
        return self.drafts[0]


def _draft(runner, h_prev, next_ids, slot: int, start: int, depth: int) -> list[int]:
    """MTP over positions start.. (h_prev [1, k, d], next_ids [1, k]); returns `depth` chained drafts."""
    slots = torch.tensor([slot])
    out = runner.mtp(
        h_prev,
        next_ids,
        slots,
        torch.tensor([start]),
        start + next_ids.shape[1],
        last_only=True,
        return_hidden=depth > 1,
    )
    logits, h = out if depth > 1 else (out, None)
    drafts = [int(logits[0, -1].argmax())]
    pos = start + next_ids.shape[1]
    for _ in range(depth - 1):  # feed the module its own normed output and its draft, one position on
        logits, h = runner.mtp(
            h, torch.tensor([[drafts[-1]]]), slots, torch.tensor([pos]), pos + 1, last_only=True, return_hidden=True
        )
        drafts.append(int(logits[0, -1].argmax()))
        pos += 1
    return drafts


def mtp_prefill(runner, hidden: torch.Tensor, prompt: list[int], first: int, slot: int, depth: int = 1) -> SpecState:
    """After the main prefill of `prompt` (hidden [T, d] of its positions) and greedy token `first`, fill the MTP
    cache of positions 0..T-1 and draft `depth` tokens after `first`."""
    T = len(prompt)
    next_ids = torch.tensor([prompt[1:] + [first]])  # [1, T]: token i+1 for position i
    return SpecState(pos=T, last=first, drafts=_draft(runner, hidden[None, :T], next_ids, slot, 0, depth))


def spec_step(runner, st: SpecState, slot: int, want_logprobs: bool = False):
    """One verify step; updates `st` and returns (tokens [1 .. depth+1], logprobs list or None)."""
    p, D = st.pos, len(st.drafts)
    logits, hidden = runner.decode(
        torch.tensor([[st.last] + st.drafts]), torch.tensor([slot]), torch.tensor([p]), p + D + 1
    )
    g = logits[0].argmax(dim=-1).tolist()  # [g_0 .. g_D]
    n = 0
    while n < D and st.drafts[n] == g[n]:
        n += 1
    for i in range(min(n + 1, D)):  # the drafts looked at: the accepted ones and the first wrong one
        st.drafted[i] += 1
        st.accepted[i] += i < n
    tokens = st.drafts[:n] + [g[n]]
    k = len(tokens)
    lp = None
    if want_logprobs:
        lp = logits[0, :k].log_softmax(dim=-1).gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()
    # MTP at position p+i reads h_{p+i} and the token at p+i+1, which is tokens[i]
    st.drafts = _draft(runner, hidden[:, :k], torch.tensor([tokens]), slot, p, D)
    st.pos, st.last = p + k, tokens[-1]
    return tokens, lp
