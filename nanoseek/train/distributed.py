"""Data parallelism on torch.distributed: the process group, DDP / FSDP2 wrapping, reductions, full-state gathers.

    torchrun --nproc_per_node 2 -m nanoseek pretrain --preset smoke --out runs/ddp          # DDP (the default)
    torchrun --nproc_per_node 8 -m nanoseek pretrain --preset gpu-8 --out runs/x --set parallel.strategy=fsdp

The model file knows nothing of this (torchtitan's habit): the loop calls `apply_parallel(model, cfg)`, which
wraps the model with DDP or shards it with FSDP2 (`torch.distributed.fsdp.fully_shard`), and the stages call the
reductions below where a number must be global (metrics, expert loads, GRPO's token counts). On one process every
function here is the identity, so single-process code paths stay plain.

Equal to one rank, by construction: each rank gets B/W rows of the same global batch (nanoseek.data.PackedLoader),
DDP/FSDP average gradients over ranks, and a mean over B/W rows averaged over W ranks is the mean over B rows.
Buffers are not broadcast (`broadcast_buffers=False`): the expert load counters are per rank and are all-reduced
explicitly before the balancing-bias update, so every rank moves the biases identically.

Failure: the process group has a timeout (ParallelConfig.timeout_s). A rank that dies makes torchrun stop the job;
a survivor blocked in a collective gets an error from gloo/NCCL (peer gone, or the timeout) and `session` turns it
into one clear line and exit code 1 instead of a hang.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanoseek.config import ConfigError

STRATEGIES = ("ddp", "fsdp", "none")


@dataclass
class ParallelConfig:
    """How training is spread over the ranks torchrun starts. On one process nothing is wrapped."""

    strategy: str = "ddp"  # ddp: replicate, all-reduce grads | fsdp: FSDP2 fully_shard per block | none: refuse >1 rank
    timeout_s: float = 600.0  # a collective that waits longer than this fails the job (a dead or stuck rank)
    reshard_after_forward: bool = True  # fsdp: free gathered weights after forward (ZeRO-3); False = ZeRO-2
    fsdp_param_dtype: str = "fp32"  # fsdp: dtype weights are gathered in (bf16 halves traffic; master stays fp32)
    backend: str = "auto"  # auto: nccl for CUDA tensors (+ gloo for CPU ones), gloo on CPU-only machines

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"parallel.strategy: unknown strategy {self.strategy!r}; use one of "
                              f"{', '.join(STRATEGIES)}")
        if self.timeout_s <= 0:
            raise ConfigError(f"parallel.timeout_s: must be > 0, got {self.timeout_s}; e.g. 600")
        if self.fsdp_param_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"parallel.fsdp_param_dtype: {self.fsdp_param_dtype!r}; use fp32 or bf16")


class RankFailure(RuntimeError):
    """A collective failed because another rank died, hung past the timeout, or the network broke."""


# ---- the process group ---------------------------------------------------------------------------------------
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(cfg: ParallelConfig | None = None) -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). Returns True if
    a group now exists. Idempotent; does nothing on a single process."""
    cfg = cfg or ParallelConfig()
    if is_distributed():
        return True
    if not launched_by_torchrun():
        return False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = cfg.backend
    device_id = None
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)  # "cuda" now means this rank's GPU everywhere (model.to, tensors)
        device_id = torch.device("cuda", local_rank)
    if backend == "auto":
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=cfg.timeout_s), device_id=device_id)
    return True


def teardown() -> None:
    if is_distributed():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def session(cfg: ParallelConfig | None = None):
    """Process group for the duration of one command (a no-op outside torchrun). A failed collective (another
    rank died or timed out) becomes one clear error line and exit code 1."""
    if not init(cfg):
        yield
        return
    timeout = (cfg or ParallelConfig()).timeout_s
    try:
        yield
    except (dist.DistError, RuntimeError) as e:
        if not _is_peer_failure(e):
            raise
        r, w = rank(), world_size()
        print(f"nanoseek: rank {r} of {w}: lost contact with another rank ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:300]}). A rank died (killed, out of memory, crashed) or waited longer "
              f"than parallel.timeout_s={timeout:g}s; stopping. Its own log says why; restart the job with --resume "
              f"to continue from the last checkpoint.", file=sys.stderr, flush=True)
        os._exit(1)  # not sys.exit: tearing a broken group down can itself block
    finally:
        teardown()


def _is_peer_failure(e: BaseException) -> bool:
    if isinstance(e, (dist.DistError, RankFailure)):
        return True
    text = str(e).lower()
    return any(s in text for s in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "broken pipe"))


@contextlib.contextmanager
def session_for(preset: str | None, sets: list[str] | None):
    """`session` with the [parallel] section of a preset and its `--set parallel.*` overrides (what the CLI has)."""
    cfg = ParallelConfig()
    if preset is not None and launched_by_torchrun():
        from nanoseek.config import load_preset

        cfg = load_preset(preset, [s for s in (sets or []) if s.startswith("parallel.")], check=False) \
            .section("parallel")
    with session(cfg):
        yield


