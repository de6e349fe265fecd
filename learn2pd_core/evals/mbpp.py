"""MBPP: 3-shot (tasks 2, 3, 4) `[BEGIN] ... [DONE]` prompts on the 500 test tasks (ids 11-510).

The completion is cut at "[DONE]". If it holds a Markdown code fence (chat models add them although the
shots have none), the fenced code is what runs. code + test_setup_code + the three asserts must exit
cleanly in the sandbox within its CPU time limit (setup after the code: see `program`). CRLF line endings
of mbpp.jsonl are normalised to "\\n" in prompts and tests. The limit is CPU time, not the harness's 3 s of
wall clock: task 123's reference solution needs 2.4 CPU s on a 2-core machine and timed out at 3 s of wall
clock whenever the machine was busy.
"""
from __future__ import annotations

import re

from ..errors import Learn2PDError
from . import CHAT_STOPS, check_shots, hub_rows, make_example, read_jsonl, require, resolve_file

STOP = ("[DONE]",) + CHAT_STOPS
METRICS = ("correct",)
EXECUTES_CODE = True   # sandbox errors propagate instead of counting as wrong answers
SHOT_IDS = (2, 3, 4)
TEST_IDS = range(11, 511)
_FIELDS = ("task_id", "text", "code", "test_list")


def load(source: str | None, shots: int | None, limit: int | None) -> list[dict]:
    shots = check_shots("mbpp", shots, len(SHOT_IDS), len(SHOT_IDS))
    if source is None:
        rows = hub_rows("mbpp", "mbpp", "mbpp.jsonl", "google-research-datasets/mbpp", "test", "full")
        if shots:   # the hub keeps tasks 1-10 in a split named "prompt"
            rows += hub_rows("mbpp", "mbpp", "mbpp.jsonl", "google-research-datasets/mbpp", "prompt", "full")
        where = "google-research-datasets/mbpp"
    else:
        path = resolve_file("mbpp", "mbpp", source, ("mbpp.jsonl",))
        rows, where = require(read_jsonl(path), _FIELDS, str(path)), str(path)
    by_id = {int(r["task_id"]): r for r in rows}
    missing = [i for i in SHOT_IDS[:shots] if i not in by_id]
    if missing:
        raise Learn2PDError(f"{where} lacks the few-shot tasks {missing}; use the full mbpp.jsonl (task ids 1-974)")
    prefix = "".join(_task(by_id[i]) + f"{_lf(by_id[i]['code'])}\n[DONE]\n" for i in SHOT_IDS[:shots])
    tests = [by_id[i] for i in TEST_IDS if i in by_id]
    if not tests:
        raise Learn2PDError(f"{where} has none of MBPP's test tasks (ids 11-510)")
    return [make_example(f"mbpp/{r['task_id']}", prefix + _task(r),
                         {"task_id": int(r["task_id"]), "test_setup_code": _lf(r.get("test_setup_code") or ""),
                          "test_list": [_lf(t) for t in r["test_list"]]})
            for r in (tests[:limit] if limit else tests)]


def _lf(text: str) -> str:
    return text.replace("\r\n", "\n")


def _task(row: dict) -> str:
    tests = "\n".join(_lf(t) for t in row["test_list"])
    return (f"You are an expert Python programmer, and here is your task: {row['text']} "
            f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")


_FENCE = re.compile(r"```[A-Za-z0-9_+-]*[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def extract(completion: str, example: dict | None = None) -> str | None:
    """The code to run: the first fenced block if there is one, else the completion."""
    m = _FENCE.search(completion)
    return m.group(1) if m else completion


def program(target: dict, code: str) -> str:
    # The setup goes after the code: the only two tasks with setup code (367, 927) build trees from the
    # Node class that the solution defines, so setup-first would fail even the reference solution.
    return f"{code}\n{target['test_setup_code']}\n" + "\n".join(target["test_list"]) + "\n"


def scores(target: dict, completion: str) -> dict[str, bool]:
    from .sandbox import run_checked
    return {"correct": run_checked(program(target, extract(completion)))}
