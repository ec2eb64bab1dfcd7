"""Byte-level BPE tokenizer with DeepSeek's special tokens and DeepSeek-R1's chat format.

    nanoseek tokenizer --preset cpu-tiny --out runs/x/tokenizer      # train on the preset's corpus, save
    tok = load_tokenizer("runs/x/tokenizer")
    tok.encode("12+3")                        # no BOS/EOS added; digits are always single tokens
    tok.encode_chat([{"role": "user", "content": r1_prompt("What is 2 + 3?")}])   # ends in <｜Assistant｜><think>\n

Training: HF `tokenizers` BPE over bytes (GPT-2 byte alphabet), after splitting every digit into its own piece
(DeepSeek's tokenizers do the same; a model adds 47+85 column by column much more easily when 47 is "4","7").
Special tokens, one id each, at fixed ids 0..8 (BOS = 0 and EOS = 1, as in DeepSeek-V3's config.json):
`<｜begin▁of▁sentence｜>`, `<｜end▁of▁sentence｜>`, `<｜▁pad▁｜>`, `<｜User｜>`, `<｜Assistant｜>`, and the tags
`<think>`, `</think>`, `<answer>`, `</answer>` (tags are kept by decode(skip_special_tokens=True), as R1 keeps
<think>).

Chat format (DeepSeek-R1's template): BOS, the system text (several system messages joined by a blank line), then
`<｜User｜>{content}` per user turn and `<｜Assistant｜>{content}<｜end▁of▁sentence｜>` per assistant turn, where an
assistant turn's content loses everything up to its last `</think>` (earlier reasoning is not shown again); the
generation prompt is `<｜Assistant｜><think>\n`. The reply format the rewards parse is
`<think>\n{reasoning}\n</think>\n<answer>{answer}</answer>` (see `assistant_reply`). The same template is saved as
Jinja in tokenizer_config.json, so `transformers.AutoTokenizer.apply_chat_template` gives the same ids.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"
ANSWER, END_ANSWER = "<answer>", "</answer>"
SPECIAL = [BOS, EOS, PAD, USER, ASSISTANT]  # control tokens: dropped by decode(skip_special_tokens=True)
TAGS = [THINK, END_THINK, ANSWER, END_ANSWER]  # single tokens that stay in decoded text
ALL_SPECIAL = SPECIAL + TAGS  # ids 0..8 in this order
GENERATION_PROMPT = ASSISTANT + THINK + "\n"

# DeepSeek-R1's chat template, reduced to what nanoseek uses (no tools). One line: Jinja whitespace is output.
CHAT_TEMPLATE = (
    "{%- if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{%- set ns = namespace(system_prompt='', first=true) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{%- if ns.first %}{% set ns.system_prompt = message['content'] %}{% set ns.first = false %}"
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{{- bos_token }}{{- ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{- '" + USER + "' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}{%- set content = message['content'] %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1] %}{%- endif %}"
    "{{- '" + ASSISTANT + "' + content + '" + EOS + "' }}"
    "{%- elif message['role'] != 'system' %}{{- raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '" + ASSISTANT + "<think>\\n' }}{%- endif %}"
)

R1_PROMPT = "Think step by step in <think> </think>, then answer in <answer> </answer>.\n{question}"


def r1_prompt(question: str) -> str:
    """The R1-Zero user message: asks for reasoning in <think></think>, then the answer in <answer></answer>.
    (The paper's template, shortened: every prompt token costs a tiny model time.)"""
    return R1_PROMPT.format(question=question)


def assistant_reply(reasoning: str, answer: str) -> str:
    """The reply format the rewards parse: the answer is the <answer>…</answer> after </think>."""
    return f"{THINK}\n{reasoning}\n{END_THINK}\n{ANSWER}{answer}{END_ANSWER}"


def completion_text(reply: str) -> str:
    """The part of `reply` the model writes after the generation prompt (which already holds '<think>\\n')."""
    for prefix in (THINK + "\n", THINK):
        if reply.startswith(prefix):
            return reply[len(prefix):]
    return reply


def render_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Python twin of CHAT_TEMPLATE (a test checks transformers' rendering of the Jinja gives the same ids)."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    out = [BOS, "\n\n".join(system)]
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "user":
            out.append(USER + content)
        elif role == "assistant":
            out.append(ASSISTANT + content.split(END_THINK)[-1] + EOS)
        elif role != "system":
            raise ValueError(f"unknown role {role!r} in chat messages; use system, user or assistant")
    if add_generation_prompt:
        out.append(GENERATION_PROMPT)
    return "".join(out)


@dataclass
class TokenizerConfig:
    vocab_size: int = 1024  # total, special tokens included; the model's vocab_size must be >= this
    min_frequency: int = 2  # a pair must occur this often to be merged
    max_docs: int = 50_000  # train on at most this many corpus documents (the rest teach BPE nothing new)


class NanoTokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the ids nanoseek needs."""

    def __init__(self, tok):
        self.tok = tok
        self.special = {s: tok.token_to_id(s) for s in ALL_SPECIAL}
        missing = [s for s, i in self.special.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}; retrain it with `nanoseek tokenizer`")
        self.bos_id, self.eos_id, self.pad_id = self.special[BOS], self.special[EOS], self.special[PAD]
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings inside it become their single ids; no BOS/EOS added."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise KeyError(f"{token!r} is not a single token of this tokenizer")
        return i

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(render_chat(messages, add_generation_prompt))

    def save(self, out_dir: str | Path) -> Path:
        """tokenizer.json + tokenizer_config.json (with the chat template) readable by transformers."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(out / "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
            "add_bos_token": False, "add_eos_token": False,  # the chat template writes BOS itself
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000,
            "chat_template": CHAT_TEMPLATE,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n")
        return out


def _new_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),  # "472" -> "4", "7", "2" before any merge
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in ALL_SPECIAL])
    return tok


