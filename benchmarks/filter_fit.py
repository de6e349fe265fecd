"""Filter fitting speed: 5,000 full-batch epochs with 1 and 2 Ray Train workers, on the default trace set
and on that set tiled to >= 100,000 rows (the issue's size target; tiling keeps the real confidence
patterns, only the row count changes). Prints one table; medians of --repeats runs.

    python benchmarks/filter_fit.py --traces runs/collect --repeats 3
    python benchmarks/filter_fit.py --variant context --min-rows 0   # the context filter, default set only

--variant is the paper's filter by default: the 100k-row target was set for it (one row per block). The
context filter trains on one row per masked position (~27 per block row here), so on the tiled set a
full-batch epoch is ~27x the work; --min-rows 0 skips the tiled set.

(Named filter_fit, not train_filter: Ray workers import the job module by name, and a benchmark of the
same name on the driver's path would shadow it.)
"""
import argparse
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "jobs")]

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

import train_filter  # noqa: E402  (jobs/train_filter.py)
from learn2pd_core import storage  # noqa: E402
from learn2pd_core.bench import publish  # noqa: E402


def tiled(traces: str, min_rows: int, out: str) -> tuple[str, int]:
    src, manifest = train_filter.trace_source(traces)
    table = storage.read_dataset(src)
    copies = [table.set_column(0, "prompt_id", pc.binary_join_element_wise(table["prompt_id"], f"~{i}", ""))
              for i in range(-(-min_rows // table.num_rows))]
    big = pa.concat_tables(copies)
    storage.write_table(storage.join(out, "traces", "part-0.parquet"), big)
    storage.write_json(storage.join(out, "manifest.json"), {**manifest, "tiled_from": traces})
    return out, big.num_rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", default="runs/collect")
    ap.add_argument("--epochs", type=int, default=5000)
    ap.add_argument("--min-rows", type=int, default=100_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs shared by the workers (default: all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], help="matmul precisions to compare")
    ap.add_argument("--variant", default="paper", choices=["paper", "context"], help="filter variant (default paper)")
    args = ap.parse_args()
    import ray
    # Workers unpickle the job's functions by module name: put jobs/ on their path.
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": os.path.join(ROOT, "jobs") + os.pathsep + ROOT}})
    tmp = tempfile.mkdtemp(prefix="l2pd-bench-")
    src, _ = train_filter.trace_source(args.traces)
    base_rows = storage.read_dataset(src, columns=["prompt_id"]).num_rows
    sets = [("default", args.traces, base_rows)]
    if args.min_rows > base_rows:
        sets.append(("tiled", *tiled(args.traces, args.min_rows, os.path.join(tmp, "tiled"))))
    rows = []
    for name, uri, n in sets:
        for w, prec in [(w, p) for w in args.workers for p in args.precisions]:
            runs = []
            for r in range(args.repeats):
                out = os.path.join(tmp, f"{name}-{w}-{prec}-{r}")
                train_filter.main(["--traces", uri, "--output", out, "--epochs", str(args.epochs),
                                   "--num-workers", str(w), "--cpus-per-worker", str(max(1, args.cpus // w)),
                                   "--eval-every", str(args.epochs // 20), "--precision", prec,
                                   "--variant", args.variant])
                runs.append(storage.read_json(os.path.join(out, "metrics.json")))
            rows.append((name, n, f"{w} | {prec}", statistics.median(m["loop_seconds"] for m in runs),
                         statistics.median(m["fit_seconds"] for m in runs), runs[0]["parameters"],
                         statistics.median(m["final_train_loss"] for m in runs),
                         statistics.median(m["best_val_loss"] for m in runs),
                         statistics.median(m["base_rate_val_loss"] for m in runs)))
    table = [f"{args.variant} filter, {args.epochs} full-batch epochs, medians of {args.repeats} runs; "
             f"{args.cpus} CPUs shared by the workers; traces `{args.traces}`", "",
             "| trace set | rows | workers | precision | epochs s | trainer.fit s | params | train loss | best val loss | "
             "base-rate loss |", "|---|---|---|---|---|---|---|---|---|---|"]
    table += [f"| {r[0]} | {r[1]:,} | {r[2]} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:,} | {r[6]:.4f} | {r[7]:.4f} | {r[8]:.4f} |"
              for r in rows]
    print("\n" + "\n".join(table))
    traces_model = train_filter.trace_source(args.traces)[1].get("model", "unknown")
    publish(__file__, f"{args.variant} filter, {args.epochs:,} full-batch epochs", "\n".join(table),
            model=f"{args.variant} filter on traces of {traces_model}")


if __name__ == "__main__":
    main()
