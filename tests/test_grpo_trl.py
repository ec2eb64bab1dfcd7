"""nanoseek's GRPO equals TRL's GRPOTrainer (trl 1.16.0) on the same model and batch: advantages, loss, gradients
and the logged statistics, for every loss_type both implement, with beta = 0 and beta > 0, within 1e-5.

How the reference is driven (TRL exposes no pure loss function, so two internal methods are called):
- `GRPOTrainer._generate_and_score_completions(rows)` samples one rollout batch from a tiny random Llama built
  here (no hub access), scores it with a trivial reward function, and returns TRL's own batch: prompt/completion
  ids and masks, advantages, num_items_in_batch and, when beta > 0, the reference log-probs from its ref model.
- `GRPOTrainer.compute_loss(model, inputs)` is the public Trainer hook; it calls `_compute_loss`, which needs
  `current_gradient_accumulation_steps` (set by Trainer's training loop, so we set it to 1 by hand).
Before the loss the policy's weights are nudged (so π_θ ≠ π_ref and the KL term has a gradient) and the batch
gets old log-probs that differ from the current ones (so ratios leave [1-ε_low, 1+ε_high] on both sides, which
TRL otherwise never sees with num_iterations = 1).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_DISABLED", "true")

import datasets  # noqa: E402  (comes with trl)
import pytest  # noqa: E402
import torch  # noqa: E402
import trl  # noqa: E402  (test-only dependency, pyproject [test]; imported plainly so a missing one fails loudly)
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from nanoseek.train.grpo import (  # noqa: E402
    GRPOConfig,
    group_advantages,
    per_token_loss,
    token_entropy,
    token_logprobs,
    zero_variance_groups,
)

G = 4  # completions per prompt
PROMPTS = ["ab", "cd12", "x", "hello"]  # different lengths, so prompts are left-padded
MAX_LEN = 10  # max_completion_length
TEMPERATURE = 0.7  # != 1 so that both sides must divide the logits by it
EPS_LOW, EPS_HIGH = 0.2, 0.28
TOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama and a character-level tokenizer, saved locally (TRL loads the policy and its ref from
    the same directory)."""
    d = tmp_path_factory.mktemp("tiny_llama")
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789 <>/\n")
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d), tok


def make_trainer(model_dir, tmp_path, *, loss_type="grpo", beta=0.0, scale_rewards="group", reward_log=None,
                 kl_bias_correction=False):
    path, tok = model_dir
    rows = datasets.Dataset.from_dict({"prompt": PROMPTS})

    def reward_fn(completions, **kw):  # deterministic, varied, with ties: some groups may be all-equal
        r = [float(len(c) % 3 == 0) + 0.5 * float("a" in c) for c in completions]
        if reward_log is not None:
            reward_log.append(r)
        return r

    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "trl_out"), per_device_train_batch_size=len(PROMPTS) * G, num_generations=G,
        max_completion_length=MAX_LEN, beta=beta, loss_type=loss_type, scale_rewards=scale_rewards,
        epsilon=EPS_LOW, epsilon_high=EPS_HIGH, temperature=TEMPERATURE, report_to=[], use_cpu=True,
        bf16=False,  # TRL's GRPOConfig defaults to bf16 autocast even on CPU; compare in exact fp32
        use_bias_correction_kl=kl_bias_correction,  # TRL's default is True (DeepSeek-V3.2); the GRPO paper's is off
        save_strategy="no", seed=0)
    trainer = trl.GRPOTrainer(model=path, reward_funcs=reward_fn, args=args, train_dataset=rows,
                              processing_class=tok)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; _compute_loss divides by it
    return trainer


def rollout_rows():
    return [{"prompt": p} for p in PROMPTS for _ in range(G)]  # each prompt's G completions side by side


def nudge(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * p.std().nan_to_num(0.02) * torch.randn(p.shape, generator=g))


def completion_logits(model, batch):
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)  # [B, P + C]
    att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    C = batch["completion_ids"].size(1)
    return model(input_ids=ids, attention_mask=att).logits[:, -C - 1:-1]  # [B, C, V]: predicts the completion


