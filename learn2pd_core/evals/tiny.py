"""`tiny`: the held-out benchmark family of the embedded tiny model (learn2pd_core.tiny.tasks), so the
whole evaluation runs on CPU without downloads.

Five task types (GSM8K/MATH/code stand-ins and multi-answer tasks). Without `limit`: 8 per task = 40
examples; with `limit`: ceil(limit / 5) per task, interleaved task by task, so any prefix covers the task
types evenly. Prompts are the raw task prompts (the model applies its chat template); `source` and `shots`
do not apply and are ignored. Ids ("tiny/<task>-0-<k>") do not depend on `limit`.
"""
from __future__ import annotations

import math

from . import make_example

STOP: tuple[str, ...] = ()
METRICS = ("correct",)
DEFAULT_PER_TASK = 8


def load(source: str | None, shots: int | None, limit: int | None, fewshot: bool = False,
         name: str = "tiny") -> list[dict]:
    from ..tiny.tasks import BENCHMARK_TASKS, benchmark_examples
    per_task = math.ceil(limit / len(BENCHMARK_TASKS)) if limit else DEFAULT_PER_TASK
    by_task = {t: [] for t in BENCHMARK_TASKS}
    for e in benchmark_examples(per_task, seed=0, fewshot=fewshot):
        by_task[e["task"]].append(e)
    # round robin: task 1's first, task 2's first, ..., task 1's second, ...
    ordered = [e for k in range(per_task) for t in BENCHMARK_TASKS for e in by_task[t][k:k + 1]]
    return [make_example(f"{name}/{e['id']}", e["prompt"],
                         {"task": e["task"], "prompt": e["prompt"], "answer": e["answer"]})
            for e in (ordered[:limit] if limit else ordered)]


def extract(completion: str, example: dict | None = None) -> str | None:
    return completion.strip()


def scores(target: dict, completion: str) -> dict[str, bool]:
    from ..tiny.tasks import score
    return {"correct": bool(score(target, completion))}
