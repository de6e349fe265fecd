"""Evaluation: decode benchmark examples with every method, score them, and aggregate the rows into the
report's table (accuracy and its paired difference against vanilla with a bootstrap interval, NFE, tokens per
forward, tokens/s, speedups, AUP). No Ray in here.

Each method's accuracy comes from its cheapest exact form: a method without EoTP gives token for token the
answers of its EoTP "block" form (tested), which skips every block after the answer's end, so vanilla's answers
cost ~38 forwards on the tiny model instead of 256. Only a method's speed (NFE, tokens per forward, tokens/s)
needs the method itself; its cost per forward is nearly flat, so it is measured on a timed sample of batches.
One call of `evaluate_examples` decodes one batch (one benchmark, one gen length); in a timed batch every method
is decoded as itself, in the others each method's exact form stands in for it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections import defaultdict
from typing import Sequence

import numpy as np
import pyarrow as pa

from .config import DEFAULT_THRESHOLD, DecodeConfig
from .engine import generate
from .traces import encode_rows

# `timed`: this row's NFE, tokens and seconds come from decoding the method itself (a timed batch, or a method
# that is its own exact form); otherwise from nothing: only its answer (from the exact form) is known.
RESULTS = pa.schema([("benchmark", pa.string()), ("gen_length", pa.int32()), ("example_id", pa.string()),
                     ("method", pa.string()), ("threshold", pa.float64()), ("completion", pa.string()),
                     ("correct", pa.bool_()), ("scores", pa.string()), ("timed", pa.bool_()), ("nfe", pa.int32()),
                     ("answer_tokens", pa.int32()), ("decode_seconds", pa.float64()), ("batch_id", pa.string()),
                     ("batch_seconds", pa.float64()), ("forwards_per_block", pa.list_(pa.int32()))])
ERRORS = pa.schema([("benchmark", pa.string()), ("gen_length", pa.int32()), ("example_id", pa.string()),
                    ("error", pa.string())])
# What a first user wants to see: each policy alone and with EoTP, and the paper's fastest (learn2pd+eotp+dual).
DEFAULT_METHODS = ("vanilla", "vanilla+eotp", "threshold", "threshold+eotp", "learn2pd", "learn2pd+eotp",
                   "learn2pd+eotp+dual")
SWEPT = tuple(DEFAULT_THRESHOLD)   # the policies with a τ: their +eotp forms are swept for the trade-off figure
BASELINES = ("vanilla", "vanilla+eotp", "threshold", "threshold+eotp", "factor", "factor+eotp")   # learn2pd's rivals
RESAMPLES = 2000   # bootstrap resamples of the accuracy difference against vanilla
# The reference answers of the egp oracle: vanilla's, from its exact form (its tokens after the first
# end-of-text are end-of-text, which is what the answer means).
EGP_REFERENCE = "vanilla+eotp"


def canonical(method: str, filter=None) -> str:
    """The method's one name: suffixes in order, and no '@τ' where τ is the default in force (for learn2pd the
    filter's sidecar value), so 'learn2pd@0.99' with a 0.99 filter is 'learn2pd', decoded once."""
    cfg = DecodeConfig.from_method(method)
    if cfg.threshold is not None and cfg.threshold == dataclasses.replace(cfg, threshold=None).tau(filter):
        cfg = dataclasses.replace(cfg, threshold=None)
    return cfg.method


def exact_form(method: str) -> str:
    """The cheapest method whose answers are token for token this method's: its EoTP "block" form (the same
    decoding up to the block holding the first end-of-text, every later block skipped). A method with an EoTP
    mode is its own."""
    cfg = DecodeConfig.from_method(method)
    return method if cfg.eotp else dataclasses.replace(cfg, eotp="block").method


def expand_methods(methods: Sequence[str], sweep: Sequence[float] = (), filter=None) -> list[str]:
    """The methods to run, each once under its canonical name: vanilla first, the requested ones, then
    'threshold+eotp@τ' and 'learn2pd+eotp@τ' for every τ of the sweep, for each of the two policies requested
    (the +eotp forms: without EoTP every point would sit near the same tokens per forward, padding's)."""
    out = ["vanilla"]
    for m in methods:
        name = canonical(m, filter)
        if name not in out:
            out.append(name)
    for policy in SWEPT:
        if any(DecodeConfig.from_method(m).policy == policy for m in out):
            out += [p for p in (canonical(f"{policy}+eotp@{t:g}", filter) for t in sweep) if p not in out]
    return out


