"""The KV cache's effect on accuracy, on enough examples to resolve a few points: each cached method (+prefix,
+dual) against the same method without the cache, paired on the same examples.

    python benchmarks/cache_accuracy.py --filter runs/filter                      # 300 examples per family
    python benchmarks/cache_accuracy.py --filter runs/filter --examples 40 --policies threshold

Every method runs with EoTP's block mode, whose answers equal the same method's without EoTP token for token
(tested, with and without either cache), so `vanilla+eotp` stands for vanilla at about a tenth of its forwards:
that is what makes several hundred examples per family affordable on a CPU. evaluate.py reports the same pairs
("KV cache" table) but always decodes plain vanilla first, which at 256 forwards per example caps it at ~100
examples here.

Prints two tables: every method's accuracy against vanilla's (vanilla+eotp), then, per family and cached
method, the accuracy without and with the cache, the paired difference with its 95% bootstrap interval
("within 2 points" when the interval's lower end is >= -2), answers gained and lost, and the share of
completions the cache changed at all.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repo

import pyarrow as pa  # noqa: E402

from learn2pd_core import DEFAULTS, Learn2PDError, load_filter, load_model  # noqa: E402
from learn2pd_core.bench import publish  # noqa: E402
from learn2pd_core.evals import load_benchmark  # noqa: E402
from learn2pd_core.evaluation import cache_effects, evaluate_examples, summarize  # noqa: E402


def pair_changes(rows: dict, benchmark: str, method: str, base: str) -> dict:
    """Answers gained / lost and completions changed by `method` against `base` on the examples of `benchmark`
    both have; `rows` maps (benchmark, method) to {example_id: result row}."""
    a, b = rows[(benchmark, method)], rows[(benchmark, base)]
    ids = a.keys() & b.keys()
    return {"gained": sum(a[i]["correct"] and not b[i]["correct"] for i in ids),
            "lost": sum(b[i]["correct"] and not a[i]["correct"] for i in ids),
            "changed": sum(a[i]["completion"] != b[i]["completion"] for i in ids) / max(len(ids), 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--benchmarks", default="tiny,tiny-long", help="comma-separated")
    ap.add_argument("--examples", type=int, default=300, help="examples per benchmark")
    ap.add_argument("--gen-length", type=int, default=DEFAULTS.gen_length)
    ap.add_argument("--block-size", type=int, default=DEFAULTS.block_size)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--policies", default="vanilla,threshold,learn2pd", help="comma-separated; each runs +eotp "
                    "without a cache, with +prefix and with +dual")
    ap.add_argument("--filter", help="filter directory (needed by learn2pd)")
    args = ap.parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    if "learn2pd" in policies and not args.filter:
        sys.exit("cache_accuracy: learn2pd needs --filter DIR (e.g. runs/filter from jobs/train_filter.py), "
                 "or leave it out of --policies")
    try:
        filt = load_filter(args.filter) if args.filter else None
        model = load_model(args.model)
    except Learn2PDError as e:
        sys.exit(f"cache_accuracy: {e}")
    methods = [f"{p}+eotp{cache}" for p in policies for cache in ("", "+prefix", "+dual")]

    tables = []
    for bench in args.benchmarks.split(","):
        rows = [{"example_id": e["example_id"], "prompt": e["prompt"], "target": e["target"]}
                for e in load_benchmark(bench, limit=args.examples).examples]
        res, errors = evaluate_examples(model, bench, rows, gen_length=args.gen_length, block_size=args.block_size,
                                        methods=methods, filter=filt, batch_size=args.batch_size)
        for e in errors.to_pylist():
            print(f"skipped {e['example_id']}: {e['error']}", file=sys.stderr)
        tables.append(res)
    results = pa.concat_tables(tables)
    summary = summarize(results, baseline="vanilla+eotp")
    accuracy = {(r["benchmark"], r["method"]): r["accuracy"] for r in summary}

    head = (f"{args.model}, gen {args.gen_length}, block {args.block_size}, batch {args.batch_size}, "
            f"every method with EoTP's block mode (answers = the method's without EoTP)")
    methods_table = ["| benchmark | method | n | accuracy % | Δacc vs vanilla [95% CI] | NFE | tokens/forward |",
                     "|---|---|---|---|---|---|---|"]
    for r in summary:
        ci = r["acc_diff_ci"]
        diff = "" if r["method"] == "vanilla+eotp" or ci is None else \
            f"{r['acc_diff']:+.1f} [{ci[0]:+.1f}, {ci[1]:+.1f}]"
        methods_table.append(f"| {r['benchmark']} | {r['method']} | {r['examples']} | {r['accuracy']:.1f} | {diff} | "
                             f"{r['nfe']:.1f} | {r['tpf']:.2f} |")
    cache_table = ["| benchmark | cached method | n | accuracy without cache % | with cache % | Δacc [95% CI] | "
                   "within 2 points | answers gained / lost | completions changed | tokens/s ratio |",
                   "|---|---|---|---|---|---|---|---|---|---|"]
    by_pair = {}   # indexed once: (benchmark, method) -> {example_id: row}
    for r in results.to_pylist():
        by_pair.setdefault((r["benchmark"], r["method"]), {})[r["example_id"]] = r
    for e in cache_effects(results, summary):
        ch = pair_changes(by_pair, e["benchmark"], e["method"], e["without_cache"])
        lo, hi = e["acc_diff_ci"]
        cache_table.append(
            f"| {e['benchmark']} | {e['method']} | {e['paired_examples']} | "
            f"{accuracy[(e['benchmark'], e['without_cache'])]:.1f} | {accuracy[(e['benchmark'], e['method'])]:.1f} | "
            f"{e['acc_diff']:+.1f} [{lo:+.1f}, {hi:+.1f}] | {'yes' if e['within_2_points'] else 'not shown'} | "
            f"{ch['gained']} / {ch['lost']} | {100 * ch['changed']:.0f}% | {e['tps_ratio']:.2f}x |")
    body = "\n".join([head, "", *methods_table, "", *cache_table])
    print("\n" + body)
    publish(__file__, f"{args.model}: {args.benchmarks.replace(',', ', ')}, gen {args.gen_length}, "
            f"{args.examples} examples per benchmark", body, model=args.model)


if __name__ == "__main__":
    main()
