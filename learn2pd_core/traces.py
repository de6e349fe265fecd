"""The trace dataset's schema, and one batch of collection: prompts -> (traces, references, errors).

traces:     one row per (prompt, block, step) of the EGP re-decode: the filter's training data.
references: one row per prompt: the vanilla greedy answer used as the oracle's reference, the forwards of its
            decode (vanilla+eotp, see oracle.py) and of the EGP re-decode.
errors:     one row per prompt that could not be decoded, with the reason.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

from .errors import Learn2PDError
from .engine import prompt_problem
from .oracle import collect_egp

TRACES = pa.schema([("prompt_id", pa.string()), ("task", pa.string()), ("block", pa.int32()), ("step", pa.int32()),
                    ("confidence", pa.list_(pa.float32())), ("correct", pa.list_(pa.bool_())),
                    ("masked", pa.list_(pa.bool_()))])
REFERENCES = pa.schema([("prompt_id", pa.string()), ("task", pa.string()), ("prompt", pa.string()),
                        ("reference_text", pa.string()), ("reference_ids", pa.list_(pa.int32())),
                        ("reference_nfe", pa.int32()), ("egp_nfe", pa.int32()), ("trace_rows", pa.int32())])
ERRORS = pa.schema([("prompt_id", pa.string()), ("task", pa.string()), ("prompt", pa.string()), ("error", pa.string())])


def encode_checked(model, prompt, gen_length: int, chat: bool) -> list[int]:
    """Token ids of one prompt, or a Learn2PDError saying why it cannot be decoded."""
    if not isinstance(prompt, str):
        raise Learn2PDError(f"prompt is {type(prompt).__name__}, not text")
    if not prompt.strip():
        raise Learn2PDError("prompt is empty")
    try:
        ids = model.encode_prompt(prompt, chat=chat)
    except Exception as e:   # tokenizers raise assorted types on undecodable input
        raise Learn2PDError(f"prompt cannot be tokenised: {e}") from None
    problem = prompt_problem(model, ids, gen_length)
    if problem:
        raise Learn2PDError(f"prompt {problem}")
    return ids


def encode_rows(model, rows: Sequence[dict], gen_length: int, chat: bool | None):
    """(decodable rows, their token ids, [(bad row, reason)]) for rows with a "prompt"."""
    good, ids, failed = [], [], []
    for r in rows:
        try:
            ids.append(encode_checked(model, r["prompt"], gen_length, chat))
            good.append(r)
        except Learn2PDError as e:
            failed.append((r, str(e)))
    return good, ids, failed


def collect_batch(model, rows: Sequence[dict], *, gen_length: int, block_size: int, chat: bool = True,
                  batch_size: int | None = None) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Collect EGP traces for rows {prompt_id, task, prompt}; bad rows become error rows, the rest go on."""
    good, ids, failed = encode_rows(model, rows, gen_length, chat)
    errors = [{"prompt_id": r["prompt_id"], "task": r["task"],
               "prompt": r["prompt"] if isinstance(r["prompt"], str) else repr(r["prompt"]), "error": reason}
              for r, reason in failed]
    traces, refs = [], []
    if good:
        vanilla, egp = collect_egp(model, ids, gen_length, block_size, batch_size)
        for r, v, e in zip(good, vanilla, egp):
            t = e.trace
            n = len(t.block)
            traces.append(pa.table({"prompt_id": [r["prompt_id"]] * n, "task": [r["task"]] * n,
                                    "block": t.block, "step": t.step,
                                    "confidence": _lists(t.confidence), "correct": _lists(t.correct),
                                    "masked": _lists(t.masked)}, schema=TRACES))
            refs.append({"prompt_id": r["prompt_id"], "task": r["task"], "prompt": r["prompt"],
                         "reference_text": v.text, "reference_ids": v.token_ids, "reference_nfe": v.nfe,
                         "egp_nfe": e.nfe, "trace_rows": n})
    trace_table = pa.concat_tables(traces) if traces else TRACES.empty_table()
    return (trace_table, pa.Table.from_pylist(refs, schema=REFERENCES), pa.Table.from_pylist(errors, schema=ERRORS))


def _lists(matrix: np.ndarray) -> pa.Array:
    """[n, S] numpy -> list<...> column without a Python loop."""
    n, s = matrix.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * s + 1, s, dtype=np.int32)), pa.array(matrix.reshape(-1)))
