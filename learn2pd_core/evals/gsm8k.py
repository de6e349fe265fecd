"""GSM8K, lm-evaluation-harness style: N-shot `Question: ...\\nAnswer: ...` prompts with the first N worked
train answers (default 5), cut at the next "Question:".

Metrics: strict = the first `#### <number>` of the completion; flexible = the last number anywhere in it.
Both strip commas, `$` and a trailing period and then compare strings with the gold after `####` (like the
harness: "18.00" is not "18"). The primary metric is flexible: instruct models (LLaDA-8B-Instruct) often
state the answer without the `####` marker, and flexible-extract is what dLLM papers built on the
harness usually report.
"""
from __future__ import annotations

import re

from ..errors import Learn2PDError
from . import CHAT_STOPS, check_shots, hub_rows, make_example, read_jsonl, require, resolve_file

STOP = ("Question:",) + CHAT_STOPS
METRICS = ("correct", "strict", "flexible")
DEFAULT_SHOTS = 5

_STRICT = re.compile(r"#### (-?[0-9.,]+)")
# A number as written in prose: optional sign and dollar, digit groups with commas, optional decimals.
_NUMBER = re.compile(r"-?\$?\d(?:[\d,]*\d)?(?:\.\d+)?")


def load(source: str | None, shots: int | None, limit: int | None) -> list[dict]:
    shots = check_shots("gsm8k", shots, DEFAULT_SHOTS, 10_000)
    if source is None:
        test = hub_rows("gsm8k", "gsm8k", "test.jsonl", "openai/gsm8k", "test", "main")
        train = hub_rows("gsm8k", "gsm8k", "train.jsonl", "openai/gsm8k", "train", "main") if shots else []
    else:
        path = resolve_file("gsm8k", "gsm8k", source, ("test.jsonl",))
        test = require(read_jsonl(path), ("question", "answer"), str(path))
        train = read_jsonl(_train_file(path)) if shots else []
    prefix = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in train[:shots])
    return [make_example(f"gsm8k/{i}", f"{prefix}Question: {r['question']}\nAnswer:", {"answer": gold(r["answer"])})
            for i, r in enumerate(test[:limit] if limit else test)]


def _train_file(test_path):
    train = test_path.with_name("train.jsonl")
    if not train.is_file():
        raise Learn2PDError(f"few-shot examples come from {train}, which does not exist; put GSM8K's train.jsonl "
                            "next to the test file or pass shots=0")
    return train


def gold(answer: str) -> str:
    """The normalised number after `####` of a worked answer."""
    return _clean(answer.split("####")[-1])


def _clean(number: str) -> str:
    return number.strip().replace(",", "").replace("$", "").rstrip(".")


def extract_strict(completion: str) -> str | None:
    m = _STRICT.search(completion)
    return _clean(m.group(1)) if m else None


def extract_flexible(completion: str) -> str | None:
    found = _NUMBER.findall(completion)
    return _clean(found[-1]) if found else None


def extract(completion: str, example: dict | None = None) -> str | None:
    return extract_flexible(completion)


def scores(target: dict, completion: str) -> dict[str, bool]:
    answer = target["answer"]
    strict = extract_strict(completion) == answer
    flexible = extract_flexible(completion) == answer
    return {"correct": flexible, "strict": strict, "flexible": flexible}
