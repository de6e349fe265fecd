"""Decoding demo on the embedded tiny model: take the filter of `jobs/train_filter.py` (--filter), or fit
one on EGP traces (those of `jobs/collect.py` when --traces points at its output, else collected here),
then decode held-out benchmark prompts with every method and print the comparison.

    python -m learn2pd_core.demo [--filter runs/filter | --traces runs/collect] [--prompts 16] [--gen-length 256]
"""
import argparse
import sys

import numpy as np

from . import Learn2PDError, fit_filter, load_filter, load_model, storage
from .bench import compare_methods, fit_filter_on, markdown_table
from .tiny.tasks import benchmark_examples, instruction_examples, score


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--prompts", type=int, default=16, help="held-out benchmark-family prompts")
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--traces", help="output of jobs/collect.py to fit the filter on")
    ap.add_argument("--filter", help="output of jobs/train_filter.py (takes precedence over --traces)")
    args = ap.parse_args(argv)

    model = load_model(args.model)
    settings = dict(gen_length=args.gen_length, block_size=args.block_size)
    traces = storage.read_dataset(storage.join(args.traces, "traces"), ["confidence", "correct"]) if args.traces else None
    if args.filter:
        filt = load_filter(args.filter)
        rows = storage.read_json(storage.join(args.filter, "metrics.json"))["rows"]
        print(f"1/2 using the filter in {args.filter}", flush=True)
    elif traces is not None and traces.num_rows:
        print(f"1/2 fitting the filter on {traces.num_rows} trace rows from {args.traces} ...", flush=True)
        conf = np.array(traces.column("confidence").to_pylist(), dtype=np.float32)
        correct = np.array(traces.column("correct").to_pylist(), dtype=bool)
        filt, rows = fit_filter(conf, correct, epochs=2000, lr=3e-3, provenance={"traces": args.traces}), len(conf)
    else:
        train = [e["prompt"] for e in instruction_examples(per_task=2, seed=123)]
        print(f"1/2 collecting EGP traces on {len(train)} instruction prompts and fitting the filter ...", flush=True)
        filt, rows = fit_filter_on(model, train, **settings)
    examples = benchmark_examples(per_task=max(1, args.prompts // 4), seed=0)[:args.prompts]
    print(f"2/2 decoding {len(examples)} held-out prompts with every method ({rows} trace rows fitted) ...", flush=True)
    table = compare_methods(model, [e["prompt"] for e in examples],
                            ["vanilla", "threshold", "factor", "egp", "learn2pd", "learn2pd+eotp"],
                            batch_size=16, repeats=1, score=lambda i, text: score(examples[i], text),
                            filter=filt, **settings)
    print()
    print(markdown_table(table))


if __name__ == "__main__":
    try:
        main()
    except Learn2PDError as e:
        sys.exit(f"error: {e}")
