"""Packed rows: a batch of sequences stored as its distinct tokens, for training forwards over rows that share
prefixes (GRPO: the G completions of a prompt share it).

Causal attention makes a token's hidden states a function of the tokens up to it only, so the G copies of a
prompt in a rollout batch compute the same thing G times, and right-padding computes nothing useful at all. A
`PackedRows` keeps each distinct prompt once, then every row's own continuation, with no padding: the token-wise
layers (projections, norms, MLP/MoE, head) run over those S distinct tokens. Only attention needs the rows
(MLA._packed): each distinct prompt attends over itself (causal), and each row's continuation tokens attend over
the whole row, its prompt included, gathered from the distinct tokens into a right-padded [N, L] layout.

Padding slots point at distinct token 0: masks keep every real query off them, and pad queries' outputs are
never read (their gradient is exactly zero).

    packed = pack_rows(prompts, continuations)           # lists of token ids, one pair per row
    out = model(packed.ids[None], packed=packed, logits_for=packed.rows[:, :-1][mask])   # logits [M, V]
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class PackedRows:
    ids: torch.Tensor  # [S] distinct tokens: each distinct prompt once, then each row's continuation
    positions: torch.Tensor  # [S] position of each token in its row(s)
    rows: torch.Tensor  # [N, L] index into ids of row b's t-th token (right padding: 0); attention's keys/values
    prompts: torch.Tensor  # [P, Lp] index into ids of distinct prompt p's tokens (right padding: 0)
    queries: torch.Tensor  # [N, Lc] index into ids of row b's continuation tokens (right padding: 0)
    mask: torch.Tensor  # [N, 1, Lc, L] bool: continuation token i of row b sees the row's keys j <= len(prompt) + i
    first: torch.Tensor  # [S] where each token's attention output is in cat(prompts.view(-1), queries.view(-1))

    def to(self, device) -> PackedRows:
        return PackedRows(*(getattr(self, f.name).to(device) for f in fields(self)))


def _pad(seqs: list, width: int) -> torch.Tensor:
    out = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def pack_rows(prompts: list[list[int]], continuations: list[list[int]]) -> PackedRows:
    """Row b = prompts[b] + continuations[b]. Equal prompts (by value) are stored once; rows need not be grouped."""
    if len(prompts) != len(continuations) or not prompts:
        raise ValueError(f"need one continuation per prompt and at least one row, got {len(prompts)} prompts and "
                         f"{len(continuations)} continuations")
    if any(not p for p in prompts):
        raise ValueError("every row needs a non-empty prompt (at least a BOS token) to pack")
    ids: list[int] = []
    positions: list[int] = []
    start: dict[tuple, int] = {}  # distinct prompt -> index of its first token in ids
    prompt_at: list[range] = []  # each distinct prompt's tokens in ids
    row_prompt: list[range] = []
    row_cont: list[range] = []
    for p, c in zip(prompts, continuations):
        key = tuple(p)
        if key not in start:
            start[key] = len(ids)
            prompt_at.append(range(len(ids), len(ids) + len(p)))
            ids += p
            positions += range(len(p))
        row_prompt.append(range(start[key], start[key] + len(p)))
        row_cont.append(range(len(ids), len(ids) + len(c)))
        ids += c
        positions += range(len(p), len(p) + len(c))
    L = max(len(p) + len(c) for p, c in zip(row_prompt, row_cont))
    Lp, Lc = max(map(len, prompt_at)), max(1, max(map(len, row_cont)))  # at least one (pad) query per row
    first = torch.zeros(len(ids), dtype=torch.long)
    for i, r in enumerate(prompt_at):
        first[r.start: r.stop] = torch.arange(i * Lp, i * Lp + len(r))
    base = len(prompt_at) * Lp
    for b, r in enumerate(row_cont):
        first[r.start: r.stop] = torch.arange(base + b * Lc, base + b * Lc + len(r))
    plen = torch.tensor([len(r) for r in row_prompt])
    mask = torch.arange(L)[None, None, :] <= plen[:, None, None] + torch.arange(Lc)[None, :, None]  # [N, Lc, L]
    rows = _pad([list(p) + list(c) for p, c in zip(row_prompt, row_cont)], L)
    return PackedRows(torch.tensor(ids), torch.tensor(positions), rows, _pad(prompt_at, Lp), _pad(row_cont, Lc),
                      mask[:, None], first)
