"""Semi-autoregressive block decoding for masked diffusion LMs, with every commit policy, batched continuously.

Prompts wait in a queue and decode in a pool of slots: each slot's row has its own current block, step count,
transfer schedule and (under EoTP) its own end, and rows share only the forward pass. When a row finishes (its
last block, or EoTP's cut), the next waiting prompt takes its slot, and its KV cache entries, at the next step,
so every slot keeps working while prompts remain. The loop reads as LLaDA's generate.py: for each row's block
and step, predict, take each prediction's confidence, let the commit rule choose, write.
"""
from __future__ import annotations

import os
import time
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from . import policies
from .config import DecodeConfig
from .errors import ConfigError
from .forward import BlockForward, StepInput
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
    decode_seconds: float             # wall time from taking a slot until finishing
    trace: Trace | None = None        # egp only


@dataclass
class Request:
    """One prompt and what belongs to it alone."""
    index: int                        # its place in the caller's list
    prompt: list[int]
    reference: list[int] | None       # egp: the reference answer
    generator: torch.Generator | None # sampling: its own random stream


def generate(model: DiffusionLM, prompts: Sequence[str | Sequence[int]], config: DecodeConfig, *, filter=None,
             references: Sequence[Sequence[int]] | None = None, batch_size: int | None = None) -> list[GenerationResult]:
    """Decode every prompt (text goes through the model's prompt template; id lists are used as they are) through
    `batch_size` slots (default: one per prompt). `filter`: learn2pd's filter (an object of learn2pd_core.filter, or
    the path of one); `references`: egp's reference answers, gen_length ids per prompt."""
    return Decoder(model, config, filter, batch_size).run(prompts, references)


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


