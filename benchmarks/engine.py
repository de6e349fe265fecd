"""Decoding-engine benchmark: every policy side by side on the same prompts, at batch 1 and batch 16.

    python benchmarks/engine.py [--model tiny] [--dtype float32] [--prompts 16] [--gen-lengths 256] [--repeats 3] [--filter DIR]
    python benchmarks/engine.py --families short,long --gen-lengths 256,1024 --methods vanilla,vanilla+dual   # the cache

--families: `short` is the tiny benchmark family's questions alone, `long` the same questions after few-shot
prefixes of >= 300 tokens (the `tiny-long` benchmark), where most of a forward's keys are the prompt's.
"vs no cache" is a cached method's tokens/s over the same method without the cache, same prompts and batch.

Without --filter, a filter is fitted first on EGP traces of instruction-family prompts (not the
benchmark prompts). Prints one markdown table; times are medians of --repeats runs. Then the vanilla
batch ratio, and beside it what one forward pass achieves (FLOP/s) at the smallest and largest batch
against this machine's matmul peak: the ceiling on what batching can buy here.
"""
import argparse
import platform
import statistics
import sys
import time

import torch

from learn2pd_core import DEFAULTS, Learn2PDError, load_filter, load_model
from learn2pd_core.bench import (compare_methods, fit_filter_on, forward_roofline, markdown_table,  # noqa: I001
                                  occupancy_table, publish, roofline_lines, slot_occupancy)
from learn2pd_core.evaluation import uncached
from learn2pd_core.tiny.tasks import benchmark_examples, instruction_examples, score

METHODS = ["vanilla", "threshold", "factor", "egp", "learn2pd", "vanilla+eotp", "learn2pd+eotp",
           "vanilla+dual", "threshold+dual", "learn2pd+eotp+dual"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny', a checkpoint directory or a hub id")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="model weights' dtype (default: bfloat16 on a GPU, float32 on a CPU)")
    ap.add_argument("--prompts", type=int, default=16, help="benchmark-family prompts to decode")
    ap.add_argument("--gen-lengths", "--gen-length", dest="gen_lengths", default="256", help="comma-separated")
    ap.add_argument("--families", default="short", help="comma-separated: short, long (few-shot prompts)")
    ap.add_argument("--block-size", type=int, default=DEFAULTS.block_size)
    ap.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (policy[+eotp][+prefix|+dual][@τ])")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per method; the median is reported")
    ap.add_argument("--filter", help="filter directory; default: fit one on instruction-family EGP traces")
    ap.add_argument("--filter-prompts-per-task", type=int, default=3)
    ap.add_argument("--occupancy", default="learn2pd+eotp+dual",
                    help="method whose slot occupancy is measured static against continuous, at the largest batch "
                         "size with 4x as many prompts ('' to skip; default learn2pd+eotp+dual)")
    ap.add_argument("--label", default="", help="appended to the docs section's title, so that a run with other "
                    "methods on the same prompts gets a section of its own (e.g. 'eager against captured')")
    args = ap.parse_args(argv)

    families, gens = args.families.split(","), [int(g) for g in args.gen_lengths.split(",")]
    if set(families) - {"short", "long"}:
        raise Learn2PDError(f"--families {args.families!r}: choose from short, long")
    model = load_model(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None)
    if args.filter:
        filt = load_filter(args.filter)
    else:
        start = time.perf_counter()
        train = [e["prompt"] for e in instruction_examples(args.filter_prompts_per_task, seed=123)]
        filt, rows = fit_filter_on(model, train, gen_length=min(gens), block_size=args.block_size)
        print(f"fitted a filter on {rows} EGP trace rows from {len(train)} instruction prompts "
              f"in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    rows, prompts_of = [], {}
    for fam in families:
        examples = _spread(benchmark_examples(per_task=args.prompts, seed=0, fewshot=fam == "long"), args.prompts)
        prompts = prompts_of[fam] = [e["prompt"] for e in examples]
        for gen in gens:
            for bs in sorted({min(int(b), len(prompts)) for b in args.batch_sizes.split(",")}):   # never padded
                got = compare_methods(model, prompts, args.methods.split(","), batch_size=bs, repeats=args.repeats,
                                      score=lambda i, text: score(examples[i], text), filter=filt,
                                      gen_length=gen, block_size=args.block_size)
                rows += [{"family": fam, "gen": gen, **r} for r in with_cache_ratio(got)]
    occupancy = measure_occupancy(model, args, families, gens, filt)
    dtype = str(next(model.model.parameters()).dtype).removeprefix('torch.')
    print(f"\n{args.model} ({dtype}) on "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.prompts} prompts per family, block {args.block_size}, "
          f"median of {args.repeats}\n")
    print(markdown_table(rows))
    notes = []   # printed as they come, and published below the table
    for fam in families:
        for gen in gens:
            part = [r for r in rows if r["family"] == fam and r["gen"] == gen]
            by = {(r["method"], r["batch"]): r for r in part}
            sizes = sorted({r["batch"] for r in part})
            if len(sizes) > 1 and ("vanilla", sizes[0]) in by:
                ratio = by[("vanilla", sizes[-1])]["tok_s"] / by[("vanilla", sizes[0])]["tok_s"]
                notes += ["", f"{fam} prompts, gen {gen}: vanilla tokens/s, batch {sizes[-1]} vs batch {sizes[0]}: "
                              f"{ratio:.2f}x"]
                print("\n".join(notes[-2:]))
                # Why the ratio is what it is: the forward's FLOP rate at each size against this machine's peak.
                seq_len = round(statistics.median(len(model.encode_prompt(p)) for p in prompts_of[fam])) + gen
                small = by[("vanilla", sizes[0])]
                roof = forward_roofline(model, seq_len, (sizes[0], sizes[-1]),
                                        forward_share=1 - small["policy"] - small["other"])
                notes += roofline_lines(roof)
                print("\n".join(roofline_lines(roof)))
    for bs in sorted({r["batch"] for r in rows}):   # the policies' own bookkeeping against the whole step
        worst = max((r for r in rows if r["batch"] == bs), key=lambda r: r["policy"])
        notes.append(f"batch {bs}: policy bookkeeping at most {worst['policy']:.1%} of decode time "
                     f"({worst['method']}, {worst['family']}, gen {worst['gen']})")
        print(notes[-1])
    body = (f"{args.prompts} prompts per family, block {args.block_size}, median of {args.repeats}\n\n"
            f"{markdown_table(rows)}\n\n```\n" + "\n".join(notes).strip() + "\n```")
    if occupancy:
        body += "\n\nSlot occupancy, static against continuous batching:\n\n" + occupancy_table(occupancy)
    publish(__file__, f"{args.model} {dtype}: {args.families.replace(',', ', ')} prompts, gen "
            f"{args.gen_lengths.replace(',', ', ')}, batch {args.batch_sizes.replace(',', ', ')}"
            + (f": {args.label}" if args.label else ""), body,
            model=f"{args.model} ({dtype})")


