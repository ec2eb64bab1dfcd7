"""Corpus documents, packed loader (deterministic, resumable, shardable) and SFT examples."""

import numpy as np
import pytest
import torch

from nanoseek import data as D
from nanoseek import tasks
from nanoseek import tokenizer as T

CFG = D.DataConfig(train_size=400, val_size=20, test_size=20, ood_size=10)


@pytest.fixture(scope="module")
def tok():
    return T.train_tokenizer(D.corpus_texts(CFG), vocab_size=512)


@pytest.fixture(scope="module")
def docs(tok):
    return D.corpus_ids(CFG, tok, "train")


def test_config_checks():
    with pytest.raises(ValueError, match="worked_fraction"):
        D.DataConfig(worked_fraction=1.5)
    with pytest.raises(ValueError, match="tasks is empty"):
        D.DataConfig(tasks=[])
    from nanoseek.config import ConfigError, build

    with pytest.raises(ConfigError, match="did you mean 'seq_len'"):
        build(D.DataConfig, {"seq_length": 10}, "[data]")
    assert build(D.DataConfig, {"tasks": "add,rg:chain_sum"}, "[data]").tasks == ["add", "rg:chain_sum"]


def test_document_mix_follows_the_config():
    def stats(**kw):
        cfg = D.DataConfig(**{**CFG.__dict__, **kw})
        docs = D.documents(cfg)
        worked = np.mean([not r.startswith("<think>\n\n</think>") for _, r in docs])
        r1 = np.mean([m[0]["content"].startswith(T.r1_prompt("")) for m, _ in docs])
        return worked, r1, docs

    w, r, docs = stats()
    assert 0.72 < w < 0.88 and 0.4 < r < 0.6
    assert len(docs) == 400 * len(CFG.tasks)
    w0, r0, docs0 = stats(worked_fraction=0.0, r1_prompt_fraction=0.0)
    assert w0 == 0 and r0 == 0
    assert all(r.endswith(f"<answer>{e['answer']}</answer>") for (_, r), e in zip(docs0, D.splits(CFG)["train"]))
    w1, r1, _ = stats(worked_fraction=1.0, r1_prompt_fraction=1.0)
    assert w1 == 1 and r1 == 1
    assert D.documents(CFG) == D.documents(CFG)  # deterministic


def test_documents_are_chat_rendered_and_tokenized_like_generation(tok, docs):
    entries = D.splits(CFG)["train"]
    rendered = D.documents(CFG)
    for ids, e, (msgs, _reply) in list(zip(docs, entries, rendered))[::97]:
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and ids.count(tok.eos_id) == 1
        prompt = tok.encode_chat(msgs, add_generation_prompt=True)
        assert ids[: len(prompt)] == prompt  # the exact prompt RL/eval will feed
        text = tok.decode(ids)
        assert e["question"] in text and text.endswith(f"<answer>{e['answer']}</answer>" + T.EOS)
        assert tasks.score(e["answer"], e) == 1.0


def test_easiest_level_completions_are_short(tok):
    """Worked solutions at level 1 stay under ~80 tokens (tokens cost pretraining time)."""
    for name in tasks.names():
        lens = [len(tok.encode(T.completion_text(D.entry_reply(e)))) for e in tasks.get(name).generate(9, 200, 1)]
        assert max(lens) < 80, (name, max(lens))


def test_held_out_questions_never_in_the_corpus():
    s = D.splits(CFG)
    text = "\n".join(D.corpus_texts(CFG))
    for e in s["test"] + s["ood"]:
        assert e["question"] + T.ASSISTANT not in text  # the question as a whole prompt


def test_packed_windows_are_shifted_and_cover_the_epoch(docs):
    L = D.PackedLoader(docs, seq_len=64, batch_size=4, seed=1)
    n = L.batches_per_epoch
    xs, ys = zip(*[next(L) for _ in range(n)])
    x, y = torch.cat(xs), torch.cat(ys)  # [n*4, 64]
    assert x.shape == (n * 4, 64) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x[1:, 0], y[:-1, -1])  # windows are consecutive: stride seq_len
    stream = torch.cat([x[:1, :1].reshape(-1), y.reshape(-1)]).tolist()  # the epoch's token stream
    # it is whole documents in some order: cut at EOS, every complete piece is a corpus document, none too often
    from collections import Counter

    pieces, cur = [], []
    for t in stream:
        cur.append(t)
        if t == docs[0][-1]:
            pieces.append(tuple(cur))
            cur = []
    have = Counter(tuple(d) for d in docs)
    got = Counter(pieces)
    assert not got - have
    dropped = sum(map(len, docs)) - len(stream)
    assert sum(got.values()) >= len(docs) - dropped // min(map(len, docs)) - 1
    assert L.epoch == 1