class Slots:
    """Every slot's decoding state in one place. Prompts are left-padded to P tokens (the longest prompt of the
    call), so a row's generation region is x[r, P:P+G] and its live sequence x[r, :end[r]] (EoTP moves end[r] in).
    Each row has its own block, step within the block, transfer schedule and counters; a free slot holds no
    request (`request` -1) and takes no part in the forward."""

    def __init__(self, size: int, prompt_width: int, cfg: DecodeConfig, mask_id: int, pad_id: int, dev):
        B, G, self.P, self.cfg, self.mask_id, self.pad_id = size, cfg.gen_length, prompt_width, cfg, mask_id, pad_id
        self.x = torch.full((B, self.P + G), pad_id, dtype=torch.long, device=dev)       # [B, L] token ids
        self.real = torch.zeros((B, self.P + G), dtype=torch.bool, device=dev)          # [B, L] not left padding
        self.end = torch.zeros(B, dtype=torch.long, device=dev)                         # [B] live sequence end
        self.block = torch.zeros(B, dtype=torch.long, device=dev)                       # [B] current block
        self.step = torch.zeros(B, dtype=torch.long, device=dev)                        # [B] step within the block
        self.schedule = torch.zeros((B, cfg.steps_per_block), dtype=torch.long, device=dev)   # [B, steps/block]
        self.reference = torch.zeros((B, G), dtype=torch.long, device=dev)              # [B, G] egp's reference
        self.request: list[Request | None] = [None] * B                                 # the Request in each slot
        self.forwards_per_block = np.zeros((B, cfg.num_blocks), dtype=np.int64)
        self.tokens_per_step: list[list[int]] = [[] for _ in range(B)]
        self.admitted_at = np.zeros(B)

    def free(self) -> list[int]:
        return [r for r, q in enumerate(self.request) if q is None]

    def live(self) -> torch.Tensor:
        """[R] the slots holding a request."""
        return torch.tensor([r for r, q in enumerate(self.request) if q is not None], dtype=torch.long,
                            device=self.x.device)

    def admit(self, r: int, request: Request, now: float):
        """Request takes slot r: its prompt, a fully masked generation region, block 0, step 0."""
        P, p = self.P, request.prompt
        self.x[r], self.real[r] = self.pad_id, False
        self.x[r, P - len(p):P] = torch.tensor(p, device=self.x.device)
        self.real[r, P - len(p):] = True
        self.x[r, P:] = self.mask_id
        self.end[r], self.block[r], self.step[r] = self.x.shape[1], 0, 0
        self.schedule[r] = policies.transfer_schedule(torch.tensor([self.cfg.block_size], device=self.x.device),
                                                      self.cfg.steps_per_block)[0]
        if request.reference is not None:
            self.reference[r] = torch.tensor(request.reference, device=self.x.device)
        self.request[r] = request
        self.forwards_per_block[r] = 0
        self.tokens_per_step[r] = []
        self.admitted_at[r] = now

    def step_input(self, rows: torch.Tensor, pos: torch.Tensor) -> StepInput:
        """The runner's inputs for these rows, whose blocks are at pos [R, S]."""
        return StepInput(rows, self.x[rows], self.real[rows], self.end[rows], pos[:, 0], self.step[rows] == 0)

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

    def finish_step(self, rows: torch.Tensor, committed: torch.Tensor, forwards: int) -> list[int]:
        """Count the step's forwards and commits, move rows whose block is done to their next block that still has
        masks; returns the slots whose rows have none left (finished)."""
        rows_np = rows.cpu().numpy()
        self.forwards_per_block[rows_np, self.block[rows].cpu().numpy()] += forwards
        for r, n in zip(rows_np.tolist(), committed.tolist()):
            self.tokens_per_step[r].append(n)
        self.step[rows] += 1
        pos = self.block_positions(rows)
        still = (self.x[rows[:, None], pos.clamp(max=self.x.shape[1] - 1)] == self.mask_id) & (pos < self.end[rows, None])
        return [r for r in rows[~still.any(dim=1)].tolist() if not self._next_block(r)]

    def _next_block(self, r: int) -> bool:
        """Move slot r to its next block that still has masks; False when there is none."""
        S, mask_id = self.cfg.block_size, self.mask_id
        while True:
            self.block[r] += 1
            start = self.P + int(self.block[r]) * S
            if int(self.block[r]) >= self.cfg.num_blocks or start >= int(self.end[r]):
                return False
            count = int((self.x[r, start:min(start + S, int(self.end[r]))] == mask_id).sum())
            if count:
                self.step[r] = 0
                self.schedule[r] = policies.transfer_schedule(torch.tensor([count], device=self.x.device),
                                                              self.cfg.steps_per_block)[0]
                return True

    def release(self, r: int, model: DiffusionLM, now: float) -> GenerationResult:
        """The finished row's result; the slot is free for the next request."""
        request, tokens = self.request[r], self.x[r, self.P:].tolist()
        answer = next((i for i, t in enumerate(tokens) if t in model.eos_token_ids), self.cfg.gen_length)
        self.request[r] = None
        return GenerationResult(request.prompt, tokens, model.decode(tokens[:answer]), answer,
                                int(self.forwards_per_block[r].sum()), self.tokens_per_step[r],
                                self.forwards_per_block[r].tolist(), now - float(self.admitted_at[r]))


class TraceRecorder:
    """EGP's trace: an observer of every step, keeping what the filter learns from, per request."""

    def __init__(self):
        self.records = []

    def observe(self, requests: torch.Tensor, step: policies.Step):
        self.records.append((requests, step.block, step.step, step.confidence.float(), step.predicted,
                             step.predicted == step.reference, step.masked))

    def traces(self) -> dict[int, Trace]:
        """Each request's records, in step order."""
        cols = [torch.cat([rec[i] for rec in self.records]).cpu().numpy() for i in range(7)]
        out = {}
        for index in np.unique(cols[0]).tolist():
            sel = np.flatnonzero(cols[0] == index)
            out[index] = Trace(cols[1][sel].astype(np.int32), cols[2][sel].astype(np.int32),
                               cols[3][sel].astype(np.float32), cols[4][sel], cols[5][sel], cols[6][sel])
        return out


