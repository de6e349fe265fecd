"""Stage 1 of Learn2PD: collect EGP traces with Ray.

Ray Data shards the prompts across actors that each hold one model replica; every batch decodes the
model's own greedy reference, re-decodes it with the EGP oracle, and writes its traces, references and
errors as atomic Parquet parts under --output (a local path or s3://bucket/prefix). A rerun skips prompts
that already have a reference or an error row, so an interrupted run resumes; --overwrite starts afresh.

    python jobs/collect.py                              # tiny model, synthetic instruction family, runs/collect
    ray job submit --working-dir . -- python jobs/collect.py --model GSAI-ML/LLaDA-8B-Instruct \\
        --prompts Muennighoff/flan --per-task 40 --raw-prompts --gpus-per-actor 1 --num-actors 8 --output s3://b/run1
"""
import argparse
import collections
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repo, for `python jobs/...`

import pyarrow as pa  # noqa: E402

from learn2pd_core.console import run_cli  # noqa: E402
from learn2pd_core import DEFAULTS, DecodeConfig, Learn2PDError, check_model, console, storage  # noqa: E402
from learn2pd_core.placement import (ModelActor, check_shared_output, connect, largest_node_cpus,  # noqa: E402
                                     plan_actors, summaries)
from learn2pd_core.prompts import TINY_SOURCE, PromptSet, failure_reason, failure_summary, read_prompts  # noqa: E402
from learn2pd_core.traces import ERRORS, collect_batch  # noqa: E402

INPUT_FAILURES = "part-input.parquet"   # errors/ part of the rows of --prompts that are not prompts, rewritten each run


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny' (embedded), a checkpoint directory or a hub id (default: tiny)")
    ap.add_argument("--prompts", default=TINY_SOURCE,
                    help=f"'{TINY_SOURCE}'; a .jsonl/.parquet file, a directory or a glob of such shards, local "
                         "or s3:// (read a batch at a time); or a Hugging Face dataset id such as Muennighoff/flan "
                         "(streamed)")
    ap.add_argument("--prompt-column", help="column holding the prompt text (default: prompt, inputs or question)")
    ap.add_argument("--task-column", default="task", help="column holding the task type (default: task)")
    ap.add_argument("--per-task", type=int, help="prompts sampled per task type with --seed (paper: 40): the same "
                                                 "sample whatever the shard layout; default all (tiny: 8)")
    ap.add_argument("--limit", type=int, help="use only the first N prompts after sampling")
    ap.add_argument("--gen-length", type=int, default=DEFAULTS.gen_length,
                    help=f"generation length (default {DEFAULTS.gen_length})")
    ap.add_argument("--block-size", type=int, default=DEFAULTS.block_size,
                    help=f"block size; the filter's input width (default {DEFAULTS.block_size})")
    ap.add_argument("--batch-size", type=int, default=128,
                    help="prompts per actor batch, at most (fewer when the prompts would not reach every actor; "
                         "default 128); the actor decodes them through --slots slots, refilled as rows finish")
    ap.add_argument("--slots", type=int, default=16, help="decoding slots per actor: rows in each forward (default 16)")
    ap.add_argument("--num-actors", type=int, default=None,
                    help="model replicas, one per actor (default: one per GPU, or one per CPU on a CPU-only cluster, where the "
                         "actors split the CPUs evenly: each reserves CPUs // actors, its torch thread count)")
    ap.add_argument("--gpus-per-actor", type=float, default=None,
                    help="GPUs per actor (default: 1 when the cluster has GPUs, else 0)")
    ap.add_argument("--raw-prompts", action="store_true",
                    help="tokenise prompts as they are, without the chat template (the paper's code did this)")
    ap.add_argument("--output", default="runs/collect", help="local directory or s3://bucket/prefix (default runs/collect)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed for --per-task (default 0)")
    ap.add_argument("--overwrite", action="store_true", help="delete --output first instead of resuming")
    ap.add_argument("--shared-output", action="store_true",
                    help="assert that a local --output is one filesystem mounted on every node of the cluster")
    ap.add_argument("--verbose", action="store_true",
                    help="show Ray's own output on the console instead of writing it to the log file")
    return ap.parse_args(argv)


