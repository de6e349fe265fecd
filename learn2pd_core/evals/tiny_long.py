"""`tiny-long`: the `tiny` benchmark's questions, answers and scorers, each question after a few-shot prefix of
solved examples of its task (>= 300 tokens; learn2pd_core.tiny.tasks.fewshot_prefix): the long-prompt family,
where as on GSM8K's 5-shot prompts (~900 tokens, answers ~150) most of a forward's keys are the prompt's, which
is the workload a KV cache is for. Ids: "tiny-long/<task>-0-<k>-fewshot"; `source` and `shots` are ignored.
"""
from __future__ import annotations

from . import tiny
from .tiny import METRICS, STOP, extract, scores  # noqa: F401  (same answers, same scoring)


def load(source: str | None, shots: int | None, limit: int | None) -> list[dict]:
    return tiny.load(source, shots, limit, fewshot=True, name="tiny-long")
