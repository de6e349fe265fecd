"""Does the learned filter beat the confidence threshold? One run, the same traces and the same examples for all:

1. Held-out traces (whole prompts split off before any fit): at each τ, the share of masked positions that the
   threshold rule, the paper's filter and the context filter commit, and how many of those commits are wrong
   (the prediction differs from the model's own greedy answer); calibration of sigmoid(f) against the labels
   (reliability bins, expected calibration error; reliability.png).
2. Data size: both filters fitted on 25 / 50 / 100% of the training prompts (same held-out prompts).
3. Training settings: the paper's (AdamW lr 1e-3, 5,000 epochs) and the official notebook's lr 3e-3.
4. Decoding: the benchmark examples with vanilla, the threshold sweep and both filters' τ sweeps, and
   learn2pd+eotp at each filter's default τ, with EoTP's default (block) and the paper's (commit) mode: accuracy with a paired 95% bootstrap interval against vanilla, NFE,
   tokens per forward, AUP; which tasks the changed answers come from; tradeoff.png.

    python benchmarks/filter_study.py --traces runs/collect --examples 200 --output runs/filter_study

Writes report.md (also printed), report.json, reliability.png and tradeoff.png under --output.
"""
import argparse
import os
import sys
import time
import zlib
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "jobs")]

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

import train_filter  # noqa: E402  (jobs/train_filter.py: where the traces are)
from learn2pd_core import DEFAULTS, fit_filter, load_model, storage  # noqa: E402
from learn2pd_core.bench import publish  # noqa: E402
from learn2pd_core.evals import load_benchmark  # noqa: E402
from learn2pd_core.evaluation import aup, evaluate_examples, family, markdown, summarize  # noqa: E402
from learn2pd_core.filter import calibration, make_filter, validation_prompts  # noqa: E402
from learn2pd_core.report import reliability_png, tradeoff_png  # noqa: E402

TAUS = (0.5, 0.9, 0.96, 0.99, 0.999)
SWEEP = (0.7, 0.9, 0.96, 0.99, 0.999)
SETTINGS = {"paper": (1e-3, 5000), "notebook lr": (3e-3, 5000)}   # (lr, epochs)


def read_traces(uri: str) -> dict:
    src, manifest = train_filter.trace_source(uri)
    t = storage.read_dataset(src)
    dense = lambda c: np.stack(t[c].to_numpy(zero_copy_only=False))
    return {"prompt_id": np.asarray(t["prompt_id"].to_pylist()), "task": np.asarray(t["task"].to_pylist()),
            "confidence": dense("confidence").astype(np.float32), "correct": dense("correct"),
            "masked": dense("masked"), "block": t["block"].to_numpy(), "step": t["step"].to_numpy(), "manifest": manifest}


def take(rows: dict, keep: np.ndarray) -> dict:
    return {k: v[keep] for k, v in rows.items() if isinstance(v, np.ndarray)}


def fit(rows: dict, variant: str, lr: float, epochs: int, seed: int):
    return fit_filter(rows["confidence"], rows["correct"], rows["masked"], rows["block"], rows["step"],
                      variant=variant, lr=lr, epochs=epochs, seed=seed)


@torch.no_grad()
def accept_prob(filt, rows: dict) -> np.ndarray:
    """[N, S] sigmoid(f) on trace rows; for the threshold rule, the confidence itself."""
    if filt is None:
        return rows["confidence"]
    t = lambda k: torch.as_tensor(np.array(rows[k]))
    return torch.sigmoid(filt(t("confidence"), t("masked"), t("block"), t("step"))).numpy()


