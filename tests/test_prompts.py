"""Prompt sources (learn2pd_core/prompts.py): a FLAN-sized sharded set sampled exactly, the same whatever its shard
layout, in bounded memory; ids that do not move; every unusable row a failure naming its file and line. No Ray."""
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from learn2pd_core import Learn2PDError, storage
from learn2pd_core.prompts import failure_reason, load_prompts, read_prompts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from prompts_sample import LAYOUT, TINY_TASK, flan_rows, sample_in_fresh_process, write_shards  # noqa: E402

GIB = 2 ** 30


def reference_sample(rows, per_task: int, seed: int) -> tuple[list[list], int]:
    """The sampling rule, written plainly over every row held at once: a row's id is its task, '-', the first 16
    hex digits of the 128-bit BLAKE2b of 'task NUL text', and '-k' for the k-th identical row (k >= 1); a task's
    sample is its first `per_task` rows by (k, 128-bit BLAKE2b of the same keyed with 'seed <seed>'). Returns the
    sample as [prompt_id, task, prompt] in task order, then rank, and the bytes of text read."""
    copies, ranked, text_bytes, position = Counter(), defaultdict(list), 0, 0
    key = f"seed {seed}".encode()
    for chunk in rows.chunks():
        text_bytes += sum(column.nbytes for column in chunk.columns)
        for task, text in zip(chunk["task"].to_pylist(), chunk["inputs"].to_pylist()):
            content = f"{task}\0{text}".encode()
            digest = hashlib.blake2b(content, digest_size=16).digest()
            k = copies[digest]
            copies[digest] += 1
            rank = (k, hashlib.blake2b(content, key=key, digest_size=16).digest())
            ranked[task].append((rank, f"{task}-{digest.hex()[:16]}" + (f"-{k}" if k else ""), position))
            position += 1
    chosen = [(task, ident, pos) for task in sorted(ranked) for _, ident, pos in sorted(ranked[task])[:per_task]]
    texts = rows.table(np.array([pos for _, _, pos in chosen]))["inputs"].to_pylist()
    return [[ident, task, text] for (task, ident, _), text in zip(chosen, texts)], text_bytes


def test_a_million_flan_rows_are_sampled_exactly_in_bounded_memory_whatever_the_layout(tmp_path):
    rows = flan_rows(1_000_000, seed=3)
    write_shards(rows, tmp_path / "a", LAYOUT)
    # The same rows shuffled into other shards, formats and folders, beside files that are not data.
    write_shards(rows, tmp_path / "b", [("x/p0.parquet", 0.4), ("y/j0.jsonl", 0.25), ("p1.parquet", 0.1),
                                        ("y/z/j1.jsonl.gz", 0.03), ("p2.parquet", 0.22)],
                 order=np.random.default_rng(5).permutation(len(rows)))
    for junk in ("README.md", "_SUCCESS", "y/.p3.parquet.tmp"):
        (tmp_path / "b" / junk).write_text("not data")

    a = sample_in_fresh_process(tmp_path / "a", 40, seed=11)
    b = sample_in_fresh_process(tmp_path / "b", 40, seed=11)
    expected, text_bytes = reference_sample(rows, 40, seed=11)
    assert a["rows"] == expected            # exact, in order
    assert b["rows"] == expected            # another process, another layout: the same sample
    per_task = Counter(task for _, task, _ in a["rows"])
    assert len(per_task) == 49 and set(per_task.values()) == {40, 25}   # the tiny task has 25 rows, 5 repeated
    assert len([i for i, task, _ in a["rows"] if task == TINY_TASK and i.endswith("-1")]) == 5
    # A reader that held the dataset would grow by more than its text; this one holds the sample and a batch.
    grew = a["peak"] - a["base"]
    assert a["peak"] <= 1.5 * GIB and grew < text_bytes / 4, (a["peak"] / GIB, grew / GIB, text_bytes / GIB)


