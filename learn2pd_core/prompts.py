"""Prompt sources for trace collection: the tiny model's synthetic instruction family; a file, a directory or a
glob of JSON Lines / Parquet shards, local or s3:// (optionally compressed: .jsonl.gz, .jsonl.zst, ...); or a
Hugging Face dataset (FLAN: `Muennighoff/flan`, columns `inputs`, `targets` and `task`).

Shards are read one batch at a time, so the driver never holds the dataset. With `per_task`, each task keeps a
bounded heap of its first `per_task` rows in a seeded order of their content, so the sample is the same for a
seed whatever the shard layout. A prompt's id is a function of its content (task, text and which identical copy
it is), so neither an edit elsewhere in the file, a skipped line nor a new shard layout moves it; a row with its
own `prompt_id` keeps it. A row that cannot be a prompt (not UTF-8, not JSON, not an object, a missing column,
a prompt that is not text, is empty or holds a lone surrogate) becomes a failure naming its file and line (or
shard and row), and the rest go on.
"""
from __future__ import annotations

import fnmatch
import hashlib
import heapq
import io
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterator

from .errors import Learn2PDError

TINY_SOURCE = "tiny-instruction"
FLAN_DATASET = "Muennighoff/flan"
PROMPT_COLUMNS = ("prompt", "inputs", "question")   # tried in order when --prompt-column is not given
ID_COLUMN = "prompt_id"
JSON_LINES = (".jsonl", ".json", ".ndjson")
PARQUET = (".parquet",)
COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")        # pyarrow decompresses these by their ending
BATCH_ROWS = 4096                                    # Parquet and hub rows decoded at a time

# Why a row is not a prompt: the first words of its error message, so that a run's errors count by reason.
NOT_UTF8, NOT_JSON, NOT_OBJECT = "not UTF-8", "not JSON", "not a JSON object"
MISSING, NOT_TEXT, EMPTY, SURROGATE = "missing column", "not text", "empty prompt", "lone surrogate"
UNREADABLE, DUPLICATE_ID = "unreadable shard", "duplicate prompt_id"
INPUT_REASONS = (NOT_UTF8, NOT_JSON, NOT_OBJECT, MISSING, NOT_TEXT, EMPTY, SURROGATE, UNREADABLE, DUPLICATE_ID)
# What traces.encode_checked / engine.prompt_problem say when a model cannot decode a prompt, by reason.
MODEL_REASONS = (("exceeds the model's context", "too long"), ("mask token", "mask token"),
                 ("cannot be tokenised", "cannot be tokenised"), ("prompt is empty", EMPTY), ("not text", NOT_TEXT))


@dataclass
class PromptSet:
    """The prompts to collect, {prompt_id, task, prompt} each, and the rows that cannot be prompts, shaped as
    traces.ERRORS rows {prompt_id, task, prompt, error}."""
    rows: list[dict]
    failures: list[dict] = field(default_factory=list)

    def failure_line(self) -> str:
        """One line: how many rows failed, by reason, and the first."""
        return failure_summary(self.failures)


def load_prompts(source: str = TINY_SOURCE, **options) -> list[dict]:
    """read_prompts' rows; its failures are said on the console in one line."""
    prompts = read_prompts(source, **options)
    if prompts.failures:
        from . import console
        console.say(f"{source}: {prompts.failure_line()}; those rows are skipped")
    return prompts.rows


