"""The whole Learn2PD pipeline in one submission: collect -> train_filter -> evaluate under one run directory.

    <run-dir>/collect    EGP traces            (jobs/collect.py)
    <run-dir>/filter     the fitted filter      (jobs/train_filter.py)
    <run-dir>/evaluate   results and report     (jobs/evaluate.py)

A stage whose output is complete is skipped, so a scheduled rerun or a retry after a failure continues where
the last one stopped (and a stage that was interrupted resumes inside itself). The stages run in this driver
process, sharing one Ray connection.

    python jobs/pipeline.py                                     # embedded default -> runs/{collect,filter,evaluate}
    ray job submit --working-dir . -- python jobs/pipeline.py --run-dir s3://b/run1 \\
        --model GSAI-ML/LLaDA-8B-Instruct --prompts Muennighoff/flan --per-task 40 --raw-prompts \\
        --benchmarks gsm8k,math,humaneval,mbpp --gen-lengths 256,1024
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                    # the stage modules
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repo

import collect  # noqa: E402
import evaluate  # noqa: E402
import train_filter  # noqa: E402
from learn2pd_core.console import run_cli  # noqa: E402
from learn2pd_core import DEFAULTS, DecodeConfig, Learn2PDError, console, storage  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs", help="local directory or s3://bucket/prefix (default runs: the "
                    "stages' own default outputs runs/collect, runs/filter, runs/evaluate)")
    ap.add_argument("--model", default="tiny", help="'tiny' (embedded), a checkpoint directory or a hub id")
    ap.add_argument("--prompts", help="collect: prompt source (default: the tiny model's instruction family)")
    ap.add_argument("--per-task", type=int, help="collect: prompts per task type (paper: 40)")
    ap.add_argument("--raw-prompts", action="store_true", help="collect and evaluate: no chat template")
    ap.add_argument("--benchmarks", default="tiny,tiny-long",
                    help="evaluate: comma list (tiny, tiny-long, gsm8k, math, humaneval, mbpp; default tiny,tiny-long)")
    ap.add_argument("--data-dir", help="evaluate: local benchmark data instead of the hub (e.g. ../shared/data)")
    ap.add_argument("--gen-lengths", default=None, help="evaluate: comma list (default 256,1024)")
    ap.add_argument("--limit", type=int, help="evaluate: examples per benchmark")
    ap.add_argument("--long-limit", type=int, help="evaluate: examples per benchmark above gen length 256")
    ap.add_argument("--collect-gen-length", type=int, default=DEFAULTS.gen_length,
                    help=f"collect: generation length (default {DEFAULTS.gen_length})")
    ap.add_argument("--block-size", type=int, default=DEFAULTS.block_size,
                    help=f"block size of every stage (default {DEFAULTS.block_size})")
    ap.add_argument("--epochs", type=int, default=5000, help="train_filter: epochs (default 5000)")
    ap.add_argument("--num-actors", type=int, help="collect and evaluate: model replicas")
    ap.add_argument("--gpus-per-actor", type=float, help="collect and evaluate: GPUs per actor")
    ap.add_argument("--num-workers", type=int, default=1, help="train_filter: Ray Train workers")
    ap.add_argument("--use-gpu", action="store_true", help="train_filter: one GPU per worker")
    ap.add_argument("--shared-output", action="store_true",
                    help="assert that a local --run-dir is one filesystem mounted on every node of the cluster")
    ap.add_argument("--verbose", action="store_true",
                    help="show Ray's own output on the console instead of writing it to <run-dir>/pipeline.log")
    ap.add_argument("--stage-args", action="append", default=[], metavar="STAGE:ARGS",
                    help="extra flags for one stage, e.g. --stage-args 'evaluate:--sweep 0.9,0.99' (repeatable)")
    return ap.parse_args(argv)


def stage_argv(args) -> dict[str, list[str]]:
    run = args.run_dir
    shared = [f"--block-size={args.block_size}"] + (["--raw-prompts"] if args.raw_prompts else [])
    common = (["--verbose"] if args.verbose else []) + (["--shared-output"] if args.shared_output else [])
    actors = ([f"--num-actors={args.num_actors}"] if args.num_actors else []) + \
             ([f"--gpus-per-actor={args.gpus_per_actor}"] if args.gpus_per_actor is not None else [])
    out = {
        "collect": [f"--model={args.model}", f"--output={run}/collect", f"--gen-length={args.collect_gen_length}",
                    *shared, *actors, *common] + ([f"--prompts={args.prompts}"] if args.prompts else [])
        + ([f"--per-task={args.per_task}"] if args.per_task else []),
        "train_filter": [f"--traces={run}/collect", f"--output={run}/filter", f"--epochs={args.epochs}",
                         f"--num-workers={args.num_workers}", *common] + (["--use-gpu"] if args.use_gpu else []),
        "evaluate": [f"--model={args.model}", f"--filter={run}/filter", f"--output={run}/evaluate",
                     f"--benchmarks={args.benchmarks}", *shared, *actors, *common]
        + ([f"--data-dir={args.data_dir}"] if args.data_dir else [])
        + ([f"--gen-lengths={args.gen_lengths}"] if args.gen_lengths else [])
        + ([f"--limit={args.limit}"] if args.limit is not None else [])
        + ([f"--long-limit={args.long_limit}"] if args.long_limit is not None else []),
    }
    for extra in args.stage_args:
        stage, _, flags = extra.partition(":")
        if stage not in out:
            raise Learn2PDError(f"--stage-args {extra!r}: the stage must be one of {', '.join(out)} (e.g. 'evaluate:--sweep 0.9')")
        out[stage] += flags.split()
    return out


def complete(stage: str, run: str) -> str | None:
    """Why `stage` needs no work in `run` (a one-line summary of its output), or None when it must run."""
    if stage == "collect":
        path = storage.join(run, "collect", "manifest.json")
        if storage.exists(path):
            c = storage.read_json(path).get("counts", {})
            if c and c["collected"] + c["errors"] == c["prompts"]:
                return f"{c['collected']} prompts, {c['trace_rows']} trace rows, {c['errors']} failures"
    elif stage == "train_filter":
        path = storage.join(run, "filter", "metrics.json")
        if storage.exists(path):
            m = storage.read_json(path)
            return (f"{m.get('variant', 'paper')} filter fitted "
                    f"(best validation loss {m.get('best_val_loss', float('nan')):.4f})")
    elif storage.exists(storage.join(run, "evaluate", "report.md")):
        return f"report at {storage.join(run, 'evaluate', 'report.md')}"
    return None


def validate(argvs: dict[str, list[str]]) -> None:
    """What can be checked before the first stage starts: collect's settings and model, and evaluate's generation
    lengths against the block size (its filter does not exist yet; evaluate checks it when it starts)."""
    collect.validate(collect.parse_args(argvs["collect"]))
    ev = evaluate.parse_args(argvs["evaluate"])
    for gen in ev.gen_lengths:
        DecodeConfig(gen_length=gen, block_size=ev.block_size)
    train_filter.parse_args(argvs["train_filter"])


def main(argv=None) -> int:
    args = parse_args(argv)
    argvs = stage_argv(args)
    validate(argvs)
    with console.session(args.run_dir, "pipeline", args.verbose):
        return run(args, argvs)


def run(args, argvs: dict[str, list[str]]) -> int:
    import ray
    # The stage modules are imported here, not run as __main__: ship their actor classes and training loop
    # to the workers by value, so workers need only learn2pd_core, not the jobs/ directory on their path.
    for module in (collect, train_filter, evaluate):
        ray.cloudpickle.register_pickle_by_value(module)
    if console.log_path():
        console.say(f"pipeline: Ray's output goes to {console.log_path()} (--verbose shows it here)")
    stages = {"collect": collect.main, "train_filter": train_filter.main, "evaluate": evaluate.main}
    for name, argv_ in argvs.items():
        done = complete(name, args.run_dir)
        if done:
            console.say(f"== {name}: already complete, skipped ({done})")
            continue
        console.say(f"== {name}: python jobs/{name}.py {' '.join(argv_)}")
        stages[name](argv_)
    if done:   # the last stage was skipped: show its report anyway
        console.say(storage.read_bytes(storage.join(args.run_dir, "evaluate", "report.md")).decode())
    console.say(f"pipeline complete: {args.run_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)
