"""Collect-job benchmark: the Ray job's own actor pool (1 and 2 actors) against a plain loop calling the engine
on the same prompts, with the same per-batch code and outputs. Ray start-up and model loading are reported apart.

    python benchmarks/collect_job.py [--prompts 64] [--gen-length 256] [--batch-size 16] [--actors 1,2] [--repeats 3]

Times are medians of --repeats runs (each into a fresh output directory).
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

JOBS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "jobs")
sys.path.insert(0, JOBS)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from collect import collect_with_actors, write_batch  # noqa: E402
from learn2pd_core import DEFAULTS, load_model  # noqa: E402
from learn2pd_core.bench import publish  # noqa: E402
from learn2pd_core.placement import plan_actors  # noqa: E402
from learn2pd_core.prompts import load_prompts  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--gen-length", type=int, default=DEFAULTS.gen_length)
    ap.add_argument("--block-size", type=int, default=DEFAULTS.block_size)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--actors", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = load_prompts(per_task=64, limit=None)
    rows = [rows[i] for i in range(0, len(rows), max(1, len(rows) // args.prompts))][:args.prompts]
    settings = dict(gen_length=args.gen_length, block_size=args.block_size, chat=True)
    tmp = tempfile.mkdtemp()
    results = []

    start = time.perf_counter()
    model = load_model(args.model)
    load_s = time.perf_counter() - start
    walls = []
    for r in range(args.repeats):
        start = time.perf_counter()
        n_rows = 0
        for i in range(0, len(rows), args.batch_size):
            n_rows += write_batch(model, rows[i:i + args.batch_size], f"{tmp}/plain{r}", **settings)["trace_rows"][0]
        walls.append(time.perf_counter() - start)
    plain_s = statistics.median(walls)
    results.append(("plain loop", "-", plain_s, load_s, n_rows))

    import ray
    start = time.perf_counter()
    # Workers import CollectActor from jobs/collect.py, as the job's own driver would ship it.
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.path.abspath(JOBS)}})
    init_s = time.perf_counter() - start
    for n in map(int, args.actors.split(",")):
        cpus = plan_actors(ray.cluster_resources(), 0, n)[1]   # what the job gives each actor, for the label
        walls = []
        for r in range(args.repeats):
            start = time.perf_counter()
            out = list(collect_with_actors(rows, f"{tmp}/ray{n}-{r}", model=args.model, gen_length=args.gen_length,
                                      block_size=args.block_size, chat=True, batch_size=args.batch_size,
                                      num_actors=n, gpus_per_actor=0))
            # Actors load their replicas in parallel: one model load is the start-up share of this wall time.
            walls.append(time.perf_counter() - start - load_s)
        results.append((f"ray job ({cpus} CPU each)", n, statistics.median(walls), load_s,
                        sum(o["trace_rows"] for o in out)))
    shutil.rmtree(tmp)

    table = [f"{len(rows)} prompts, gen {args.gen_length}, block {args.block_size}, batch {args.batch_size}; "
             f"Ray start-up {init_s:.1f}s (excluded); medians of {args.repeats} runs", "",
             "| run | actors | decode+write s | model load s | prompts/s | trace rows/s | wall ratio vs plain |",
             "|---|---|---|---|---|---|---|"]
    table += [f"| {name} | {n} | {secs:.1f} | {load:.1f} | {len(rows) / secs:.2f} | {trace_rows / secs:.1f} | "
              f"{secs / plain_s:.2f} |" for name, n, secs, load, trace_rows in results]
    print("\n" + "\n".join(table))
    publish(__file__, f"{args.model}, {len(rows)} prompts, gen {args.gen_length}, batch {args.batch_size}",
            "\n".join(table), model=args.model)


if __name__ == "__main__":
    main()
