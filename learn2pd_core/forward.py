"""The decoding step's forward pass for the rows of the slot pool: which positions go through the model, which
keys/values come from the KV cache, which logits come back. The engine's commit rules see only the logits.

Without a cache every step runs the model over each row's live sequence. With one (Fast-dLLM's, which the
Learn2PD paper used), a row's first step in a block runs that full forward and stores every position's keys and
values; its later steps in the block reuse them:
- `prefix`: the forward runs over the block and everything after it; the positions before the block come cached;
- `dual`:   the forward runs over the block only; every other position comes cached.
Cached values go stale as the block fills: an approximation, which is why the paper reports accuracy with it.
`refresh="step"` stores fresh keys/values before every step's cached forward: exact (the no-cache result token
for token) at two forwards a step, a check of the cached path rather than a speed-up.

Rows are left-padded to one width. The columns that are padding in every row of a step are left out of its
forward (`first`), so short prompts cost their own length whenever the longest prompt is not decoding with them.

`capture` (dual cache only) runs the cached block step through `CapturedStep`: compiled at fixed shapes, which
costs what the eager step trims (see there) and pays where per-operation overhead dominates the step.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

CAPACITY_STEP = 128     # a captured cache's key length is a multiple of this: few distinct compiled shapes


@dataclass
class StepInput:
    """What one step's forward needs of its rows (R of them), handed over by the engine each step."""
    slots: torch.Tensor        # [R] the rows' slots: their KV cache entries and recorded predictions
    tokens: torch.Tensor       # [R, L] token ids (left-padded prompt, then the generation region)
    real: torch.Tensor         # [R, L] bool: not left padding
    end: torch.Tensor          # [R] live sequence end (EoTP moves it in)
    block_start: torch.Tensor  # [R] absolute start of each row's current block
    first_step: torch.Tensor   # [R] bool: the row's first step in this block (a cache refresh)

    def subset(self, keep: torch.Tensor) -> "StepInput":
        return StepInput(*(getattr(self, f.name)[keep] for f in fields(self)))

    def positions(self, index: torch.Tensor) -> torch.Tensor:
        """Rotary positions of absolute indices [R, K]: counted from each row's first real token."""
        return (index - (~self.real).sum(1, keepdim=True)).clamp(min=0)

    def first(self) -> int:
        """The first column that is real in some row: the columns before it are padding everywhere."""
        return int(self.real.int().argmax(1).min())


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


