"""Prompt sources for trace collection: the tiny model's synthetic instruction family, JSONL or Parquet
files (local or s3://), or a Hugging Face dataset (FLAN: `Muennighoff/flan`, columns `inputs` and `task`).
Every prompt gets a stable `prompt_id`, so reruns find what is already done."""
from __future__ import annotations

import hashlib
import json
import os
import random
from collections import defaultdict

from .errors import Learn2PDError

TINY_SOURCE = "tiny-instruction"
FLAN_DATASET = "Muennighoff/flan"


def load_prompts(source: str = TINY_SOURCE, *, per_task: int | None = None, limit: int | None = None,
                 seed: int = 0, prompt_column: str | None = None, task_column: str = "task",
                 split: str = "train") -> list[dict]:
    """Rows {prompt_id, task, prompt}: `per_task` sampled per task type with `seed`, then the first `limit`."""
    if source == TINY_SOURCE:
        from .tiny.tasks import instruction_examples
        rows = [{"prompt_id": e["id"], "task": e["task"], "prompt": e["prompt"]}
                for e in instruction_examples(per_task or 8, seed=seed)]
        return rows[:limit] if limit else rows
    records = _read_file(source) if os.path.exists(source) or source.endswith((".jsonl", ".parquet")) \
        else _read_hub(source, split)
    rows = _normalise(records, source, prompt_column, task_column)
    if per_task:
        rows = _sample_per_task(rows, per_task, seed)
    return rows[:limit] if limit else rows


def _read_file(path: str) -> list[dict]:
    """A local or s3:// JSONL / Parquet file (S3 through the same settings as the job outputs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from . import storage
    if not storage.exists(path):
        raise Learn2PDError(f"prompt file {path} does not exist; pass a .jsonl or .parquet file (local or s3://), "
                            f"'{TINY_SOURCE}' or a Hugging Face dataset id")
    data = storage.read_bytes(path)
    if not path.endswith(".parquet"):
        return _read_jsonl(path, data)
    try:
        return pq.read_table(pa.BufferReader(data)).to_pylist()
    except Exception as e:   # pyarrow raises several types for malformed files
        raise Learn2PDError(f"cannot read prompts from {path}: {str(e).splitlines()[0]}") from None


def _read_jsonl(path: str, data: bytes) -> list[dict]:
    """One JSON object per line. A line that is not UTF-8 or not a JSON object is reported and skipped; the
    rest are used."""
    rows, bad = [], []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            bad.append(f"line {number} is not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})")
            continue
        except ValueError as e:
            bad.append(f"line {number} is not JSON ({e})")
            continue
        if not isinstance(row, dict):
            bad.append(f"line {number} is not a JSON object")
            continue
        rows.append(row)
    if bad:
        from . import console
        console.say(f"{path}: skipped {len(bad)} unreadable line(s), the first: {bad[0]}; save the file as UTF-8 "
                    "JSON Lines to use them")
    return rows


def _read_hub(name: str, split: str) -> list[dict]:
    try:
        import datasets
        return list(datasets.load_dataset(name, split=split))
    except Exception as e:   # offline, unknown dataset, missing split: all end the job the same way
        raise Learn2PDError(f"cannot load dataset {name!r} (split {split!r}): {str(e).splitlines()[0][:200]} -- "
                            "pass a local .jsonl/.parquet file instead, or populate the Hugging Face cache") from None


def _normalise(records: list[dict], source: str, prompt_column: str | None, task_column: str) -> list[dict]:
    if not records:
        raise Learn2PDError(f"{source} holds no prompts")
    columns = set(records[0])
    prompt_column = prompt_column or next((c for c in ("prompt", "inputs", "question") if c in columns), None)
    if prompt_column not in columns:
        raise Learn2PDError(f"{source} has no prompt column (columns: {', '.join(sorted(columns))}); "
                            "name it with --prompt-column")
    has_task = task_column in columns
    rows = []
    for i, r in enumerate(records):
        prompt = r.get(prompt_column)
        task = str(r[task_column]) if has_task else "default"
        pid = str(r["prompt_id"]) if r.get("prompt_id") is not None else \
            f"{task}-{hashlib.sha1(f'{i}:{prompt}'.encode()).hexdigest()[:12]}"
        rows.append({"prompt_id": pid, "task": task, "prompt": prompt})
    return rows


def _sample_per_task(rows: list[dict], per_task: int, seed: int) -> list[dict]:
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r)
    rng = random.Random(seed)
    out = []
    for task in sorted(by_task):
        group = by_task[task]
        out += rng.sample(group, min(per_task, len(group)))
    return out