def family(method: str) -> str:
    """'threshold+eotp@0.7' -> 'threshold+eotp': the curve a sweep point belongs to."""
    return method.partition("@")[0]


def evaluate_examples(model, benchmark: str, rows: Sequence[dict], *, gen_length: int, block_size: int,
                      methods: Sequence[str], filter=None, chat: bool | None = None, batch_size: int | None = None,
                      batch_id: str = "", timed: bool = True) -> tuple[pa.Table, pa.Table]:
    """Decode rows {example_id, prompt, target} of one benchmark with every method; (results, errors).
    timed=False decodes each method's exact form only and gives the methods that are not their own form their
    form's answers, without NFE or seconds. A row that cannot be decoded becomes an error row; the others go on."""
    from .evals import score_details, truncate

    good, ids, failed = encode_rows(model, rows, gen_length, chat)
    errors = [{"benchmark": benchmark, "gen_length": gen_length, "example_id": r["example_id"], "error": reason}
              for r, reason in failed]
    decoded: dict[str, tuple] = {}   # method -> (results, wall seconds), each decode done once

    def decode(method: str):
        if method not in decoded:
            cfg = DecodeConfig.from_method(method, gen_length=gen_length, block_size=block_size)
            request = {"filter": filter} if cfg.policy == "learn2pd" else {}
            if cfg.policy == "egp":
                request["references"] = [r.token_ids for r in decode(EGP_REFERENCE)[0]]
            start = time.perf_counter()
            results = generate(model, ids, cfg, batch_size=batch_size, **request)
            decoded[method] = (results, time.perf_counter() - start)
        return decoded[method]

    out = []
    try:
        for method in methods if good else []:
            form = method if timed else exact_form(method)
            results, wall = decode(form)
            own = form == method
            tau = DecodeConfig.from_method(method).tau(filter)
            for r, res in zip(good, results):
                completion = truncate(benchmark, res.text)
                try:
                    scores = score_details(benchmark, r, completion)
                except Exception as e:   # the scorer's machinery failed (e.g. no sandbox): wrong, and reported
                    scores = {"correct": False, "error": f"{type(e).__name__}: {e}"}
                    errors.append({"benchmark": benchmark, "gen_length": gen_length, "example_id": r["example_id"],
                                   "error": f"{method}: scoring failed: {scores['error']}"})
                out.append({"benchmark": benchmark, "gen_length": gen_length, "example_id": r["example_id"],
                            "method": method, "threshold": tau, "completion": completion,
                            "correct": bool(scores["correct"]), "scores": json.dumps(scores), "timed": own,
                            "nfe": res.nfe if own else None, "answer_tokens": res.answer_tokens,
                            "decode_seconds": res.decode_seconds if own else None, "batch_id": batch_id,
                            "batch_seconds": wall if own else None,
                            "forwards_per_block": res.forwards_per_block if own else None})
    except RuntimeError as e:   # e.g. out of GPU memory: this group fails as a whole, the job goes on
        out = []
        errors += [{"benchmark": benchmark, "gen_length": gen_length, "example_id": r["example_id"],
                    "error": f"decoding failed: {str(e).splitlines()[0][:300]}"} for r in good]
    return pa.Table.from_pylist(out, schema=RESULTS), pa.Table.from_pylist(errors, schema=ERRORS)