def write_jsonl(path: Path, lines) -> Path:
    """Lines given as dicts (written as JSON) or raw bytes (written as they are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines)
                     + b"\n")
    return path


def ids_by_prompt(prompts) -> dict:
    return {r["prompt"]: r["prompt_id"] for r in prompts.rows}


def test_every_unusable_line_is_a_failure_naming_file_and_line_and_the_rest_go_on(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"task": "t", "prompt": "good one"},
        b'{"task": "t", "prompt": "caf\xe9"}',              # 2: Latin-1, not UTF-8
        b'{"task": "t", "prompt": "unterminated}',          # 3
        b"[1, 2]",                                          # 4
        {"task": "t", "prompt": 42},                        # 5
        {"task": "t", "prompt": "   "},                     # 6
        b'{"task": "t", "prompt": "half \\ud800 pair"}',    # 7: a lone surrogate, escaped as JSON allows
        {"task": "t", "text": "no prompt here"},            # 8
        b"",                                                # 9: blank lines are not rows
        {"task": "t", "prompt": "good two", "prompt_id": "mine"},
        {"task": "t", "prompt": "good three", "prompt_id": "mine"},   # 11: its id is taken
    ])
    prompts = read_prompts(str(path))
    assert [r["prompt"] for r in prompts.rows] == ["good one", "good two"] and prompts.rows[1]["prompt_id"] == "mine"
    where = {f["error"].split(": ", 2)[1]: failure_reason(f["error"]) for f in prompts.failures}
    assert where == {f"{path} line 2": "not UTF-8", f"{path} line 3": "not JSON", f"{path} line 4": "not a JSON object",
                     f"{path} line 5": "not text", f"{path} line 6": "empty prompt",
                     f"{path} line 7": "lone surrogate", f"{path} line 8": "missing column",
                     f"{path} line 11": "duplicate prompt_id"}
    errors = {f["prompt_id"]: f["error"] for f in prompts.failures}
    assert "byte 0xe9 at column 29; save the file as UTF-8" in errors[f"{path} line 2"]
    assert "'prompt' is int, not text" in errors[f"{path} line 5"]
    assert "'\\ud800' at character 6" in errors[f"{path} line 7"]
    # Each failure is a row of the errors table as it is: Arrow can hold it (no surrogate left in it).
    from learn2pd_core.traces import ERRORS
    assert pa.Table.from_pylist(prompts.failures, schema=ERRORS).num_rows == 8
    line = prompts.failure_line()
    assert line.startswith("8 failures (") and "1 not UTF-8" in line and "\n" not in line
    assert line.endswith(f"the first: {errors[f'{path} line 2']}")


def test_load_prompts_says_the_skipped_lines_in_one_line(tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [b'{"prompt_id": "a", "prompt": "caf\xe9"}', {"prompt": "fine"}, b"[1]"])
    assert [r["prompt"] for r in load_prompts(str(path))] == ["fine"]
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and "2 failures (1 not UTF-8, 1 not a JSON object)" in said[0]
    assert f"the first: not UTF-8: {path} line 1: byte 0xe9" in said[0] and said[0].endswith("those rows are skipped")


def test_parquet_failures_name_the_shard_and_row_and_an_unreadable_shard_is_one_failure(tmp_path):
    shard = tmp_path / "d" / "part-0.parquet"
    shard.parent.mkdir()
    pq.write_table(pa.table({"inputs": ["first", None, "", "fourth"], "task": ["t", "t", "t", None]}), shard)
    (tmp_path / "d" / "part-1.parquet").write_bytes(b"PAR1 but not Parquet")
    write_jsonl(tmp_path / "d" / "more.jsonl", [{"inputs": "fifth", "task": "u"}])
    prompts = read_prompts(str(tmp_path / "d"))
    assert [r["prompt"] for r in prompts.rows] == ["fifth", "first"]   # shards in the order of their names
    assert {f["error"].split(": ", 2)[1]: failure_reason(f["error"]) for f in prompts.failures} == {
        f"{shard} row 1": "missing column", f"{shard} row 2": "empty prompt", f"{shard} row 3": "missing column",
        f"{tmp_path / 'd' / 'part-1.parquet'} from row 0": "unreadable shard"}


def test_ids_follow_the_content_not_the_position(tmp_path):
    before = read_prompts(str(write_jsonl(tmp_path / "v1.jsonl", [
        {"task": "t", "prompt": "alpha"}, b"not json", {"task": "t", "prompt": "beta"},
        {"task": "t", "prompt": "beta"}, {"task": "t", "prompt": "gamma", "prompt_id": "g"}])))
    # Line 2 fixed, a line put in front, two lines swapped: no other prompt's id moves.
    after = read_prompts(str(write_jsonl(tmp_path / "v2.jsonl", [
        {"task": "t", "prompt": "new"}, {"task": "t", "prompt": "beta"}, {"task": "t", "prompt": "alpha"},
        {"task": "t", "prompt": "fixed"}, {"task": "t", "prompt": "gamma", "prompt_id": "g"},
        {"task": "t", "prompt": "beta"}])))
    old, new = [r["prompt_id"] for r in before.rows], [r["prompt_id"] for r in after.rows]
    assert set(old) <= set(new) and len(set(new)) == len(new) == 6
    beta = [r["prompt_id"] for r in after.rows if r["prompt"] == "beta"]
    assert beta[1] == beta[0] + "-1" and ids_by_prompt(after)["gamma"] == "g"
    # The same task under another task name is another prompt; the same rows as Parquet keep their ids.
    other = read_prompts(str(write_jsonl(tmp_path / "v3.jsonl", [{"task": "u", "prompt": "alpha"}])))
    assert other.rows[0]["prompt_id"] != ids_by_prompt(before)["alpha"]
    pq.write_table(pa.Table.from_pylist([{"task": "t", "prompt": p} for p in ("beta", "alpha", "beta")]),
                   tmp_path / "v4.parquet")
    assert set(ids_by_prompt(read_prompts(str(tmp_path / "v4.parquet"))).values()) < set(new)


def test_per_task_sampling_takes_distinct_prompts_first_and_depends_on_the_seed(tmp_path):
    lines = [{"task": f"t{i % 3}", "prompt": f"prompt {i}"} for i in range(300)] + [{"task": "t0", "prompt": "again"}] * 4
    path = write_jsonl(tmp_path / "p.jsonl", lines)
    sample = read_prompts(str(path), per_task=5, seed=1).rows
    assert Counter(r["task"] for r in sample) == {"t0": 5, "t1": 5, "t2": 5}
    assert sum(r["prompt"] == "again" for r in sample) <= 1      # a repeat only once every distinct prompt is in
    assert read_prompts(str(path), per_task=5, seed=1).rows == sample
    assert read_prompts(str(path), per_task=5, seed=2).rows != sample
    assert read_prompts(str(path), per_task=5, seed=1, limit=7).rows == sample[:7]
    few = write_jsonl(tmp_path / "few.jsonl", [{"task": "t", "prompt": "same"}] * 3 + [{"task": "t", "prompt": "x"}])
    ids = [r["prompt_id"] for r in read_prompts(str(few), per_task=3).rows]
    assert len(ids) == 3 and sum(i.endswith("-1") for i in ids) == 1 and not any(i.endswith("-2") for i in ids)


def test_files_directories_globs_and_compressed_shards(tmp_path):
    write_jsonl(tmp_path / "d" / "a.jsonl", [{"prompt": "one"}])
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "b.jsonl.gz").write_bytes(gzip.compress(json.dumps({"prompt": "two"}).encode()))
    pq.write_table(pa.table({"prompt": ["three"]}), tmp_path / "d" / "sub" / "c.parquet")
    (tmp_path / "d" / "_SUCCESS").write_text("")
    (tmp_path / "d" / ".d.parquet.tmp").write_text("half written")
    prompt_set = lambda source: sorted(r["prompt"] for r in read_prompts(source).rows)   # noqa: E731
    assert prompt_set(str(tmp_path / "d")) == ["one", "three", "two"]
    assert prompt_set(str(tmp_path / "d" / "*.parquet")) == ["three"]   # `*` crosses folders
    assert prompt_set(str(tmp_path / "d" / "sub" / "b.jsonl.gz")) == ["two"]
    assert read_prompts(str(tmp_path / "d" / "a.jsonl")).rows[0]["task"] == "default"


def test_sources_that_cannot_be_read_are_one_line(tmp_path):
    cases = [(str(tmp_path / "missing.jsonl"), "does not exist"),
             (str(tmp_path / "missing" / "*.parquet"), "does not exist"),
             (str(write_jsonl(tmp_path / "p.txt", [{"prompt": "x"}])), "neither JSON Lines nor Parquet"),
             (str(write_jsonl(tmp_path / "cols.jsonl", [{"text": "x"}])), "no prompt column (columns: text)"),
             (str(write_jsonl(tmp_path / "bad.jsonl", [b"\xff", b"[]"])), "has no usable prompt: 2 failures"),
             (str(tmp_path / "empty"), "holds no .jsonl or .parquet files")]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not data")
    for source, needle in cases:
        with pytest.raises(Learn2PDError, match=re.escape(needle)) as e:
            read_prompts(source)
        assert "\n" not in str(e.value)


def test_s3_shards_read_as_local_ones(tmp_path, s3_server):
    local = tmp_path / "flan"
    write_jsonl(local / "a.jsonl", [{"inputs": f"q{i}", "task": f"t{i % 2}"} for i in range(10)])
    pq.write_table(pa.table({"inputs": [f"r{i}" for i in range(10)], "task": ["t0", "t1"] * 5}), local / "b.parquet")
    for name in ("a.jsonl", "b.parquet"):
        storage.write_bytes(f"{s3_server}/flan/{name}", (local / name).read_bytes())
    strip = lambda rows: [(r["prompt_id"], r["prompt"]) for r in rows]   # noqa: E731
    assert strip(read_prompts(f"{s3_server}/flan", per_task=3).rows) == strip(read_prompts(str(local), per_task=3).rows)
    assert {r["prompt"][0] for r in read_prompts(f"{s3_server}/flan/*.parquet").rows} == {"r"}


def test_a_hub_dataset_is_streamed(tmp_path, monkeypatch):
    """The hub path with a real streaming dataset (the hub itself cannot be reached here): datasets' own reader of
    local Parquet shards stands in for Muennighoff/flan's, and must be asked to stream."""
    import datasets
    shards = write_shards(flan_rows(3000, seed=1, tasks=5), tmp_path / "flan", [("s0.parquet", 0.5), ("s1.parquet", 0.5)])
    real, calls = datasets.load_dataset, []

    def from_local(name, split, streaming=False):
        calls.append((name, split, streaming))
        return real("parquet", data_files=[str(s) for s in shards], split=split, streaming=streaming)

    monkeypatch.setattr(datasets, "load_dataset", from_local)
    hub = read_prompts("Muennighoff/flan", per_task=4, seed=2)
    assert calls == [("Muennighoff/flan", "train", True)]
    assert hub.rows == read_prompts(str(tmp_path / "flan"), per_task=4, seed=2).rows and len(hub.rows) == 6 * 4


def test_an_unreachable_hub_is_one_line_before_ray_starts(tmp_path):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "collect.py"), "--prompts", "Muennighoff/flan",
                           "--per-task", "40", "--output", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "local"})
    assert time.monotonic() - start < 60
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: cannot load 'Muennighoff/flan' (split 'train') from the Hugging Face Hub")
    assert "not a local file or directory either" in proc.stderr
    assert "Started a local Ray" not in (tmp_path / "out" / "collect.log").read_text()
