"""GRPO (DeepSeekMath §4.1, DeepSeek-R1 §2.2.1) and its named variants: Dr. GRPO, DAPO, BNPO.

The pure functions come first (log-probs, entropy, group advantages, the clipped loss with its statistics, the
rollout statistics); the loss is what `tests/test_grpo_trl.py` proves equal to TRL's `GRPOTrainer`. The
rollout/training loop follows them.

Objective per token t of completion i (ρ = π_θ/π_old, A_i shared by every token of completion i):

    L_it = -min(ρ A_i, clip(ρ, 1-ε_low, 1+ε_high) A_i) + β·KL_it,   KL_it = π_ref/π_θ - log(π_ref/π_θ) - 1  (k3)

(kl_bias_correction = True multiplies KL_it by ρ, as DeepSeek-V3.2 does and TRL 1.16 does by default.) The
loss_type says how the L_it are averaged (mask m_it marks real completion tokens):

    grpo     mean_i ( Σ_t m L / Σ_t m )          the paper: per-sequence mean, then mean over sequences
    bnpo     Σ_it m L / Σ_it m                   token-level over the (micro-)batch
    dapo     Σ_it m L / num_items                token-level over the whole rollout batch (DAPO eq. 12)
    dr_grpo  Σ_it m L / (B · max_completion_length)   Dr. GRPO: no 1/|o|, a constant instead

Advantages (eq. in DeepSeekMath §4.1.2): A_i = (r_i - mean_group(r)) / (std + 1e-4), std unbiased like TRL's;
scale "group" uses the group's std, "batch" the whole batch's std, "none" no division (Dr. GRPO).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanoseek.config import ConfigError
from nanoseek.train.rewards import Reward

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
SCALES = ("group", "batch", "none")
STD_EPS = 1e-4  # added to the std before dividing, as TRL does (guards all-equal groups)


@dataclass
class GRPOConfig:
    """The [rl] section. Fields left at None take the named loss_type's own choice (resolved in __post_init__)."""

    # --- objective
    loss_type: str = "grpo"  # grpo | bnpo | dapo | dr_grpo (see the module docstring)
    num_generations: int = 8  # G: completions sampled per prompt
    scale_rewards: str | None = None  # group | batch | none; None: "none" for dr_grpo, else "group"
    epsilon_low: float = 0.2  # clip ρ from below at 1 - ε_low
    epsilon_high: float | None = None  # clip ρ from above at 1 + ε_high; None: 0.28 for dapo (DAPO), else ε_low
    beta: float = 0.001  # k3 KL weight to the frozen reference (R1 paper: 0.001); 0 skips the reference forward
    kl_bias_correction: bool = False  # DeepSeek-V3.2: weight the per-token KL by ρ (unbiased off-policy; TRL's default)
    mu: int = 1  # policy iterations per rollout batch (μ in GRPO's Algorithm 1)
    dynamic_sampling: bool | None = None  # drop groups with all-equal rewards; None: True for dapo only
    # --- rollouts
    prompts_per_step: int = 8  # prompts per rollout batch; the batch has prompts_per_step * G completions
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    # --- rewards (nanoseek.train.rewards)
    format_weight: float = 0.2  # reward = accuracy + format_weight * format (+ overlong)
    overlong_buffer: int = 0  # DAPO L_cache in tokens; 0 disables the soft overlong penalty (L_max = max length)
    prompt_opens_think: bool = True  # the chat template's generation prompt ends with "<think>\n"
    # --- optimisation
    lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0
    steps: int = 100
    micro_batch_size: int = 0  # completions per forward/backward; 0 = the whole rollout batch at once
    seed: int = 0

    def __post_init__(self):
        if self.scale_rewards is None:
            self.scale_rewards = "none" if self.loss_type == "dr_grpo" else "group"
        if self.epsilon_high is None:
            self.epsilon_high = 0.28 if self.loss_type == "dapo" else self.epsilon_low
        if self.dynamic_sampling is None:
            self.dynamic_sampling = self.loss_type == "dapo"
        self.validate()

    def validate(self) -> None:
        def bad(name, why, fix):
            raise ConfigError(f"rl.{name}: {why}; {fix}")

        if self.loss_type not in LOSS_TYPES:
            bad("loss_type", f"unknown {self.loss_type!r}", f"use one of {', '.join(LOSS_TYPES)}")
        if self.scale_rewards not in SCALES:
            bad("scale_rewards", f"unknown {self.scale_rewards!r}", f"use one of {', '.join(SCALES)}")
        if self.num_generations < 2:
            bad("num_generations", f"a group needs at least 2 completions, got {self.num_generations}",
                "set it to 2 or more (the paper uses 16 for R1, 64 for DeepSeekMath)")
        if not 0 <= self.epsilon_low < 1:
            bad("epsilon_low", f"must be in [0, 1) so that 1 - ε_low > 0, got {self.epsilon_low}", "use e.g. 0.2")
        if self.epsilon_high < 0:
            bad("epsilon_high", f"must be >= 0, got {self.epsilon_high}", "use e.g. 0.2, or 0.28 as in DAPO")
        if self.beta < 0:
            bad("beta", f"must be >= 0, got {self.beta}", "use 0 (no reference model) or e.g. 0.001")
        for name in ("mu", "prompts_per_step", "max_completion_length", "steps"):
            if getattr(self, name) < 1:
                bad(name, f"must be >= 1, got {getattr(self, name)}", "set it to a positive integer")
        if self.temperature <= 0:
            bad("temperature", f"must be > 0, got {self.temperature}", "sample at e.g. 1.0 during RL")
        if not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p}", "use 1.0 during RL")
        if not 0 <= self.overlong_buffer < self.max_completion_length:
            bad("overlong_buffer", f"{self.overlong_buffer} must be in [0, max_completion_length="
                f"{self.max_completion_length})", "use e.g. a quarter of max_completion_length, or 0 to disable")
        if self.micro_batch_size < 0:
            bad("micro_batch_size", f"must be >= 0, got {self.micro_batch_size}", "use 0 for the whole batch")


