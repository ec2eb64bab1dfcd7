"""Corpus, splits, packing and resumable loaders.

    cfg = DataConfig()                                   # or load_preset(...).section("data")
    s = splits(cfg)                                      # {"train", "val", "test", "ood"}: lists of task entries
    docs = corpus_ids(cfg, tok, "train")                 # one token list per document, BOS ... EOS
    loader = PackedLoader(docs, seq_len=cfg.seq_len, batch_size=16, seed=cfg.seed)
    x, y = next(loader)                                  # LongTensor [B, T] inputs and next-token targets
    state = loader.state_dict(); ...; loader.load_state_dict(state)   # resume at the same batch

A corpus document is one task entry rendered as a chat: the user asks the question (wrapped in the R1 prompt for a
fraction `r1_prompt_fraction` of documents, so the base model has seen the prompt RL will use), the assistant
answers `<think>\\n{worked steps}\\n</think>\\n<answer>{answer}</answer>` for a fraction `worked_fraction`, else with an
empty think (plain question -> answer). It is tokenized exactly as generation will see it: the chat prompt with its
generation prompt `<｜Assistant｜><think>\\n`, then the completion, then EOS.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from nanoseek import tasks
from nanoseek.tokenizer import EOS, assistant_reply, completion_text, r1_prompt, render_chat

IGNORE = -100  # target id that torch.nn.functional.cross_entropy skips (ignore_index default)


@dataclass
class DataConfig:
    tasks: list[str] = field(default_factory=lambda: ["add", "sub", "mul", "chain_sum", "sort", "linear",
                                                      "countdown"])  # names from nanoseek.tasks, or rg:<name>
    difficulty: int = 1  # level of train/val/test; 1 = 1-2 digit numbers
    ood_difficulty: int | None = None  # level of the out-of-distribution test split; None = difficulty + 1
    train_size: int = 6000  # entries PER TASK (fewer if a task has fewer distinct questions at this level)
    val_size: int = 50  # per task
    test_size: int = 100  # per task
    ood_size: int = 50  # per task
    seed: int = 0  # questions, document rendering and data order all follow from it
    worked_fraction: float = 0.8  # documents with the worked solution in <think>; the rest have an empty think
    r1_prompt_fraction: float = 0.5  # documents whose question is wrapped in tokenizer.r1_prompt
    seq_len: int = 256  # tokens per packed training sequence (each window holds seq_len + 1 tokens)

    def __post_init__(self):
        for k in ("worked_fraction", "r1_prompt_fraction"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise ValueError(f"data.{k}={getattr(self, k)} must be in [0, 1]")
        if not self.tasks:
            raise ValueError("data.tasks is empty; list task names, e.g. ['add', 'rg:chain_sum']")
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len={self.seq_len} must be >= 2")

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": self.train_size, "val": self.val_size, "test": self.test_size, "ood": self.ood_size}


# ---- entries, documents, SFT examples -------------------------------------------------------------------------
def splits(cfg: DataConfig) -> dict[str, list[dict]]:
    """Task entries per split (deterministic; cached per config, so treat the lists as read-only)."""
    return _splits(tuple(cfg.tasks), tuple(sorted(cfg.sizes.items())), cfg.seed, cfg.difficulty, cfg.ood_difficulty)


@functools.lru_cache(maxsize=4)
def _splits(names, sizes, seed, difficulty, ood_difficulty):
    return tasks.make_splits(list(names), dict(sizes), seed, difficulty, ood_difficulty)


def prompt_messages(entry: dict, r1: bool = True) -> list[dict]:
    """The chat that asks `entry`'s question (wrapped in the R1 prompt when r1)."""
    return [{"role": "user", "content": r1_prompt(entry["question"]) if r1 else entry["question"]}]


def entry_reply(entry: dict, worked: bool = True) -> str:
    """The ideal assistant reply: worked solution in <think> (empty if not worked or none), answer in <answer>."""
    return assistant_reply(entry["solution"] if worked else "", entry["answer"])


def documents(cfg: DataConfig, split: str = "train") -> list[tuple[list[dict], str]]:
    """(prompt messages, assistant reply) per entry of `split`; the worked/plain and R1/bare choices are seeded."""
    out = []
    for i, e in enumerate(splits(cfg)[split]):
        rng = random.Random(f"doc/{cfg.seed}/{split}/{i}")
        worked = rng.random() < cfg.worked_fraction and bool(e["solution"])
        r1 = rng.random() < cfg.r1_prompt_fraction
        out.append((prompt_messages(e, r1), entry_reply(e, worked)))
    return out


def corpus_texts(cfg: DataConfig, split: str = "train", limit: int | None = None) -> list[str]:
    """Documents as text (what the tokenizer trains on)."""
    docs = documents(cfg, split)[:limit]
    return [render_chat(m, add_generation_prompt=True) + completion_text(r) + EOS for m, r in docs]


def corpus_ids(cfg: DataConfig, tok, split: str = "train") -> list[list[int]]:
    """Documents as token ids, BOS ... EOS, tokenized as generation sees them (prompt, then completion)."""
    docs = documents(cfg, split)
    prompts = tok.encode_batch([render_chat(m, add_generation_prompt=True) for m, _ in docs])
    completions = tok.encode_batch([completion_text(r) for _, r in docs])
    return [p + c + [tok.eos_id] for p, c in zip(prompts, completions)]