def test_loader_is_deterministic_and_seeded(docs):
    a = [next(D.PackedLoader(docs, 32, 4, seed=0)) for _ in range(1)]
    b = [next(D.PackedLoader(docs, 32, 4, seed=0)) for _ in range(1)]
    c = [next(D.PackedLoader(docs, 32, 4, seed=1)) for _ in range(1)]
    assert torch.equal(a[0][0], b[0][0]) and not torch.equal(a[0][0], c[0][0])
    # later epochs use a new order
    L = D.PackedLoader(docs, 32, 4, seed=0)
    first = next(L)[0]
    L.step = L.batches_per_epoch
    assert not torch.equal(first, next(L)[0])


def test_resume_gives_exactly_the_same_batches(docs):
    L = D.PackedLoader(docs, 128, 8, seed=3)
    n = L.batches_per_epoch + 5  # crosses an epoch boundary
    ref = [next(L) for _ in range(n + 10)]
    L2 = D.PackedLoader(docs, 128, 8, seed=3)
    for _ in range(n - 3):
        next(L2)
    state = L2.state_dict()
    L3 = D.PackedLoader(docs, 128, 8, seed=3)
    L3.load_state_dict(state)
    for k in range(n - 3, n + 10):
        x, y = next(L3)
        assert torch.equal(x, ref[k][0]) and torch.equal(y, ref[k][1]), k
    with pytest.raises(ValueError, match="batch_size"):
        D.PackedLoader(docs, 128, 4, seed=3).load_state_dict(state)


def test_rank_shards_form_the_same_global_batch(docs):
    whole = D.PackedLoader(docs, 64, 8, seed=2)
    parts = [D.PackedLoader(docs, 64, 8, seed=2, rank=r, world_size=4) for r in range(4)]
    for _ in range(3):
        gx, gy = next(whole)
        xs, ys = zip(*[next(p) for p in parts])
        assert torch.equal(torch.cat(xs), gx) and torch.equal(torch.cat(ys), gy)
    with pytest.raises(ValueError, match="multiple of the number of ranks"):
        D.PackedLoader(docs, 64, 6, world_size=4)


def test_too_small_corpus_names_the_fix():
    with pytest.raises(ValueError, match="train_size"):
        D.PackedLoader([[0, 5, 6, 1]], 64, 2)


def test_val_batches_are_fixed(docs):
    a, b = D.val_batches(docs, 64, 4, 3), D.val_batches(docs, 64, 4, 3)
    assert len(a) == 3 and all(torch.equal(p[0], q[0]) for p, q in zip(a, b))


def test_sft_example_masks_the_prompt(tok):
    e = tasks.get("add").generate(0, 1, 1)[0]
    msgs = D.prompt_messages(e) + [{"role": "assistant", "content": D.entry_reply(e)}]
    ex = D.sft_example(msgs, tok)
    assert ex.prompt_ids == tok.encode_chat(msgs[:1], add_generation_prompt=True)
    assert ex.prompt_ids[-2:] == [tok.special[T.THINK], tok.encode("\n")[0]]
    assert ex.completion_ids[-1] == tok.eos_id
    assert tok.decode(ex.completion_ids) == T.completion_text(D.entry_reply(e)) + T.EOS
    assert ex.loss_mask == [0] * len(ex.prompt_ids) + [1] * len(ex.completion_ids)
    with pytest.raises(ValueError, match="assistant"):
        D.sft_example(msgs[:1], tok)
    # multi-turn: earlier reasoning is stripped from the prompt, only the last reply is trained
    last = "<think>\nx\n</think>\n<answer>1</answer>"
    mt = msgs + [{"role": "user", "content": "again"}, {"role": "assistant", "content": last}]
    ex2 = D.sft_example(mt, tok)
    assert e["solution"] not in tok.decode(ex2.prompt_ids)
    assert tok.decode(ex2.completion_ids) == "x\n</think>\n<answer>1</answer>" + T.EOS


def test_sft_batch_targets(tok):
    a = D.SFTExample([0, 3, 10, 4, 5], [20, 21, 1])
    b = D.SFTExample([0, 3, 11, 12, 13, 4, 5], [22, 1])
    x, y = D.sft_batch([a, b], pad_id=tok.pad_id)
    assert x.shape == y.shape == (2, 8)
    assert x[0].tolist() == [0, 3, 10, 4, 5, 20, 21, tok.pad_id]
    assert y[0].tolist() == [-100, -100, -100, -100, 20, 21, 1, -100]
    assert y[1].tolist() == [-100] * 6 + [22, 1]
    loss = torch.nn.functional.cross_entropy(torch.zeros(2 * 8, 30), y.reshape(-1))
    assert torch.isfinite(loss)
    xs, ys = D.sft_batch([a, b], pad_id=2, max_len=5)
    assert xs.shape == (2, 5) and ys[1].tolist() == [-100] * 5
