"""Does the learned filter beat the confidence threshold whatever the fit? The verdict across independent fits.

For each of --fits fits: EGP traces collected in-process on its own sample of instruction-family prompts (seed
1000 + fit), and each filter variant fitted on them with its own seed (the paper's settings: AdamW lr 1e-3, 5,000
epochs). Then on the same held-out benchmark examples of each family (`tiny`, and `tiny-long`: the same questions
after few-shot prefixes), at gen 256: the threshold+eotp τ sweep once, and each fit's learn2pd+eotp τ sweep.
Reported per family and variant, for every fit and as a mean over fits:
- at the defaults: learn2pd+eotp at the filter's default τ against threshold+eotp at 0.9 (accuracy points);
- at matched tokens per forward: learn2pd+eotp at the filter's default τ against the threshold curve's accuracy at
  the same tokens per forward (linear between its sweep points; clamped at its ends);
- AUP of each curve, both over the same τ values.
Intervals (95%) come from a two-level bootstrap: fits drawn with replacement, then examples drawn with replacement
(paired: the same examples for every method), so they include the spread between fits as well as the examples'.
With 3 fits there are only 10 distinct draws of fits: read the intervals with the per-fit rows beside them.
EoTP's block mode gives every method the answers it gives without EoTP (tested), so accuracies are those of the
methods themselves; NFE and tokens per forward are with EoTP.

    python benchmarks/filter_verdict.py --fits 3 --examples 500 --output runs/filter_verdict     # ~40 min on 2 cores

Writes report.md and report.json under --output and a section in docs/filter_verdict.md.
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from learn2pd_core import DEFAULTS, fit_filter, load_model, storage  # noqa: E402
from learn2pd_core.bench import publish  # noqa: E402
from learn2pd_core.evals import load_benchmark  # noqa: E402
from learn2pd_core.evaluation import aup, evaluate_examples  # noqa: E402
from learn2pd_core.filter import make_filter  # noqa: E402
from learn2pd_core.oracle import collect_egp, trace_matrix  # noqa: E402
from learn2pd_core.tiny.tasks import instruction_examples  # noqa: E402

SWEEP = (0.5, 0.7, 0.9, 0.96, 0.99, 0.999)
# the threshold's curve reaches further: the learned filters commit more per step than the threshold at 0.5
THRESHOLD_SWEEP = (0.1, 0.3) + SWEEP
THRESHOLD_DEFAULT = 0.9
FAMILIES = {"tiny": "short prompts", "tiny-long": "few-shot prompts"}


def fit_filters(model, fit: int, per_task: int, variants, gen: int) -> tuple[dict, int]:
    """One fit: its own prompt sample and seed; every variant fitted on the same traces."""
    prompts = [e["prompt"] for e in instruction_examples(per_task, seed=1000 + fit)]
    _, egp = collect_egp(model, prompts, gen, DEFAULTS.block_size, batch_size=16)
    rows = trace_matrix(egp)
    return {v: fit_filter(**rows, variant=v, epochs=5000, lr=1e-3, seed=fit) for v in variants}, len(rows["confidence"])


def decode(model, bench: str, rows, methods, filt, gen: int) -> dict:
    """method -> per-example arrays (correct, nfe, answer tokens), in the rows' order."""
    res, errors = evaluate_examples(model, bench, rows, gen_length=gen, block_size=DEFAULTS.block_size,
                                    methods=methods, filter=filt, batch_size=16)
    if errors.num_rows:
        raise SystemExit(f"error: {errors.num_rows} examples of {bench} failed, e.g. {errors.column('error')[0]}")
    order = {r["example_id"]: i for i, r in enumerate(rows)}
    out = {}
    for r in res.to_pylist():
        m = out.setdefault(r["method"], {k: np.zeros(len(rows)) for k in ("correct", "nfe", "tokens")})
        i = order[r["example_id"]]
        m["correct"][i], m["nfe"][i], m["tokens"][i] = r["correct"], r["nfe"], r["answer_tokens"]
    return out


def curve(per_method: dict, taus, name, idx=slice(None)) -> list[tuple[float, float]]:
    """(tokens per forward, accuracy %) of each τ point on the examples `idx`, in the order of `taus`."""
    pts = []
    for t in taus:
        m = per_method[f"{name}@{t:g}"]
        pts.append((m["tokens"][idx].sum() / max(m["nfe"][idx].sum(), 1), 100 * m["correct"][idx].mean()))
    return pts