def held_out(prob: np.ndarray, rows: dict, tau: float | None = None, inclusive: bool = False) -> dict:
    """Over the held-out masked positions: per τ the committed share and the wrong commits; BCE; calibration;
    with `tau`, where that τ's wrong commits are (task, quarter of the block, first step of a block or later).
    `inclusive`: commit at prob >= τ, as the engine's threshold rule does (the filter rule commits at > τ)."""
    commits = (lambda q, t: q >= t) if inclusive else (lambda q, t: q > t)
    m = rows["masked"]
    where = None
    if tau is not None:
        wrong = commits(prob, tau) & m & ~rows["correct"]                      # [N, S]
        at = np.nonzero(wrong)
        S = m.shape[1]
        where = {"tau": tau, "task": Counter(rows["task"][at[0]].tolist()),
                 "position": Counter(f"{q * S // 4}-{(q + 1) * S // 4 - 1}" for q in (at[1] * 4 // S).tolist()),
                 "step": Counter("first" if s == 0 else "later" for s in rows["step"][at[0]].tolist())}
    p, y = prob[m], rows["correct"][m]
    out = {"positions": int(m.sum()), "correct_share": float(y.mean())}
    for t in TAUS:
        c = commits(p, t)
        out[f"{t:g}"] = {"committed": float(c.mean()), "wrong": int((c & ~y).sum()),
                           "wrong_per_1000": float(1000 * (c & ~y).sum() / max(c.sum(), 1))}
    q = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    out["bce"] = float(-(y * np.log(q) + (~y) * np.log(1 - q)).mean())
    out["calibration"] = calibration(p, y)
    if where is not None:
        out["wrong_at"] = {k: dict(v) if isinstance(v, Counter) else v for k, v in where.items()}
    return out


def trace_tables(study: dict) -> list[str]:
    lines = ["### Held-out traces: what each rule commits at τ, and how many of those commits are wrong", "",
             f"{study['held_out_prompts']} held-out prompts, {study['rules']['threshold']['positions']:,} masked "
             f"positions, {100 * study['rules']['threshold']['correct_share']:.1f}% of them already right. "
             "Cell: committed share / wrong commits. The threshold rule commits confidence > τ.", "",
             "| rule | " + " | ".join(f"τ {t:g}" for t in TAUS) + " | BCE | ECE |", "|---" * (len(TAUS) + 3) + "|"]
    for name, r in study["rules"].items():
        cells = [f"{100 * r[f'{t:g}']['committed']:.1f}% / {r[f'{t:g}']['wrong']}" for t in TAUS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['bce']:.4f} | {r['calibration']['ece']:.4f} |")
    lines += ["", "Where each rule's wrong commits fall at its default τ (held-out traces):", "",
              "| rule | τ | by task | by block position | first step of a block / later |", "|---|---|---|---|---|"]
    fmt = lambda c: ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: -kv[1])) or "-"
    for name, r in study["rules"].items():
        w = r["wrong_at"]
        lines.append(f"| {name} | {w['tau']:g} | {fmt(w['task'])} | {fmt(w['position'])} | "
                     f"{w['step'].get('first', 0)} / {w['step'].get('later', 0)} |")
    lines += ["", "### Data size and training settings (same held-out prompts)", "",
              "| filter | training prompts | lr | epochs | held-out BCE | ECE | τ 0.96: committed / wrong | "
              "τ 0.99: committed / wrong | fit s |", "|---|---|---|---|---|---|---|---|---|"]
    for f in study["fits"]:
        r = f["held_out"]
        cell = lambda t: f"{100 * r[t]['committed']:.1f}% / {r[t]['wrong']}"
        lines.append(f"| {f['variant']} | {f['prompts']} | {f['lr']:g} | {f['epochs']} | {r['bce']:.4f} | "
                     f"{r['calibration']['ece']:.4f} | {cell('0.96')} | {cell('0.99')} | {f['seconds']:.0f} |")
    return lines + [""]