# ---------------------------------------------------------------- aggregation
def summarize(results: pa.Table, baseline: str = "vanilla") -> list[dict]:
    """One row per (benchmark, gen_length, method). Accuracy is over every example; NFE, tokens per forward and
    TPS (answer tokens / decoding seconds summed over batches) over the examples where the method itself was
    decoded (`timed`): all of them, or the timed sample, whose per-batch tokens/s spread is given. Speedups and
    accuracy differences are against `baseline` (vanilla) on the same examples (same batches, same actors)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results.to_pylist():
        groups[(r["benchmark"], r["gen_length"], r["method"])].append(r)
    rows = []
    for (bench, gen, method), rs in groups.items():
        timed = [r for r in rs if r["timed"]]
        batches: dict[str, list[dict]] = defaultdict(list)
        for r in timed:
            batches[r["batch_id"]].append(r)
        seconds = sum(b[0]["batch_seconds"] for b in batches.values())
        tokens, nfe = sum(r["answer_tokens"] for r in timed), sum(r["nfe"] for r in timed)
        per_batch = [sum(r["answer_tokens"] for r in b) / b[0]["batch_seconds"] for b in batches.values()
                     if b[0]["batch_seconds"]]
        rows.append({"benchmark": bench, "gen_length": gen, "method": method, "threshold": rs[0]["threshold"],
                     "examples": len(rs), "accuracy": 100 * sum(r["correct"] for r in rs) / len(rs),
                     "timed_examples": len(timed), "timed_batches": len(batches),
                     "tps_range": [min(per_batch), max(per_batch)] if len(timed) < len(rs) and len(per_batch) > 1
                     else None,
                     "nfe": nfe / len(timed) if timed else float("nan"), "tpf": tokens / nfe if nfe else 0.0,
                     "tps": tokens / seconds if seconds else 0.0, "seconds": seconds,
                     "blocks_median_forwards": _median_forwards(timed)})
        rows[-1]["paired_examples"], rows[-1]["acc_diff"], rows[-1]["acc_diff_ci"] = \
            paired_accuracy_diff(rs, groups.get((bench, gen, baseline), []))
    base = {(r["benchmark"], r["gen_length"]): r for r in rows if r["method"] == baseline}
    for r in rows:
        v = base.get((r["benchmark"], r["gen_length"]))
        r["speedup"] = r["tps"] / v["tps"] if v and v["tps"] else float("nan")
        r["nfe_speedup"] = v["nfe"] / r["nfe"] if v and r["nfe"] else float("nan")
        r["accuracy_delta"] = r["accuracy"] - v["accuracy"] if v else float("nan")
    order = {m: i for i, m in enumerate(DEFAULT_METHODS + ("factor", "egp"))}
    return sorted(rows, key=lambda r: (r["benchmark"], r["gen_length"], "@" in r["method"],
                                       order.get(r["method"], 99), r["method"]))


def paired_accuracy_diff(rows: Sequence[dict], vanilla: Sequence[dict], *, resamples: int = RESAMPLES,
                         seed: int = 0) -> tuple[int, float | None, list[float] | None]:
    """(n, accuracy difference in points, its 95% paired bootstrap interval [lo, hi]) of `rows` against
    `vanilla` on the examples both have (an example that failed for either side is left out).
    Paired because both methods answer the same examples: resampling example ids keeps each example's two
    outcomes together, so the interval reflects how often the methods disagree, not each accuracy's own spread.
    With 40 examples one example is 2.5 points, so a point estimate alone cannot tell 1 point from noise."""
    mine = {r["example_id"]: r["correct"] for r in rows}
    base = {r["example_id"]: r["correct"] for r in vanilla}
    ids = sorted(mine.keys() & base.keys())   # sorted: the same resamples whatever order the rows came in
    if not ids:
        return 0, None, None
    diff = np.array([100.0 * (int(mine[i]) - int(base[i])) for i in ids])
    picks = np.random.default_rng(seed).integers(0, len(ids), size=(resamples, len(ids)))
    lo, hi = np.percentile(diff[picks].mean(axis=1), [2.5, 97.5])
    return len(ids), float(diff.mean()), [float(lo), float(hi)]


def uncached(method: str) -> str:
    """'learn2pd+eotp+dual@0.9' -> 'learn2pd+eotp@0.9': the same method without the KV cache."""
    return method.replace("+prefix", "").replace("+dual", "")


def cache_effects(results: pa.Table, summary: Sequence[dict]) -> list[dict]:
    """Each cached method (+prefix, +dual) against the same method without the cache, per benchmark and gen length:
    the paired accuracy difference on the same examples with its 95% interval, "within 2 points" read from the
    interval (lower end >= -2), and the tokens/s ratio."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results.to_pylist():
        groups[(r["benchmark"], r["gen_length"], r["method"])].append(r)
    tps = {(r["benchmark"], r["gen_length"], r["method"]): r["tps"] for r in summary}
    out = []
    for (bench, gen, method), rs in sorted(groups.items()):
        base = uncached(method)
        if base == method or (bench, gen, base) not in groups:
            continue
        n, diff, ci = paired_accuracy_diff(rs, groups[(bench, gen, base)])
        plain = tps.get((bench, gen, base))
        out.append({"benchmark": bench, "gen_length": gen, "method": method, "without_cache": base,
                    "paired_examples": n, "acc_diff": diff, "acc_diff_ci": ci,
                    "within_2_points": ci is not None and ci[0] >= -2.0,
                    "tps_ratio": tps[(bench, gen, method)] / plain if plain else float("nan")})
    return out