def matched(threshold_curve, tpf: float) -> float:
    """The threshold curve's accuracy at `tpf` tokens per forward (linear between points, clamped at the ends)."""
    xs, ys = zip(*sorted(threshold_curve))
    return float(np.interp(tpf, xs, ys))


def effects(thr: dict, fits: list[dict], tau: float, idx=slice(None)) -> list[dict]:
    """Per fit: Δ at the defaults, Δ at matched TPF, AUP of both curves, on the examples `idx`."""
    t_curve = curve(thr, THRESHOLD_SWEEP, "threshold+eotp", idx)
    reach = [x for x, _ in t_curve]
    # both AUPs over the same τ values: the threshold's extra points would add area for reach alone
    t_aup = aup(curve(thr, SWEEP, "threshold+eotp", idx))
    base = thr[f"threshold+eotp@{THRESHOLD_DEFAULT:g}"]["correct"][idx].mean() * 100
    out = []
    for f in fits:
        m = f[f"learn2pd+eotp@{tau:g}"]
        acc = 100 * m["correct"][idx].mean()
        tpf = m["tokens"][idx].sum() / max(m["nfe"][idx].sum(), 1)
        out.append({"accuracy": acc, "tpf": tpf, "default": acc - base, "matched": acc - matched(t_curve, tpf),
                    "beyond": not min(reach) <= tpf <= max(reach),
                    "aup": aup(curve(f, SWEEP, "learn2pd+eotp", idx)), "threshold_aup": t_aup})
    return out


