"""Sampling prompts from a large sharded dataset: `read_prompts(folder, per_task=40)` over a FLAN-shaped set
(columns `inputs`, `targets`, `task`; dozens of tasks; JSON Lines, gzipped JSON Lines and Parquet shards), its
rows per second and the driver's peak memory against the dataset's size.

    python benchmarks/prompts_sample.py [--rows 100000,1000000,3000000] [--per-task 40] [--dir /big/tmp]

Each size is written to a temporary folder, then sampled in a fresh process, whose peak resident memory
(VmHWM: the process's own, from exec on) is reported with its baseline after the imports.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["anli_r1", "anli_r2", "cosmos_qa", "gsm8k", "squad_v1", "wmt16_translate_de", "trivia_qa", "cot_esnli",
            "natural_questions", "piqa", "winogrande", "glue_mrpc"]
TEMPLATES = 4                      # FLAN names a task by its family and template set: 12 x 4 = 48 tasks
TINY_TASK, TINY_ROWS = "tiny_task_fewshot", 25   # a task with fewer rows than a usual --per-task
SENTENCES, PIECES, PASSAGES = 256, 4, 4096       # an input's passage: PIECES of SENTENCES, one of PASSAGES
DUPLICATES = 0.02                  # the share of rows that repeat another row of their task word for word
CHUNK = 100_000                    # rows turned into text at a time: memory is reused instead of first touched
LAYOUT = [("flan-00000.jsonl", 0.3), ("flan-00001.jsonl.gz", 0.02), ("flan-00002.parquet", 0.28),
          ("flan-00003.jsonl", 0.15), ("flan-00004.parquet", 0.25)]

PROBE = r"""
import json, sys, time
def mem(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
from learn2pd_core.prompts import read_prompts
base = mem("VmRSS:")
start = time.perf_counter()
rows = read_prompts(sys.argv[1], per_task=int(sys.argv[2]), seed=int(sys.argv[3])).rows
print(json.dumps({"seconds": time.perf_counter() - start, "base": base, "peak": mem("VmHWM:"),
                  "rows": [[r["prompt_id"], r["task"], r["prompt"]] for r in rows]}))
"""


@dataclass
class FlanRows:
    """A FLAN-shaped dataset held as small index arrays (a row: its task, its passage, its number), turned into
    text a slice at a time: a million rows of ~0.7 KB cost 24 MB until written."""
    tasks: pa.Array         # task names
    headers: pa.Array       # each task's first sentence
    passages: pa.Array
    task_ids: np.ndarray
    passage_ids: np.ndarray
    numbers: np.ndarray

    def __len__(self) -> int:
        return len(self.task_ids)

    def table(self, rows: np.ndarray) -> pa.Table:
        """The rows at positions `rows`: columns inputs, targets and task."""
        numbers = pc.cast(pa.array(self.numbers[rows]), pa.string())
        inputs = pc.binary_join_element_wise(self.headers.take(self.task_ids[rows]),
                                             self.passages.take(self.passage_ids[rows]), "Question", numbers, " ")
        return pa.table({"inputs": inputs, "targets": pc.binary_join_element_wise("answer", numbers, " "),
                         "task": self.tasks.take(self.task_ids[rows])})

    def chunks(self, order: np.ndarray | None = None):
        """The rows as tables of CHUNK rows, in `order` (default: as generated)."""
        order = np.arange(len(self)) if order is None else order
        for start in range(0, len(order), CHUNK):
            yield self.table(order[start:start + CHUNK])


def flan_rows(rows: int, seed: int = 0, tasks: int = len(FAMILIES) * TEMPLATES) -> FlanRows:
    """`rows` FLAN-shaped rows of `tasks` tasks and a tiny one: skewed task sizes; inputs of ~0.7 KB with quotes,
    backslashes and non-ASCII; a share of exact duplicates, some in the task smaller than a usual --per-task."""
    rng = np.random.default_rng(seed)
    tasks = [f"{family}_{k}templates" for k in range(10, 10 + TEMPLATES) for family in FAMILIES][:tasks] + [TINY_TASK]
    weights = 1.0 / np.arange(1, len(tasks)) ** 0.8
    n = rows - TINY_ROWS
    task_ids = np.concatenate([rng.choice(len(tasks) - 1, size=n, p=weights / weights.sum()),
                               np.full(TINY_ROWS, len(tasks) - 1)])
    vocab = pa.array([f"Sentence {i} says \"{'naïve café' if i % 3 else 'Tōkyō 東京'}\" with a\\backslash and "
                      f"{'words ' * (8 + i % 9)}then stops." for i in range(SENTENCES)])
    passages = pc.binary_join_element_wise(*(vocab.take(rng.integers(0, SENTENCES, PASSAGES)) for _ in range(PIECES)),
                                           " ")
    origin = np.arange(rows)
    copies = rng.choice(n, size=int(n * DUPLICATES), replace=False)
    origin[copies] = rng.choice(n, size=len(copies))   # a copy takes its task from its original too
    origin[-5:] = origin[n:n + 5]                        # and the tiny task repeats five of its own rows
    return FlanRows(pa.array(tasks), pa.array([f"[{t}] Read the passage and answer the question." for t in tasks]),
                    passages, task_ids[origin], rng.integers(0, PASSAGES, rows)[origin],
                    rng.integers(0, 10**6, rows)[origin])


def _json_lines(table: pa.Table) -> pa.Buffer:
    """The rows as JSON Lines, escaped by Arrow kernels (the text holds quotes and backslashes, no control
    characters; non-ASCII stays as it is, which JSON allows). Every line ends in a newline, so the lines'
    concatenation, which is the string array's data buffer, is the file."""
    def quoted(column):
        escaped = pc.replace_substring(pc.replace_substring(column, "\\", "\\\\"), '"', '\\"')
        return pc.binary_join_element_wise('"', escaped, '"', "")
    fields = [pc.binary_join_element_wise(f'"{name}": ', quoted(table[name]), "") for name in table.column_names]
    lines = pc.binary_join_element_wise("{", pc.binary_join_element_wise(*fields, ", "), "}\n", "")
    lines = pa.concat_arrays(lines.chunks) if isinstance(lines, pa.ChunkedArray) else lines
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32, count=len(lines) + 1, offset=lines.offset * 4)
    return lines.buffers()[2][offsets[0]:offsets[-1]]


