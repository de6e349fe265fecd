"""Benchmarks for the evaluate job: load prompts, cut completions at stop sequences, score them.

    bench = load_benchmark("gsm8k", source="../shared/data", limit=100)
    for ex in bench.examples:                    # {"example_id", "prompt", "target"}, all plain strings
        ok = score("gsm8k", ex, model_output)    # truncates, extracts, compares (or executes); never raises

`source`: None reads the Hugging Face hub (`datasets.load_dataset`); otherwise a local file, the benchmark's
folder (e.g. ../shared/data/gsm8k) or a data root holding one folder per benchmark (../shared/data, what the
job's --data-dir passes). `tiny` and `tiny-long` (its questions after few-shot prefixes) are generated in code and ignore `source` and
`shots`.

Metrics (`score_details` / `scores`; "correct" is the primary one that `score` returns):
gsm8k {"correct" = flexible, "strict", "flexible"}; math, humaneval, mbpp, tiny, tiny-long {"correct"}.
Rows travel through Ray Data and Parquet, so `target` is a JSON string holding what the scorer needs.
"""
from __future__ import annotations

import gzip
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import Learn2PDError

BENCHMARKS = ("tiny", "tiny-long", "gsm8k", "math", "humaneval", "mbpp")
_MODULES = {"tiny": "tiny", "tiny-long": "tiny_long", "gsm8k": "gsm8k", "math": "minerva_math", "humaneval": "humaneval", "mbpp": "mbpp"}
# End-of-turn markers of common chat templates: a completion never legitimately continues past them.
CHAT_STOPS = ("</s>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>")


@dataclass(frozen=True)
class Benchmark:
    name: str
    stop: tuple[str, ...]    # the completion is cut at the first of these before scoring
    examples: list[dict]     # {"example_id": str, "prompt": str, "target": JSON str}


def _module(name: str):
    if name not in _MODULES:
        raise Learn2PDError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    # Imported lazily: the submodules import helpers from this package, and scoring one benchmark
    # should not pay for another's dependencies (math-verify, sympy).
    return importlib.import_module(f"{__name__}.{_MODULES[name]}")


def load_benchmark(name: str, *, source: str | None = None, shots: int | None = None,
                   limit: int | None = None) -> Benchmark:
    """The benchmark's examples in a fixed order (the first `limit`); `shots` defaults to the standard count."""
    mod = _module(name)
    if shots is not None and shots < 0:
        raise Learn2PDError(f"shots must be >= 0, got {shots}")
    if limit is not None and limit < 1:
        raise Learn2PDError(f"limit must be >= 1, got {limit}")
    examples = mod.load(None if source is None else str(source), shots, limit)
    return Benchmark(name=name, stop=mod.STOP, examples=examples[:limit] if limit else examples)


def stop_sequences(benchmark: str) -> tuple[str, ...]:
    return _module(benchmark).STOP


def truncate(benchmark: str, completion: str) -> str:
    """`completion` up to the first stop sequence of the benchmark (idempotent)."""
    return cut_at(completion or "", _module(benchmark).STOP)


def extract(benchmark: str, completion: str, example: dict | None = None) -> str | None:
    """The answer the scorer reads from a completion (for reports); None when there is none."""
    try:
        return _module(benchmark).extract(truncate(benchmark, completion), example)
    except Learn2PDError:
        raise
    except Exception:   # model garbage must not end an evaluation
        return None


def scores(benchmark: str, example: dict, completion: str) -> dict[str, bool]:
    """Every metric of the benchmark for one completion; "correct" is the primary one."""
    mod = _module(benchmark)
    target = _target(example)
    try:
        return mod.scores(target, truncate(benchmark, completion))
    except Exception:
        if getattr(mod, "EXECUTES_CODE", False):   # a sandbox failure is the machine's fault, not the model's
            raise
        return {m: False for m in mod.METRICS}   # odd output that trips an extractor counts as wrong


score_details = scores


def score(benchmark: str, example: dict, completion: str) -> bool:
    """The primary metric (GSM8K: flexible match; the others: correct / pass@1)."""
    return bool(scores(benchmark, example, completion)["correct"])


# ---------------------------------------------------------------- helpers shared by the benchmark modules
def cut_at(text: str, stops) -> str:
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def _target(example: dict) -> dict:
    raw = example.get("target") if isinstance(example, dict) else None
    try:
        target = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        target = None
    if not isinstance(target, dict):
        raise Learn2PDError(f"example {example.get('example_id') if isinstance(example, dict) else example!r} has "
                            "no valid target; pass rows produced by load_benchmark")
    return target


def make_example(example_id: str, prompt: str, target: dict) -> dict:
    return {"example_id": example_id, "prompt": prompt, "target": json.dumps(target, ensure_ascii=False)}


def check_shots(name: str, shots: int | None, default: int, maximum: int) -> int:
    shots = default if shots is None else shots
    if shots > maximum:
        raise Learn2PDError(f"{name} supports at most {maximum} shots, got {shots}")
    return shots


def resolve_file(name: str, folder: str, source: str, candidates: tuple[str, ...]) -> Path:
    """A file given directly, the first candidate inside the benchmark folder, or inside <root>/<folder>."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for d in (path, path / folder):
            for c in candidates:
                if (d / c).is_file():
                    return d / c
        raise Learn2PDError(f"no {name} data in {path}: expected {' or '.join(candidates)} there or in "
                            f"{path / folder}; pass the file itself or a data root such as ../shared/data")
    raise Learn2PDError(f"{name} source {source} does not exist; pass a local file or folder "
                        f"(e.g. ../shared/data/{folder}/{candidates[0]} or the data root ../shared/data)")


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Learn2PDError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def hub_rows(name: str, folder: str, example_file: str, dataset: str, split: str,
             config: str | None = None) -> list[dict]:
    """Rows of a hub dataset split; any failure (offline, no cache) is one line naming the local alternative."""
    try:
        import datasets
        return [dict(r) for r in datasets.load_dataset(dataset, config, split=split)]
    except Exception as e:   # offline, missing cache, renamed dataset: the remedy is the same
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        hint = "" if os.environ.get("HF_HUB_OFFLINE") else " (set HF_HUB_OFFLINE=1 to skip the hub's retries)"
        raise Learn2PDError(f"cannot load {name} from the Hugging Face hub ({dataset}, split {split}: {msg}); "
                            f"pass --data-dir/--source with a local file, e.g. ../shared/data/{folder}/"
                            f"{example_file}, or populate the HF cache{hint}") from None


def require(rows: list[dict], keys: tuple[str, ...], where: str) -> list[dict]:
    missing = [k for k in keys if rows and k not in rows[0]]
    if not rows or missing:
        raise Learn2PDError(f"{where} has no usable rows" + (f" (missing {', '.join(missing)})" if missing else ""))
    return rows