@dataclass
class SFTExample:
    prompt_ids: list[int]
    completion_ids: list[int]  # ends with EOS

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    @property
    def loss_mask(self) -> list[int]:
        """1 on completion tokens (trained), 0 on prompt tokens."""
        return [0] * len(self.prompt_ids) + [1] * len(self.completion_ids)


def sft_example(messages: list[dict], tok) -> SFTExample:
    """Chat `messages` ending in an assistant turn -> prompt ids (everything before it, plus the generation prompt
    `<｜Assistant｜><think>\\n`) and completion ids (the rest of the last reply, plus EOS). Only the last assistant turn
    is trained; earlier turns are rendered by the chat template (their reasoning stripped, as R1 does)."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("sft_example needs messages ending with an assistant turn (the completion to learn)")
    prompt = tok.encode_chat(messages[:-1], add_generation_prompt=True)
    completion = tok.encode(completion_text(messages[-1]["content"])) + [tok.eos_id]
    return SFTExample(prompt, completion)


def sft_batch(examples: list[SFTExample], pad_id: int, max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded batch: x = ids[:-1], y = ids[1:] with IGNORE (-100) where the target is prompt or padding.
    x, y: LongTensor [B, T], T = longest example - 1 (capped at max_len; longer examples lose their tail)."""
    if not examples:
        raise ValueError("sft_batch got no examples")
    seqs = [(ex.ids, ex.loss_mask) for ex in examples]
    if max_len is not None:
        seqs = [(ids[: max_len + 1], m[: max_len + 1]) for ids, m in seqs]
    T = max(len(ids) for ids, _ in seqs) - 1
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    for b, (ids, m) in enumerate(seqs):
        ids_t = torch.tensor(ids, dtype=torch.long)
        n = len(ids) - 1
        x[b, :n] = ids_t[:-1]
        y[b, :n] = torch.where(torch.tensor(m[1:], dtype=torch.bool), ids_t[1:], IGNORE)
    return x, y


# ---- packed pretraining batches --------------------------------------------------------------------------------
class PackedLoader:
    """Endless batches of packed windows; order fixed by the seed; resumable; shardable by rank.

    Each epoch concatenates all documents in a seeded random order and cuts the stream into windows of seq_len + 1
    tokens (stride seq_len, so every token is a target once); window w gives x = t[w*T : w*T+T], y = t[w*T+1 :
    w*T+T+1]. Global batch k of an epoch is windows [k*B, (k+1)*B); rank r of world_size takes rows
    [r*B/W, (r+1)*B/W) of it, so the global batch does not depend on the number of ranks. The leftover windows of
    an epoch (fewer than B) are dropped. The position is one integer, the number of global batches served.
    """

    def __init__(self, docs: list[list[int]], seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"global batch_size={batch_size} is not divisible by world_size={world_size}; "
                             f"choose a batch size that is a multiple of the number of ranks")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        self.flat = np.concatenate([np.asarray(d, dtype=np.int32) for d in docs]) if docs else np.zeros(0, np.int32)
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if docs else lengths
        self.lengths = lengths
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch = batch_size // world_size
        windows = (len(self.flat) - 1) // seq_len
        self.batches_per_epoch = windows // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"corpus of {len(self.flat)} tokens is too small for one batch of {batch_size} x "
                             f"{seq_len + 1} tokens; generate more data (data.train_size) or lower the batch size")
        self.step = 0
        self._epoch, self._tokens = -1, None

    def _epoch_tokens(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths))
            self._tokens = np.concatenate([self.flat[self.starts[i]: self.starts[i] + self.lengths[i]] for i in order])
            self._epoch = epoch
        return self._tokens

    @property
    def epoch(self) -> int:
        return self.step // self.batches_per_epoch

    @property
    def tokens_per_batch(self) -> int:
        """Target tokens per global batch (B * seq_len)."""
        return self.batch_size * self.seq_len

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, k = divmod(self.step, self.batches_per_epoch)
        t, T = self._epoch_tokens(epoch), self.seq_len
        w0 = k * self.batch_size + self.rank * self.local_batch
        rows = np.stack([t[w * T: w * T + T + 1] for w in range(w0, w0 + self.local_batch)])  # [B_local, T+1]
        self.step += 1
        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1], rows[:, 1:]  # x, y: [B_local, T]

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "tokens": int(len(self.flat))}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for k in ("seed", "batch_size", "seq_len", "tokens"):
            if state.get(k) != mine[k]:
                raise ValueError(f"cannot resume the data loader: saved {k}={state.get(k)} but this run has "
                                 f"{k}={mine[k]}; resume with the same data config and batch size")
        self.step = int(state["step"])


def val_batches(docs: list[list[int]], seq_len: int, batch_size: int, n_batches: int, seed: int = 0):
    """A fixed list of (x, y) batches for validation loss (the first n of a PackedLoader; fewer if small)."""
    batch_size = min(batch_size, max(1, (sum(len(d) for d in docs) - 1) // seq_len))
    loader = PackedLoader(docs, seq_len, batch_size, seed)
    return [next(loader) for _ in range(min(n_batches, loader.batches_per_epoch))]
