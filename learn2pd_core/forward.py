"""The decoding step's forward pass for a batch of rows: which positions go through the model, which keys/values
come from the KV cache, which logits come back. The engine's commit rules see only the logits.

Without a cache every step runs the model over each row's live sequence. With one (Fast-dLLM's, which the
Learn2PD paper used), a row's first step in a block runs that full forward and stores every position's keys and
values; its later steps in the block reuse them:
- `prefix`: the forward runs over the block and everything after it; the positions before the block come cached;
- `dual`:   the forward runs over the block only; every other position comes cached.
Cached values go stale as the block fills: an approximation, which is why the paper reports accuracy with it.
`refresh="step"` stores fresh keys/values before every step's cached forward: exact (the no-cache result token
for token) at two forwards a step, a check of the cached path rather than a speed-up.

The cache holds keys/values [slots, kv_heads, L + 1, head_dim] per layer for the rows still decoding, in position
order; a cached forward writes the positions it computes into it and attends over it, copying nothing. Allocated once
per batch, and compacted when rows leave (finished, or cut by EoTP), so they stop costing memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

@dataclass
class StepLogits:
    positions: torch.Tensor   # [R, K] absolute positions whose logits were computed
    logits: torch.Tensor      # [R, K, V]
    valid: torch.Tensor       # [R, K] bool: a real position of the row's live sequence (not padding of the request)

    def at(self, pos: torch.Tensor) -> torch.Tensor:
        """Logits [R, S, V] at positions pos [R, S] (each within `positions` or beyond the row's end)."""
        if self.positions.shape == pos.shape and bool((self.positions == pos).all()):
            return self.logits
        idx = (pos[:, :, None] == self.positions[:, None, :]).float().argmax(-1)   # [R, S]
        return self.logits.gather(1, idx[..., None].expand(-1, -1, self.logits.shape[-1]))


class BlockForward:
    """One batch's model runner. `__call__(rows, block_start, region)`: logits for each row's block
    (region "block") or for its whole generation region from the block on (region "generation", EoTP predict)."""

    def __init__(self, model, x: torch.Tensor, real: torch.Tensor, end: torch.Tensor, prompt_width: int,
                 block_size: int, cache: str | None = None, refresh: str = "block"):
        self.model, self.x, self.real, self.end = model, x, real, end      # the engine's tensors, read live
        self.P, self.S, self.mode, self.refresh = prompt_width, block_size, cache, refresh
        self.offset = (~real).sum(1)                                       # [B] left padding: position = index - offset
        self.kv: list[list[torch.Tensor]] | None = None                    # per layer [k, v] [slots, Hkv, L, hd]
        self.slot = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)   # row -> cache slot
        # Greedy prediction and its confidence at every position, as of the last forward that computed it: EoTP
        # "predict" reads it over the whole generation region (under dual, positions outside the block keep the
        # predictions of the block's first step, as their keys/values do).
        self.pred_conf = torch.full(x.shape, -1.0, device=x.device)          # [B, L], -1: never computed
        self.pred_id = torch.zeros(x.shape, dtype=torch.long, device=x.device)
        # NFE counts every forward, however wide: a refresh="step" check runs two a step
        self.forwards_per_step = 2 if cache is not None and refresh == "step" else 1

    def __call__(self, rows: torch.Tensor, block_start: torch.Tensor, first_step: torch.Tensor,
                 region: str = "block") -> StepLogits:
        """rows [R]; block_start [R] absolute start of each row's block; first_step [R] bool: the row's first
        step in this block (a cache refresh)."""
        out = self._step(rows, block_start, first_step, region)
        if region == "generation":
            self._record(rows, out)
        return out

    def _record(self, rows, out: StepLogits):
        """Keep the greedy prediction and its softmax confidence at every position this forward computed."""
        top, arg = out.logits.float().max(dim=-1)                      # [R, K]
        conf = torch.exp(top - out.logits.float().logsumexp(dim=-1))
        r = rows[:, None].expand_as(out.positions)[out.valid]
        at = out.positions[out.valid]
        self.pred_conf[r, at], self.pred_id[r, at] = conf[out.valid], arg[out.valid]

    def _step(self, rows, block_start, first_step, region) -> StepLogits:
        if self.mode is None:
            return self._full(rows, block_start, region, store=False)
        self._compact(rows)
        full = first_step.clone() if self.kv is not None else torch.ones_like(first_step)
        if self.refresh == "step":                                         # exactness check: store, then read
            fresh = self._full(rows, block_start, region, store=True)
            if region == "generation":   # the whole region's predictions are fresh too
                self._record(rows, fresh)
            full[:] = False
        out = [None] * 2
        groups = (rows[full], rows[~full])
        if len(groups[0]):
            out[0] = self._full(groups[0], block_start[full], region, store=True)
        if len(groups[1]):
            out[1] = self._cached(groups[1], block_start[~full], region)
        return _merge(full, out)

    # ---- the forwards ------------------------------------------------------------------------------------------

    def _full(self, rows, block_start, region, store: bool) -> StepLogits:
        """Every live position of each row through the model; keys/values stored when `store`."""
        dev, x = self.x.device, self.x
        T = int(self.end[rows].max())
        span = torch.arange(T, device=dev)
        attn = self.real[rows, :T] & (span < self.end[rows, None])                       # [R, T]
        at = self._region(rows, block_start, region, T)                                  # [R, K]
        out = self.model(x[rows, :T], None if bool(attn.all()) else attn, logits_at=at.clamp(max=T - 1),
                         **({"positions": self._positions(rows, span.expand(len(rows), -1)), "return_kv": True}
                            if store else {}))
        if store:
            out, kv = out
            self._store(rows, kv, T)
        return StepLogits(at, out, at < self.end[rows, None])

    def _cached(self, rows, block_start, region) -> StepLogits:
        dev, L, S = self.x.device, self.x.shape[1], self.S
        end = self.end[rows, None]
        # queries: dual the block; prefix the block and everything after it (so EoTP predict sees the rest)
        width = S if self.mode == "dual" else int((self.end[rows] - block_start).max())
        q = block_start[:, None] + torch.arange(width, device=dev)                       # [R, W] absolute
        q_ok = q < end
        qc = q.clamp(max=L - 1)
        # Keys: every position before the rows' longest end, read from the cache, except the positions this
        # forward computes, which it writes over in place. A query past its row's end (EoTP cut, or a row
        # shorter than the widest) writes to the slot just past the keys, which no row attends to.
        Tk = int(self.end[rows].max())
        span = torch.arange(Tk + 1, device=dev)
        k_ok = (span < end) & self.real[rows][:, span.clamp(max=L - 1)]                  # [R, Tk + 1]
        slots = self.slot[rows]
        if torch.equal(slots, torch.arange(self.kv[0][0].shape[0], device=dev)):   # every row, in slot order:
            cache = [(k[:, :, :Tk + 1], v[:, :, :Tk + 1]) for k, v in self.kv]        # the cache itself
        else:   # others are at a block's first step (a full forward): a copy of these rows' slots
            cache = [(k[slots, :, :Tk + 1], v[slots, :, :Tk + 1]) for k, v in self.kv]
        at = q if region == "generation" or self.mode == "dual" else q[:, :S]              # [R, K] absolute
        at_idx = (at - block_start[:, None]).clamp(max=width - 1)
        logits = self.model(self.x[rows[:, None], qc], k_ok, logits_at=at_idx, positions=self._positions(rows, qc),
                            kv_cache=cache, write_at=torch.where(q_ok, q, Tk))
        return StepLogits(at, logits, at < end)

    def _region(self, rows, block_start, region, T) -> torch.Tensor:
        dev = self.x.device
        if region == "block":
            return block_start[:, None] + torch.arange(self.S, device=dev)
        return torch.arange(self.P, T, device=dev).expand(len(rows), -1)

    def _positions(self, rows, index) -> torch.Tensor:
        """Rotary positions of absolute indices [R, K]: counted from each row's first real token."""
        return (index - self.offset[rows, None]).clamp(min=0)

    # ---- the cache ---------------------------------------------------------------------------------------------

    def _store(self, rows, kv, T: int):
        if self.kv is None:   # allocated once, for the rows present at the batch's first step; one spare slot
            B, L = self.x.shape   # past the last position takes the writes of queries past a row's end
            # zeros, not empty: attention weighs masked keys' values by 0, and 0 x a stray NaN would be NaN
            self.kv = [[torch.zeros((B,) + t.shape[1:2] + (L + 1,) + t.shape[3:], dtype=t.dtype, device=t.device)
                        for t in layer] for layer in kv]
            self.slot = torch.arange(B, device=self.x.device)
        for (kc, vc), (k, v) in zip(self.kv, kv):
            kc[self.slot[rows], :, :T] = k
            vc[self.slot[rows], :, :T] = v

    def _compact(self, live: torch.Tensor):
        """Drop the slots of rows that left: the cache shrinks to the rows still decoding."""
        if self.kv is None or len(live) == self.kv[0][0].shape[0]:
            return
        keep = self.slot[live]
        self.kv = [[t[keep] for t in layer] for layer in self.kv]
        self.slot[:] = -1
        self.slot[live] = torch.arange(len(live), device=self.x.device)

    def cache_bytes(self) -> int:
        return 0 if self.kv is None else sum(t.numel() * t.element_size() for layer in self.kv for t in layer)


def _merge(full: torch.Tensor, parts) -> StepLogits:
    """Rows' results back in their order; regions padded to one width (padding is not valid)."""
    present = [p for p in parts if p is not None]
    if len(present) == 1:
        return present[0]
    K = max(p.positions.shape[1] for p in present)
    R, V = len(full), present[0].logits.shape[-1]
    ref = present[0]
    positions = torch.full((R, K), -1, dtype=torch.long, device=ref.positions.device)
    logits = ref.logits.new_zeros((R, K, V))
    valid = torch.zeros((R, K), dtype=torch.bool, device=ref.positions.device)
    for sel, p in zip((full, ~full), parts):
        k = p.positions.shape[1]
        positions[sel, :k], logits[sel, :k], valid[sel, :k] = p.positions, p.logits, p.valid
    return StepLogits(positions, logits, valid)
