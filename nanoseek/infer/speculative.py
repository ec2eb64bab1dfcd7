"""MTP self-speculative decoding (DeepSeek-V3 §2.2 and §5.4.3): the MTP module drafts the token after next,
the main model verifies it, greedy, batch 1.

State of a sequence between steps: the main cache holds positions 0..p-1, `last` is the token at position p (not
cached yet) and `draft` the MTP module's guess for position p+1. One step:
  1. the main model runs [last, draft] at positions p, p+1 (one forward of 2 tokens over the latent cache);
     g1 = argmax at p (the true token p+1), g2 = argmax at p+1 (the token after the draft);
  2. g1 == draft: both are right, emit [draft, g2] (2 tokens for one forward); else emit [g1] (the latent written
     at p+1 is overwritten next step, and never attended before that);
  3. the MTP module (its own cache layer) reads the main hidden state of each newly verified position i and the
     embedding of token i+1 and writes its latents; its logits at the last one are the next draft.
The emitted tokens are exactly greedy decoding's (up to float noise between a 2-token and a 1-token forward).
V3 reports 85-90% acceptance of the drafted token on its trained model; a random model's MTP head agrees with the
main head rarely, so acceptance and speedup are only meaningful on a trained checkpoint (bench/decode.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SpecState:
    pos: int  # main-cache tokens of the sequence (positions 0..pos-1)
    last: int  # token at position pos (not cached yet)
    draft: int  # MTP's guess for position pos+1
    drafted: int = 0  # drafts verified so far
    accepted: int = 0  # drafts accepted so far


def mtp_prefill(runner, hidden: torch.Tensor, prompt: list[int], first: int, slot: int) -> SpecState:
    """After the main prefill of `prompt` (hidden [T, d] of its positions) and greedy token `first`, fill the MTP
    cache of positions 0..T-1 and draft the token after `first`."""
    T = len(prompt)
    next_ids = torch.tensor([prompt[1:] + [first]])  # [1, T]: token i+1 for position i
    logits = runner.mtp(hidden[None, :T], next_ids, torch.tensor([slot]), torch.zeros(1, dtype=torch.long), T,
                        last_only=True)
    return SpecState(pos=T, last=first, draft=int(logits[0, -1].argmax()))


def spec_step(runner, st: SpecState, slot: int, want_logprobs: bool = False):
    """One verify step; updates `st` and returns (tokens [1 or 2], logprobs list or None)."""
    p = st.pos
    slots = torch.tensor([slot])
    logits, hidden = runner.decode(torch.tensor([[st.last, st.draft]]), slots, torch.tensor([p]), p + 2)
    g = logits[0].argmax(dim=-1).tolist()  # [g1, g2]
    st.drafted += 1
    if g[0] == st.draft:
        st.accepted += 1
        tokens = [st.draft, g[1]]
    else:
        tokens = [g[0]]
    k = len(tokens)
    # MTP at position p+i reads h_{p+i} and the token at p+i+1, which is tokens[i] in both cases
    mtp_logits = runner.mtp(hidden[:, :k], torch.tensor([tokens]), slots, torch.tensor([p]), p + k, last_only=True)
    lp = None
    if want_logprobs:
        lp = logits[0, :k].log_softmax(dim=-1).gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()
    st.pos, st.last, st.draft = p + k, tokens[-1], int(mtp_logits[0, -1].argmax())
    return tokens, lp