_SPECIAL_RE = re.compile("|".join(re.escape(s) for s in ALL_SPECIAL))


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2) -> NanoTokenizer:
    """Train byte-level BPE on `texts` (special-token strings are cut out first so no merge is spent on them)."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers

    if vocab_size < len(ALL_SPECIAL) + 256:
        raise ValueError(f"tokenizer vocab_size={vocab_size} is below 256 bytes + {len(ALL_SPECIAL)} special "
                         f"tokens; set tokenizer.vocab_size >= {256 + len(ALL_SPECIAL)}")
    tok = _new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=ALL_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def pieces():
        for t in texts:
            yield from (p for p in _SPECIAL_RE.split(t) if p)

    tok.train_from_iterator(pieces(), trainer)
    # Tags stay in decoded text (R1 keeps <think> in its output; rewards parse <answer>): mark them non-special.
    spec = json.loads(tok.to_str())
    for t in spec["added_tokens"]:
        if t["content"] in TAGS:
            t["special"] = False
    tok = Tokenizer.from_str(json.dumps(spec))
    return NanoTokenizer(tok)


def load_tokenizer(path: str | Path) -> NanoTokenizer:
    """Load `path/tokenizer.json` (a directory) or a tokenizer.json file."""
    from tokenizers import Tokenizer

    p = Path(path)
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"no tokenizer at {f}; every stage's model directory carries its tokenizer.json "
                                f"(`nanoseek tokenizer --out DIR` trains one)")
    return NanoTokenizer(Tokenizer.from_file(str(f)))


# ---- `nanoseek tokenizer` -----------------------------------------------------------------------------------
def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu-tiny", help="preset name or .toml path (default: cpu-tiny)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a preset value")
    p.add_argument("--out", required=True, help="directory to write tokenizer.json + tokenizer_config.json")


def run(args) -> int:
    import time

    from nanoseek.config import load_preset
    from nanoseek.data import corpus_texts

    preset = load_preset(args.preset, args.set)
    data_cfg, cfg = preset.section("data"), preset.section("tokenizer")
    t0 = time.time()
    texts = corpus_texts(data_cfg, limit=cfg.max_docs)
    tok = train_tokenizer(texts, cfg.vocab_size, cfg.min_frequency)
    out = tok.save(args.out)
    n_tokens = sum(len(x) for x in tok.encode_batch(texts))
    print(f"tokenizer: {tok.vocab_size} tokens from {len(texts)} documents ({n_tokens / len(texts):.1f} tokens "
          f"per document) in {time.time() - t0:.1f}s -> {out}")
    return 0
