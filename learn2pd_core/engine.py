"""Batched semi-autoregressive block decoding for masked diffusion LMs, with every commit policy.

Each row of the batch decides independently: it has its own current block, step count, transfer
schedule and (under EoTP) its own end. Rows share only the forward pass; a finished row leaves it.
"""
from __future__ import annotations

import os
import time
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from . import policies
from .config import DecodeConfig
from .errors import ConfigError
from .forward import BlockForward
from .model import DiffusionLM


@dataclass
class Trace:
    """EGP records of one prompt, one row per forward pass: the filter's training data."""
    block: np.ndarray        # [n] int32 block index
    step: np.ndarray         # [n] int32 step within the block
    confidence: np.ndarray   # [n, S] float32 confidence of the prediction at every block position
    predicted: np.ndarray    # [n, S] int64 predicted token ids
    correct: np.ndarray      # [n, S] bool prediction == reference
    masked: np.ndarray       # [n, S] bool position still masked before this step's commit


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]              # gen_length ids; end-of-text padding included
    text: str                         # decoded up to the first end-of-text
    answer_tokens: int                # tokens before the first end-of-text
    nfe: int                          # forward passes that included this row
    tokens_per_step: list[int]        # tokens committed at each of this row's steps
    forwards_per_block: list[int]     # forward passes spent on each block (0 for blocks cut by EoTP)
    decode_seconds: float             # wall time from the batch's start until this row finished
    trace: Trace | None = None        # egp only


def generate(model: DiffusionLM, prompts: Sequence[str | Sequence[int]], config: DecodeConfig, *, filter=None,
             references: Sequence[Sequence[int]] | None = None, batch_size: int | None = None) -> list[GenerationResult]:
    """Decode every prompt (text goes through the model's prompt template; id lists are used as they are).
    `filter`: learn2pd's filter (an object of learn2pd_core.filter, or the path of one); `references`: egp's
    reference answers, gen_length ids per prompt."""
    if config.cache and not getattr(model, "native", False):
        raise ConfigError(f"cache={config.cache!r} needs a LLaDA checkpoint (model_type llada), which learn2pd runs "
                          f"natively; {getattr(model, 'name', 'this model')} is not one: decode it without a cache")
    if isinstance(filter, (str, os.PathLike)):
        from .filter import load_filter
        filter = load_filter(filter)
    config.check_request(filter, references, len(prompts))
    ids = [_prompt_ids(model, p, i, config.gen_length) for i, p in enumerate(prompts)]
    step = batch_size or max(1, len(ids))
    out: list[GenerationResult] = []
    for i in range(0, len(ids), step):
        out += _decode_batch(model, ids[i:i + step], references[i:i + step] if references is not None else None,
                             config, filter if config.policy == "learn2pd" else None)
    return out


def prompt_problem(model: DiffusionLM, ids: Sequence[int], gen_length: int) -> str | None:
    """Why these prompt ids cannot be decoded (phrased to follow "prompt ..."), or None if they can."""
    if not ids:
        return "is empty; give it at least one token"
    if model.mask_token_id in ids:
        return f"contains the mask token {model.mask_token_id}; remove it from the prompt"
    if model.max_length and len(ids) + gen_length > model.max_length:
        return (f"of {len(ids)} tokens + gen_length {gen_length} exceeds the model's context of {model.max_length}; "
                "shorten the prompt or lower gen_length")
    return None


