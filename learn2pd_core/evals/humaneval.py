"""HumanEval: 0-shot function completion, pass@1 with one greedy sample.

The prompt is the task's signature and docstring; the completion is cut at the harness's stop sequences
(a new top-level class/def/comment/if/print) and also at "```", because chat-tuned models close a code
fence after the body. prompt + completion + the task's tests + `check(entry_point)` run in the sandbox
(separate process; time limit: the sandbox's CPU_SECONDS of CPU time, which a busy machine does not
shrink, where the harness used 3 s of wall clock).
"""
from __future__ import annotations

from . import CHAT_STOPS, check_shots, hub_rows, make_example, read_jsonl, require, resolve_file

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "```") + CHAT_STOPS
METRICS = ("correct",)
EXECUTES_CODE = True   # sandbox errors propagate instead of counting as wrong answers
FILES = ("HumanEval.jsonl.gz", "HumanEval.jsonl")
_FIELDS = ("task_id", "prompt", "test", "entry_point")


def load(source: str | None, shots: int | None, limit: int | None) -> list[dict]:
    check_shots("humaneval", shots, 0, 0)
    if source is None:
        rows = hub_rows("humaneval", "humaneval", FILES[0], "openai/openai_humaneval", "test")
    else:
        path = resolve_file("humaneval", "humaneval", source, FILES)
        rows = require(read_jsonl(path), _FIELDS, str(path))
    return [make_example(r["task_id"], r["prompt"], {k: r[k] for k in _FIELDS})
            for r in (rows[:limit] if limit else rows)]


def program(target: dict, completion: str) -> str:
    return f"{target['prompt']}{completion}\n{target['test']}\ncheck({target['entry_point']})\n"


def extract(completion: str, example: dict | None = None) -> str | None:
    return completion


def scores(target: dict, completion: str) -> dict[str, bool]:
    from .sandbox import run_checked
    return {"correct": run_checked(program(target, completion))}
