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

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoseek.config import ConfigError
from nanoseek.model.packed import PackedRows, pack_rows
from nanoseek.train import distributed as D
from nanoseek.train.rewards import Reward

# Runs under torchrun with DDP or FSDP2: every rank draws the same prompts and keeps its share of whole groups (so
# each group's advantages are computed over the whole group), samples them with its own engine, and the updates are
# averaged; rank 0 writes the logs and the model (docs/scaling.md). Under FSDP2 the engine reads an unsharded twin
# of the policy that the ranks refill with the gathered weights before every rollout phase.
DISTRIBUTED = True

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
    require_reasoning: bool = True  # the format reward also needs non-empty text inside <think>…</think>
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
    # --- the loop (nanoseek rl)
    zero_steps: int | None = None  # steps of `nanoseek rl --zero` (R1-Zero); None: steps
    student_steps: int | None = None  # steps of `nanoseek rl --student` (the RL-only student arm); None: steps
    # `rl --zero` only: {field = value, ...} replacing this section's fields (R1-Zero starts from the base model, R1
    # from the SFT model, so their best lr / temperature / batch differ); see stage_config.
    zero: dict = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)  # training tasks; [] = the data section's tasks
    max_sample_rounds: int = 3  # dynamic sampling: rollout rounds per step before topping up with flat groups
    dtype: str = "bf16"  # autocast dtype of the policy forward/backward (weights and AdamW state stay fp32)
    engine_dtype: str = "float32"  # dtype of the engine's copy of the weights for rollouts
    threads: int = 0  # torch CPU threads for rollouts and updates (0: torch's default)
    ckpt_every: int = 10  # RL steps between checkpoints (and at the end)
    log_every: int = 5  # RL steps between progress lines and samples.jsonl entries

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
        if self.max_sample_rounds < 1:
            bad("max_sample_rounds", f"must be >= 1, got {self.max_sample_rounds}", "use e.g. 3")
        for name in ("zero_steps", "student_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(name, f"must be >= 1 or unset, got {getattr(self, name)}", "leave it out to use rl.steps")
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


# ==== the loop: rollouts from the shared engine, rule rewards, policy updates ===================================
#
#   nanoseek rl --zero --model runs/x/pretrain/model --out runs/x/zero       # R1-Zero: GRPO straight from the base
#   nanoseek rl --model runs/x/sft/model --out runs/x/rl                      # R1: reasoning RL after the cold start
#   nanoseek rl --model runs/x/student_base/model --out runs/x/student_rl --student   # the RL-only student arm
#   ... --preset smoke --set rl.steps=3 [--resume]
#
# One RL step: take prompts_per_step training questions, ask each with the R1 template, sample G completions per
# question from the engine (the G samples share one prefill), score them with the task's rule (accuracy) and the
# format rule, turn rewards into group advantages, then run μ optimizer steps of the clipped objective above on
# that batch through the shared training loop (nanoseek/train/loop.py: AdamW, warmup, clipping, bf16 autocast,
# atomic checkpoints). With dynamic sampling (DAPO) groups whose G rewards are all equal are dropped and more
# questions are sampled, up to max_sample_rounds rounds. The reference model (for the KL term) is the input model,
# frozen, and is not even loaded when β = 0.
#
# Writes into --out: metrics.jsonl (one record per RL step, the keys listed in `step_stats`), checkpoints/step_N
# (HF model + train state: resumable with --resume), samples.jsonl (a few completions every log_every steps) and
# model/ (the final policy, HF format, with the input model's tokenizer files: chat/serve/eval open it).


@dataclass
class Rollout:
    """One rollout batch: N = groups * G completions, each prompt's G completions next to each other."""

    prompts: list[list[int]]  # [N] prompt ids (each repeated G times)
    completions: list[list[int]]  # [N] completion ids, EOS included when the model stopped by itself
    entries: list[dict]  # [N] the task entry each completion answers
    texts: list[str]  # [N] decoded completions (tags kept, EOS dropped): what the rewards read
    rewards: list  # [N] nanoseek.train.rewards.Reward
    truncated: list[bool]  # [N] hit max_completion_length without stopping
    sampler_logprobs: list = field(default_factory=list)  # [N] the engine's log-probs of the completion tokens

    def __len__(self) -> int:
        return len(self.completions)

    def select_groups(self, keep: list[int], G: int) -> Rollout:
        idx = [g * G + j for g in keep for j in range(G)]
        return Rollout(*([getattr(self, f)[i] for i in idx] for f in ROLLOUT_FIELDS))

    def __add__(self, other: Rollout) -> Rollout:
        return Rollout(*(getattr(self, f) + getattr(other, f) for f in ROLLOUT_FIELDS))


ROLLOUT_FIELDS = ("prompts", "completions", "entries", "texts", "rewards", "truncated", "sampler_logprobs")


class PromptStream:
    """An endless, seeded, resumable stream of training questions: each epoch is a fresh permutation."""

    def __init__(self, entries: list[dict], seed: int):
        if not entries:
            raise ValueError("no training questions for RL; check data.tasks / rl.tasks and data.train_size")
        self.entries, self.seed, self.pos = entries, seed, 0
        self._epoch, self._order = -1, None

    def take(self, n: int) -> list[dict]:
        out = []
        for _ in range(n):
            epoch, i = divmod(self.pos, len(self.entries))
            if epoch != self._epoch:
                self._order = torch.randperm(len(self.entries), generator=torch.Generator().manual_seed(
                    self.seed * 1_000_003 + epoch)).tolist()
                self._epoch = epoch
            out.append(self.entries[self._order[i]])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"pos": self.pos, "n": len(self.entries), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n") != len(self.entries) or state.get("seed") != self.seed:
            raise ValueError(f"cannot resume RL: the checkpoint's question stream (n={state.get('n')}, seed="
                             f"{state.get('seed')}) differs from this run's (n={len(self.entries)}, seed={self.seed}); "
                             "resume with the same preset and --set values")
        self.pos = int(state["pos"])


def prompt_ids(tok, entry: dict) -> list[int]:
    """The R1 template (DeepSeek-R1 Table 1, shortened): one user turn asking for <think> then <answer>, and the
    generation prompt `<｜Assistant｜><think>\\n`. R1-Zero, R1 and eval all ask this way."""
    from nanoseek.data import prompt_messages

    return tok.encode_chat(prompt_messages(entry, r1=True))


def reseed(engine, seed: int | None) -> None:
    """Make the engine's next draws a function of `seed` (so a resumed run samples what the first run would have).
    Not SamplingParams.seed: that seeds every request alike, so different prompts would share one random stream."""
    rng = getattr(engine, "_rng", None)
    if seed is not None and isinstance(rng, torch.Generator):
        rng.manual_seed(seed)


def sample_rollout(engine, tok, entries: list[dict], cfg: GRPOConfig, seed: int | None = None) -> Rollout:
    """G completions per entry from the engine, decoded and scored."""
    from nanoseek import tasks
    from nanoseek.infer.sampling import SamplingParams
    from nanoseek.train import rewards as R

    G = cfg.num_generations
    prompts = [prompt_ids(tok, e) for e in entries]
    params = SamplingParams(n=G, temperature=cfg.temperature, top_p=cfg.top_p,
                            max_tokens=cfg.max_completion_length, logprobs=True)
    reseed(engine, seed)
    outs = engine.generate(prompts, params)  # [P][G] Completion
    ro = Rollout([], [], [], [], [], [], [])
    for p, e, group in zip(prompts, entries, outs):
        for c in group:
            ids = list(c.token_ids)
            stopped = c.finish_reason == "stop"
            if ids and ids[-1] == tok.eos_id:
                ids = ids[:-1]
            text = tok.decode(ids, skip_special_tokens=True)
            if stopped:
                ids = ids + [tok.eos_id]  # the model chose to stop: EOS is part of what it is trained on
            ro.prompts.append(p)
            ro.completions.append(ids)
            ro.entries.append(e)
            ro.texts.append(text)
            ro.truncated.append(not stopped)
            ro.sampler_logprobs.append(list(c.logprobs or [])[: len(ids)])
    ro.rewards = R.rewards(ro.texts, ro.entries, tasks.score, lengths=[len(c) for c in ro.completions],
                           prompt_opens_think=cfg.prompt_opens_think, format_weight=cfg.format_weight,
                           require_reasoning=cfg.require_reasoning,
                           max_len=cfg.max_completion_length, overlong_buffer=cfg.overlong_buffer)
    return ro


def collect_rollout(engine, tok, stream: PromptStream, cfg: GRPOConfig, step: int) -> tuple[Rollout, Rollout, int]:
    """The step's training batch (prompts_per_step groups), everything sampled for it (for the logs), and the
    number of sampling rounds. Dynamic sampling (DAPO eq. 11) keeps only groups whose rewards differ and samples
    again until it has enough; after max_sample_rounds it tops up with zero-variance groups (their advantage is 0:
    they add only the KL term), so every step trains on the same number of groups.

    Under torchrun every rank takes the same questions from the stream and keeps its contiguous share
    (D.shard_range: whole groups), so the ranks together sample what one process would, with rank-specific seeds.
    With dynamic sampling each rank fills its own quota of prompts_per_step / W groups, so the batch is not
    exactly one process's, and the ranks' streams may drift apart (a checkpoint stores rank 0's position)."""
    G, W = cfg.num_generations, D.world_size()
    if cfg.prompts_per_step % W:
        raise ConfigError(f"rl.prompts_per_step = {cfg.prompts_per_step} does not split over {W} ranks; use a "
                          f"multiple of {W}")
    want = cfg.prompts_per_step // W  # this rank's groups
    seen: Rollout | None = None
    kept: Rollout | None = None
    spare: list[tuple[Rollout, int]] = []
    rounds = 0
    while True:
        rounds += 1
        n = want if kept is None else want - len(kept) // G
        taken, mine = stream.take(n * W), D.shard_range(n * W)  # the same questions on every rank; keep ours
        ro = sample_rollout(engine, tok, taken[mine.start: mine.stop], cfg,
                            seed=cfg.seed * 100_003 + step * 101 + rounds + D.rank() * 1_000_000_007)
        seen = ro if seen is None else seen + ro
        if not cfg.dynamic_sampling:
            return ro, seen, rounds
        flat = torch.tensor([r.reward for r in ro.rewards])
        zero = zero_variance_groups(flat, G).tolist()
        good = ro.select_groups([g for g, z in enumerate(zero) if not z], G)
        spare += [(ro, g) for g, z in enumerate(zero) if z]
        kept = good if kept is None else kept + good
        if len(kept) >= want * G:
            return kept.select_groups(list(range(want)), G), seen, rounds
        if rounds >= cfg.max_sample_rounds:
            need = want - len(kept) // G
            for src, g in spare[:need]:
                kept = kept + src.select_groups([g], G)
            return kept, seen, rounds


@dataclass
class MicroBatch:
    ids: torch.Tensor  # [B, T+1] prompt + completion, right-padded
    mask: torch.Tensor  # [B, T] 1 where the target ids[:, 1:] is a completion token
    adv: torch.Tensor  # [B]
    old_logp: torch.Tensor | None = None  # [B, T] log π_old (None: exact as logp.detach() when μ = 1)
    ref_logp: torch.Tensor | None = None  # [B, T] log π_ref (only when β > 0)
    sampler_logp: torch.Tensor | None = None  # [B, T] the engine's log-probs (a diagnostic: engine vs trainer)
    num_items: float = 0.0  # completion tokens in the whole rollout batch (dapo's denominator)
    n_micro: int = 1  # micro-batches in the optimizer step
    weight: float = 1.0  # loss multiplier that makes the micro-batches' mean equal the whole batch's loss
    packed: PackedRows | None = None  # the same rows as distinct tokens (prompts once); None: forward over ids


def make_micro_batches(ro: Rollout, adv: torch.Tensor, cfg: GRPOConfig, pad_id: int) -> list[MicroBatch]:
    """Rows = prompt + completion, right-padded (causal attention never looks right, so padding is harmless);
    the loss mask marks the completion tokens.

    Each chunk's forward runs over its distinct tokens (MicroBatch.packed): a prompt its rows share runs once, and
    nothing is padded but attention's rows. With micro_batch_size a multiple of G, chunks hold whole groups (each
    prompt then runs once per step), groups sorted by their longest row (rows are padded to the chunk's longest in
    attention only); otherwise rows are sorted by length before chunking. Each chunk gets the weight that makes the
    shared loop's mean over micro-batches equal the loss of the whole batch in one piece, for every loss_type:
        grpo, dr_grpo   n_micro · rows/N          (per-sequence terms, averaged over the N sequences)
        bnpo            n_micro · tokens/total    (token-level over the batch)
        dapo            n_micro                   (already divided by num_items, the batch's token count)
    """
    N = len(ro)
    size = cfg.micro_batch_size or N
    G = cfg.num_generations
    length = [len(p) + len(c) for p, c in zip(ro.prompts, ro.completions)]
    if size >= N:
        order = list(range(N))
    elif size % G == 0 and N % G == 0:  # whole groups per chunk: each prompt is then run once (packed rows)
        groups = sorted(range(N // G), key=lambda g: max(length[g * G: g * G + G]))
        order = [g * G + j for g in groups for j in range(G)]
    else:
        order = sorted(range(N), key=lambda i: length[i])
    chunks = [order[s: s + size] for s in range(0, N, size)]
    num_items = float(sum(len(c) for c in ro.completions))
    out = []
    for rows in chunks:
        L = max(len(ro.prompts[i]) + len(ro.completions[i]) for i in rows)
        ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), L - 1)
        sampler = torch.zeros(len(rows), L - 1)
        have_sampler = all(len(ro.sampler_logprobs) > i and len(ro.sampler_logprobs[i]) == len(ro.completions[i])
                           for i in rows)
        for b, i in enumerate(rows):
            p, c = ro.prompts[i], ro.completions[i]
            ids[b, : len(p) + len(c)] = torch.tensor(p + c)
            mask[b, len(p) - 1: len(p) - 1 + len(c)] = 1.0  # position t predicts ids[t+1]
            if have_sampler and c:
                sampler[b, len(p) - 1: len(p) - 1 + len(c)] = torch.tensor(ro.sampler_logprobs[i])
        n_micro = len(chunks)
        if cfg.loss_type in ("grpo", "dr_grpo"):
            weight = n_micro * len(rows) / N
        elif cfg.loss_type == "bnpo":
            weight = n_micro * float(mask.sum()) / max(num_items, 1.0)
        else:  # dapo
            weight = float(n_micro)
        # The forward runs over the chunk's distinct tokens: a prompt shared by rows of the chunk once, no padding.
        packed = pack_rows([ro.prompts[i] for i in rows], [ro.completions[i] for i in rows]) \
            if all(ro.prompts[i] for i in rows) else None
        out.append(MicroBatch(ids, mask, adv[rows], sampler_logp=sampler if have_sampler else None,
                              num_items=num_items, n_micro=n_micro, weight=weight, packed=packed))
    return out


def sequence_logprobs(model, mb: MicroBatch, temperature: float, with_entropy: bool = False):
    """log π(completion tokens) [B, T] (and the entropy [B, T] when asked) from one forward of model over mb.ids.

    With mb.packed the forward runs over the distinct tokens only and the head over the M positions that predict
    a completion token (nanoseek/model/packed.py): the same numbers, placed at mask's positions, zeros elsewhere.
    """
    if mb.packed is not None:
        dev = _device(model)
        p, mask = mb.packed.to(dev), mb.mask.to(dev) > 0
        logits = model(p.ids[None], packed=p, logits_for=p.rows[:, :-1][mask]).logits  # [M, V]
        logp = token_logprobs(logits, mb.ids[:, 1:].to(dev)[mask], temperature)  # [M]
        logp = logp.new_zeros(mask.shape).masked_scatter(mask, logp)  # [B, T]
        ent = None
        if with_entropy:
            with torch.no_grad():
                ent = logp.new_zeros(mask.shape).masked_scatter(mask, token_entropy(logits.detach(), temperature))
        return logp, ent
    logits = model(mb.ids[:, :-1].to(_device(model))).logits  # [B, T, V]
    logp = token_logprobs(logits, mb.ids[:, 1:].to(logits.device), temperature)
    ent = None
    if with_entropy:
        with torch.no_grad():
            ent = token_entropy(logits.detach(), temperature)
    return logp, ent


def _device(model) -> torch.device:
    return next(model.parameters()).device


def grpo_loss_fn(cfg: GRPOConfig):
    """loss_fn(model, MicroBatch) for the shared Trainer (which averages the micro-batch losses)."""

    def loss_fn(model, mb: MicroBatch):
        logp, ent = sequence_logprobs(model, mb, cfg.temperature, with_entropy=True)
        dev = logp.device
        loss, stats = per_token_loss(logp, None if mb.old_logp is None else mb.old_logp.to(dev),
                                     None if mb.ref_logp is None else mb.ref_logp.to(dev), mb.adv.to(dev),
                                     mb.mask.to(dev), cfg, num_items=mb.num_items, entropy=ent)
        loss = loss * mb.weight  # the Trainer averages micro-batch losses; see make_micro_batches
        if mb.sampler_logp is not None:  # how far the engine's sampling log-probs are from the trainer's
            m = mb.mask.to(dev)
            stats["sampler_logp_diff"] = float(((logp.detach() - mb.sampler_logp.to(dev)).abs() * m).sum()
                                               / m.sum().clamp(min=1.0))
        stats["tokens"] = float(mb.mask.sum())
        return loss, stats

    return loss_fn


@torch.no_grad()
def fill_logprobs(model, mbs: list[MicroBatch], cfg: GRPOConfig, attr: str, autocast) -> None:
    """Set mb.<attr> (old_logp or ref_logp) from a no-grad forward of `model` (same precision as training)."""
    was = model.training
    model.eval()
    for mb in mbs:
        with autocast():
            logp, _ = sequence_logprobs(model, mb, cfg.temperature)
        setattr(mb, attr, logp.float().cpu())
    model.train(was)


def tokenizer_files(model_dir: str | Path) -> dict[str, str]:
    """The tokenizer files of a stage directory (copied into every checkpoint, so chat/serve/eval can open it)."""
    d = Path(model_dir)
    files = {f.name: str(f) for f in d.glob("tokenizer*") if f.is_file()}
    if "tokenizer.json" not in files:
        raise FileNotFoundError(f"{d} has no tokenizer.json; every stage's model directory carries its tokenizer "
                                "(pass a model/ directory written by `nanoseek pretrain`, `sft`, `rl` or `distill`)")
    return files


def train_questions(data_cfg, task_names: list[str]) -> list[dict]:
    """The training split's questions of `task_names` (all of data.tasks when empty)."""
    from nanoseek.data import splits

    unknown = [t for t in task_names if t not in data_cfg.tasks]
    if unknown:
        raise ConfigError(f"rl.tasks {unknown} are not in data.tasks {data_cfg.tasks}; RL trains on the data "
                          "section's train split, so list tasks from data.tasks (or leave rl.tasks empty)")
    return [e for e in splits(data_cfg)["train"] if not task_names or e["task"] in task_names]


def train(model_dir: str | Path, out: str | Path, cfg: GRPOConfig, data_cfg, engine_cfg=None, *,
          steps: int | None = None, stage: str = "rl", resume: bool = False, log=None, parallel=None) -> dict:
    """GRPO from the checkpoint in `model_dir`; writes `out` (see the block comment above). Returns the last
    metrics record. `parallel`: the [parallel] section under torchrun (DDP, or FSDP2: then every rank's rollout
    engine reads a whole-weight twin of the policy, refilled from the shards before each rollout phase)."""
    import nanoseek
    from nanoseek.checkpoint import save
    from nanoseek.infer.engine import Engine
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.loop import LoopConfig, Trainer

    log = log or (lambda s: print(s, file=sys.stderr, flush=True) if D.is_main() else None)
    out = Path(out)
    steps = steps or cfg.steps
    tok = load_tokenizer(model_dir)
    files = tokenizer_files(model_dir)
    stream = PromptStream(train_questions(data_cfg, cfg.tasks), cfg.seed)
    torch.manual_seed(cfg.seed)
    policy = nanoseek.load(model_dir)  # MTP modules ride along untrained (RL trains the main model only)
    # FSDP2 shards the policy in place, but the engine needs whole weights: it gets a frozen unsharded twin (one
    # buffer model for the whole run, no grads), refilled in place before each rollout phase.
    twin = copy.deepcopy(policy).requires_grad_(False).eval() \
        if D.world_size() > 1 and parallel is not None and parallel.strategy == "fsdp" else None
    loop_cfg = LoopConfig(steps=steps * cfg.mu, lr=cfg.lr, min_lr_ratio=1.0, warmup_steps=cfg.warmup_steps,
                          schedule="constant", weight_decay=cfg.weight_decay, beta1=0.9, beta2=0.99,
                          grad_clip=cfg.grad_clip, dtype=cfg.dtype, seed=cfg.seed, eval_every=0, ckpt_every=0,
                          keep_checkpoints=2, progress=False, threads=cfg.threads)
    trainer = Trainer(policy, loop_cfg, out, grpo_loss_fn(cfg), extra_files=files,
                      run_info={"stage": stage, "model": str(model_dir)}, parallel=parallel)
    done = 0
    if resume and trainer.resume(stream):
        done = int(trainer.extra_state.get("rl_step", 0))
        if D.is_main():
            trainer._truncate_metrics(done)  # records past the checkpoint belong to lost steps
        log(f"{stage}: resumed at RL step {done}")
    elif (out / "metrics.jsonl").exists():
        if not resume:
            raise ConfigError(f"{out} already holds an RL run; pass --resume to continue it, or choose a new --out")
        D.barrier()  # every rank has seen the files before rank 0 removes them
        for name in ("metrics.jsonl", "samples.jsonl"):  # crashed before its first checkpoint: start over
            if D.is_main():
                (out / name).unlink(missing_ok=True)
    ref = None
    # The frozen reference is the input model (also after a resume). Under FSDP2 it stays a plain unsharded copy:
    # it never changes (nothing to gather), and its forwards stay local to each rank, no collectives.
    if cfg.beta > 0:
        ref = nanoseek.load(model_dir, mtp=False).to(trainer.device)
        ref.requires_grad_(False)
    rollout_model = trainer.raw_model if twin is None else twin.to(trainer.device)
    engine = Engine(rollout_model, tok, engine_cfg) if engine_cfg is not None else Engine(rollout_model, tok)
    G = cfg.num_generations
    record: dict = {}
    t_start = time.time()
    for step in range(done, steps):
        t0 = time.perf_counter()
        trainer.raw_model.eval()
        if twin is not None:  # the weights of the last update (or of the resumed checkpoint), whole on every rank
            D.copy_full_weights(trainer.raw_model, twin)
        with torch.no_grad():
            batch, seen, rounds = collect_rollout(engine, tok, stream, cfg, step)
        t1 = time.perf_counter()
        rew = torch.tensor([r.reward for r in batch.rewards])
        if cfg.scale_rewards == "batch" and D.world_size() > 1:  # the std of the WHOLE batch, over all ranks
            adv = group_advantages(rew, G, "none") / (D.all_gather_cat(rew).float().std() + STD_EPS)
        else:
            adv = group_advantages(rew, G, cfg.scale_rewards)  # groups are whole on this rank
        mbs = make_micro_batches(batch, adv, cfg, tok.pad_id)
        if D.world_size() > 1:  # token-level losses divide by the whole batch's tokens / W (DDP then averages)
            global_items = D.dapo_num_items(sum(len(c) for c in batch.completions))
            for mb in mbs:
                if cfg.loss_type == "bnpo":
                    mb.weight = mb.weight * max(mb.num_items, 1.0) / max(global_items, 1.0)
                mb.num_items = global_items
        if ref is not None:
            fill_logprobs(ref, mbs, cfg, "ref_logp", trainer.autocast)
        if cfg.mu > 1:  # π_old is the policy that sampled; its log-probs are fixed before the first update
            fill_logprobs(trainer.raw_model, mbs, cfg, "old_logp", trainer.autocast)
        updates = [trainer.train_step(mbs) for _ in range(cfg.mu)]
        t2 = time.perf_counter()
        upd = {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]
               if isinstance(updates[0][k], (int, float)) and k not in ("step", "tokens")}
        lengths = [len(c) for c in seen.completions]
        # Over all ranks: samples and train groups summed, rollout means averaged (equal shares per rank; with
        # dynamic sampling the ranks' `seen` sizes differ and the average is over ranks, not samples).
        rollout = D.reduce_metrics({**rollout_stats(seen.rewards, lengths, seen.truncated, G), "samples": len(seen),
                                    "sample_rounds": rounds})
        record = {"step": step + 1, **rollout, **upd, "optimizer_step": trainer.step,
                  "train_groups": int(D.global_count(len(batch) // G)), "rollout_seconds": t1 - t0,
                  "update_seconds": t2 - t1, "elapsed": time.time() - t_start}
        trainer.log(record)
        trainer.extra_state = {"rl_step": step + 1}
        last = step + 1 == steps
        if (step + 1) % cfg.log_every == 0 or last or step == done:
            log(f"{stage} step {step + 1}/{steps}: reward {record['reward']:.3f} acc {record['accuracy']:.3f} "
                f"format {record['format']:.2f} len {record['length']:.0f} zero-var "
                f"{record['zero_variance_groups']:.2f} | rollout {t1 - t0:.1f}s update {t2 - t1:.1f}s")
            for i in range(0, len(seen), G)[:2] if D.is_main() else ():  # rank 0's groups
                with open(out / "samples.jsonl", "a") as f:
                    f.write(json.dumps({"step": step + 1, "question": seen.entries[i]["question"],
                                        "answer": seen.entries[i]["answer"], "completion": seen.texts[i],
                                        "reward": seen.rewards[i].reward}) + "\n")
        if last or (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0):
            trainer.save_checkpoint(stream.state_dict())
    full = D.FullModel(trainer.raw_model)  # whole tensors on every rank; rank 0 writes
    if D.is_main():
        save(full, out / "model", extra_files=files)
    return record


# ---- `nanoseek rl` -------------------------------------------------------------------------------------------
def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="input model directory (HF format + tokenizer files)")
    p.add_argument("--out", required=True, help="stage directory: metrics.jsonl, checkpoints/, model/")
    p.add_argument("--zero", action="store_true",
                   help="R1-Zero: GRPO from the base model with the R1 template (uses rl.zero_steps and rl.zero)")
    p.add_argument("--student", action="store_true",
                   help="the RL-only student arm: GRPO on the student base (uses rl.student_steps)")
    p.add_argument("--preset", default="cpu-tiny", help="preset name or .toml path (default: cpu-tiny)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset value, e.g. --set rl.steps=20 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")


def stage_config(preset, stage: str) -> GRPOConfig:
    """The [rl] section as `stage` (zero | rl | student_rl) uses it: for zero, the fields in rl.zero replace the
    section's own (built together, so e.g. a loss_type there also picks that loss type's defaults)."""
    from nanoseek.config import build

    raw = dict(preset.raw.get("rl", {}))
    over = raw.pop("zero", {})
    if not isinstance(over, dict):
        raise ConfigError(f"rl.zero must be a table of [rl] fields, e.g. zero = {{ lr = 1e-4 }}; got {over!r}")
    if stage != "zero" or not over:
        return preset.section("rl")
    if "zero" in over:
        raise ConfigError("rl.zero cannot hold another 'zero' table; list the [rl] fields R1-Zero changes")
    return build(GRPOConfig, {**raw, **over}, f"[rl] with its zero overrides of {preset.path or 'defaults'}")


def run(args) -> int:
    from nanoseek.checkpoint import model_dir
    from nanoseek.config import load_preset

    if args.zero and args.student:
        raise ConfigError("--zero and --student are two different stages; pass one of them")
    args.model = str(model_dir(args.model))
    preset = load_preset(args.preset, args.set)
    stage = "zero" if args.zero else "student_rl" if args.student else "rl"
    cfg: GRPOConfig = stage_config(preset, stage)
    steps = (cfg.zero_steps if args.zero else cfg.student_steps if args.student else None) or cfg.steps
    engine_cfg = preset.section("engine")
    engine_cfg.dtype = cfg.engine_dtype
    # One rollout batch runs as one wave: a slot per completion (tiny models decode faster in bigger batches).
    engine_cfg.max_batch = max(engine_cfg.max_batch, cfg.prompts_per_step * cfg.num_generations)
    t0 = time.time()
    last = train(args.model, args.out, cfg, preset.section("data"), engine_cfg, steps=steps, stage=stage,
                 resume=args.resume, parallel=preset.section("parallel"))
    if not D.is_main():
        return 0
    summary = {k: last.get(k) for k in ("step", "reward", "accuracy", "accuracy_lenient", "format", "length")}
    summary["seconds"] = time.time() - t0
    print(json.dumps({"stage": stage, **summary}))
    return 0