@pytest.fixture(scope="module")
def batch(model_dir, tmp_path_factory):
    """One rollout batch sampled and scored by TRL itself (beta > 0, so it includes TRL's reference log-probs)."""
    torch.manual_seed(1)
    log = []
    tr = make_trainer(model_dir, tmp_path_factory.mktemp("gen"), beta=0.04, reward_log=log)
    out = tr._generate_and_score_completions(rollout_rows())
    out["rewards"] = torch.tensor(log[-1])
    mask = out["completion_mask"].float()
    assert out["advantages"].shape == (len(PROMPTS) * G,)
    assert 0 < mask.sum() < mask.numel(), "completions should end at different lengths for a discriminating test"
    with torch.no_grad():  # old log-probs that differ from the policy's, on both sides of the trust region
        logp = token_logprobs(completion_logits(tr.model, out), out["completion_ids"], TEMPERATURE)
        g = torch.Generator().manual_seed(2)
        out["old_per_token_logps"] = logp + 0.4 * torch.randn(logp.shape, generator=g)
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trl(model_dir, tmp_path, scale):
    torch.manual_seed(3)
    log = []
    tr = make_trainer(model_dir, tmp_path, scale_rewards=scale, reward_log=log)
    out = tr._generate_and_score_completions(rollout_rows())
    rewards = torch.tensor(log[-1])
    assert rewards.std() > 0
    torch.testing.assert_close(group_advantages(rewards, G, scale), out["advantages"], atol=TOL, rtol=0)
    # TRL's logged share of zero-std completions equals ours (per completion = per group, groups have equal size)
    zero = zero_variance_groups(rewards, G).float().mean().item() if scale != "batch" else 0.0
    assert tr._metrics["train"]["frac_reward_zero_std"][-1] == pytest.approx(zero, abs=1e-6)


def test_reference_logprobs_equal_trl(model_dir, batch):
    """token_logprobs (fp32 logsumexp, temperature) equals TRL's fused LM head on the same (reference) model."""
    ref = LlamaForCausalLM.from_pretrained(model_dir[0]).eval()
    with torch.no_grad():
        ours = token_logprobs(completion_logits(ref, batch), batch["completion_ids"], TEMPERATURE)
    m = batch["completion_mask"].bool()
    torch.testing.assert_close(ours[m], batch["ref_per_token_logps"][m], atol=TOL, rtol=0)


@pytest.mark.parametrize("beta,kl_bias_correction", [(0.0, False), (0.04, False), (0.04, True)])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_loss_and_grads_equal_trl(model_dir, batch, tmp_path, loss_type, beta, kl_bias_correction):
    tr = make_trainer(model_dir, tmp_path, loss_type=loss_type, beta=beta, kl_bias_correction=kl_bias_correction)
    model = tr.model
    nudge(model, seed=4)  # π_θ ≠ π_ref, so the KL term is non-zero and has a gradient
    inputs = {k: batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask",
                                     "advantages", "num_items_in_batch", "old_per_token_logps")}
    if beta > 0:
        inputs["ref_per_token_logps"] = batch["ref_per_token_logps"]

    # TRL
    model.zero_grad(set_to_none=True)
    trl_loss = tr.compute_loss(model, inputs)
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    trl_stats = {k: v[-1] for k, v in tr._metrics["train"].items()}

    # nanoseek, on the same model and batch; dynamic sampling is a rollout-side choice, off here for all types
    cfg = GRPOConfig(loss_type=loss_type, beta=beta, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                     max_completion_length=MAX_LEN, temperature=TEMPERATURE, num_generations=G,
                     dynamic_sampling=False, kl_bias_correction=kl_bias_correction)
    model.zero_grad(set_to_none=True)
    logits = completion_logits(model, inputs)
    logp = token_logprobs(logits, inputs["completion_ids"], cfg.temperature)
    with torch.no_grad():
        ent = token_entropy(logits, cfg.temperature)
    loss, stats = per_token_loss(logp, inputs["old_per_token_logps"], inputs.get("ref_per_token_logps"),
                                 inputs["advantages"], inputs["completion_mask"], cfg, entropy=ent)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert loss.item() == pytest.approx(trl_loss.item(), abs=TOL)
    assert ours.keys() == trl_grads.keys() and len(ours) > 0
    for n in ours:
        torch.testing.assert_close(ours[n], trl_grads[n], atol=TOL, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    assert max(g.abs().max().item() for g in ours.values()) > 1e-3  # the gradients compared are not all ~0

    # the statistics TRL logs, from the same definitions
    assert stats["clip_low"] == pytest.approx(trl_stats["clip_ratio/low_mean"], abs=1e-6)
    assert stats["clip_high"] == pytest.approx(trl_stats["clip_ratio/high_mean"], abs=1e-6)
    assert stats["clip_region"] == pytest.approx(trl_stats["clip_ratio/region_mean"], abs=1e-6)
    assert stats["entropy"] == pytest.approx(trl_stats["entropy"], abs=TOL)
    assert stats["clip_low"] > 0 and stats["clip_high"] > 0  # both sides of the trust region were exercised
    if beta > 0:
        assert stats["kl"] == pytest.approx(trl_stats["kl"], abs=TOL)
        assert stats["kl"] > 1e-4