def decode_study(model, filters: dict, benchmarks, n: int, gen: int, batch: int,
                 with_eotp: bool) -> tuple[pa.Table, dict]:
    """Every method on the same examples; learn2pd methods are named learn2pd:<variant>."""
    tables, seconds = [], {}
    for bench in benchmarks:
        rows = [{"example_id": e["example_id"], "prompt": e["prompt"], "target": e["target"]}
                for e in load_benchmark(bench, limit=n).examples]
        if with_eotp:   # every method with EoTP "block": each one's answers without EoTP, at a fraction of the cost
            groups = [(None, ["vanilla+eotp"] + [f"threshold+eotp@{t:g}" for t in SWEEP])]
            groups += [(v, [f"learn2pd+eotp@{t:g}" for t in SWEEP]) for v in filters]
        else:   # EoTP in both modes: "block" (the default, exact) and the paper's mid-block "commit"
            groups = [(None, ["vanilla", "vanilla+eotp-commit"] + [f"threshold@{t:g}" for t in SWEEP]
                       + ["threshold+eotp"])]
            groups += [(v, [f"learn2pd@{t:g}" for t in SWEEP] + ["learn2pd+eotp", "learn2pd+eotp-commit"])
                       for v in filters]
        for variant, methods in groups:
            start = time.process_time()
            res, errors = evaluate_examples(model, bench, rows, gen_length=gen, block_size=DEFAULTS.block_size, methods=methods,
                                            filter=filters.get(variant), batch_size=batch)
            if errors.num_rows:
                print(f"{errors.num_rows} errors in {bench}, e.g. {errors.column('error')[0]}", file=sys.stderr)
            seconds[f"{bench}: {variant or 'vanilla, threshold'}"] = time.process_time() - start
            if variant:
                names = [m.replace("learn2pd", f"learn2pd:{variant}", 1) for m in res.column("method").to_pylist()]
                res = res.set_column(res.schema.get_field_index("method"), "method", pa.array(names))
            tables.append(res)
    return pa.concat_tables(tables), seconds


def task_of(example_id: str) -> str:
    return example_id.split("/", 1)[1].rsplit("-", 2)[0]   # "tiny/word_problem-0-3" -> "word_problem"