# ---- wrapping the model (from outside; the model file knows nothing of this) ---------------------------------
def apply_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """Replicate the model on every rank; gradients are averaged in buckets during backward."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = next(model.parameters()).device
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*is deprecated", category=FutureWarning)
    # find_unused_parameters: RL and SFT do not run the MTP modules; their parameters get no gradient (None, as on
    # one process, so AdamW leaves them alone) instead of DDP waiting for them forever.
    # broadcast_buffers=False: the expert load counters are per-rank on purpose (reduced in the balance hook),
    # and the routing biases stay equal because every rank applies the same update from the same global load.
    return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False,
               find_unused_parameters=True)


def apply_fsdp(model: torch.nn.Module, cfg: ParallelConfig | None = None) -> torch.nn.Module:
    """FSDP2: shard every decoder block and MTP block, then the rest (embeddings, head, norms) at the root.
    Works in place: parameters become DTensors sharded on dim 0 (for stacked experts: by expert)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    cfg = cfg or ParallelConfig()
    bf16 = cfg.fsdp_param_dtype == "bf16"
    # Gradients are reduced in fp32. With fp32 weights they already are: reduce_dtype stays None, which also keeps
    # torch 2.13 off a path that fails for a unit that never ran forward (RL and SFT skip the MTP block) when a
    # micro-batch skips the gradient sync (FSDPParam.to_accumulated_grad_if_needed reads the never-gathered param).
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                              reduce_dtype=torch.float32 if bf16 else None)
    # Every unit reshards after forward, the root too: a forward without backward (val loss, log-probs) must leave
    # the parameters sharded, as the optimizer and checkpoints know them (torchtitan keeps the root gathered to
    # save one all-gather; that would leave unsharded parameters behind after an eval forward).
    # An MTP module's own norms and projection are used outside its block's forward (its head norm after it
    # returns), so only the block is a unit; they stay with the root.
    for block in list(model.model.layers) + [m.block for m in getattr(model, "mtp", [])]:
        fully_shard(block, reshard_after_forward=cfg.reshard_after_forward, mp_policy=mp)
    fully_shard(model, reshard_after_forward=True, mp_policy=mp)
    return model


def apply_parallel(model: torch.nn.Module, cfg: ParallelConfig | None) -> torch.nn.Module:
    """What the loop calls: DDP or FSDP2 across the ranks of the process group; the model itself on one process."""
    cfg = cfg or ParallelConfig()
    if not is_distributed() or world_size() == 1:
        return model
    if cfg.strategy == "none":
        raise ConfigError(f"parallel.strategy = 'none' but {world_size()} ranks are running: each would train its "
                          f"own model; use parallel.strategy = 'ddp' or 'fsdp', or run on one process")
    return apply_fsdp(model, cfg) if cfg.strategy == "fsdp" else apply_ddp(model)


@contextlib.contextmanager
def grad_sync(model: torch.nn.Module, enabled: bool):
    """Gradient accumulation: skip the cross-rank gradient reduction for every micro-batch but the last (DDP's
    no_sync, FSDP2's set_requires_gradient_sync). The summed gradients are reduced once; the result is the same."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = getattr(model, "_orig_mod", model)
    if enabled or not is_distributed():
        yield
    elif isinstance(model, DDP):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def is_sharded(model: torch.nn.Module) -> bool:
    """True if FSDP2 sharded the model (its parameters are DTensors): forward is then a collective."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in unwrap(model).parameters())


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module with the model's own attributes (DDP hides them under .module; FSDP2 keeps the module)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)