def _median_forwards(rows: list[dict]) -> float:
    counts = [f for r in rows for f in r["forwards_per_block"] if f > 0]
    return float(statistics.median(counts)) if counts else 0.0


def aup(points: Sequence[tuple[float, float]], *, alpha: float = 3.0, drop: float = 5.0) -> float:
    """Accuracy under parallelism (d3LLM): area under accuracy (%) over tokens per forward for a sweep.
    Points are ordered by TPF; the first (least parallel) sets the reference and points more than `drop`
    accuracy points below it are dropped; each accuracy y is weighted by W(y) = min(exp(-alpha(1 - y/y_max)), 1);
    the area is the trapezoid rule over the kept points, starting from TPF 0 at the first point's value."""
    pts = sorted(points)
    if not pts:
        return 0.0
    first = pts[0][1]
    kept = [(x, y) for x, y in pts if y >= first - drop]
    y_max = max(y for _, y in kept)
    weighted = [(x, y * (min(math.exp(-alpha * (1 - y / y_max)), 1.0) if y_max > 0 else 0.0)) for x, y in kept]
    area, (px, py) = 0.0, (0.0, weighted[0][1])
    for x, y in weighted:
        area += (x - px) * (py + y) / 2
        px, py = x, y
    return area


def aup_table(summary: Sequence[dict]) -> list[dict]:
    """AUP of each swept family (e.g. threshold+eotp: its '@τ' points and itself at its default τ) per benchmark
    and gen length."""
    swept = {family(r["method"]) for r in summary if "@" in r["method"]}
    curves: dict[tuple, list] = defaultdict(list)
    for r in summary:
        if family(r["method"]) in swept:
            curves[(r["benchmark"], r["gen_length"], family(r["method"]))].append((r["tpf"], r["accuracy"]))
    return [{"benchmark": b, "gen_length": g, "family": f, "points": len(p), "aup": aup(p)}
            for (b, g, f), p in sorted(curves.items())]


def target_checks(summary: Sequence[dict]) -> list[dict]:
    """Learn2PD+EoTP against the project's targets, per benchmark and gen length. Accuracy holds "within 1
    point of vanilla" when the lower end of the paired 95% bootstrap interval of the difference is >= -1 point."""
    by = defaultdict(dict)
    for r in summary:
        by[(r["benchmark"], r["gen_length"])][r["method"]] = r
    out = []
    for (bench, gen), m in sorted(by.items()):
        ours = m.get("learn2pd+eotp")
        if not ours:
            continue
        rivals = [m[k] for k in BASELINES if k in m]
        check = {"benchmark": bench, "gen_length": gen,
                 "fewer_nfe_than_baselines": all(ours["nfe"] < r["nfe"] for r in rivals),
                 "higher_tps_than_baselines": all(ours["tps"] > r["tps"] for r in rivals),
                 # not the point estimate: the paired 95% interval must rule out a loss of more than 1 point
                 "accuracy_within_1_point": ours["acc_diff_ci"] is not None and ours["acc_diff_ci"][0] >= -1.0,
                 "acc_diff": ours["acc_diff"], "acc_diff_ci": ours["acc_diff_ci"]}
        if "egp" in m:
            check["nfe_vs_egp"] = ours["nfe"] / m["egp"]["nfe"]
            check["within_1.5x_of_egp"] = check["nfe_vs_egp"] <= 1.5
        out.append(check)
    return out


def _diff_ci(r: dict) -> str:   # "-2.5 [-7.5, +2.5]"; blank for vanilla itself and without vanilla
    if r.get("method") == "vanilla" or r.get("acc_diff_ci") is None:
        return ""
    return "{:+.1f} [{:+.1f}, {:+.1f}]".format(r["acc_diff"], *r["acc_diff_ci"])


def _speed_from(r: dict) -> str:   # "all" or "sample: 16 ex., 2 batches, 10.2-11.9 tok/s"
    if r["timed_examples"] == r["examples"]:
        return "all"
    spread = "" if r.get("tps_range") is None else ", {:.1f}-{:.1f} tok/s".format(*r["tps_range"])
    return f"sample: {r['timed_examples']} ex., {r['timed_batches']} batch{'es' if r['timed_batches'] != 1 else ''}{spread}"