def validate(args) -> None:
    """Everything about the settings that can be known before Ray starts or a model loads."""
    for name in ("per_task", "limit", "batch_size", "slots", "num_actors"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise Learn2PDError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if args.gpus_per_actor is not None and args.gpus_per_actor < 0:
        raise Learn2PDError(f"--gpus-per-actor must be >= 0 (got {args.gpus_per_actor})")
    DecodeConfig(gen_length=args.gen_length, block_size=args.block_size)   # raises the one-line ConfigError
    check_model(args.model)


def write_batch(model, rows: list[dict], output: str, **settings) -> dict:
    """Collect one batch and write its parts; returns the batch's counts."""
    traces, refs, errors = collect_batch(model, rows, **settings)
    name = storage.part_name([r["prompt_id"] for r in rows])
    # Traces first: a prompt counts as done once its reference row exists, so its traces are complete.
    storage.write_table(storage.join(output, "traces", name), traces)
    if errors.num_rows:
        storage.write_table(storage.join(output, "errors", name), errors)
    storage.write_table(storage.join(output, "references", name), refs)
    return {"prompts": [len(rows)], "trace_rows": [traces.num_rows], "errors": [errors.num_rows]}


class CollectActor(ModelActor):
    """One model replica: load in __init__, collect a batch in __call__ (Ray's batch-inference pattern)."""
    COUNTS = ("prompts", "trace_rows", "errors")

    def process(self, batch: dict) -> dict:
        rows = [{"prompt_id": str(p), "task": str(t), "prompt": q}
                for p, t, q in zip(batch["prompt_id"], batch["task"], batch["prompt"])]
        return write_batch(self.model, rows, self.output, **self.settings)


def collect_with_actors(rows: list[dict], output: str, *, model: str, gen_length: int, block_size: int, chat: bool,
                        batch_size: int, slots: int = 16, num_actors: int | None = None,
                        gpus_per_actor: float | None = None, shared_output: bool = False, total: int | None = None):
    """Ray Data shards `rows` over a pool of CollectActors placed by plan_actors, in batches of up to `batch_size`
    prompts, never so large that some actor gets none of the run's `total` prompts (default: the rows; a resumed run
    passes all its prompts, so a lost batch is redone with the same prompts together); each actor keeps its `slots`
    slots busy through its batch. Yields one summary per batch as it finishes."""
    import ray
    gpus, cpus, actors = plan_actors(ray.cluster_resources(), gpus_per_actor, num_actors, largest_node_cpus())
    ds = ray.data.from_items(rows).map_batches(
        CollectActor, batch_size=max(1, min(batch_size, -(-(total or len(rows)) // actors))),
        compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus, num_cpus=cpus,
        fn_constructor_kwargs=dict(model=model, output=output, gen_length=gen_length, block_size=block_size,
                                   chat=chat, batch_size=slots, shared_output=shared_output,
                                   driver_node=ray.get_runtime_context().get_node_id()))
    yield from summaries(ds)


def finished_prompt_ids(output: str) -> set[str]:
    """Prompts with a reference or an error row; trace parts of unfinished batches are removed, and so is every
    part of a batch with a part that cannot be read (a truncated upload), so that the batch is redone."""
    bad = storage.drop_unreadable_batches(output, ("traces", "references", "errors"))
    if bad:
        console.say(f"{len(bad)} unreadable part(s) removed, their batches will be collected again: {', '.join(bad)}")
    done = set()
    for kind in ("references", "errors"):
        table = storage.read_dataset(storage.join(output, kind), columns=["prompt_id"])
        if table is not None:
            done.update(table.column("prompt_id").to_pylist())
    finished = {p.rsplit("/", 1)[1] for p in storage.list_parts(storage.join(output, "references"))}
    for part in storage.list_parts(storage.join(output, "traces")):
        if part.rsplit("/", 1)[1] not in finished:
            storage.delete_file(part)
    return done


def main(argv=None) -> int:
    args = parse_args(argv)
    validate(args)
    if args.overwrite:
        storage.remove(args.output)
    storage.check_writable(args.output)
    with console.session(args.output, "collect", args.verbose):
        return run(args)


def run(args) -> int:
    import ray
    import torch
    import transformers

    started = datetime.datetime.now(datetime.timezone.utc)
    prompts = read_prompts(args.prompts, per_task=args.per_task, limit=args.limit, seed=args.seed,
                           prompt_column=args.prompt_column, task_column=args.task_column)
    record_input_failures(prompts, args.output, args.prompts)   # first: a fixed row's old failure is not "done"
    done = finished_prompt_ids(args.output)
    pending = [r for r in prompts.rows if r["prompt_id"] not in done]
    console.say(f"collect: {len(prompts.rows)} prompts from {args.prompts}: {len(prompts.rows) - len(pending)} "
                f"already done, {len(pending)} to collect"
                + (f" (Ray's log: {console.log_path()})" if console.log_path() else ""))

    if pending:
        connect(args.verbose)
        check_shared_output(args.output, args.shared_output)
        totals = collect_pending(pending, args, len(prompts.rows))
        console.say(f"this run: {totals['prompts']} prompts, {totals['trace_rows']} trace rows, "
                    f"{totals['errors']} failures")

    counts, failures = output_counts(args.output)
    if failures:
        console.say(f"collect: {failure_summary(failures)} (all in {storage.join(args.output, 'errors')})")
    storage.write_json(storage.join(args.output, "manifest.json"), {
        "stage": "collect", "model": args.model, "prompts_source": args.prompts, "per_task": args.per_task,
        "limit": args.limit, "seed": args.seed, "chat_template": not args.raw_prompts,
        "decode": {"gen_length": args.gen_length, "block_size": args.block_size, "reference": "vanilla greedy",
                   "policy": "egp"},
        "counts": {"prompts": len(prompts.rows) + len(prompts.failures), **counts},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "ray": ray.__version__},
        "started": started.isoformat(), "finished": datetime.datetime.now(datetime.timezone.utc).isoformat()})
    console.say(f"collect: {counts['collected']} prompts, {counts['trace_rows']} trace rows, {counts['errors']} "
                f"failures -> {storage.join(args.output, 'traces')}")
    return 0


def collect_pending(pending: list[dict], args, total: int) -> dict:
    """Collect `pending` (of the run's `total` prompts) on the connected cluster with one progress bar; the run's
    totals."""
    totals = {"prompts": 0, "trace_rows": 0, "errors": 0}
    with console.progress(len(pending), "collect", "prompt") as bar:
        for batch in collect_with_actors(pending, args.output, model=args.model, gen_length=args.gen_length,
                                         block_size=args.block_size, chat=not args.raw_prompts,
                                         batch_size=args.batch_size, slots=args.slots, total=total,
                                         num_actors=args.num_actors,
                                         gpus_per_actor=args.gpus_per_actor, shared_output=args.shared_output):
            for k in totals:
                totals[k] += batch[k]
            bar.update(batch["prompts"])
    return totals


def record_input_failures(prompts: PromptSet, output: str, source: str) -> None:
    """The rows of --prompts that are not prompts, as error rows in one part that each run rewrites: a row fixed
    since the last run is no longer counted (its new content gives it a new id, and it is collected)."""
    part = storage.join(output, "errors", INPUT_FAILURES)
    if prompts.failures:
        storage.write_table(part, pa.Table.from_pylist(prompts.failures, schema=ERRORS))
        console.say(f"{source}: {prompts.failure_line()}; recorded in {storage.join(output, 'errors')}, the other "
                    "rows go on")
    elif storage.exists(part):
        storage.delete_file(part)


def output_counts(output: str) -> tuple[dict, list[dict]]:
    """What the output holds, all runs together: counts of collected prompts, trace rows and failures, the
    failures by reason; and the failures {prompt_id, error}."""
    refs = storage.read_dataset(storage.join(output, "references"), columns=["prompt_id", "trace_rows"])
    errs = storage.read_dataset(storage.join(output, "errors"), columns=["prompt_id", "error"])
    failures = errs.to_pylist() if errs is not None else []
    return {"collected": refs.num_rows if refs is not None else 0,
            "trace_rows": sum(refs.column("trace_rows").to_pylist()) if refs is not None else 0,
            "errors": len(failures),
            "errors_by_reason": dict(collections.Counter(failure_reason(f["error"]) for f in failures))}, failures


if __name__ == "__main__":
    run_cli(main)