class Decoder:
    """Decoding through a pool of `slots` slots: the commit rule built once from the config, the slot pool, the
    model runner. `steps` counts the batched steps of the last run (one forward pass over every busy slot each)."""

    def __init__(self, model: DiffusionLM, cfg: DecodeConfig, filt=None, slots: int | None = None):
        if cfg.cache and not getattr(model, "native", False):
            raise ConfigError(f"cache={cfg.cache!r} needs a LLaDA checkpoint (model_type llada), which learn2pd runs "
                              f"natively; {getattr(model, 'name', 'this model')} is not one: decode it without a cache")
        if isinstance(filt, (str, os.PathLike)):
            from .filter import load_filter
            filt = load_filter(filt)
        cfg.check_filter(filt)
        self.model, self.cfg, self.slots = model, cfg, slots
        self.filter = filt.to(model.device) if filt is not None and cfg.policy == "learn2pd" else None
        self.rule = policies.make_rule(cfg.policy, cfg.tau(self.filter), cfg.factor, self.filter)
        self.steps = 0

    def run(self, prompts: Sequence[str | Sequence[int]],
            references: Sequence[Sequence[int]] | None = None) -> list[GenerationResult]:
        cfg, model = self.cfg, self.model
        cfg.check_references(references, len(prompts))
        ids = [_prompt_ids(model, p, i, cfg.gen_length) for i, p in enumerate(prompts)]
        requests = [Request(i, p, list(references[i]) if references is not None else None,
                            torch.Generator(device=model.device).manual_seed(_row_seed(cfg.seed, p))
                            if cfg.temperature > 0 else None) for i, p in enumerate(ids)]
        self.steps = 0
        return self._decode(requests) if requests else []

    @torch.inference_mode()   # decoding never needs gradients; without this the filter's forward records a graph every step
    def _decode(self, requests: list[Request]) -> list[GenerationResult]:
        cfg, model, dev, mask_id = self.cfg, self.model, self.model.device, self.model.mask_token_id
        # Longest prompts first: rows of similar length then share each step, and the padding columns that are
        # padding in every row are left out of the forward.
        queue = deque(sorted(requests, key=lambda q: -len(q.prompt)))
        pool = Slots(min(self.slots or len(requests), len(requests)), max(len(q.prompt) for q in requests), cfg, mask_id,
                     model.pad_token_id, dev)
        self.runner = runner = BlockForward(model, len(pool.request), pool.x.shape[1], pool.P, cfg.block_size,
                                            cfg.cache, cfg.cache_refresh, cfg.capture)
        recorder = TraceRecorder() if cfg.policy == "egp" else None
        eos_ids = torch.tensor(model.eos_token_ids, device=dev)
        eos_fill = model.eos_token_ids[0]
        region = "generation" if cfg.eotp == "predict" else "block"   # EoTP "predict" reads the whole region
        results: list[GenerationResult | None] = [None] * len(requests)
        t0 = time.perf_counter()

        while True:
            now = time.perf_counter() - t0
            for r in pool.free():                                      # waiting prompts take the free slots
                if not queue:
                    break
                pool.admit(r, queue.popleft(), now)
                runner.admit(torch.tensor([r], device=dev))
            rows = pool.live()                                         # [R] busy slots
            if not rows.numel():
                break
            pos = pool.block_positions(rows)                           # [R, S]
            live = pos < pool.end[rows, None]                          # positions not cut by EoTP
            out = runner(pool.step_input(rows, pos), region)           # predict: logits where they are read
            pred, conf = _predict(out.at(pos), cfg.temperature,        # ... and their confidence
                                  [pool.request[r].generator for r in rows.tolist()], mask_id)
            # Cut positions are end-of-text and take no part in the forward: fixed values keep rows independent.
            pred, conf = torch.where(live, pred, eos_fill), torch.where(live, conf, 1.0)
            current = pool.x[rows[:, None], pos]
            step = policies.Step(conf, pred, (current == mask_id) & live, pool.top_k_count(rows), pool.block[rows],
                                 pool.step[rows], pool.reference[rows[:, None], pos - pool.P] if recorder else None)
            commit = self.rule(step)                                   # commit: the rule chooses
            if recorder:
                recorder.observe(torch.tensor([pool.request[r].index for r in rows.tolist()], device=dev), step)
            pool.x[rows[:, None], pos] = torch.where(commit, self.rule.tokens(step), current)   # write
            n_commit = commit.sum(dim=1)
            if bool((n_commit == 0).any()):   # every rule commits >= 1 per step; without it decoding never ends
                raise RuntimeError(f"policy {cfg.policy!r} committed no token in a block that still has masks")
            if cfg.eotp == "block":
                pool.cut(rows, _finished_answer_end(pool, rows, pos, live, eos_ids), eos_fill)
            elif cfg.eotp:
                cut = torch.where(commit & torch.isin(pool.x[rows[:, None], pos], eos_ids), pos,
                                  pool.x.shape[1]).min(dim=1).values
                if cfg.eotp == "predict":
                    cut, n_commit = _predicted_eot(pool, rows, runner, eos_ids, cut, n_commit)
                pool.cut(rows, cut, eos_fill)
            self.steps += 1
            now = time.perf_counter() - t0
            for r in pool.finish_step(rows, n_commit, runner.forwards_per_step):   # finished rows free their slot
                index = pool.request[r].index
                results[index] = pool.release(r, model, now)
        if recorder:
            for index, trace in recorder.traces().items():
                results[index].trace = trace
        return results