# ---- log-probabilities and entropy ---------------------------------------------------------------------------


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(ids | context) per position. logits [B, T, V] predict ids [B, T] (already shifted) -> [B, T] fp32.

    Computed as logit[id] - logsumexp(logits) in fp32, which never forms a second [B, T, V] tensor of log-probs.
    Logits are divided by the sampling temperature first, so the ratio is taken under the sampling distribution.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # [B, T]
    return picked - torch.logsumexp(logits, dim=-1)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of the next-token distribution per position: logits [B, T, V] -> [B, T] fp32 (nats)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ---- advantages ----------------------------------------------------------------------------------------------


def _check_groups(rewards: torch.Tensor, G: int) -> None:
    if rewards.dim() != 1 or rewards.numel() % G:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of G={G}; pass a flat "
                         "[num_prompts * G] tensor with each prompt's G completions next to each other")


def group_advantages(rewards: torch.Tensor, G: int, scale: str = "group") -> torch.Tensor:
    """A_i = (r_i - mean of its group) / (std + 1e-4). rewards [N] (groups of G consecutive) -> [N] fp32.

    scale: "group" = the group's std, "batch" = the whole batch's std (still the group's mean), "none" = no
    division (Dr. GRPO). std is unbiased (Bessel), like TRL, so the two agree exactly.
    """
    _check_groups(rewards, G)
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; use one of {', '.join(SCALES)}")
    r = rewards.float().view(-1, G)  # [P, G]
    adv = (r - r.mean(dim=1, keepdim=True)).view(-1)  # [N]
    if scale == "group":
        adv = adv / (r.std(dim=1, keepdim=True).expand_as(r).reshape(-1) + STD_EPS)
    elif scale == "batch":
        adv = adv / (rewards.float().std() + STD_EPS)
    return adv


def zero_variance_groups(rewards: torch.Tensor, G: int) -> torch.Tensor:
    """[N] rewards -> [P] bool: groups whose G rewards are all equal (they carry no GRPO signal)."""
    _check_groups(rewards, G)
    r = rewards.view(-1, G)
    return (r == r[:, :1]).all(dim=1)


def dynamic_sampling_keep(rewards: torch.Tensor, G: int) -> torch.Tensor:
    """DAPO's dynamic sampling (eq. 11 constraint 0 < |correct| < G): [N] rewards -> [N] bool, True for the
    completions of groups whose rewards are not all equal. The loop keeps sampling until it has enough of them."""
    return (~zero_variance_groups(rewards, G)).repeat_interleave(G)