class KVCache:
    """Keys and values of every layer for each slot of the pool, [slots, Hkv, L + 1, hd] per layer, in the model's
    dtype, allocated at the first store. A request owns its slot's entries while it decodes; the next request to
    take the slot overwrites them (its first step in every block is a full forward that stores every position).
    The position past L takes the writes of queries past a row's end, which no row attends to."""

    def __init__(self, slots: int, length: int, capacity: int | None = None):
        self.slots, self.length = slots, length
        self.capacity = max(length + 1, capacity or 0)     # key positions held: >= L + 1 (the spare one)
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def store(self, slots: torch.Tensor, kv, first: int, T: int):
        """Write keys/values [R, Hkv, T - first, hd] per layer of positions first..T-1 of these slots."""
        if self.layers is None:
            # zeros, not empty: attention weighs masked keys' values by 0, and 0 x a stray NaN would be NaN
            self.layers = [tuple(torch.zeros((self.slots,) + t.shape[1:2] + (self.capacity,) + t.shape[3:],
                                             dtype=t.dtype, device=t.device) for t in layer) for layer in kv]
        for (kc, vc), (k, v) in zip(self.layers, kv):
            kc[slots, :, first:T] = k
            vc[slots, :, first:T] = v

    def read(self, slots: torch.Tensor, first: int, T: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (k, v) [R, Hkv, T + 1 - first, hd] of positions first..T (T: the spare write position). When
        the rows are every slot in order it is the cache itself, which a cached forward writes in place; otherwise a
        copy (what the forward writes into it, it recomputes at every step anyway)."""
        every = len(slots) == self.slots and bool((slots == torch.arange(self.slots, device=slots.device)).all())
        return [tuple(t[:, :, first:T + 1] if every else t[slots, :, first:T + 1] for t in layer)
                for layer in self.layers]

    def bytes(self) -> int:
        return 0 if self.layers is None else sum(t.numel() * t.element_size() for layer in self.layers for t in layer)


class BlockForward:
    """The pool's model runner. `__call__(inp, region)`: logits for each row's block (region "block") or for its
    whole generation region from the block on (region "generation", EoTP predict). Counts its model calls."""

    def __init__(self, model, slots: int, length: int, prompt_width: int, block_size: int,
                 cache: str | None = None, refresh: str = "block", capture: bool = False):
        self.model, self.P, self.S, self.mode, self.refresh = model, prompt_width, block_size, cache, refresh
        dev = model.device
        capacity = -(-(length + 1) // CAPACITY_STEP) * CAPACITY_STEP if capture else None
        self.cache = KVCache(slots, length, capacity) if cache else None
        self.captured = CapturedStep(model, self.cache, block_size) if capture else None
        # Greedy prediction and its confidence at every position, as of the last forward that computed it: EoTP
        # "predict" reads it over the whole generation region (under dual, positions outside the block keep the
        # predictions of the block's first step, as their keys/values do).
        self.pred_conf = torch.full((slots, length), -1.0, device=dev)          # [slots, L], -1: never computed
        self.pred_id = torch.zeros((slots, length), dtype=torch.long, device=dev)
        # NFE counts every forward, however wide: a refresh="step" check runs two a step
        self.forwards_per_step = 2 if cache is not None and refresh == "step" else 1
        self.calls = 0   # model calls: a step whose rows split into full and cached forwards makes two

    def admit(self, slots: torch.Tensor):
        """New requests took these slots: nothing of the previous ones may be read."""
        self.pred_conf[slots] = -1.0

    def __call__(self, inp: StepInput, region: str = "block") -> StepLogits:
        out = self._step(inp, region)
        if region == "generation":
            self._record(inp.slots, out)
        return out

    def _record(self, slots, out: StepLogits):
        """Keep the greedy prediction and its softmax confidence at every position this forward computed."""
        top, arg = out.logits.float().max(dim=-1)                      # [R, K]
        conf = torch.exp(top - out.logits.float().logsumexp(dim=-1))
        r = slots[:, None].expand_as(out.positions)[out.valid]
        at = out.positions[out.valid]
        self.pred_conf[r, at], self.pred_id[r, at] = conf[out.valid], arg[out.valid]

    def _step(self, inp: StepInput, region) -> StepLogits:
        if self.mode is None:
            return self._full(inp, region, store=False)
        full = inp.first_step.clone() if self.cache.layers is not None else torch.ones_like(inp.first_step)
        if self.refresh == "step":                                         # exactness check: store, then read
            fresh = self._full(inp, region, store=True)
            if region == "generation":   # the whole region's predictions are fresh too
                self._record(inp.slots, fresh)
            full[:] = False
        parts = [self._full(inp.subset(full), region, store=True) if bool(full.any()) else None,
                 self._cached(inp.subset(~full), region) if bool((~full).any()) else None]
        return _merge(full, parts)

    # ---- the forwards ------------------------------------------------------------------------------------------

    def _full(self, inp: StepInput, region, store: bool) -> StepLogits:
        """Every live position of each row through the model; keys/values stored when `store`."""
        self.calls += 1
        dev = inp.tokens.device
        first, T = inp.first(), int(inp.end.max())
        span = torch.arange(first, T, device=dev)
        attn = inp.real[:, first:T] & (span < inp.end[:, None])                          # [R, T - first]
        at = self._region(inp, region, T)                                                # [R, K] absolute
        out = self.model(inp.tokens[:, first:T], None if bool(attn.all()) else attn,
                         logits_at=(at.clamp(max=T - 1) - first),
                         **({"positions": inp.positions(span.expand(len(inp.end), -1)), "return_kv": True}
                            if store else {}))
        if store:
            out, kv = out
            self.cache.store(inp.slots, kv, first, T)
        return StepLogits(at, out, at < inp.end[:, None])

    def _cached(self, inp: StepInput, region) -> StepLogits:
        self.calls += 1
        if self.captured is not None:
            return self.captured(inp)
        dev, L, S = inp.tokens.device, inp.tokens.shape[1], self.S
        end = inp.end[:, None]
        # queries: dual the block; prefix the block and everything after it (so EoTP predict sees the rest)
        width = S if self.mode == "dual" else int((inp.end - inp.block_start).max())
        q = inp.block_start[:, None] + torch.arange(width, device=dev)                   # [R, W] absolute
        q_ok = q < end
        qc = q.clamp(max=L - 1)
        # Keys: every position from the first real column to the rows' longest end, read from the cache, except the
        # positions this forward computes, which it writes over in place. A query past its row's end (EoTP cut,
        # or a row shorter than the widest) writes to the spare position just past the keys, which no row attends.
        first, Tk = inp.first(), int(inp.end.max())
        span = torch.arange(first, Tk + 1, device=dev)
        k_ok = (span < end) & inp.real[:, span.clamp(max=L - 1)]                         # [R, Tk + 1 - first]
        at = q if region == "generation" or self.mode == "dual" else q[:, :S]              # [R, K] absolute
        at_idx = (at - inp.block_start[:, None]).clamp(max=width - 1)
        logits = self.model(inp.tokens.gather(1, qc), k_ok, logits_at=at_idx, positions=inp.positions(qc),
                            kv_cache=self.cache.read(inp.slots, first, Tk), write_at=torch.where(q_ok, q, Tk) - first)
        return StepLogits(at, logits, at < end)

    def _region(self, inp: StepInput, region, T) -> torch.Tensor:
        dev = inp.tokens.device
        if region == "block":
            return inp.block_start[:, None] + torch.arange(self.S, device=dev)
        return torch.arange(self.P, T, device=dev).expand(len(inp.end), -1)


class CapturedStep:
    """The dual cache's block step at fixed shapes, so that it can be compiled once per shape (torch.compile; on
    CUDA in mode "reduce-overhead", which replays it as a CUDA graph) instead of dispatching each operation.

    Shapes: rows padded to the next power of two up to the pool's slots (the pad rows repeat the first row and
    are dropped), queries the block's S positions, keys every position of the cache's capacity (the pool's
    width rounded up to CAPACITY_STEP) under the key mask. Costs against the eager step, which trims both: pad
    rows compute for nothing, and keys past the longest live row or left of the widest prompt are attended to
    with weight 0 rather than skipped. When the rows are every slot in order the step reads and writes the cache
    in place; otherwise it works on a copy of their slots' entries made inside the compiled step (what a
    cached step writes is the block, which every step writes again before reading it)."""

    def __init__(self, model, cache: KVCache, block_size: int):
        self.net, self.cache, self.S = _native_net(model), cache, block_size
        dev = model.device
        self.all_slots = torch.arange(cache.slots, device=dev)
        self.step = _compiled_step(self.net, dev)
        self.marked = False

    def __call__(self, inp: StepInput) -> StepLogits:
        R, L, C, S, dev = len(inp.slots), inp.tokens.shape[1], self.cache.capacity, self.S, inp.tokens.device
        Rb = min(1 << (R - 1).bit_length(), self.cache.slots)                 # next power of two, at most all slots
        rows = inp.subset(torch.cat([torch.arange(R, device=dev), torch.zeros(Rb - R, dtype=torch.long, device=dev)]))
        end = rows.end[:, None]                                                              # [Rb, 1]
        q = rows.block_start[:, None] + torch.arange(S, device=dev)                          # [Rb, S] absolute
        qc = q.clamp(max=L - 1)
        real = torch.cat([rows.real, rows.real.new_zeros(Rb, C - L)], dim=1)                 # [Rb, C]
        k_ok = (torch.arange(C, device=dev) < end) & real
        write_at = torch.where(q < end, q, L)            # past a row's end: the spare position L, never attended
        in_place = R == self.cache.slots and bool((inp.slots == self.all_slots).all())
        if not self.marked and dev.type == "cuda":
            # before the first graph is recorded: CUDA graphs use inputs at a fixed address in place; any other
            # input they copy into their own buffers at every replay (the whole cache)
            for layer in self.cache.layers:
                for t in layer:
                    torch._dynamo.mark_static_address(t)
            self.marked = True
        logits = self.step(rows.tokens.gather(1, qc), k_ok, rows.positions(qc), write_at, rows.slots,
                           self.cache.layers, in_place)                                       # [Rb, S, V]
        at = q[:R]
        # cloned: a CUDA graph's output is overwritten by its next replay
        return StepLogits(at, logits[:R].clone(), at < end[:R])


def _native_net(model) -> torch.nn.Module:
    """The LLaDA module inside a DiffusionLM (or a wrapper of one, such as a benchmark's timer)."""
    net = model.model
    while not isinstance(net, torch.nn.Module):
        net = net.model
    return net


def _compiled_step(net, device: torch.device):
    """One compiled function per model, kept on the model (and freed with it), so that a new pool (every `generate`
    call) reuses the graphs compiled for its shapes. One graph per (slots, rows bucket, in place or not, cache
    capacity); torch's recompile limit counts them all for this one function, so it is raised from 8 to 64, past
    which further shapes run eagerly (a warning, never an error: no `fullgraph`)."""
    if getattr(net, "_captured_step", None) is None:
        def step(tokens, k_ok, positions, write_at, slots, layers, in_place: bool):
            kv = layers if in_place else [tuple(t.index_select(0, slots) for t in layer) for layer in layers]
            return net(tokens, k_ok, positions, kv_cache=kv, write_at=write_at).logits

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        net._captured_step = torch.compile(step, dynamic=False,
                                           mode="reduce-overhead" if device.type == "cuda" else None)
    return net._captured_step


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