def read_prompts(source: str = TINY_SOURCE, *, per_task: int | None = None, limit: int | None = None,
                 seed: int = 0, prompt_column: str | None = None, task_column: str = "task",
                 split: str = "train") -> PromptSet:
    """The prompts of `source`: `per_task` sampled per task with `seed` (all when None), then the first `limit`."""
    if source == TINY_SOURCE:
        from .tiny.tasks import instruction_examples
        rows = [{"prompt_id": e["id"], "task": e["task"], "prompt": e["prompt"]}
                for e in instruction_examples(per_task or 8, seed=seed)]
        return PromptSet(rows[:limit] if limit else rows)
    columns = _Columns(source, prompt_column, task_column)
    chosen = _PerTask(per_task, seed) if per_task else _InOrder(limit)
    failures = []
    for where, record in _records(source, split, columns.wanted()):
        try:
            row = columns.row(record)
        except _BadRow as bad:
            failures.append(bad.failure(_where(where)))
            continue
        if chosen.add(row, where):
            break   # --limit without sampling: the first rows are enough
    if not chosen.count:
        raise Learn2PDError(f"{source} has no usable prompt: {failure_summary(failures)}" if failures
                            else f"{source} holds no prompts")
    rows, duplicates = _unique_ids(chosen.rows())
    return PromptSet(rows[:limit] if limit else rows, failures + duplicates)


def failure_reason(message: str) -> str:
    """The reason of an error row's message: one of INPUT_REASONS, a model's reason (e.g. 'too long') or 'other'."""
    head = message.split(": ", 1)[0]
    if head in INPUT_REASONS:
        return head
    return next((reason for phrase, reason in MODEL_REASONS if phrase in message), "other")


def failure_summary(failures: list[dict]) -> str:
    """'3 failures (2 not UTF-8, 1 too long), the first: <its prompt_id>: <its error>'."""
    counts = Counter(failure_reason(f["error"]) for f in failures)
    first = failures[0]
    located = first["error"].partition(": ")[2].startswith(f"{first['prompt_id']}: ")   # named by where it is
    named = first["error"] if located else f"{first['prompt_id']}: {first['error']}"
    return (f"{len(failures)} failure{'s' if len(failures) != 1 else ''} ("
            + ", ".join(f"{n} {reason}" for reason, n in counts.most_common()) + f"), the first: {named}")


# ---- rows: columns, checks and failures

class _BadRow(Exception):
    """A row that cannot be a prompt: its reason (one of INPUT_REASONS), what is wrong and how to fix it."""

    def __init__(self, reason: str, detail: str, shown: str = "", task: str = "", prompt_id: str | None = None):
        super().__init__(reason)
        self.reason, self.detail, self.shown, self.task, self.prompt_id = reason, detail, shown, task, prompt_id

    def failure(self, where: str) -> dict:
        """An ERRORS row. A row without an id of its own is named by where it is: it has no usable content."""
        return {"prompt_id": self.prompt_id or where, "task": self.task, "prompt": _printable(self.shown)[:500],
                "error": f"{self.reason}: {where}: {self.detail}"}


@dataclass
class _Row:
    task: str
    text: str
    content: bytes      # task and text as UTF-8: what the id and the sampling order hash
    prompt_id: str | None


class _Columns:
    """Which fields of a record hold the prompt, the task and the id: the prompt column is the first of
    PROMPT_COLUMNS (or --prompt-column) that the source's first record has."""

    def __init__(self, source: str, prompt: str | None, task: str):
        self.source, self.prompt, self.task, self.seen, self.has_task = source, prompt, task, False, False

    def wanted(self) -> set[str]:
        """The columns a Parquet shard needs to decode (the others are never read)."""
        return ({self.prompt} if self.prompt else set(PROMPT_COLUMNS)) | {self.task, ID_COLUMN}

    def _first(self, record: dict) -> None:
        self.seen = True
        names = set(record)
        self.prompt = self.prompt or next((c for c in PROMPT_COLUMNS if c in names), None)
        if self.prompt not in names:
            raise Learn2PDError(f"{self.source} has no prompt column (columns: {', '.join(sorted(names))}); "
                                "name it with --prompt-column")
        self.has_task = self.task in names

    def row(self, record) -> _Row:
        """The prompt row of a record, or the _BadRow that names what is wrong with it."""
        if isinstance(record, _BadRow):
            raise record
        if not self.seen:
            self._first(record)
        prompt_id = record.get(ID_COLUMN)
        if prompt_id is not None:
            prompt_id = str(prompt_id)
            _text(prompt_id, ID_COLUMN)
        task = record.get(self.task) if self.has_task else "default"
        if task is None:
            raise _BadRow(MISSING, f"no '{self.task}'; give every row a task", repr(record), "", prompt_id)
        task = str(task)
        task_bytes = _text(task, self.task, prompt_id=prompt_id)
        prompt = record.get(self.prompt)
        text = _text(prompt, self.prompt, task, prompt_id)
        if not prompt.strip():
            raise _BadRow(EMPTY, f"'{self.prompt}' is blank; remove the row or write its prompt", prompt, task,
                          prompt_id)
        return _Row(task, prompt, task_bytes + b"\0" + text, prompt_id)