def changes_by_task(results: pa.Table, baseline: str) -> list[dict]:
    """Per method: examples it got right that vanilla did not (gained) and the reverse (lost), by task."""
    rows = results.to_pylist()
    base = {(r["benchmark"], r["example_id"]): r["correct"] for r in rows if r["method"] == baseline}
    out = {}
    for r in rows:
        v = base.get((r["benchmark"], r["example_id"]))
        if r["method"] == baseline or v is None or v == r["correct"]:
            continue
        c = out.setdefault((r["benchmark"], r["method"]), {"gained": Counter(), "lost": Counter()})
        c["gained" if r["correct"] else "lost"][task_of(r["example_id"])] += 1
    return [{"benchmark": b, "method": m, "gained": dict(c["gained"]), "lost": dict(c["lost"])}
            for (b, m), c in sorted(out.items())]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", default="runs/collect", help="collect output holding traces/ (default runs/collect)")
    ap.add_argument("--output", default="runs/filter_study")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--benchmarks", default="tiny", help="comma-separated tiny benchmark families (tiny, tiny-long)")
    ap.add_argument("--examples", type=int, default=200, help="examples per benchmark (default 200)")
    ap.add_argument("--gen-length", type=int, default=DEFAULTS.gen_length)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--val-fraction", type=float, default=0.25, help="share of trace prompts held out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-decode", action="store_true", help="trace studies only")
    ap.add_argument("--with-eotp", action="store_true",
                    help="decode every method with EoTP's block mode, the baseline being vanilla+eotp: the same answers "
                         "as without EoTP (tested), without decoding the padding; what makes gen 1024 affordable on a CPU")
    args = ap.parse_args(argv)
    storage.check_writable(args.output)

    traces = read_traces(args.traces)
    val_ids = validation_prompts(traces["prompt_id"], args.val_fraction, args.seed)
    is_val = np.isin(traces["prompt_id"], list(val_ids))
    train, val = take(traces, ~is_val), take(traces, is_val)
    # a seeded order of the training prompts; its prefixes are the data-size study's subsets
    train_ids = sorted(set(train["prompt_id"]), key=lambda p: (zlib.crc32(f"size:{args.seed}:{p}".encode()), p))
    print(f"traces: {len(traces['prompt_id'])} rows from {len(set(traces['prompt_id']))} prompts; "
          f"{len(val_ids)} prompts held out", file=sys.stderr)

    fits, final = [], {}
    for variant in ("paper", "context"):
        for setting, (lr, epochs) in SETTINGS.items():
            shares = (0.25, 0.5, 1.0) if setting == "paper" else (1.0,)
            for share in shares:
                ids = train_ids[:max(2, round(share * len(train_ids)))]
                part = take(train, np.isin(train["prompt_id"], ids))
                start = time.perf_counter()
                filt = fit(part, variant, lr, epochs, args.seed)
                fits.append({"variant": variant, "setting": setting, "prompts": len(ids), "rows": len(part["block"]),
                             "lr": lr, "epochs": epochs, "seconds": time.perf_counter() - start,
                             "held_out": held_out(accept_prob(filt, val), val)})
                print(f"fit {variant} {setting} {len(ids)} prompts: {fits[-1]['seconds']:.0f}s", file=sys.stderr)
                if share == 1.0 and setting == "paper":
                    final[variant] = filt
    default_tau = {v: make_filter(v, DEFAULTS.block_size).threshold for v in ("paper", "context")}
    rules = {"threshold (confidence)": held_out(accept_prob(None, val), val, 0.9, inclusive=True)}
    rules.update({f"learn2pd:{v}": held_out(accept_prob(f, val), val, default_tau[v]) for v, f in final.items()})
    study = {"traces": args.traces, "held_out_prompts": len(val_ids), "train_prompts": len(train_ids),
             "rules": {"threshold": rules["threshold (confidence)"], **{k: v for k, v in rules.items() if ":" in k}},
             "fits": fits}
    storage.write_bytes(storage.join(args.output, "reliability.png"),
                        reliability_png({k: v["calibration"] for k, v in rules.items()}))
    lines = ["# Learn2PD filter study", "", f"Traces `{args.traces}`: {len(train_ids)} training prompts, "
             f"{len(val_ids)} held out (split by prompt, seed {args.seed}). Decoding filters: each variant fitted on "
             "every training prompt with the paper's settings.", ""] + trace_tables(study)

    if not args.skip_decode:
        for v, f in final.items():
            f.threshold = default_tau[v]
        model = load_model(args.model)
        results, seconds = decode_study(model, final, args.benchmarks.split(","), args.examples, args.gen_length,
                                        args.batch_size, args.with_eotp)
        baseline = "vanilla+eotp" if args.with_eotp else "vanilla"
        summary = summarize(results, baseline)
        curves = {}
        for r in summary:
            if "@" in r["method"]:
                curves.setdefault((r["benchmark"], family(r["method"])), []).append((r["tpf"], r["accuracy"]))
        study.update(summary=summary, cpu_seconds=seconds, changes=changes_by_task(results, baseline),
                     aup=[{"benchmark": b, "family": f, "aup": aup(p)} for (b, f), p in sorted(curves.items())])
        storage.write_bytes(storage.join(args.output, "tradeoff.png"), tradeoff_png(summary))
        if args.with_eotp:
            lines += ["Every method runs with EoTP's block mode, which gives the answers the method gives without EoTP "
                      "token for token (tests/test_engine.py::test_block_eotp_gives_the_answer_decoding_without_it_gives),"
                      " so Δacc is against vanilla's answers; 'vanilla' below is vanilla+eotp.", ""]
        lines += [markdown(summary, sweep=True), "### AUP of each τ sweep", "", "| benchmark | sweep | AUP |",
                  "|---|---|---|"] + [f"| {a['benchmark']} | {a['family']} | {a['aup']:.1f} |" for a in study["aup"]]
        lines += ["", "### Where the changed answers come from (examples gained / lost against vanilla, by task)", "",
                  "| benchmark | method | gained | lost |", "|---|---|---|---|"]
        fmt = lambda c: ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "-"
        lines += [f"| {c['benchmark']} | {c['method']} | {fmt(c['gained'])} | {fmt(c['lost'])} |" for c in study["changes"]]
        lines += ["", "CPU seconds of decoding: " + "; ".join(f"{k} {v:.0f}" for k, v in seconds.items()), ""]
    report = "\n".join(lines)
    storage.write_bytes(storage.join(args.output, "report.md"), report.encode())
    storage.write_json(storage.join(args.output, "report.json"), study)
    print(report)
    publish(__file__, "held-out traces only (--skip-decode)" if args.skip_decode else
            f"{args.benchmarks.replace(',', ', ')}, gen {args.gen_length}, {args.examples} examples"
            + (", every method with EoTP's block mode" if args.with_eotp else ""),
            "\n".join(lines[2:]), model=f"{args.model}; traces `{args.traces}`")
    return 0


if __name__ == "__main__":
    from learn2pd_core.console import run_cli
    run_cli(main)
