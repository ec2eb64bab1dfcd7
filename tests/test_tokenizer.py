"""Tokenizer: special tokens are single fixed ids, digits are single tokens, and transformers' chat template gives
exactly the ids of nanoseek's own chat formatting."""

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek import tokenizer as T
from nanoseek.data import DataConfig, corpus_texts

os.environ["HF_HUB_OFFLINE"] = "1"

CFG = DataConfig(train_size=300, val_size=5, test_size=5, ood_size=5)


@pytest.fixture(scope="module")
def tok():
    return T.train_tokenizer(corpus_texts(CFG), vocab_size=400)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    return tok.save(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def hf(saved):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(saved))


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "user", "content": T.r1_prompt("Sort in ascending order: 5, 1, 3")}],
    [{"role": "system", "content": "You are a careful solver."}, {"role": "user", "content": "What is 47 + 85?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Show steps."},
     {"role": "user", "content": "What is 9 * 8?"}],
    [{"role": "user", "content": "What is 2 + 3?"},
     {"role": "assistant", "content": T.assistant_reply("2+3=5", "5")},
     {"role": "user", "content": "And 40 + 2?"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
     {"role": "user", "content": "Solve for x: 3x + 4 = 19"},
     {"role": "assistant", "content": "<think>\nstep one\n</think>\nfirst</think> second <answer>5</answer>"}],
    [{"role": "user", "content": "ünïcödé ✓ 漢字 and a tab\tand\nnewlines  "}],
]


def test_special_tokens_are_single_fixed_ids(tok):
    assert tok.bos_id == 0 and tok.eos_id == 1
    assert [tok.special[s] for s in T.ALL_SPECIAL] == list(range(len(T.ALL_SPECIAL)))
    assert T.BOS == "<\uff5cbegin\u2581of\u2581sentence\uff5c>" and T.EOS == "<\uff5cend\u2581of\u2581sentence\uff5c>"
    assert T.USER == "<\uff5cUser\uff5c>" and T.ASSISTANT == "<\uff5cAssistant\uff5c>"
    for s in T.ALL_SPECIAL:
        assert tok.encode(s) == [tok.special[s]]
        assert tok.encode(f"x{s}y")[1] == tok.special[s]


def test_digits_are_single_tokens(tok):
    text = "What is 123456 + 7890? x=42, -17"
    pieces = [tok.decode([i]) for i in tok.encode(text)]
    for p in pieces:
        assert sum(c.isdigit() for c in p) <= 1, pieces
    assert sum(p.strip().isdigit() for p in pieces) == 14
    for t in tok.tok.get_vocab():  # no merge anywhere in the vocabulary joins two digits
        assert sum(c.isdigit() for c in t) <= 1, t


@given(st.text(max_size=200))
@settings(max_examples=150, deadline=None)
def test_roundtrip_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_vocab_size_from_config_and_training_is_deterministic():
    texts = corpus_texts(CFG)
    a, b = T.train_tokenizer(texts, vocab_size=300), T.train_tokenizer(texts, vocab_size=300)
    assert a.vocab_size == 300
    assert a.tok.to_str() == b.tok.to_str()
    with pytest.raises(ValueError, match="vocab_size"):
        T.train_tokenizer(texts, vocab_size=100)


def test_no_merge_spent_on_special_token_strings(tok):
    assert not any("▁of▁" in t or "｜" in t for t in tok.tok.get_vocab() if t not in T.ALL_SPECIAL)


def test_decode_skips_control_tokens_but_keeps_tags(tok):
    ids = tok.encode_chat([{"role": "user", "content": "hi"}]) + tok.encode("7\n</think>\n<answer>7</answer>")
    assert tok.decode(ids, skip_special_tokens=True) == "hi<think>\n7\n</think>\n<answer>7</answer>"
    assert tok.decode(ids).startswith(T.BOS + T.USER + "hi" + T.ASSISTANT)


def test_render_chat_follows_r1_template():
    msgs = CONVERSATIONS[4]
    text = T.render_chat(msgs)
    assert text == (T.BOS + T.USER + "What is 2 + 3?" + T.ASSISTANT + "\n<answer>5</answer>" + T.EOS
                    + T.USER + "And 40 + 2?" + T.ASSISTANT + "<think>\n")
    assert T.render_chat(msgs, add_generation_prompt=False).endswith(T.USER + "And 40 + 2?")
    assert T.render_chat(CONVERSATIONS[3], False) == T.BOS + "Be brief.\n\nShow steps." + T.USER + "What is 9 * 8?"
    with pytest.raises(ValueError, match="unknown role"):
        T.render_chat([{"role": "tool", "content": "x"}])


def test_reply_format_and_r1_prompt():
    assert T.assistant_reply("a\nb", "7") == "<think>\na\nb\n</think>\n<answer>7</answer>"
    assert T.completion_text(T.assistant_reply("s", "7")) == "s\n</think>\n<answer>7</answer>"
    p = T.r1_prompt("What is 1 + 1?")
    assert p.endswith("What is 1 + 1?") and "<think>" in p and "</think>" in p and "<answer>" in p


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_transformers_chat_template_gives_the_same_ids(tok, hf, i, gen):
    msgs = CONVERSATIONS[i]
    ours = tok.encode_chat(msgs, add_generation_prompt=gen)
    theirs = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen, return_dict=False)
    assert list(theirs) == ours
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == T.render_chat(msgs, gen)
    assert hf.decode(ours) == tok.decode(ours)
    assert hf.encode("What is 12 + 3?", add_special_tokens=False) == tok.encode("What is 12 + 3?")


def test_saved_files_and_reload(tok, saved, hf):
    cfg = json.loads((saved / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["bos_token"] == T.BOS and cfg["eos_token"] == T.EOS and cfg["chat_template"] == T.CHAT_TEMPLATE
    assert hf.bos_token_id == 0 and hf.eos_token_id == 1 and hf.pad_token_id == tok.pad_id
    again = T.load_tokenizer(saved)
    assert again.vocab_size == tok.vocab_size and again.special == tok.special
    assert again.encode_chat(CONVERSATIONS[4]) == tok.encode_chat(CONVERSATIONS[4])
    with pytest.raises(FileNotFoundError, match="nanoseek tokenizer"):
        T.load_tokenizer(saved / "nope")


def test_cli_trains_and_writes(tmp_path):
    from nanoseek.cli import main

    preset = tmp_path / "p.toml"
    preset.write_text('[data]\ntasks = ["add", "sort"]\ntrain_size = 200\nval_size = 5\ntest_size = 5\n'
                      'ood_size = 5\n\n[tokenizer]\nvocab_size = 300\n')
    out = tmp_path / "tok"
    assert main(["tokenizer", "--preset", str(preset), "--out", str(out), "--set", "data.train_size=150"]) == 0
    tok = T.load_tokenizer(out)
    assert tok.vocab_size <= 300 and tok.bos_id == 0
    assert (out / "tokenizer_config.json").is_file()