def _text(value, name: str, task: str = "", prompt_id: str | None = None) -> bytes:
    """`value` as UTF-8, or the _BadRow that says why it is not text."""
    if value is None:
        raise _BadRow(MISSING, f"no '{name}'; give every row one", "", task, prompt_id)
    if not isinstance(value, str):
        raise _BadRow(NOT_TEXT, f"'{name}' is {type(value).__name__}, not text; make it a string", repr(value),
                      task, prompt_id)
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as e:   # e.g. "\ud800" in JSON: Python reads it, UTF-8 (and so Arrow) cannot hold it
        raise _BadRow(SURROGATE, f"'{name}' holds the lone surrogate {value[e.start]!r} at character {e.start + 1}; "
                      "replace it with the character it stands for", value, task, prompt_id) from None


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _unique_ids(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Chosen rows whose own prompt_id repeats an earlier one's become failures (content ids cannot repeat)."""
    seen, kept, failed = set(), [], []
    for row in rows:
        where = row.pop("where")
        if row["prompt_id"] in seen:
            failed.append({"prompt_id": where, "task": row["task"], "prompt": row["prompt"],
                           "error": f"{DUPLICATE_ID}: {where}: prompt_id {row['prompt_id']!r} is taken by an "
                                    "earlier row; give each row its own or leave it out"})
            continue
        seen.add(row["prompt_id"])
        kept.append(row)
    return kept, failed


# ---- ids and sampling

def _digest(content: bytes, key: bytes = b"") -> bytes:
    return hashlib.blake2b(content, key=key, digest_size=16).digest()


def content_id(task: str, digest: bytes, copy: int) -> str:
    """A prompt's id: its task, the start of the hash of its task and text (`digest`), and `-k` for the k-th
    identical row (k >= 1). Identical rows are interchangeable, so whichever is met first is copy 0."""
    base = f"{task}-{digest.hex()[:16]}"
    return f"{base}-{copy}" if copy else base


class _InOrder:
    """Every row in the order read, up to `limit`."""

    def __init__(self, limit: int | None):
        self.limit, self.kept, self.copies = limit, [], Counter()

    @property
    def count(self) -> int:
        return len(self.kept)

    def add(self, row: _Row, where) -> bool:
        """Keep `row`; True once `limit` rows are kept."""
        digest = _digest(row.content)
        copy = self.copies[digest]
        self.copies[digest] += 1
        self.kept.append({"prompt_id": row.prompt_id or content_id(row.task, digest, copy), "task": row.task,
                          "prompt": row.text, "where": _where(where)})
        return bool(self.limit) and len(self.kept) >= self.limit

    def rows(self) -> list[dict]:
        return self.kept


class _PerTask:
    """For each task, the first `n` rows in the order (copy, seeded hash of task and text), kept in a bounded
    heap while the rows stream past.

    The copy number comes first so that a task's sample holds distinct prompts before any repeated one (the same
    prompt twice would only decode the same traces twice). It also keeps the heap exact in bounded memory: a
    row's copy number is known from the copies still in its task's heap, because once copy 0 of a text leaves
    the heap (or never enters it), the heap's largest key is below it and every later copy of that text sorts
    after it. A hash per copy independent of the others would need a count of every text ever read instead."""

    def __init__(self, n: int, seed: int):
        self.n, self.key = n, f"seed {seed}".encode()
        self.heaps: dict[str, list] = defaultdict(list)
        self.groups: dict[str, dict] = defaultdict(dict)   # per task: hash -> [copies read, copies in the heap]
        self.count = 0

    def add(self, row: _Row, where) -> bool:
        heap, groups = self.heaps[row.task], self.groups[row.task]
        h = int.from_bytes(_digest(row.content, self.key), "big")
        group = groups.get(h)
        copy = group[0] if group else 0
        if group:
            group[0] += 1
        rank = (copy << 128) | h   # a unique integer: the heap never compares the rows behind two equal ranks
        if len(heap) >= self.n and rank >= -heap[0][0]:
            return False
        if group is None:
            group = groups[h] = [1, 0]
        group[1] += 1
        entry = (-rank, copy, h, row, where)
        if len(heap) < self.n:
            heapq.heappush(heap, entry)
            self.count += 1
            return False
        _, _, gone, _, _ = heapq.heapreplace(heap, entry)
        groups[gone][1] -= 1
        if not groups[gone][1]:
            del groups[gone]   # its every later copy sorts after the heap's largest key: none can enter
        return False

    def rows(self) -> list[dict]:
        out = []
        for task in sorted(self.heaps):
            for _, copy, _, row, where in sorted(self.heaps[task], reverse=True):
                out.append({"prompt_id": row.prompt_id or content_id(task, _digest(row.content), copy), "task": task,
                            "prompt": row.text, "where": _where(where)})
        return out


# ---- records: (where, dict or _BadRow) from files, directories, globs and the hub

def _where(where: tuple) -> str:
    """'p.jsonl line 3', 'shard.parquet row 17', 'Muennighoff/flan row 5' (formatted only when needed)."""
    return " ".join(str(part) for part in where)


def _records(source: str, split: str, columns: set[str]) -> Iterator[tuple[tuple, object]]:
    if not _is_path(source):
        yield from _hub_records(source, split)
        return
    for shard in _shards(source):
        stem = _uncompressed(shard)
        yield from _jsonl_records(shard) if stem.endswith(JSON_LINES) else _parquet_records(shard, columns)


def _is_path(source: str) -> bool:
    """A local or s3:// file, directory or glob, rather than a Hugging Face dataset id."""
    return (source.startswith(("s3://", "/", ".", "~")) or os.path.exists(source) or _has_glob(source)
            or _uncompressed(source).endswith(JSON_LINES + PARQUET))


def _has_glob(source: str) -> bool:
    return any(c in source for c in "*?[")


def _uncompressed(name: str) -> str:
    return name[: -len(ext)] if (ext := next((e for e in COMPRESSED if name.endswith(e)), "")) else name


def _shards(source: str) -> list[str]:
    """The data files of a file, a directory (recursively) or a glob (whose `*` also crosses folders), sorted,
    spelt as the source is (a shard named in a failure is found where the user put it)."""
    import pyarrow.fs as pafs

    from . import storage
    base = _glob_base(source) if _has_glob(source) else source.rstrip("/")
    fs, path = storage.resolve(base)
    with storage.named("list the prompts in", base):
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.NotFound:
            raise Learn2PDError(f"prompt source {base} does not exist; pass a .jsonl or .parquet file, a directory "
                                f"or a glob of them (local or s3://), '{TINY_SOURCE}' or a Hugging Face dataset id")
        if kind == pafs.FileType.File:
            if not _uncompressed(source).endswith(JSON_LINES + PARQUET):
                raise Learn2PDError(f"{source} is neither JSON Lines nor Parquet by its name; name it "
                                    f"{' or '.join(JSON_LINES + PARQUET)} (optionally + {', '.join(COMPRESSED)})")
            return [source]
        found = sorted(i.path[len(path):] for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                       if i.type == pafs.FileType.File)
    shards = [base + rel for rel in found if _is_data(rel)]
    if _has_glob(source):
        pattern = storage.resolve(source)[1]
        shards = [s for s in shards if fnmatch.fnmatchcase(storage.resolve(s)[1], pattern)]
    if not shards:
        raise Learn2PDError(f"{source} holds no .jsonl or .parquet files (plain or {', '.join(COMPRESSED)})")
    return shards


def _glob_base(source: str) -> str:
    """The folder a glob's matches are listed under: everything before the folder of its first wildcard."""
    return source[: min(source.index(c) for c in "*?[" if c in source)].rsplit("/", 1)[0] or "."


def _is_data(relative: str) -> bool:
    """A shard's path below the source: hidden and underscore names (_SUCCESS, .part.tmp) are not data."""
    parts = [p for p in relative.split("/") if p]
    return (not any(p.startswith((".", "_")) for p in parts)
            and _uncompressed(parts[-1]).endswith(JSON_LINES + PARQUET))


def _jsonl_records(uri: str):
    from . import storage
    fs, path = storage.resolve(uri)
    with storage.named("read prompts from", uri), fs.open_input_stream(path, compression="detect") as raw:
        for number, line in enumerate(io.BufferedReader(raw, 1 << 20), 1):
            if line.strip():
                yield (uri, "line", number), _parse_line(line)


def _parse_line(line: bytes):
    """A JSON object, or the _BadRow that says why the line is not one."""
    line = line.rstrip(b"\r\n")
    try:
        text = line.decode("utf-8-sig")   # -sig: a byte-order mark on the first line is not an error
    except UnicodeDecodeError as e:
        return _BadRow(NOT_UTF8, f"byte 0x{line[e.start]:02x} at column {e.start + 1}; save the file as UTF-8",
                       line.decode("utf-8", "backslashreplace"))
    try:
        record = json.loads(text)
    except ValueError as e:
        return _BadRow(NOT_JSON, f"{getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')}; write one JSON "
                                 "object per line", text)
    if not isinstance(record, dict):
        return _BadRow(NOT_OBJECT, f"a JSON {type(record).__name__}; write one JSON object per line", text)
    return record


def _parquet_records(uri: str, columns: set[str]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from . import storage
    fs, path = storage.resolve(uri)
    index = 0
    with storage.named("read prompts from", uri), fs.open_input_file(path) as f:
        try:
            shard = pq.ParquetFile(f)
            names = [c for c in shard.schema_arrow.names if c in columns]
            for batch in shard.iter_batches(batch_size=BATCH_ROWS, columns=names):
                for record in batch.to_pylist():
                    yield (uri, "row", index), record
                    index += 1
        except pa.ArrowInvalid as e:   # not Parquet, or a corrupt page: the shard's other rows are lost, not the job
            yield (uri, "from row", index), _BadRow(UNREADABLE, f"{str(e).splitlines()[0][:200]}; rewrite the shard")


def _hub_records(name: str, split: str):
    """A hub dataset, streamed: its shards are read as they are iterated, never downloaded whole."""
    def next_batch(stream):
        try:
            return next(stream, None)
        except Exception as e:   # offline, unknown dataset, missing split, lost connection: all end the job alike
            detail = " ".join(str(e).split())[:200]
            raise Learn2PDError(f"cannot load {name!r} (split {split!r}) from the Hugging Face Hub: {detail} -- it is "
                                "not a local file or directory either; pass a .jsonl/.parquet file, a directory or a "
                                "glob of them, or connect to the Hub") from None

    def batches():
        import datasets
        yield from datasets.load_dataset(name, split=split, streaming=True).iter(batch_size=BATCH_ROWS)

    stream, index = batches(), 0
    while (batch := next_batch(stream)) is not None:
        for values in zip(*batch.values()):
            yield (name, "row", index), dict(zip(batch, values))
            index += 1
