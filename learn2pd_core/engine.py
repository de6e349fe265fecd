"""Batched semi-autoregressive block decoding for masked diffusion LMs, with every commit policy.

Each row of the batch decides independently: it has its own current block, step count, transfer
schedule and (under EoTP) its own end. Rows share only the forward pass; a finished row leaves it.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from . import policies
from .config import DecodeConfig
from .errors import ConfigError
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


def generate(model: DiffusionLM, prompts: Sequence[str | Sequence[int]], config: DecodeConfig,
             *, batch_size: int | None = None) -> list[GenerationResult]:
    """Decode every prompt (text goes through the model's prompt template; id lists are used as they are)."""
    ids = [_prompt_ids(model, p, i, config.gen_length) for i, p in enumerate(prompts)]
    refs = config.references
    if config.policy == "egp" and len(refs) != len(ids):
        raise ConfigError(f"egp got {len(refs)} references for {len(ids)} prompts; pass one per prompt")
    step = batch_size or max(1, len(ids))
    out: list[GenerationResult] = []
    for i in range(0, len(ids), step):
        out += _decode_batch(model, ids[i:i + step], refs[i:i + step] if refs is not None else None, config)
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


@torch.inference_mode()   # decoding never needs gradients; without this the filter's forward records a graph every step
def _decode_batch(model: DiffusionLM, prompts: list[list[int]], references, cfg: DecodeConfig) -> list[GenerationResult]:
    dev, mask_id = model.device, model.mask_token_id
    B, G, S, nb, spb = len(prompts), cfg.gen_length, cfg.block_size, cfg.num_blocks, cfg.steps_per_block
    P = max(map(len, prompts))
    L = P + G
    # Left padding keeps every row's generation region at [P, L); padding is excluded by the attention mask.
    x = torch.full((B, L), mask_id, dtype=torch.long, device=dev)
    valid = torch.ones((B, L), dtype=torch.bool, device=dev)
    for r, p in enumerate(prompts):
        x[r, :P - len(p)] = model.pad_token_id
        valid[r, :P - len(p)] = False
        x[r, P - len(p):P] = torch.tensor(p, device=dev)
    ref = torch.tensor(np.asarray(references, dtype=np.int64), device=dev) if cfg.policy == "egp" else None
    eos_ids = torch.tensor(model.eos_token_ids, device=dev)
    eos_fill = model.eos_token_ids[0]
    filt = cfg.filter.to(dev) if cfg.policy == "learn2pd" else None
    tau = cfg.tau
    generators = [torch.Generator(device=dev).manual_seed(_row_seed(cfg.seed, p)) for p in prompts] \
        if cfg.temperature > 0 else None

    end = torch.full((B,), L, dtype=torch.long, device=dev)   # row r's live sequence is x[r, :end[r]]
    block = torch.zeros(B, dtype=torch.long, device=dev)
    step = torch.zeros(B, dtype=torch.long, device=dev)
    schedule = policies.transfer_schedule(torch.full((B,), S, device=dev), spb)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    nfe, fpb = np.zeros(B, dtype=np.int64), np.zeros((B, nb), dtype=np.int64)
    per_step: list[list[int]] = [[] for _ in range(B)]
    finished_at = np.zeros(B)
    records = []
    offsets = torch.arange(S, device=dev)
    positions = torch.arange(L, device=dev)
    t0 = time.perf_counter()

    while True:
        rows = active.nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        T = int(end[rows].max())
        attn = valid[rows, :T] & (positions[:T] < end[rows, None])
        logits = model(x[rows, :T], None if bool(attn.all()) else attn)
        pos = P + block[rows, None] * S + offsets                      # [R, S] this row's block
        live = pos < end[rows, None]                                   # positions not cut by EoTP
        pred, conf = _predict(logits[torch.arange(len(rows), device=dev)[:, None], pos.clamp(max=T - 1)],
                              cfg.temperature, [generators[i] for i in rows.tolist()] if generators else None, mask_id)
        # Cut positions are end-of-text and take no part in the forward: fixed values keep rows independent.
        pred, conf = torch.where(live, pred, eos_fill), torch.where(live, conf, 1.0)
        current = x[rows[:, None], pos]
        masked = (current == mask_id) & live

        if cfg.policy == "vanilla":
            commit = policies.top_k(conf, masked, schedule[rows, step[rows].clamp(max=spb - 1)].clamp(min=1))
        elif cfg.policy == "threshold":
            commit = policies.threshold_rule(conf, masked, tau)
        elif cfg.policy == "factor":
            commit = policies.factor_rule(conf, masked, cfg.factor)
        elif cfg.policy == "egp":
            target = ref[rows[:, None], pos - P]
            commit = policies.egp_rule(conf, masked, pred, target)
            records.append((rows, block[rows], step[rows], conf.float(), pred, pred == target, masked))
            pred = target                                              # EGP writes reference tokens only
        else:  # learn2pd
            k = schedule[rows, step[rows].clamp(max=spb - 1)].clamp(min=1)
            commit = policies.learn2pd_rule(conf, masked, filt, tau, k)
        x[rows[:, None], pos] = torch.where(commit, pred, current)
        n_commit = commit.sum(dim=1)
        if bool((n_commit == 0).any()):   # every rule commits >= 1 per step; without it decoding never ends
            raise RuntimeError(f"policy {cfg.policy!r} committed no token in a block that still has masks")

        if cfg.eotp:
            cut = torch.where(commit & torch.isin(pred, eos_ids), pos, L).min(dim=1).values
            if cfg.eotp == "predict":
                cut, n_commit = _predicted_eot(x, rows, logits, attn, eos_ids, mask_id, cut, n_commit)
            new_end = torch.minimum(end[rows], cut + 1)
            tail = (positions[None, :] >= new_end[:, None]) & (positions[None, :] < end[rows, None])
            x[rows] = torch.where(tail, eos_fill, x[rows])
            end[rows] = new_end

        rows_np = rows.cpu().numpy()
        nfe[rows_np] += 1
        fpb[rows_np, block[rows].cpu().numpy()] += 1
        for r, n in zip(rows_np.tolist(), n_commit.tolist()):
            per_step[r].append(n)
        step[rows] += 1
        _advance_blocks(x, rows, block, step, schedule, active, end, P, S, nb, spb, mask_id)
        now = time.perf_counter() - t0
        for r in rows_np[~active[rows].cpu().numpy()]:
            finished_at[r] = now

    x_cpu = x[:, P:].cpu()
    traces = _split_traces(records, B) if cfg.policy == "egp" else [None] * B
    results = []
    for r in range(B):
        tokens = x_cpu[r].tolist()
        answer = next((i for i, t in enumerate(tokens) if t in model.eos_token_ids), G)
        results.append(GenerationResult(prompts[r], tokens, model.decode(tokens[:answer]), answer, int(nfe[r]),
                                        per_step[r], fpb[r].tolist(), float(finished_at[r]), traces[r]))
    return results


def _predicted_eot(x, rows, logits, attn, eos_ids, mask_id, cut, n_commit):
    """Official-code EoTP: among still-masked positions whose greedy prediction is end-of-text, commit
    the most confident one and cut the sequence after it."""
    T = logits.shape[1]
    top, arg = logits.float().max(dim=-1)
    conf = torch.exp(top - logits.float().logsumexp(dim=-1))
    cand = (x[rows, :T] == mask_id) & attn & torch.isin(arg, eos_ids)
    score = torch.where(cand, conf, -1.0)
    best_conf, best = score.max(dim=1)
    hit = best_conf >= 0
    if bool(hit.any()):
        hit_rows = rows[hit]
        x[hit_rows, best[hit]] = arg[hit, best[hit]]
        cut = torch.where(hit, torch.minimum(cut, best), cut)
        n_commit = n_commit + hit.long()
    return cut, n_commit


def _advance_blocks(x, rows, block, step, schedule, active, end, P, S, nb, spb, mask_id):
    """Move rows whose block has no masks left to their next block that still has some; retire finished rows."""
    starts = P + block[rows] * S
    span = starts[:, None] + torch.arange(S, device=x.device)
    done = ~((x[rows[:, None], span.clamp(max=x.shape[1] - 1)] == mask_id) & (span < end[rows, None])).any(dim=1)
    for r in rows[done].tolist():
        while True:
            block[r] += 1
            start = P + int(block[r]) * S
            if int(block[r]) >= nb or start >= int(end[r]):
                active[r] = False
                break
            count = int((x[r, start:min(start + S, int(end[r]))] == mask_id).sum())
            if count:
                step[r] = 0
                schedule[r] = policies.transfer_schedule(torch.tensor([count], device=x.device), spb)[0]
                break


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
