"""Per-request sampling: temperature, top-k, top-p (nucleus), min-p, seeds, stop strings and stop token ids.

One batched pass over the logits of every running sequence; each row keeps its own parameters. Rows with a seed
draw their uniform number from their own torch.Generator, so a seeded request gives the same tokens whatever else
is in the batch (up to float noise of the batch's shapes).

Log-probabilities returned for the sampled tokens are those of the sampling distribution before truncation:
log_softmax(logits / temperature) (raw logits for greedy), the quantity GRPO's ratio π_θ/π_old is taken under
(nanoseek.train.grpo.token_logprobs divides by the same temperature).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class SamplingError(ValueError):
    pass


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None  # reproducible per request
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output text)
    stop_token_ids: list[int] = field(default_factory=list)  # plus the tokenizer's EOS unless ignore_eos
    ignore_eos: bool = False
    n: int = 1  # n samples of one prompt share one prefill
    logprobs: bool = False  # per-token logprobs of the sampled tokens (RL needs them)

    def validate(self) -> None:
        """Raise SamplingError naming the bad field and a fix."""

        def bad(name, why, fix):
            raise SamplingError(f"{name}: {why}; {fix}")

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}", "ask for at least one token")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            bad("temperature", f"must be >= 0, got {self.temperature!r}", "use 0 for greedy or e.g. 0.6-1.0")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p!r}", "use 1.0 to turn nucleus sampling off")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", f"must be an integer >= 0, got {self.top_k!r}", "use 0 to turn top-k off")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            bad("min_p", f"must be in [0, 1], got {self.min_p!r}", "use 0 to turn min-p off")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", f"must be an integer or None, got {self.seed!r}", "pass an integer seed")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            bad("n", f"must be an integer >= 1, got {self.n!r}", "ask for at least one sample")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", f"must be a list of non-empty strings, got {self.stop!r}", "drop empty stop strings")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
            bad("stop_token_ids", f"must be a list of token ids, got {self.stop_token_ids!r}", "pass integers")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request seeded with `seed` (distinct streams for the n samples)."""
    return (seed * 0x9E3779B1 + index * 0x85EBCA77 + 1) % (2**63 - 1)


@dataclass
class BatchSampling:
    """The sampling parameters of the rows of one batch, as tensors (built once per change of the batch)."""

    temperature: torch.Tensor  # [B] (1.0 for greedy rows, so division is safe)
    greedy: torch.Tensor  # [B] bool
    top_k: torch.Tensor  # [B] long, vocab size where off
    top_p: torch.Tensor  # [B]
    min_p: torch.Tensor  # [B]
    all_greedy: bool
    any_truncation: bool
    any_logprobs: bool

    @classmethod
    def of(cls, params: list[SamplingParams], vocab_size: int) -> BatchSampling:
        greedy = [p.temperature == 0 for p in params]
        return cls(
            temperature=torch.tensor([1.0 if g else float(p.temperature) for p, g in zip(params, greedy)]),
            greedy=torch.tensor(greedy),
            top_k=torch.tensor([p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]),
            top_p=torch.tensor([float(p.top_p) for p in params]),
            min_p=torch.tensor([float(p.min_p) for p in params]),
            all_greedy=all(greedy),
            any_truncation=any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in params),
            any_logprobs=any(p.logprobs for p in params),
        )


def sample(logits: torch.Tensor, bs: BatchSampling, uniforms: torch.Tensor | None):
    """logits [B, V] (fp32) -> (tokens [B] long, logprobs [B] fp32 or None).

    `uniforms` [B] in [0, 1): one draw per row from the row's generator (None when every row is greedy).
    Sampling is by inverse CDF over the sorted, truncated distribution: top-k keeps the k most likely tokens,
    top-p the smallest prefix whose mass reaches p, min-p the tokens with p >= min_p * p_max (always >= 1 token).
    """
    logp = None
    if bs.all_greedy:
        tokens = logits.argmax(dim=-1)
        if bs.any_logprobs:
            logp = logits.log_softmax(dim=-1).gather(1, tokens[:, None])[:, 0]
        return tokens, logp
    scaled = logits / bs.temperature[:, None]
    if bs.any_truncation:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [B, V]
        probs = sorted_logits.softmax(dim=-1)
        drop = torch.arange(probs.shape[1])[None, :] >= bs.top_k[:, None]  # top-k first, then renormalize
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
        drop |= (probs.cumsum(dim=-1) - probs) >= bs.top_p[:, None]  # mass before this token already reaches p
        drop |= probs < bs.min_p[:, None] * probs[:, :1]
        drop[:, 0] = False
        probs = probs.masked_fill(drop, 0.0)
    else:
        order = None
        probs = scaled.softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)  # [B, V], last column = the kept mass
    u = uniforms[:, None] * cdf[:, -1:]
    pick = (cdf <= u).sum(dim=-1).clamp_(max=probs.shape[1] - 1)  # first index with cdf > u
    if order is not None:
        # never land on a dropped token through float ties at the boundary
        pick = torch.minimum(pick, (~drop).sum(dim=-1) - 1)
        pick = order.gather(1, pick[:, None])[:, 0]
    tokens = torch.where(bs.greedy, logits.argmax(dim=-1), pick)
    if bs.any_logprobs:
        logp = scaled.log_softmax(dim=-1).gather(1, tokens[:, None])[:, 0]
    return tokens, logp
