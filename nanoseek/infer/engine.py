"""The inference engine: continuous batching over a pre-allocated latent cache. Every stage that generates (RL
rollouts, rejection sampling, eval, chat, the server) goes through it.

    engine = Engine(model, tokenizer, EngineConfig(max_batch=32, max_model_len=1024))
    rid = engine.add_request(prompt_ids, SamplingParams(temperature=0.6, n=4, seed=1))
    while engine.has_unfinished():
        for out in engine.step(): ...              # StepOutputs: tokens and text as they come
    engine.generate(prompts, params)               # blocking batch API (RL, eval): list[list[Completion]]

One step (`step`): admit waiting requests while cache slots are free (first come, first served; a request needs
n slots), prefill the new ones batched (right-padded, the expanded MLA path), then decode every running sequence
by one token with absorbed MLA over the latent cache (infer/runner.py). The n samples of one prompt (a GRPO
group) prefill it once and copy the cached prompt to their other slots. A sequence frees its slot as soon as it
ends or is aborted; nothing is reallocated while serving.

    nanoseek generate --preset cpu-tiny --max-tokens 32          # a random model of a preset (token ids)
    nanoseek generate --model runs/x/base --prompt "12+35=" --temperature 0
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time
from collections import deque
from dataclasses import dataclass

import torch

from nanoseek.config import ConfigError
from nanoseek.infer import speculative
from nanoseek.infer.cache import LatentCache
from nanoseek.infer.runner import Runner
from nanoseek.infer.sampling import BatchSampling, SamplingError, SamplingParams, sample, sample_seed

log = logging.getLogger("nanoseek.engine")

EOS_TOKEN = "<｜end▁of▁sentence｜>"
PREFILL_TOKENS = 8192  # padded prompt tokens per prefill forward (bounds the [B, T, vocab] logits of a prefill)


class EngineError(ValueError):
    """A request or configuration the engine cannot serve; the message names the problem and the fix."""


@dataclass
class EngineConfig:
    max_batch: int = 32  # cache slots = concurrently running sequences
    max_model_len: int = 1024  # prompt + completion (clamped to the model's max_position_embeddings)
    dtype: str = "float32"  # "bfloat16": decode with a bf16 copy of the weights and a bf16 cache
    speculative: bool = False  # MTP self-speculation when a single greedy sequence runs (batch-1 greedy path)
    # drafts per verify: 1 = V3's MTP (the module guesses the token after next); 2 = the module chained on its own
    # output for one more guess (verified together in one forward; see infer/speculative.py)
    spec_drafts: int = 1
    # torch threads while the engine steps (restored after). 1 suits small models: a decode step is op dispatch,
    # and a second thread only adds synchronisation (on a busy 2-core machine, 100x slower). 0 = torch's setting.
    threads: int = 1

    def __post_init__(self):
        for name in ("max_batch", "max_model_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"engine.{name}: must be an integer >= 1, got {v!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"engine.dtype: {self.dtype!r} is not one of float32, bfloat16, float16")
        if self.threads < 0:
            raise ConfigError(f"engine.threads: must be >= 0, got {self.threads}")
        if self.spec_drafts not in (1, 2):
            raise ConfigError(f"engine.spec_drafts: must be 1 or 2, got {self.spec_drafts!r}")


@dataclass
class StepOutput:
    request_id: str
    index: int  # which of the n samples
    token_ids: list[int]  # tokens produced for it this step
    text: str  # decoded text delta ("" without tokenizer); stop strings trimmed
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    logprobs: list[float] | None = None  # of token_ids, when the request asked for them


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] | None


class Sequence:
    """One sample of a request: its slot, its tokens, its sampling generator and its text state."""

    def __init__(self, request: Request, index: int):
        self.request, self.index = request, index
        self.slot = -1
        self.tokens: list[int] = []
        self.logprobs: list[float] | None = [] if request.params.logprobs else None
        seed = request.params.seed
        self.generator = None if seed is None else torch.Generator().manual_seed(sample_seed(seed, index))
        self.finish_reason: str | None = None
        self.spec: speculative.SpecState | None = None  # set while MTP speculation drives this sequence
        # incremental detokenization (prefix/read offsets as in vLLM/TGI), and stop-string scanning
        self.text = ""
        self.emitted = 0  # characters of text already returned
        self.prefix_off = self.read_off = 0
        self.scanned = 0

    @property
    def pos(self) -> int:
        """Tokens of this sequence in the cache; its last token sits at this position (not cached yet)."""
        return len(self.request.prompt) + len(self.tokens) - 1


class Request:
    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, stop_ids: frozenset,
                 stream_text: bool):
        self.id, self.prompt, self.params, self.stop_ids = request_id, prompt, params, stop_ids
        self.stream_text = stream_text  # detokenize as tokens come (streaming, stop strings)
        self.seqs = [Sequence(self, i) for i in range(params.n)]
        self.max_stop = max((len(s) for s in params.stop), default=0)
        self.t_arrival = time.perf_counter()


def _eos_id(tokenizer) -> int | None:
    if tokenizer is None:
        return None
    for name in ("eos_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            return v
    if hasattr(tokenizer, "token_to_id"):
        return tokenizer.token_to_id(EOS_TOKEN)
    return None


class Engine:
    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.model, self.tokenizer = model, tokenizer
        cfg = model.config
        self.vocab_size = cfg.vocab_size
        self.max_model_len = min(config.max_model_len, cfg.max_position_embeddings)
        if self.max_model_len < config.max_model_len:
            log.warning("engine.max_model_len %d is beyond the model's max_position_embeddings; using %d",
                        config.max_model_len, self.max_model_len)
        if config.speculative and not getattr(model, "mtp", None):
            raise EngineError("engine.speculative needs the model's MTP module, and this model has none "
                              "(num_nextn_predict_layers = 0, or loaded with mtp=False); turn speculative off")
        dtype = getattr(torch, config.dtype)
        # +spec_drafts positions: a speculative verify writes the drafts' latents past the last real token
        self.cache = LatentCache(cfg, config.max_batch, self.max_model_len + config.spec_drafts, dtype=dtype,
                                 mtp=config.speculative)
        self.runner = Runner(model, self.cache, dtype=dtype)
        self.eos_id = _eos_id(tokenizer)
        self._ids = itertools.count()
        self._rng = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
        self._requests: dict[str, Request] = {}
        self._waiting: deque[Request] = deque()
        self._running: list[Sequence] = []
        self._pending: list[StepOutput] = []  # abort outputs, returned by the next step
        self._batch: tuple | None = None  # cached (slots, BatchSampling) of the running batch
        self.spec_drafted = self.spec_accepted = 0  # all drafts
        self.spec_drafted_by_depth = [0] * config.spec_drafts  # [i]: drafts of depth i+1 (acceptance per depth)
        self.spec_accepted_by_depth = [0] * config.spec_drafts

    # ---- requests -----------------------------------------------------------------------------------------
    def add_request(self, prompt_ids, params: SamplingParams | None = None, request_id: str | None = None,
                    stream_text: bool = True) -> str:
        """Queue a request; returns its id. Raises EngineError (a ValueError) naming what is wrong."""
        params = params if params is not None else SamplingParams()
        self._check(prompt_ids, params, request_id)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        stop_ids = set(params.stop_token_ids)
        if self.eos_id is not None and not params.ignore_eos:
            stop_ids.add(self.eos_id)
        stream_text = self.tokenizer is not None and (stream_text or bool(params.stop))
        req = Request(rid, [int(t) for t in prompt_ids], params, frozenset(stop_ids), stream_text)
        self._requests[rid] = req
        self._waiting.append(req)
        return rid

    def _check(self, prompt_ids, params, request_id) -> None:
        if not isinstance(params, SamplingParams):
            raise EngineError(f"params must be a SamplingParams, got {type(params).__name__}")
        try:
            params.validate()
        except SamplingError as e:
            raise EngineError(str(e)) from None
        if request_id is not None and request_id in self._requests:
            raise EngineError(f"request id {request_id!r} is already in use; pick a unique id or pass None")
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.tolist()
        if isinstance(prompt_ids, str):
            raise EngineError("prompt ids must be integers (token ids), not text; encode the text first")
        if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
            raise EngineError("the prompt is empty; give at least one token id (e.g. the BOS token)")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt_ids):
            raise EngineError("prompt ids must be integers (token ids), not text; encode the text first")
        lo, hi = min(prompt_ids), max(prompt_ids)
        if lo < 0 or hi >= self.vocab_size:
            raise EngineError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {self.vocab_size})")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise EngineError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = "
                f"{len(prompt_ids) + params.max_tokens} exceeds the context length {self.max_model_len}; "
                "shorten the prompt or lower max_tokens")
        if params.n > self.config.max_batch:
            raise EngineError(f"n={params.n} samples need {params.n} cache slots but the engine has "
                              f"{self.config.max_batch} (engine.max_batch); lower n or raise max_batch")
        bad = [t for t in params.stop_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise EngineError(f"stop_token_ids {bad} are outside the vocabulary [0, {self.vocab_size})")

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its cache slots; its unfinished samples end with finish_reason "abort"
        (returned by the next step). Returns False if the id is unknown or already finished."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        if req in self._waiting:
            self._waiting.remove(req)
        for seq in req.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
                self._release(seq)
                self._pending.append(StepOutput(req.id, seq.index, [], "", True, "abort",
                                                [] if seq.logprobs is not None else None))
        return True

    def seed(self, seed: int) -> None:
        """Reseed the generator of requests without their own seed (e.g. once per RL step, for reproducible runs
        without every prompt sharing one stream, as a common SamplingParams.seed would make them)."""
        self._rng.manual_seed(seed)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running or self._pending)

    def stats(self) -> dict:
        return dict(running=len({s.request.id for s in self._running}), waiting=len(self._waiting),
                    slots_used=self.cache.used, slots_total=self.cache.n_slots)

    # ---- the scheduler step --------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Admit + prefill new requests, decode every running sequence by one token (two when speculating).

        Weights that changed in place (an optimizer step) are picked up when requests are admitted: checking the
        version counters of every parameter costs ~0.1 ms right after a decode step (cache misses), a tenth of a
        small model's step, so it is not done every step."""
        with _threads(self.config.threads), torch.inference_mode():
            if self._waiting:
                self.runner.sync()
            outs, self._pending = self._pending, []
            decode = list(self._running)
            self._admit(outs)
            if decode:
                self._decode(decode, outs)
        return outs

    def _admit(self, outs: list[StepOutput]) -> None:
        new: list[Request] = []
        while self._waiting and self.cache.n_slots - self.cache.used >= len(self._waiting[0].seqs):
            req = self._waiting.popleft()
            for seq in req.seqs:
                seq.slot = self.cache.alloc()
            new.append(req)
        if not new:
            return
        self._batch = None
        # group the new prompts into padded forwards of at most PREFILL_TOKENS tokens
        group: list[Request] = []
        for req in new:
            T = max([len(r.prompt) for r in group] + [len(req.prompt)])
            if group and T * (len(group) + 1) > PREFILL_TOKENS:
                self._prefill(group, outs)
                group = []
            group.append(req)
        self._prefill(group, outs)

    def _prefill(self, reqs: list[Request], outs: list[StepOutput]) -> None:
        lens = [len(r.prompt) for r in reqs]
        ids = torch.zeros(len(reqs), max(lens), dtype=torch.long)  # right-padded
        for i, r in enumerate(reqs):
            ids[i, : lens[i]] = torch.tensor(r.prompt)
        slots = torch.tensor([r.seqs[0].slot for r in reqs])
        logits, hidden = self.runner.prefill(ids, slots)
        last = logits[torch.arange(len(reqs)), torch.tensor(lens) - 1].float()  # [R, V]
        rows, seqs = [], []
        for i, r in enumerate(reqs):
            self.cache.copy_prefix(r.seqs[0].slot, [s.slot for s in r.seqs[1:]], lens[i])  # one prefill per group
            rows += [i] * len(r.seqs)
            seqs += r.seqs
        tokens, logp = self._sample(last[rows], seqs)
        # MTP speculation drives a greedy single sequence that runs alone
        alone = len(reqs) == 1 and not self._running and len(reqs[0].seqs) == 1
        if self.config.speculative and alone and reqs[0].params.greedy:
            seqs[0].spec = speculative.mtp_prefill(self.runner, hidden[0].to(self.runner.dtype), reqs[0].prompt,
                                                   tokens[0], seqs[0].slot, self.config.spec_drafts)
        elif self._running:
            for s in self._running:
                s.spec = None  # others joined: its MTP cache would fall behind, decode it plainly from now on
        self._running += seqs
        for j, seq in enumerate(seqs):
            self._append(seq, [tokens[j]], None if logp is None else [logp[j]], outs)

    def _decode(self, seqs: list[Sequence], outs: list[StepOutput]) -> None:
        seqs = [s for s in seqs if s.finish_reason is None]
        if not seqs:
            return
        if len(seqs) == 1 and seqs[0].spec is not None and len(self._running) == 1:
            seq = seqs[0]
            before = (list(seq.spec.drafted), list(seq.spec.accepted))
            tokens, lp = speculative.spec_step(self.runner, seq.spec, seq.slot, seq.logprobs is not None)
            for i in range(len(before[0])):
                self.spec_drafted_by_depth[i] += seq.spec.drafted[i] - before[0][i]
                self.spec_accepted_by_depth[i] += seq.spec.accepted[i] - before[1][i]
            self.spec_drafted, self.spec_accepted = sum(self.spec_drafted_by_depth), sum(self.spec_accepted_by_depth)
            self._append(seq, tokens, lp, outs)
            return
        key = [id(s) for s in seqs]
        if self._batch is None or self._batch[0] != key:  # the batch changed: rebuild its slots and sampling rows
            self._batch = (key, torch.tensor([s.slot for s in seqs]),
                           BatchSampling.of([s.request.params for s in seqs], self.vocab_size))
        _, slots, bs = self._batch
        pos = [s.pos for s in seqs]
        last = torch.tensor([[s.tokens[-1]] for s in seqs])  # [B, 1]
        logits, _ = self.runner.decode(last, slots, torch.tensor(pos), max(pos) + 1)
        tokens, logp = self._sample(logits[:, 0], seqs, bs)
        for j, seq in enumerate(seqs):
            self._append(seq, [tokens[j]], None if logp is None else [logp[j]], outs)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], bs: BatchSampling | None = None):
        """logits [B, V] fp32 of the rows of `seqs` -> (tokens list, logprobs list or None)."""
        bs = bs or BatchSampling.of([s.request.params for s in seqs], self.vocab_size)
        u = None
        if not bs.all_greedy:
            u = torch.rand(len(seqs), generator=self._rng)
            for j, s in enumerate(seqs):
                if s.generator is not None:
                    u[j] = torch.rand((), generator=s.generator)
        tokens, logp = sample(logits, bs, u)
        return tokens.tolist(), (None if logp is None else logp.tolist())

    # ---- per-sequence bookkeeping --------------------------------------------------------------------------
    def _append(self, seq: Sequence, tokens: list[int], logprobs, outs: list[StepOutput]) -> None:
        req = seq.request
        p = req.params
        new: list[int] = []
        for k, t in enumerate(tokens):
            new.append(t)
            seq.tokens.append(t)
            if seq.logprobs is not None and logprobs is not None:
                seq.logprobs.append(logprobs[k])
            if t in req.stop_ids:
                seq.finish_reason = "stop"
            elif len(seq.tokens) >= p.max_tokens:
                seq.finish_reason = "length"
            if seq.finish_reason:
                break
        text = ""
        if req.stream_text:
            self._detokenize(seq)
            if p.stop and self._scan_stop(seq):
                seq.finish_reason = "stop"
            end = len(seq.text) if seq.finish_reason else max(seq.emitted, len(seq.text) - max(req.max_stop - 1, 0))
            text, seq.emitted = seq.text[seq.emitted : end], end
        finished = seq.finish_reason is not None
        if finished:
            self._release(seq)
            if all(s.finish_reason is not None for s in req.seqs):
                self._requests.pop(req.id, None)
        outs.append(StepOutput(req.id, seq.index, new, text, finished, seq.finish_reason,
                               None if seq.logprobs is None else list(logprobs or [])[: len(new)]))

    def _release(self, seq: Sequence) -> None:
        if seq in self._running:
            self._running.remove(seq)
            self._batch = None
        if seq.slot >= 0:
            hole, seq.slot = seq.slot, -1
            self.cache.free(hole)
            self._compact(hole)

    def _compact(self, hole: int) -> None:
        """Keep the running sequences in the lowest slots, one contiguous range (the decode step then reads the pool
        as views instead of gathering each sequence's rows in every layer, 25% of a 32-sequence step): the running
        sequence in the highest slot moves into the freed one (one copy of its cached rows, once per finish)."""
        if not self._running:
            return
        top = max(self._running, key=lambda s: s.slot)
        if top.slot < hole or top.spec is not None:  # (a speculating sequence runs alone, in the lowest slot)
            return
        # its cached positions: up to its last token's, which this step's decode may already have written
        self.cache.move(top.slot, hole, min(self.cache.max_len, top.pos + 2))
        top.slot = hole
        self._running.sort(key=lambda s: s.slot)
        self._batch = None

    def _text_ids(self, seq: Sequence) -> list[int]:
        toks = seq.tokens
        if seq.finish_reason == "stop" and toks and toks[-1] in seq.request.stop_ids:
            toks = toks[:-1]  # a stop token ends the text without showing up in it
        return toks

    def _detokenize(self, seq: Sequence) -> None:
        """Append the newly complete characters (a byte-level BPE token can end inside a UTF-8 character)."""
        ids = self._text_ids(seq)
        decode = self.tokenizer.decode
        prefix = decode(ids[seq.prefix_off : seq.read_off])
        full = decode(ids[seq.prefix_off :])
        if len(full) > len(prefix) and (not full.endswith("\ufffd") or seq.finish_reason):
            seq.text += full[len(prefix) :]
            seq.prefix_off, seq.read_off = seq.read_off, len(ids)

    def _scan_stop(self, seq: Sequence) -> bool:
        start = max(0, seq.scanned - seq.request.max_stop + 1)
        hits = [i for i in (seq.text.find(s, start) for s in seq.request.params.stop) if i >= 0]
        seq.scanned = len(seq.text)
        if hits:
            seq.text = seq.text[: min(hits)]
            seq.emitted = min(seq.emitted, len(seq.text))
            return True
        return False

    # ---- the blocking batch API ------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None,
                 use_tqdm: bool = False) -> list[list[Completion]]:
        """Generate for every prompt (n samples each) and return completions in prompt order. Runs the engine
        until they are done; the engine must be idle (no requests from `add_request` in flight)."""
        params = params if params is not None else SamplingParams()
        if self.has_unfinished():
            raise EngineError("generate() needs an idle engine, but requests added with add_request are still "
                              "running; finish them with step() first (or use a separate Engine)")
        for p in prompts:
            self._check(p, params, None)
        reqs = [self._requests[self.add_request(p, params, stream_text=False)] for p in prompts]
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(reqs) * params.n, desc="generate", unit="seq")
        try:
            with _threads(self.config.threads):  # once for the whole loop, not twice a step
                while self.has_unfinished():
                    outs = self.step()
                    if bar is not None:
                        bar.update(sum(o.finished for o in outs))
        except BaseException:
            for r in reqs:
                self.abort(r.id)
            self._pending.clear()
            raise
        finally:
            if bar is not None:
                bar.close()
        return [[self._completion(s) for s in r.seqs] for r in reqs]

    def _completion(self, seq: Sequence) -> Completion:
        if seq.request.stream_text:
            text = seq.text
        elif self.tokenizer is not None:
            text = self.tokenizer.decode(self._text_ids(seq))
        else:
            text = ""
        return Completion(list(seq.tokens), text, seq.finish_reason, seq.logprobs)


