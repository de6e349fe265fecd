"""Commit rules: which masked positions of the current block become final this step.

Every function works on a batch of rows at once, each row holding its own current block:
`confidence` [R, S] (float), `masked` [R, S] (bool). They return a bool commit mask [R, S] that is
never true outside `masked` and, whenever a row has a masked position, commits at least one.
Ties in confidence go to the lowest position (LLaDA's topk leaves ties unspecified; we fix them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def transfer_schedule(masked_count: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's get_num_transfer_tokens: split each row's masked count evenly over `steps`, remainder first."""
    base, rem = masked_count // steps, masked_count % steps
    return base[:, None] + (torch.arange(steps, device=masked_count.device)[None, :] < rem[:, None]).long()


def top_k(confidence: torch.Tensor, masked: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The k[r] most confident masked positions of each row."""
    score = confidence.masked_fill(~masked, float("-inf"))
    rank = score.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    return masked & (rank < k[:, None])


def _at_least_one(confidence, masked):
    return top_k(confidence, masked, torch.ones(confidence.shape[0], dtype=torch.long, device=confidence.device))


def threshold_rule(confidence, masked, tau: float):
    """Fast-dLLM threshold: every masked token with confidence >= τ, and always the most confident one."""
    return (masked & (confidence >= tau)) | _at_least_one(confidence, masked)


def factor_rule(confidence, masked, factor: float):
    """Fast-dLLM factor: the top-n while (n + 1)(1 - c_n) < f, c_n the n-th largest masked confidence."""
    ranked = confidence.masked_fill(~masked, float("-inf")).sort(dim=-1, descending=True, stable=True).values
    n = torch.arange(1, ranked.shape[-1] + 1, device=ranked.device, dtype=ranked.dtype)
    ok = ((n + 1) * (1 - ranked) < factor) & torch.isfinite(ranked)
    count = ok.long().cumprod(dim=-1).sum(dim=-1).clamp(min=1)   # length of the leading run that passes
    return top_k(confidence, masked, count)


def egp_rule(confidence, masked, predicted, reference):
    """Extremely Greedy Parallel oracle: every masked position predicted as the reference; when none is,
    the most confident one (it is then written with its reference token, which guarantees progress)."""
    match = masked & (predicted == reference)
    return match | (_at_least_one(confidence, masked) & ~match.any(dim=-1, keepdim=True))


def learn2pd_rule(confidence, masked, filt, tau: float, k: torch.Tensor, block: torch.Tensor, step: torch.Tensor):
    """Learn2PD: masked positions the filter accepts (sigmoid(logit) > τ), together with the vanilla top-k.
    `filt` maps the block's [R, S] confidences and masks and each row's block index and step [R] to [R, S]
    logits (a filter of learn2pd_core.filter; the paper's reads the confidences only)."""
    logits = filt(confidence.to(next(filt.parameters()).dtype), masked, block, step)
    return (masked & (torch.sigmoid(logits) > tau)) | top_k(confidence, masked, k)


# ---- commit rules: built once from the config, each with one job -------------------------------------------------

@dataclass
class Step:
    """What a commit rule sees of one decoding step, R rows by S block positions."""
    confidence: torch.Tensor   # [R, S] softmax confidence of each prediction
    predicted: torch.Tensor    # [R, S] predicted token ids
    masked: torch.Tensor       # [R, S] bool: still masked (and not cut by EoTP)
    top_k: torch.Tensor        # [R] tokens the vanilla schedule commits at this step (at least one)
    block: torch.Tensor        # [R] each row's block index
    step: torch.Tensor         # [R] each row's step within its block
    reference: torch.Tensor | None = None   # [R, S] egp: the reference answer's tokens at the block


class CommitRule:
    """Which masked positions of each row's block become final this step, and the tokens written there."""

    def __call__(self, s: Step) -> torch.Tensor:
        raise NotImplementedError

    def tokens(self, s: Step) -> torch.Tensor:
        return s.predicted


class Vanilla(CommitRule):
    def __call__(self, s):
        return top_k(s.confidence, s.masked, s.top_k)


@dataclass
class Threshold(CommitRule):
    tau: float

    def __call__(self, s):
        return threshold_rule(s.confidence, s.masked, self.tau)


@dataclass
class Factor(CommitRule):
    factor: float

    def __call__(self, s):
        return factor_rule(s.confidence, s.masked, self.factor)


class ExtremelyGreedy(CommitRule):
    def __call__(self, s):
        return egp_rule(s.confidence, s.masked, s.predicted, s.reference)

    def tokens(self, s):   # the oracle writes reference tokens only
        return s.reference


@dataclass
class Learned(CommitRule):
    filter: torch.nn.Module
    tau: float

    def __call__(self, s):
        return learn2pd_rule(s.confidence, s.masked, self.filter, self.tau, s.top_k, s.block, s.step)


def make_rule(policy: str, tau: float | None, factor: float, filt=None) -> CommitRule:
    """The config's commit rule (tau: the threshold in force, DecodeConfig.tau)."""
    return {"vanilla": Vanilla, "threshold": lambda: Threshold(tau), "factor": lambda: Factor(factor),
            "egp": ExtremelyGreedy, "learn2pd": lambda: Learned(filt, tau)}[policy]()