def _predict(block_logits: torch.Tensor, temperature: float, generators, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted ids [R, S] and their softmax confidence, from logits [R, S, V]. "Still masked" is never a
    prediction: committing it would stall decoding. Greedy decoding needs one maximum and one probability per
    position, taken in float32 (exact for bf16 and float32 logits; no float64 copy of the whole vocabulary, which
    on LLaDA is 126,464 columns); sampling is Gumbel-max in float64, as LLaDA's."""
    if temperature == 0:
        logits = block_logits.float()   # float32 logits: the step's own, which nothing reads after this
        logits[..., mask_id] = float("-inf")
        top, pred = logits.max(dim=-1)
        # softmax at the maximum, 1 / sum(exp(logits - max)), in place: no second copy of the vocabulary
        return pred, logits.sub_(top[..., None]).exp_().sum(dim=-1).reciprocal_()
    logits = block_logits.double()
    logits[..., mask_id] = float("-inf")
    noise = torch.stack([torch.rand(logits.shape[1:], generator=g, dtype=torch.float64, device=logits.device)
                         for g in generators])
    pred = (logits.exp() / (-torch.log(noise)) ** temperature).argmax(dim=-1)
    conf = torch.softmax(logits, dim=-1).gather(-1, pred[..., None]).squeeze(-1)
    return pred, conf


def _finished_answer_end(state: Slots, rows, pos, live, eos_ids) -> torch.Tensor:
    """EoTP "block": [R] the first end-of-text of the generation region for rows whose current block is now
    complete and holds one (earlier blocks hold none, or the row would have ended there), else past the end.
    Waiting for the block to complete keeps every position before that end-of-text decoded exactly as without
    EoTP; cutting then skips every later block, where nearly all of the padding's forwards are."""
    x, P, L = state.x, state.P, state.x.shape[1]
    complete = ~((x[rows[:, None], pos] == state.mask_id) & live).any(dim=1)   # [R]
    eos = torch.isin(x[rows, P:], eos_ids)                                       # [R, G]
    first = torch.where(eos.any(dim=1), P + eos.int().argmax(dim=1), L)
    return torch.where(complete, first, L)


def _predicted_eot(state: Slots, rows, runner: BlockForward, eos_ids, cut, n_commit):
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
