"""Trace collection: the model's own greedy answer as reference, then the EGP oracle re-decode.

The reference is decoded in vanilla's exact EoTP form ("block"): its answer is token for token vanilla's, and
every block after the answer's end is skipped instead of decoded one token per forward (on the tiny model ~32
forwards instead of 256 at gen 256; the reference tokens were identical on 16 of 16 prompts, because the model
fills the rest with end-of-text). After the first end-of-text the reference is end-of-text: what the answer
means, and what the oracle then commits."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .config import DEFAULTS, DecodeConfig
from .engine import GenerationResult, generate
from .model import DiffusionLM


def collect_egp(model: DiffusionLM, prompts: Sequence, gen_length: int = DEFAULTS.gen_length,
                block_size: int = DEFAULTS.block_size,
                batch_size: int | None = None) -> tuple[list[GenerationResult], list[GenerationResult]]:
    """(vanilla greedy references, EGP re-decodes with their trace records), both batched."""
    refs = generate(model, prompts, DecodeConfig(gen_length=gen_length, block_size=block_size, eotp="block"),
                    batch_size=batch_size)
    egp = generate(model, prompts, DecodeConfig(gen_length=gen_length, block_size=block_size, policy="egp"),
                   references=[r.token_ids for r in refs], batch_size=batch_size)
    return refs, egp


def trace_matrix(results: Sequence[GenerationResult]) -> dict[str, np.ndarray]:
    """All records of EGP results stacked, as a filter's fit takes them: confidence [N, S] float32, correct and
    masked [N, S] bool, block and step [N] int32."""
    traces = [r.trace for r in results if r.trace is not None and len(r.trace.block)]
    return {k: np.concatenate([getattr(t, k) for t in traces]) for k in ("confidence", "correct", "masked", "block", "step")}