COLUMNS = [("method", "method", "{}"), ("threshold", "τ", "{:g}"), ("examples", "n", "{}"),
           ("accuracy", "accuracy %", "{:.1f}"), ("acc_diff_ci", "Δacc vs vanilla [95% CI]", _diff_ci),
           ("nfe", "NFE", "{:.1f}"), ("tpf", "tokens/forward", "{:.2f}"),
           ("tps", "tokens/s", "{:.1f}"), ("speedup", "speedup", "{:.2f}x"), ("nfe_speedup", "NFE ratio", "{:.2f}x"),
           ("blocks_median_forwards", "median forwards/block", "{:g}"), ("timed_examples", "speed from", _speed_from)]


def markdown(summary: Sequence[dict], aups: Sequence[dict] = (), checks: Sequence[dict] = (),
             sweep: bool = False, cache: Sequence[dict] = ()) -> str:
    """The report's tables: one per benchmark and gen length (sweep points only when `sweep`)."""
    lines = []
    by = defaultdict(list)
    for r in summary:
        if sweep or "@" not in r["method"]:
            by[(r["benchmark"], r["gen_length"])].append(r)
    for (bench, gen), rows in sorted(by.items()):
        n = max(r["examples"] for r in rows)
        lines += [f"### {bench}, gen length {gen}", "",
                  (f"{n} examples: one example = {100 / n:.1f} accuracy points. Δacc = accuracy minus vanilla's on "
                   f"the examples both answered, with a paired bootstrap 95% interval ({RESAMPLES:,} resamples of "
                   "the examples). Accuracy is over every example (a method without EoTP answers exactly as its "
                   "+eotp form, which stands in for it); NFE, tokens/forward and tokens/s come from the examples "
                   "where the method itself was decoded: all, or a timed sample ('speed from')."),
                  "", "| " + " | ".join(c[1] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for r in rows:
            lines.append("| " + " | ".join(f(r) if callable(f) else "" if r.get(k) is None else f.format(r[k])
                                           for k, _, f in COLUMNS) + " |")
        lines.append("")
    if aups:
        lines += ["### AUP (τ sweep; area under accuracy % over tokens per forward)", "",
                  "| benchmark | gen length | method | points | AUP |", "|---|---|---|---|---|"]
        lines += [f"| {a['benchmark']} | {a['gen_length']} | {a['family']} | {a['points']} | {a['aup']:.1f} |"
                  for a in aups]
        lines.append("")
    if cache:
        lines += ["### KV cache: each cached method against the same method without it", "",
                  "Same examples; Δacc with a paired bootstrap 95% interval; within 2 points when its lower end is "
                  "≥ -2.", "",
                  "| benchmark | gen length | method | without cache | n | Δacc [95% CI] | within 2 points | "
                  "tokens/s ratio |", "|---|---|---|---|---|---|---|---|"]
        for c in cache:
            lines.append(f"| {c['benchmark']} | {c['gen_length']} | {c['method']} | {c['without_cache']} | "
                         f"{c['paired_examples']} | {_diff_ci(c)} | {'yes' if c['within_2_points'] else '**no**'} | "
                         f"{c['tps_ratio']:.2f}x |")
        lines.append("")
    if checks:
        lines += ["### learn2pd+eotp against the targets", "",
                  f"| benchmark | gen length | fewer NFE than {'/'.join(BASELINES)} (those run) | higher tokens/s | "
                  "accuracy within 1 point of vanilla (95% CI lower end ≥ -1) | NFE / EGP NFE (≤ 1.5) |",
                  "|---|---|---|---|---|---|"]
        yn = {True: "yes", False: "**no**"}
        for c in checks:
            egp = f"{c['nfe_vs_egp']:.2f} ({yn[c['within_1.5x_of_egp']]})" if "nfe_vs_egp" in c else "n/a"
            lines.append(f"| {c['benchmark']} | {c['gen_length']} | {yn[c['fewer_nfe_than_baselines']]} | "
                         f"{yn[c['higher_tps_than_baselines']]} | {yn[c['accuracy_within_1_point']]} "
                         f"{_diff_ci(c)} | {egp} |")
        lines.append("")
    return "\n".join(lines)
