"""The latent KV cache: what MLA stores per token per layer is only the compressed c_kv (kv_lora_rank) and
ONE shared rotary key (qk_rope_head_dim), not per-head keys and values (DeepSeek-V2 §2.1, V3 §2.1.1).

One pre-allocated pool per layer (main layers, then MTP layers): [n_slots, max_len, kv_lora_rank + rope_dim].
A running sequence owns one slot; nothing is reallocated while serving.
"""

from __future__ import annotations

import torch

from nanoseek.config import ModelConfig


class CacheFullError(RuntimeError):
    pass


class LatentCache:
    def __init__(self, cfg: ModelConfig, n_slots: int, max_len: int, dtype=torch.float32, device="cpu",
                 mtp: bool = True):
        self.n_layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
        self.kv_lora_rank = cfg.kv_lora_rank
        self.n_slots, self.max_len = n_slots, max_len
        # [layers, slots, max_len, kv_lora_rank + rope_dim]
        self.buf = torch.zeros(self.n_layers, n_slots, max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                               dtype=dtype, device=device)
        self._free = list(range(n_slots - 1, -1, -1))

    def layer(self, i: int) -> torch.Tensor:
        return self.buf[i]

    # ---- slot allocation -------------------------------------------------------------------------------------
    def alloc(self) -> int:
        """The lowest free slot (so the slots in use stay one range when the engine compacts them)."""
        if not self._free:
            raise CacheFullError(f"all {self.n_slots} cache slots are in use")
        return self._free.pop()

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.n_slots:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.append(slot)
        self._free.sort(reverse=True)  # popped from the end: lowest first

    def move(self, src: int, dst: int, length: int) -> None:
        """Move an allocated slot's first `length` positions (every layer) to the free slot `dst`; `src` is freed."""
        if dst not in self._free or src in self._free or not 0 <= src < self.n_slots:
            raise ValueError(f"cannot move slot {src} to {dst}: {src} must be allocated and {dst} free")
        self.buf[:, dst, :length] = self.buf[:, src, :length]
        self._free.remove(dst)
        self.free(src)

    @property
    def used(self) -> int:
        return self.n_slots - len(self._free)

    def copy_prefix(self, src: int, dst: list[int], length: int) -> None:
        """Share a prefilled prompt: copy its first `length` positions into other slots (a GRPO group)."""
        if dst:
            self.buf[:, dst, :length] = self.buf[:, src : src + 1, :length]

    def bytes_per_token(self) -> int:
        return self.n_layers * self.buf.shape[-1] * self.buf.element_size()