def bootstrap(thr: dict, fits: list[dict], tau: float, n: int, draws: int, seed: int) -> dict:
    """95% intervals of the mean over fits of each effect: fits, then examples, drawn with replacement."""
    rng = np.random.default_rng(seed)
    keys = ("default", "matched", "aup_gain")
    samples = {k: [] for k in keys}
    for _ in range(draws):
        chosen = [fits[i] for i in rng.integers(0, len(fits), len(fits))]
        idx = rng.integers(0, n, n)
        e = effects(thr, chosen, tau, idx)
        samples["default"].append(np.mean([x["default"] for x in e]))
        samples["matched"].append(np.mean([x["matched"] for x in e]))
        samples["aup_gain"].append(np.mean([x["aup"] - x["threshold_aup"] for x in e]))
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in samples.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fits", type=int, default=3, help="independent trace collections and fits (default 3)")
    ap.add_argument("--per-task", type=int, default=8, help="instruction prompts per task in each fit's collection")
    ap.add_argument("--examples", type=int, default=500,
                    help="held-out examples per family: --examples / 5 per task where a task has them (default 500: 405)")
    ap.add_argument("--families", default="tiny,tiny-long", help="comma-separated: tiny, tiny-long")
    ap.add_argument("--variants", default="context,paper", help="filter variants (context, paper)")
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--draws", type=int, default=1000, help="bootstrap draws")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--output", default="runs/filter_verdict")
    args = ap.parse_args(argv)
    storage.check_writable(args.output)
    variants, families = args.variants.split(","), args.families.split(",")
    model = load_model(args.model)
    start = time.perf_counter()

    fitted, trace_rows = [], []
    for k in range(args.fits):
        filters, n_rows = fit_filters(model, k, args.per_task, variants, args.gen_length)
        fitted.append(filters)
        trace_rows.append(n_rows)
        print(f"fit {k}: {n_rows} trace rows ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    report = {"fits": args.fits, "trace_rows": trace_rows, "examples": args.examples, "gen_length": args.gen_length,
              "sweep": SWEEP, "families": {}}
    lines, counts = [], {}
    for bench in families:
        rows = [{"example_id": e["example_id"], "prompt": e["prompt"], "target": e["target"]}
                for e in load_benchmark(bench, limit=args.examples).examples]
        counts[bench] = len(rows)
        thr = decode(model, bench, rows, [f"threshold+eotp@{t:g}" for t in THRESHOLD_SWEEP], None, args.gen_length)
        print(f"{bench}: threshold sweep ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        fam = report["families"][bench] = {"threshold_curve": curve(thr, THRESHOLD_SWEEP, "threshold+eotp"),
                                           "variants": {}}
        for v in variants:
            tau = make_filter(v, DEFAULTS.block_size).threshold
            per_fit = [decode(model, bench, rows, [f"learn2pd+eotp@{t:g}" for t in SWEEP], f[v], args.gen_length)
                       for f in fitted]
            print(f"{bench}: {v} sweeps ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
            fam["variants"][v] = {"tau": tau, "per_fit": effects(thr, per_fit, tau),
                                  "curves": [curve(f, SWEEP, "learn2pd+eotp") for f in per_fit],
                                  "interval": bootstrap(thr, per_fit, tau, len(rows), args.draws, seed=0)}
        lines += table(bench, fam, len(rows))
    report["seconds"] = time.perf_counter() - start
    text = "\n".join(lines)
    storage.write_json(storage.join(args.output, "report.json"), report)
    storage.write_bytes(storage.join(args.output, "report.md"), text.encode())
    print(text)
    publish(__file__, f"{args.model}, gen {args.gen_length}, {args.fits} fits x {args.examples} examples per family",
            intro(args, trace_rows, counts, report["seconds"]) + "\n\n" + text, model=args.model,
            command=f"python benchmarks/filter_verdict.py --fits {args.fits} --examples {args.examples} "
                    f"--families {args.families} --variants {args.variants}")
    return 0


def intro(args, trace_rows, counts, seconds) -> str:
    sweep = ", ".join(f"{t:g}" for t in SWEEP)
    return (f"Each fit: EGP traces of {args.per_task} instruction prompts per task (seed 1000 + fit; "
            f"{', '.join(f'{n:,}' for n in trace_rows)} trace rows), each variant fitted with seed = fit. Sweeps: "
            f"τ in {sweep}; the threshold's also 0.1 and 0.3, for matching only (every AUP is over {sweep}). "
            f"Δ: learn2pd+eotp at the filter's default τ minus threshold+eotp at {THRESHOLD_DEFAULT:g} ('defaults') "
            "or minus the threshold curve at the same tokens per forward ('matched TPF'; past the end of the "
            "threshold's curve, its end), accuracy points. The mean row's intervals are 95% from a bootstrap over "
            f"fits and examples; with {args.fits} fits there are few distinct draws of fits, so read them with the "
            f"per-fit rows. Held-out examples: {', '.join(f'{b} {n}' for b, n in counts.items())} (the benchmark "
            "takes --examples / 5 per task, and three tasks hold fewer distinct held-out questions: word_problem 62, "
            f"number_pick 60, letter_word 83). Run time {seconds / 60:.0f} min.")


def table(bench: str, fam: dict, n: int) -> list[str]:
    t_curve = fam["threshold_curve"]
    lines = [f"### {bench} ({FAMILIES.get(bench, bench)}), {n} examples", "",
             "threshold+eotp curve (τ: tokens/forward, accuracy %): "
             + ", ".join(f"{t:g}: {x:.2f}, {y:.1f}" for t, (x, y) in zip(THRESHOLD_SWEEP, t_curve)), "",
             "| filter | fit | accuracy % at default τ | tokens/forward | Δ defaults | Δ matched TPF | AUP learn2pd | "
             "AUP threshold |", "|---|---|---|---|---|---|---|---|"]
    for v, r in fam["variants"].items():
        for k, e in enumerate(r["per_fit"]):
            lines.append(f"| {v} (τ {r['tau']:g}) | {k} | {e['accuracy']:.1f} | {e['tpf']:.2f} | {e['default']:+.1f} | "
                         f"{e['matched']:+.1f}{' (beyond its curve)' if e['beyond'] else ''} | {e['aup']:.1f} | "
                         f"{e['threshold_aup']:.1f} |")
        mean = lambda key: np.mean([e[key] for e in r["per_fit"]])
        ci = r["interval"]
        lines.append(f"| **{v}: mean over fits** | | {mean('accuracy'):.1f} | {mean('tpf'):.2f} | "
                     f"**{mean('default'):+.1f} [{ci['default'][0]:+.1f}, {ci['default'][1]:+.1f}]** | "
                     f"**{mean('matched'):+.1f} [{ci['matched'][0]:+.1f}, {ci['matched'][1]:+.1f}]** | "
                     f"{mean('aup'):.1f} (gain {mean('aup') - mean('threshold_aup'):+.1f} "
                     f"[{ci['aup_gain'][0]:+.1f}, {ci['aup_gain'][1]:+.1f}]) | {mean('threshold_aup'):.1f} |")
    return lines + [""]


if __name__ == "__main__":
    from learn2pd_core.console import run_cli
    run_cli(main)