def write_shards(rows: FlanRows, folder: Path, layout: list[tuple[str, float]],
                 order: np.ndarray | None = None) -> list[Path]:
    """Split the rows, in `order` (default: as generated), into shards named by `layout` [(path under `folder`,
    share of the rows)]: a path ending .parquet is written as Parquet, .jsonl as JSON Lines, .jsonl.gz gzipped."""
    order = np.arange(len(rows)) if order is None else order
    paths, start = [], 0
    for i, (name, share) in enumerate(layout):
        end = len(order) if i == len(layout) - 1 else start + int(round(share * len(order)))
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        chunks = rows.chunks(order[start:end])
        if name.endswith(".parquet"):
            with pq.ParquetWriter(path, rows.table(order[:0]).schema) as writer:
                for chunk in chunks:
                    writer.write_table(chunk)
        else:
            with pa.output_stream(str(path), compression="gzip" if name.endswith(".gz") else None) as out:
                for chunk in chunks:
                    out.write(_json_lines(chunk))
        paths.append(path)
        start = end
    return paths


def sample_in_fresh_process(folder: Path, per_task: int, seed: int) -> dict:
    """read_prompts in a new interpreter: its seconds, its memory after the imports and at its peak, its rows."""
    out = subprocess.run([sys.executable, "-c", PROBE, str(folder), str(per_task), str(seed)], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="100000,1000000,3000000")
    ap.add_argument("--per-task", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="where to write the shards (default: a temporary folder)")
    a = ap.parse_args()
    lines = ["| rows | tasks | shards | on disk | text | sampled | seconds | rows/s | memory after imports | "
             "peak memory | peak - after imports |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    gib = lambda b: f"{b / 2**30:.2f} GiB"   # noqa: E731
    for n in map(int, a.rows.split(",")):
        with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
            rows = flan_rows(n, a.seed)
            paths = write_shards(rows, Path(tmp), LAYOUT)
            text = sum(sum(c.nbytes for c in chunk.columns) for chunk in rows.chunks())
            r = sample_in_fresh_process(Path(tmp), a.per_task, a.seed)
            disk = sum(p.stat().st_size for p in paths)
        lines.append(f"| {n:,} | {len(rows.tasks)} | {len(paths)} | {gib(disk)} | {gib(text)} | {len(r['rows'])} | "
                     f"{r['seconds']:.1f} | {n / r['seconds']:,.0f} | {gib(r['base'])} | {gib(r['peak'])} | "
                     f"{gib(r['peak'] - r['base'])} |")
        print(lines[-1], flush=True)
    body = "\n".join([f"`read_prompts(folder, per_task={a.per_task}, seed={a.seed})` over the shards "
                      + ", ".join(name for name, _ in LAYOUT) + "; seconds are the call's own (the interpreter's "
                      "start and imports excluded); memory is the sampling process's resident set; text is the "
                      "columns' Arrow size.", "", *lines])
    print("\n" + body)
    from learn2pd_core.bench import publish
    publish(__file__, f"per_task {a.per_task}, {a.rows.replace(',', ', ')} rows", body, model="none (prompt reading)")


if __name__ == "__main__":
    main()