def _prompt_ids(model: DiffusionLM, prompt, index: int, gen_length: int) -> list[int]:
    ids = model.encode_prompt(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    problem = prompt_problem(model, ids, gen_length)
    if problem:
        raise ConfigError(f"prompt {index} {problem}")
    return ids


def _row_seed(seed: int, prompt: list[int]) -> int:
    # Depends on the prompt, not its batch position, so sampled rows match per-row decoding.
    return zlib.crc32(np.asarray(prompt, dtype=np.int64).tobytes(), seed & 0xFFFFFFFF)


def _predict(block_logits: torch.Tensor, temperature: float, generators, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted ids and their softmax confidence. Sampling is Gumbel-max in float64 (LLaDA)."""
    logits = block_logits.double()
    logits[..., mask_id] = float("-inf")   # "still masked" is never a prediction: committing it would stall decoding
    if temperature == 0:
        pred = logits.argmax(dim=-1)
    else:
        noise = torch.stack([torch.rand(logits.shape[1:], generator=g, dtype=torch.float64, device=logits.device)
                             for g in generators])
        pred = (logits.exp() / (-torch.log(noise)) ** temperature).argmax(dim=-1)
    conf = torch.softmax(logits, dim=-1).gather(-1, pred[..., None]).squeeze(-1)
    return pred, conf


@dataclass
class Rows:
    """Every row's decoding state in one place. Row r's prompt is left-padded to P tokens, so its generation
    region is x[r, P:P+G] and its live sequence x[r, :end[r]] (EoTP moves end[r] in). Each row has its own block,
    step within the block, transfer schedule and counters; rows that finish leave `active`."""
    x: torch.Tensor               # [B, L] token ids, L = P + G
    real: torch.Tensor            # [B, L] bool: not left padding
    end: torch.Tensor             # [B] live sequence end
    block: torch.Tensor           # [B] current block
    step: torch.Tensor            # [B] step within the block
    schedule: torch.Tensor        # [B, steps_per_block] tokens the top-k commits at each step of the block
    active: torch.Tensor          # [B] bool: still decoding
    forwards_per_block: np.ndarray  # [B, num_blocks]
    tokens_per_step: list[list[int]]
    finished_at: np.ndarray       # [B] seconds from the batch's start
    P: int                        # padded prompt length
    cfg: DecodeConfig
    mask_id: int

    @classmethod
    def start(cls, prompts: list[list[int]], cfg: DecodeConfig, mask_id: int, pad_id: int, dev) -> "Rows":
        B, G, S = len(prompts), cfg.gen_length, cfg.block_size
        P = max(map(len, prompts))
        x = torch.full((B, P + G), mask_id, dtype=torch.long, device=dev)
        real = torch.ones((B, P + G), dtype=torch.bool, device=dev)
        for r, p in enumerate(prompts):
            x[r, :P - len(p)], real[r, :P - len(p)] = pad_id, False
            x[r, P - len(p):P] = torch.tensor(p, device=dev)
        return cls(x, real, end=torch.full((B,), P + G, dtype=torch.long, device=dev),
                   block=torch.zeros(B, dtype=torch.long, device=dev), step=torch.zeros(B, dtype=torch.long, device=dev),
                   schedule=policies.transfer_schedule(torch.full((B,), S, device=dev), cfg.steps_per_block),
                   active=torch.ones(B, dtype=torch.bool, device=dev),
                   forwards_per_block=np.zeros((B, cfg.num_blocks), dtype=np.int64),
                   tokens_per_step=[[] for _ in range(B)], finished_at=np.zeros(B), P=P, cfg=cfg, mask_id=mask_id)

    def live(self) -> torch.Tensor:
        """Indices of the rows still decoding."""
        return self.active.nonzero().squeeze(1)

    def block_positions(self, rows: torch.Tensor) -> torch.Tensor:
        """[R, S] absolute positions of each row's current block."""
        S = self.cfg.block_size
        return self.P + self.block[rows, None] * S + torch.arange(S, device=self.x.device)

    def top_k_count(self, rows: torch.Tensor) -> torch.Tensor:
        """[R] tokens the vanilla schedule commits at each row's current step (at least one)."""
        return self.schedule[rows, self.step[rows].clamp(max=self.cfg.steps_per_block - 1)].clamp(min=1)

    def cut(self, rows: torch.Tensor, at: torch.Tensor, fill: int):
        """EoTP: end each row's live sequence after position at[r]; what lies beyond becomes end-of-text."""
        new_end = torch.minimum(self.end[rows], at + 1)
        span = torch.arange(self.x.shape[1], device=self.x.device)[None, :]
        tail = (span >= new_end[:, None]) & (span < self.end[rows, None])
        self.x[rows] = torch.where(tail, fill, self.x[rows])
        self.end[rows] = new_end

    def finish_step(self, rows: torch.Tensor, committed: torch.Tensor, now: float, forwards: int = 1):
        """Count the step's forwards and commits, move rows whose block is done to their next block that still has
        masks, and retire rows that have none left."""
        rows_np = rows.cpu().numpy()
        self.forwards_per_block[rows_np, self.block[rows].cpu().numpy()] += forwards
        for r, n in zip(rows_np.tolist(), committed.tolist()):
            self.tokens_per_step[r].append(n)
        self.step[rows] += 1
        pos = self.block_positions(rows)
        still = (self.x[rows[:, None], pos.clamp(max=self.x.shape[1] - 1)] == self.mask_id) & (pos < self.end[rows, None])
        for r in rows[~still.any(dim=1)].tolist():
            self._next_block(r)
            if not self.active[r]:
                self.finished_at[r] = now

    def _next_block(self, r: int):
        S, mask_id = self.cfg.block_size, self.mask_id
        while True:
            self.block[r] += 1
            start = self.P + int(self.block[r]) * S
            if int(self.block[r]) >= self.cfg.num_blocks or start >= int(self.end[r]):
                self.active[r] = False
                return
            count = int((self.x[r, start:min(start + S, int(self.end[r]))] == mask_id).sum())
            if count:
                self.step[r] = 0
                self.schedule[r] = policies.transfer_schedule(torch.tensor([count], device=self.x.device),
                                                              self.cfg.steps_per_block)[0]
                return


@torch.inference_mode()   # decoding never needs gradients; without this the filter's forward records a graph every step
def _decode_batch(model: DiffusionLM, prompts: list[list[int]], references, cfg: DecodeConfig, filt) -> list[GenerationResult]:
    dev, mask_id = model.device, model.mask_token_id
    state = Rows.start(prompts, cfg, mask_id, model.pad_token_id, dev)
    x, P = state.x, state.P
    ref = torch.tensor(np.asarray(references, dtype=np.int64), device=dev) if cfg.policy == "egp" else None
    eos_ids = torch.tensor(model.eos_token_ids, device=dev)
    eos_fill = model.eos_token_ids[0]
    filt = filt.to(dev) if filt is not None else None
    tau = cfg.tau(filt)
    generators = [torch.Generator(device=dev).manual_seed(_row_seed(cfg.seed, p)) for p in prompts] \
        if cfg.temperature > 0 else None
    runner = BlockForward(model, x, state.real, state.end, P, cfg.block_size, cfg.cache, cfg.cache_refresh)
    records = []
    t0 = time.perf_counter()

    while (rows := state.live()).numel():
        pos = state.block_positions(rows)                              # [R, S]
        live = pos < state.end[rows, None]                             # positions not cut by EoTP
        # Logits only where they are read: the block, or (EoTP "predict") the generation region from the block on.
        out = runner(rows, pos[:, 0], state.step[rows] == 0, "generation" if cfg.eotp == "predict" else "block")
        block_logits = out.at(pos)                                     # [R, S, V]
        pred, conf = _predict(block_logits, cfg.temperature,
                              [generators[i] for i in rows.tolist()] if generators else None, mask_id)
        # Cut positions are end-of-text and take no part in the forward: fixed values keep rows independent.
        pred, conf = torch.where(live, pred, eos_fill), torch.where(live, conf, 1.0)
        current = x[rows[:, None], pos]
        masked = (current == mask_id) & live

        if cfg.policy == "vanilla":
            commit = policies.top_k(conf, masked, state.top_k_count(rows))
        elif cfg.policy == "threshold":
            commit = policies.threshold_rule(conf, masked, tau)
        elif cfg.policy == "factor":
            commit = policies.factor_rule(conf, masked, cfg.factor)
        elif cfg.policy == "egp":
            target = ref[rows[:, None], pos - P]
            commit = policies.egp_rule(conf, masked, pred, target)
            records.append((rows, state.block[rows], state.step[rows], conf.float(), pred, pred == target, masked))
            pred = target                                              # EGP writes reference tokens only
        else:  # learn2pd
            commit = policies.learn2pd_rule(conf, masked, filt, tau, state.top_k_count(rows), state.block[rows],
                                            state.step[rows])
        x[rows[:, None], pos] = torch.where(commit, pred, current)
        n_commit = commit.sum(dim=1)
        if bool((n_commit == 0).any()):   # every rule commits >= 1 per step; without it decoding never ends
            raise RuntimeError(f"policy {cfg.policy!r} committed no token in a block that still has masks")

        if cfg.eotp == "block":
            state.cut(rows, _finished_answer_end(state, rows, pos, live, eos_ids), eos_fill)
        elif cfg.eotp:
            cut = torch.where(commit & torch.isin(pred, eos_ids), pos, x.shape[1]).min(dim=1).values
            if cfg.eotp == "predict":
                cut, n_commit = _predicted_eot(state, rows, runner, eos_ids, cut, n_commit)
            state.cut(rows, cut, eos_fill)
        state.finish_step(rows, n_commit, time.perf_counter() - t0, runner.forwards_per_step)

    x_cpu = x[:, P:].cpu()
    traces = _split_traces(records, len(prompts)) if cfg.policy == "egp" else [None] * len(prompts)
    results = []
    for r, prompt in enumerate(prompts):
        tokens = x_cpu[r].tolist()
        answer = next((i for i, t in enumerate(tokens) if t in model.eos_token_ids), cfg.gen_length)
        results.append(GenerationResult(prompt, tokens, model.decode(tokens[:answer]), answer,
                                        int(state.forwards_per_block[r].sum()),
                                        state.tokens_per_step[r], state.forwards_per_block[r].tolist(),
                                        float(state.finished_at[r]), traces[r]))
    return results


def _finished_answer_end(state: Rows, rows, pos, live, eos_ids) -> torch.Tensor:
    """EoTP "block": [R] the first end-of-text of the generation region for rows whose current block is now
    complete and holds one (earlier blocks hold none, or the row would have ended there), else past the end.
    Waiting for the block to complete keeps every position before that end-of-text decoded exactly as without
    EoTP; cutting then skips every later block, where nearly all of the padding's forwards are."""
    x, P, L = state.x, state.P, state.x.shape[1]
    complete = ~((x[rows[:, None], pos] == state.mask_id) & live).any(dim=1)   # [R]
    eos = torch.isin(x[rows, P:], eos_ids)                                       # [R, G]
    first = torch.where(eos.any(dim=1), P + eos.int().argmax(dim=1), L)
    return torch.where(complete, first, L)


def _predicted_eot(state: Rows, rows, runner: BlockForward, eos_ids, cut, n_commit):
    """Official-code EoTP: among still-masked positions of the generation region whose greedy prediction is
    end-of-text, commit the most confident one and cut the sequence after it."""
    L = state.x.shape[1]
    span = torch.arange(L, device=state.x.device)
    conf, pred = runner.pred_conf[rows], runner.pred_id[rows]           # [R, L]
    cand = (state.x[rows] == state.mask_id) & (span >= state.P) & (span < state.end[rows, None]) & (conf >= 0) \
        & torch.isin(pred, eos_ids)
    best_conf, best = torch.where(cand, conf, -1.0).max(dim=1)
    hit = best_conf >= 0
    if bool(hit.any()):
        state.x[rows[hit], best[hit]] = pred[hit, best[hit]]
        cut = torch.where(hit, torch.minimum(cut, best), cut)
        n_commit = n_commit + hit.long()
    return cut, n_commit


def _split_traces(records, B: int) -> list[Trace | None]:
    if not records:
        return [None] * B
    cols = [torch.cat([rec[i] for rec in records]).cpu().numpy() for i in range(7)]
    row = cols[0]
    out = []
    for r in range(B):
        sel = np.flatnonzero(row == r)   # records are appended in step order, so this keeps time order
        out.append(Trace(cols[1][sel].astype(np.int32), cols[2][sel].astype(np.int32), cols[3][sel].astype(np.float32),
                         cols[4][sel], cols[5][sel], cols[6][sel]))
    return out