# ---- reductions ----------------------------------------------------------------------------------------------
def _comm_device() -> torch.device:
    """Where a tensor must live for the default backend: CUDA for NCCL-only groups, else CPU is fine."""
    if is_distributed() and torch.cuda.is_available() and "gloo" not in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum / mean / max of `t` over ranks, returned as a new tensor on t's device; `t` itself is left alone."""
    if not is_distributed():
        return t.clone()
    buf = t.detach().to(_comm_device(), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        buf /= world_size()
    return buf.to(t.device)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average across ranks IN PLACE (the loop's contract); the identity on one process."""
    if is_distributed():
        t.copy_(all_reduce(t.float(), "mean").to(t.dtype))
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `t` along dim 0 in rank order (all ranks must pass the same shape)."""
    if not is_distributed():
        return t.clone()
    buf = t.detach().to(_comm_device())
    out = [torch.empty_like(buf) for _ in range(world_size())]
    dist.all_gather(out, buf.contiguous())
    return torch.cat(out).to(t.device)


# Keys that are counts (summed over ranks); every other number is a per-rank mean (averaged).
SUMMED = ("tokens", "n", "count", "samples")


def reduce_metrics(record: dict) -> dict:
    """Make a step's metrics global: counts summed, means averaged, `*_max` maxed, over ranks (one collective for
    all scalar floats). Nested dicts and non-numbers pass through unchanged. Identity on one process."""
    if not is_distributed():
        return dict(record)
    keys = sorted(k for k, v in record.items() if isinstance(v, (int, float, torch.Tensor)) and not isinstance(v, bool)
                  and (not isinstance(v, torch.Tensor) or v.numel() == 1))
    vals = torch.tensor([float(record[k]) for k in keys], dtype=torch.float64)
    is_max = torch.tensor([k.endswith("_max") for k in keys])
    summed = all_reduce(torch.where(is_max, torch.zeros_like(vals), vals), "sum")
    maxed = all_reduce(torch.where(is_max, vals, torch.full_like(vals, -float("inf"))), "max")
    out = dict(record)
    W = world_size()
    for i, k in enumerate(keys):
        if is_max[i]:
            out[k] = float(maxed[i])
        elif k in SUMMED:
            out[k] = int(summed[i]) if isinstance(record[k], int) else float(summed[i])
        else:
            out[k] = float(summed[i]) / W
    return out


def global_expert_loads(moe_layers) -> list[torch.Tensor]:
    """Tokens routed to each expert, summed over ranks, per MoE layer (one collective for all layers): what
    `update_balance_bias(layers, gamma, loads=...)` needs so every rank moves the biases the same way."""
    if not moe_layers:
        return []
    local = torch.stack([m.load.detach().float() for m in moe_layers])  # [L, E]
    total = all_reduce(local, "sum")
    return list(total.unbind(0))


def global_count(n: float | torch.Tensor) -> float:
    """A count summed over ranks (e.g. completion tokens in the whole GRPO batch for DAPO's num_items)."""
    return float(all_reduce(torch.as_tensor(float(n), dtype=torch.float64), "sum"))


def dapo_num_items(local_tokens: float | torch.Tensor) -> float:
    """DAPO divides by the token count of the WHOLE rollout batch. DDP/FSDP then average gradients over W ranks, so
    each rank divides by global_tokens / W: the averaged gradient equals one rank's on the whole batch."""
    return global_count(local_tokens) / world_size()


def shard_range(n: int) -> range:
    """This rank's contiguous share of n items (n % world_size == 0): rows of a global batch, GRPO prompt groups.
    Whole groups stay on one rank, so each group's rewards and advantages are computed over the whole group."""
    W, r = world_size(), rank()
    if n % W:
        raise ConfigError(f"{n} items cannot be split evenly over {W} ranks; use a multiple of {W} "
                          f"(e.g. for GRPO: rl.prompts_per_step)")
    return range(r * n // W, (r + 1) * n // W)


# ---- full tensors for checkpoints (FSDP2 parameters are sharded DTensors) ------------------------------------
def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU. For an FSDP2 DTensor this is a collective: EVERY rank must call it, same order."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu()


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `like`: a DTensor shard if `like` is one of the same global shape, else moved to like's
    device (scalars such as AdamW's step stay as they are)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor) and tuple(full.shape) == tuple(like.shape):  # like.shape is the global shape
        return distribute_tensor(full.to(like.device_mesh.device_type), like.device_mesh, like.placements)
    return full.to(like.device) if full.dim() else full


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with every tensor whole and on CPU (a collective under FSDP2; all ranks call it)."""
    return {k: full_tensor(v) for k, v in unwrap(model).state_dict().items()}


class FullModel:
    """What `nanoseek.checkpoint.save` needs of a model (.config, .state_dict()), with whole tensors. Build it on
    every rank (gathering is collective), save it on rank 0."""

    def __init__(self, model: torch.nn.Module):
        model = unwrap(model)
        self.config = model.config
        self._state = full_state_dict(model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


@torch.no_grad()
def copy_full_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Copy `src`'s parameters and buffers into the plain (unsharded) twin `dst`, IN PLACE, gathering each tensor
    whole if FSDP2 shards it. A collective under FSDP2: every rank calls it, at the same point.

    What GRPO does before each rollout phase when training shards the policy: a rank's inference engine needs the
    whole weights. One tensor is gathered at a time (peak memory: the twin plus one whole tensor, not a second
    model), and the twin's tensors stay the same objects, so an engine built on it sees their version counters move
    and re-derives its cached (folded) weights (nanoseek/infer/runner.py `sync`)."""
    from torch.distributed.tensor import DTensor

    own = dst.state_dict(keep_vars=True)  # name -> the twin's own Parameter / buffer
    for name, t in unwrap(src).state_dict().items():
        own[name].copy_(t.full_tensor() if isinstance(t, DTensor) else t)


def load_full_state(model: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool = False):
    """Load whole tensors (from a checkpoint written at any world size) into a model that may be FSDP2-sharded."""
    model = unwrap(model)
    own = model.state_dict()
    sharded = {k: shard_like(v, own[k]) if k in own else v for k, v in state.items()}
    return model.load_state_dict(sharded, strict=strict)