# ---- the loss --------------------------------------------------------------------------------------------------


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π_θ || π_ref) per token: π_ref/π_θ - log(π_ref/π_θ) - 1 (always >= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def per_token_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
                   adv: torch.Tensor, mask: torch.Tensor, cfg: GRPOConfig, num_items: float | None = None,
                   entropy: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss of one (micro-)batch and its statistics.

    logp [B, T]: log π_θ of the completion tokens (with grad). old_logp [B, T]: log π_old at sampling time
    (None = logp.detach(), exact when μ = 1 and the batch is not split). ref_logp [B, T]: the frozen reference;
    needed only when cfg.beta > 0. adv [B] (or [B, T]). mask [B, T]: 1 for real completion tokens.
    num_items: for "dapo", the number of completion tokens in the WHOLE rollout batch (defaults to mask.sum());
    micro-batching with the other loss types divides each micro-batch's loss by the number of micro-batches.
    entropy [B, T] (optional, no grad needed) is only averaged into the stats.

    Returns (scalar loss, stats): stats are floats — policy_loss, kl (when ref_logp is given; ρ-weighted when
    cfg.kl_bias_correction, i.e. the term in the loss), clip_low,
    clip_high, clip_region (fractions of tokens whose ratio left the trust region where that matters), ratio_mean,
    ratio_max, entropy.
    """
    if cfg.beta > 0 and ref_logp is None:
        raise ValueError(f"beta={cfg.beta} needs the reference log-probs; pass ref_logp or set rl.beta = 0")
    if logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and mask {tuple(mask.shape)} must have the same [B, T] shape")
    mask = mask.to(logp.dtype)
    if old_logp is None:
        old_logp = logp.detach()
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)  # [B, 1]: one advantage per completion, shared by its tokens
    adv = adv.to(logp.dtype)

    ratio = torch.exp(logp - old_logp)  # ρ [B, T]
    clipped = torch.clamp(ratio, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    loss_tok = -torch.min(ratio * adv, clipped * adv)  # [B, T]
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else None
    if kl is not None and cfg.kl_bias_correction:
        kl = kl * ratio  # DeepSeek-V3.2 eq. 8: ρ·k3 is unbiased for the reverse KL when sampling from π_old
    if cfg.beta > 0:
        loss_tok = loss_tok + cfg.beta * kl

    masked = loss_tok * mask
    if cfg.loss_type == "grpo":
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif cfg.loss_type == "bnpo":
        loss = masked.sum() / mask.sum().clamp(min=1.0)
    elif cfg.loss_type == "dapo":
        n = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=logp.dtype)
        loss = masked.sum() / n.clamp(min=1.0)
    elif cfg.loss_type == "dr_grpo":
        loss = masked.sum() / (logp.size(0) * cfg.max_completion_length)
    else:
        raise ValueError(f"unknown loss_type {cfg.loss_type!r}; use one of {', '.join(LOSS_TYPES)}")

    with torch.no_grad():
        n_tok = mask.sum().clamp(min=1.0)

        def mmean(x):  # mean over real tokens
            return float((x.to(mask.dtype) * mask).sum() / n_tok)

        # A token is clipped only where clipping changes the objective: ρ below 1-ε with A < 0, above 1+ε with A > 0.
        low = (ratio < 1 - cfg.epsilon_low) & (adv < 0)
        high = (ratio > 1 + cfg.epsilon_high) & (adv > 0)
        real = mask > 0
        stats = {
            "policy_loss": float(loss.detach()),
            "clip_low": mmean(low),
            "clip_high": mmean(high),
            "clip_region": mmean(low | high),
            "ratio_mean": mmean(ratio),
            "ratio_max": float(ratio[real].max()) if real.any() else math.nan,
        }
        if kl is not None:
            stats["kl"] = mmean(kl)
        if entropy is not None:
            stats["entropy"] = mmean(entropy)
    return loss, stats


# ---- per-step rollout statistics -------------------------------------------------------------------------------


def rollout_stats(rs: Sequence[Reward], lengths: Sequence[int], truncated: Sequence[bool], G: int) -> dict[str, float]:
    """What one rollout batch looked like (logged every step next to the loss stats): reward mean/std, strict and
    lenient accuracy, format rate, share of zero-variance groups, mean length overall / of correct (strict score 1)
    / of wrong completions (nan when there are none), truncation rate, mean overlong penalty."""
    n = len(rs)
    if n == 0 or len(lengths) != n or len(truncated) != n:
        raise ValueError(f"need one length and one truncated flag per completion, got {n} rewards, "
                         f"{len(lengths)} lengths, {len(truncated)} flags")
    r = torch.tensor([x.reward for x in rs], dtype=torch.float64)
    acc = [x.accuracy for x in rs]
    length = [float(v) for v in lengths]

    def mean(xs):
        return float(sum(xs) / len(xs)) if xs else math.nan

    return {
        "reward": float(r.mean()),
        "reward_std": float(r.std()) if n > 1 else 0.0,
        "accuracy": mean(acc),
        "accuracy_lenient": mean([x.lenient for x in rs]),
        "format": mean([x.format for x in rs]),
        "zero_variance_groups": float(zero_variance_groups(r, G).double().mean()),
        "length": mean(length),
        "length_correct": mean([v for v, a in zip(length, acc) if a >= 1.0]),
        "length_wrong": mean([v for v, a in zip(length, acc) if a < 1.0]),
        "truncated": mean([float(t) for t in truncated]),
        "overlong": mean([x.overlong for x in rs]),
    }