class _threads:
    """Set torch's thread count for a block and restore it (no-op for 0)."""

    def __init__(self, n: int):
        self.n, self.old = n, None

    def __enter__(self):
        if self.n and torch.get_num_threads() != self.n:
            self.old = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.old is not None:
            torch.set_num_threads(self.old)


# ---- `nanoseek generate` ---------------------------------------------------------------------------------------
def add_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint directory (HF format; tokenizer.json next to it is used)")
    src.add_argument("--preset", default=None, help="a random model of this preset's [model] (default cpu-tiny)")
    p.add_argument("--prompt", default=None, help="prompt text (needs a tokenizer); default: the BOS token")
    p.add_argument("--prompt-ids", default=None, help="prompt as comma-separated token ids")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (and the random model's init seed)")
    p.add_argument("--n", type=int, default=1, help="samples of the prompt")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding (greedy, n=1)")
    p.add_argument("--dtype", default=None, help="float32 (default) or bfloat16")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset value, e.g. --set engine.max_batch=8")


def _load_tokenizer(path):
    from pathlib import Path

    if not (Path(path) / "tokenizer.json").is_file():
        return None
    from nanoseek.tokenizer import load_tokenizer

    return load_tokenizer(path)


def run(args) -> int:
    from nanoseek.config import load_preset

    preset = load_preset(args.preset or ("cpu-tiny" if args.model is None else None), args.set)
    if args.model:
        import nanoseek

        model, tokenizer = nanoseek.load(args.model), _load_tokenizer(args.model)
    else:
        from nanoseek.model.transformer import Transformer

        torch.manual_seed(args.seed or 0)
        model, tokenizer = Transformer(preset.model).eval(), None
    ecfg = preset.section("engine")
    if args.speculative:
        ecfg.speculative = True
    if args.dtype:
        ecfg.dtype = args.dtype
        ecfg.__post_init__()
    engine = Engine(model, tokenizer, ecfg)
    if args.prompt_ids:
        prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    elif args.prompt is not None:
        if tokenizer is None:
            print("nanoseek generate: --prompt needs a tokenizer (tokenizer.json in --model DIR); "
                  "with a random model pass --prompt-ids 1,2,3", file=sys.stderr)
            return 2
        prompt = tokenizer.encode(args.prompt)
    else:
        prompt = [model.config.bos_token_id or 0]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, seed=args.seed, n=args.n, stop=args.stop,
                            ignore_eos=args.ignore_eos)
    try:
        engine.add_request(prompt, params, request_id="cli")
    except EngineError as e:
        print(f"nanoseek generate: {e}", file=sys.stderr)
        return 2
    t0, n_tok = time.perf_counter(), 0
    results = {i: [] for i in range(args.n)}
    while engine.has_unfinished():
        for out in engine.step():
            n_tok += len(out.token_ids)
            results[out.index] += out.token_ids
            if args.n == 1 and tokenizer is not None:
                print(out.text, end="", flush=True)
    dt = time.perf_counter() - t0
    if args.n == 1 and tokenizer is not None:
        print()
    else:
        for i, toks in results.items():
            text = tokenizer.decode(toks) if tokenizer is not None else ""
            print(f"[{i}] {toks}" + (f"\n{text}" if text else ""))
    extra = ""
    if engine.spec_drafted:
        extra = f", MTP acceptance {engine.spec_accepted / engine.spec_drafted:.0%}"
    print(f"{n_tok} tokens in {dt:.2f}s ({n_tok / dt:.1f} tok/s{extra})", file=sys.stderr)
    return 0