def measure_occupancy(model, args, families, gens, filt) -> list[dict]:
    """Static against continuous batching: the largest batch size's slots, 4x as many prompts of the family."""
    if not args.occupancy:
        return []
    slots = max(int(b) for b in args.batch_sizes.split(","))
    rows = []
    for fam in families:
        examples = _spread(benchmark_examples(per_task=4 * args.prompts, seed=1, fewshot=fam == "long"), 4 * slots)
        for gen in gens:
            rows += [{"family": fam, "gen": gen, **r} for r in
                     slot_occupancy(model, [e["prompt"] for e in examples], args.occupancy, slots=slots,
                                    repeats=args.repeats, filter=filt, gen_length=gen, block_size=args.block_size)]
    print("\nSlot occupancy, static against continuous batching:\n\n" + occupancy_table(rows))
    return rows


def with_cache_ratio(rows):
    """Each cached method's tokens/s over the same method without the cache (same prompts, batch, gen length)."""
    plain = {r["method"]: r["tok_s"] for r in rows}
    for r in rows:
        base = uncached(r["method"])
        if base != r["method"] and base in plain:
            r["vs_no_cache"] = r["tok_s"] / plain[base]
    return rows


def _spread(examples, n):
    """n examples taken round-robin across tasks, so every task is represented."""
    by_task = {}
    for e in examples:
        by_task.setdefault(e["task"], []).append(e)
    out, i = [], 0
    while len(out) < n and any(i < len(v) for v in by_task.values()):
        out += [v[i] for v in by_task.values() if i < len(v)]
        i += 1
    return out[:n]


if __name__ == "__main__":
    try:
        main()
    except Learn2PDError as e:
        sys.exit(f"error: {e}")
