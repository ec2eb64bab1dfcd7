"""DeepSeekMoE (V3 §2.1.2): shared experts + fine-grained routed experts, sigmoid gating with group-limited
top-k, and the auxiliary-loss-free balancing bias (V3 §2.1.2, eq. 16) plus the sequence-wise balance loss
(eq. 17-20)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the shared experts."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # b_i of eq. 16: used for the choice only, updated outside the gradient by update_balance_bias.
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x):
        """x [N, d] -> gate weights [N, K], expert ids [N, K], scores s [N, E] (fp32)."""
        cfg = self.cfg
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores.detach() + self.e_score_correction_bias
        if cfg.n_group > 1:
            N = x.shape[0]
            grouped = choice.view(N, cfg.n_group, -1)  # [N, groups, E/groups]
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # a group's score: sum of its top-2
            keep = group_scores.topk(cfg.topk_group, dim=-1).indices
            mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(mask[..., None], float("-inf")).view(N, -1)
        idx = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
        w = scores.gather(1, idx)  # gates from the raw s, not s + b
        if cfg.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * cfg.routed_scaling_factor, idx, scores


class Experts(nn.Module):
    """Routed experts as stacked weights: tokens are sorted by expert and run as one grouped matmul per
    projection (torch's grouped_mm), or, where that kernel cannot run, one matmul per expert slice."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, d, h = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, h, d))
        self.up_proj = nn.Parameter(torch.empty(E, h, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, h))
        self.grouped = True  # False forces the per-expert loop (the plain-PyTorch reference)

    def forward(self, x, idx, w):
        """x [N, d], idx/w [N, K] -> [N, d], per-expert token counts [E]. No Python loop over tokens."""
        order, tok, counts = sort_by_expert(idx, self.gate_proj.shape[0])
        xs = x[tok]  # [N*K, d], grouped by expert
        if self.grouped and grouped_mm_ok(xs, self.gate_proj):
            ys = grouped_swiglu(xs, self.gate_proj, self.up_proj, self.down_proj, counts)
        else:
            ys = looped_swiglu(xs, self.gate_proj, self.up_proj, self.down_proj, counts)
        ys = ys.to(x.dtype) * w.reshape(-1)[order, None].to(x.dtype)  # the K contributions add up in x's dtype
        return torch.zeros_like(x).index_add_(0, tok, ys), counts


def sort_by_expert(idx: torch.Tensor, E: int):
    """idx [N, K] expert choices -> order [N*K] (the (token, slot) pairs grouped by expert, stable), tok [N*K] (the
    token of each), counts [E] (pairs per expert)."""
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    # static-shaped count (bincount's output size depends on the data, which breaks torch.compile graphs)
    counts = torch.zeros(E, dtype=torch.long, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))
    return order, order // idx.shape[1], counts


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # grouped_mm is not covered by autocast: cast to the autocast dtype by hand, as F.linear would
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_mm_ok(xs: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch's CPU/GPU grouped_mm needs bf16/fp32 operands (bf16 under torch.compile) with 16-byte-aligned
    rows."""
    if not hasattr(F, "grouped_mm"):
        return False
    dt = _compute_dtype(xs)
    if dt not in (torch.bfloat16, torch.float32) or (torch.compiler.is_compiling() and dt != torch.bfloat16):
        return False  # torch 2.13's compiled grouped_mm takes bf16 only
    if xs.device.type == "cuda" and (dt != torch.bfloat16 or torch.cuda.get_device_capability(xs.device) < (8, 0)):
        return False  # the CUDA kernel: bf16 on sm80+ (untested here: no GPU)
    E, h, d = weight.shape
    return (h * dt.itemsize) % 16 == 0 and (d * dt.itemsize) % 16 == 0


def grouped_swiglu(xs, gate_proj, up_proj, down_proj, counts):
    """SwiGLU of expert-sorted rows xs [S, d]: rows offs[e-1]:offs[e] use expert e. Gate and up projections run
    as one grouped matmul over [E, d, 2h]."""
    dt = _compute_dtype(xs)
    h = gate_proj.shape[1]
    offs = counts.cumsum(0).to(torch.int32)
    # Fresh, aligned, row-major [E, in, out] copies of the (small) weights: on CPU, grouped_mm over a transposed
    # view runs ~2x slower than over a contiguous one (measured, 1 thread, bf16).
    w_gu = torch.cat([gate_proj, up_proj], dim=1).transpose(1, 2).to(dt).contiguous()  # [E, d, 2h]
    gu = F.grouped_mm(xs.to(dt), w_gu, offs=offs)  # [S, 2h]
    g, u = gu.split([h, h], dim=-1)
    w_d = down_proj.transpose(1, 2).to(dt).contiguous()  # [E, h, d]
    return F.grouped_mm(F.silu(g) * u, w_d, offs=offs)  # [S, h] x [E, h, d] -> [S, d]


def looped_swiglu(xs, gate_proj, up_proj, down_proj, counts):
    """The plain-PyTorch reference: one matmul per expert slice of the sorted rows."""
    ys = xs.new_empty(xs.shape[0], down_proj.shape[1], dtype=_compute_dtype(xs))
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            xe = xs[start : start + n]
            hidden = F.silu(xe @ gate_proj[e].t()) * (xe @ up_proj[e].t())
            ys[start : start + n] = hidden @ down_proj[e].t()
            start += n
    return ys


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) \
            if cfg.n_shared_experts else None
        # Tokens routed to each expert since the last balance step (read by update_balance_bias).
        self.register_buffer("load", torch.zeros(cfg.n_routed_experts, dtype=torch.long), persistent=False)
        self.aux_loss = None

    def forward(self, x):
        B, T, d = x.shape
        w, idx, scores = self.gate(x.reshape(-1, d))
        y, counts = self.experts(x.reshape(-1, d), idx, w)
        self.load += counts.detach()
        if self.training:
            self.aux_loss = sequence_balance_loss(scores.view(B, T, -1), idx.view(B, T, -1))
        y = y.view(B, T, d)
        return y + self.shared_experts(x) if self.shared_experts is not None else y


def sequence_balance_loss(scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """V3 eq. 17-20 per sequence, averaged over the batch: sum_i f_i P_i with
    f_i = E/(K T) * #{t: i in topK(t)} and P_i = mean_t s_i,t / sum_j s_j,t. scores [B, T, E], idx [B, T, K]."""
    B, T, E = scores.shape
    K = idx.shape[-1]
    f = torch.zeros(B, E, device=scores.device).scatter_add_(
        1, idx.reshape(B, -1), torch.ones(B, T * K, device=scores.device)) * (E / (K * T))
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)
    return (f * p).sum(-1).mean()


@torch.no_grad()
def update_balance_bias(moe_layers, gamma: float, loads: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Auxiliary-loss-free balancing (V3 eq. 16 and below): b_i -= gamma if expert i was overloaded, += gamma if
    underloaded. `loads` (e.g. all-reduced across ranks) default to each layer's own counts; counts reset."""
    used = []
    for i, m in enumerate(moe_layers):
        load = (loads[i] if loads is not None else m.load).float()
        m.gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
        used.append(load.clone())
        m.load.zero_()
    return used
