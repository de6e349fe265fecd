"""jobs/evaluate.py end to end on the tiny model (real local Ray) and the aggregation it reports."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from learn2pd_core import DecodeConfig, FilterMLP, load_filter, load_model, save_filter, storage
from learn2pd_core.bench import fit_filter_on
from learn2pd_core.evaluation import (DEFAULT_METHODS, RESULTS, aup, cache_effects, exact_form, expand_methods,
                                      markdown, paired_accuracy_diff, summarize, target_checks)
from learn2pd_core.tiny.tasks import instruction_examples

# the jobs connect to the session's Ray cluster (conftest.ray_cluster) rather than each starting one
pytestmark = pytest.mark.usefixtures("ray_cluster")

ROOT = Path(__file__).resolve().parents[1]
MODEL = os.environ.get("LEARN2PD_TEST_MODEL", "tiny")
METHODS = "vanilla,vanilla+eotp,threshold,factor,learn2pd,learn2pd+eotp,egp,threshold+dual,learn2pd+eotp+dual"
# 6 examples in batches of 2: the first batch is timed, the other two decode only each method's exact form
FAST = ["--model", MODEL, "--benchmarks", "tiny", "--methods", METHODS, "--sweep", "0.7", "--block-size", "32",
        "--batch-size", "2", "--timed-batches", "1", "--num-actors", "1"]


def evaluate(*args, check=True):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "evaluate.py"), *FAST, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode:
        raise AssertionError(f"evaluate failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def results(out):
    return storage.read_dataset(storage.join(out, "results")).to_pylist()


@pytest.fixture(scope="module")
def filter_dir(tmp_path_factory):
    model = load_model(MODEL)
    filt, _ = fit_filter_on(model, [e["prompt"] for e in instruction_examples(2, seed=5)], gen_length=64,
                            block_size=32, epochs=300)
    out = tmp_path_factory.mktemp("filter")
    save_filter(filt, str(out))
    return str(out)


@pytest.fixture(scope="module")
def too_long():
    """A generation length that (with any prompt) exceeds the model's context: every example of it must become an
    error row while the others go on."""
    return 32 * math.ceil(load_model(MODEL).max_length / 32)


@pytest.fixture(scope="module")
def run(filter_dir, too_long, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval") / "out")
    proc = evaluate("--filter", filter_dir, "--gen-length", f"64,{too_long}", "--limit", "6", "--output", out)
    return out, proc


def test_every_method_answers_every_example_and_is_timed_on_the_sample(run, too_long):
    out, proc = run
    rows = results(out)
    methods = expand_methods(METHODS.split(","), [0.7])
    assert sorted({r["method"] for r in rows}) == sorted(methods)
    keys = [(r["example_id"], r["method"]) for r in rows]
    assert len(keys) == len(set(keys)) == 6 * len(methods)            # one row per example and method
    by = {(r["example_id"], r["method"]): r for r in rows}
    sample = {r["example_id"] for r in rows if r["method"] == "vanilla" and r["timed"]}
    assert len(sample) == 2                                             # one timed batch of 2
    for (ex, method), r in by.items():
        assert r["gen_length"] == 64
        own_form = "+eotp" in method
        assert r["timed"] == (own_form or ex in sample)                 # forms with EoTP are always their own
        if not r["timed"]:
            assert r["nfe"] is None and r["batch_seconds"] is None
            continue
        assert r["nfe"] >= 1
        if method == "vanilla":
            assert r["nfe"] == 64 and sum(r["forwards_per_block"]) == 64
        if method == "egp":   # the oracle writes the vanilla answer of the same run, so it scores the same
            assert r["completion"] == by[(ex, "vanilla")]["completion"]
            assert r["correct"] == by[(ex, "vanilla")]["correct"]
            assert r["nfe"] <= by[(ex, "vanilla")]["nfe"]
    errors = storage.read_dataset(storage.join(out, "errors")).to_pylist()
    assert len(errors) == 6 and all(e["gen_length"] == too_long and "context" in e["error"] for e in errors)
    assert "this run: 12 examples, 6 failures" in proc.stdout


def test_report_agrees_with_the_rows(run):
    out, proc = run
    rows = results(out)
    report = json.loads(Path(out, "report.json").read_text())
    assert report["errors"] == 6 and report["hardware"]["devices"]
    summary = {r["method"]: r for r in report["summary"]}
    for method, s in summary.items():
        mine = [r for r in rows if r["method"] == method]
        timed = [r for r in mine if r["timed"]]
        assert s["examples"] == len(mine) and s["timed_examples"] == len(timed)
        assert math.isclose(s["accuracy"], 100 * sum(r["correct"] for r in mine) / len(mine))   # every example
        assert math.isclose(s["nfe"], sum(r["nfe"] for r in timed) / len(timed))                # the timed ones
        assert math.isclose(s["tpf"], sum(r["answer_tokens"] for r in timed) / sum(r["nfe"] for r in timed))
        assert math.isclose(s["nfe_speedup"], summary["vanilla"]["nfe"] / s["nfe"])
    assert summary["vanilla"]["timed_examples"] == 2 and summary["vanilla+eotp"]["timed_examples"] == 6
    assert summary["learn2pd+eotp"]["nfe"] < summary["vanilla"]["nfe"]
    assert {a["family"] for a in report["aup"]} == {"threshold+eotp", "learn2pd+eotp"}
    md = Path(out, "report.md").read_text()
    assert "learn2pd+eotp" in md and "tiny, gen length 64" in md and "4.21x" in md
    assert "| sample: 2 ex., 1 batch" in md and "| all |" in md          # which figures come from the sample
    for png in ("tradeoff.png", "forwards_per_block.png"):
        assert Path(out, png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| learn2pd+eotp |" in proc.stdout                       # the table is printed at the end


def test_the_sampled_run_answers_as_a_full_decode(run, filter_dir, tmp_path):
    """Every method's answers, and so its accuracy, are those of decoding every example with the method itself."""
    out, _ = run
    full = str(tmp_path / "full")
    evaluate("--filter", filter_dir, "--gen-length", "64", "--limit", "6", "--output", full, "--full")
    answers = lambda rows: {(r["example_id"], r["method"]): (r["completion"], r["correct"]) for r in rows}
    full_rows = results(full)
    assert all(r["timed"] for r in full_rows)
    assert answers(results(out)) == answers(full_rows)
    accuracy = lambda o: {r["method"]: r["accuracy"] for r in json.loads(Path(o, "report.json").read_text())["summary"]}
    assert accuracy(out) == accuracy(full)


def test_rerun_resumes_without_duplicates(run, filter_dir, too_long):
    out, _ = run
    before = sorted((r["example_id"], r["method"], r["completion"]) for r in results(out))
    again = evaluate("--filter", filter_dir, "--gen-length", f"64,{too_long}", "--limit", "6", "--output", out)
    assert "0 to decode" in again.stdout
    parts = storage.list_parts(storage.join(out, "results"))
    # as if a batch with results had been interrupted (a batch of only undecodable examples writes no rows)
    storage.delete_file(next(p for p in parts if pq.read_metadata(p).num_rows))
    lost = len(before) - len(results(out))
    assert lost > 0
    resumed = evaluate("--filter", filter_dir, "--gen-length", f"64,{too_long}", "--limit", "6", "--output", out)
    assert f"{lost // len(expand_methods(METHODS.split(','), [0.7]))} to decode" in resumed.stdout
    assert sorted((r["example_id"], r["method"], r["completion"]) for r in results(out)) == before


def test_other_settings_or_missing_filter_fail_in_one_line(run, filter_dir, tmp_path):
    out, _ = run
    proc = evaluate("--filter", filter_dir, "--gen-length", "64", "--limit", "6", "--methods", "vanilla,threshold",
                    "--output", out, check=False)
    assert proc.returncode == 1 and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    proc = evaluate("--filter", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o"), check=False)
    assert proc.returncode == 1 and "jobs/train_filter.py" in proc.stderr and "Traceback" not in proc.stderr
    proc = evaluate("--benchmarks", "tiny,nonsense", "--methods", "vanilla", "--output", str(tmp_path / "o"), check=False)
    assert proc.returncode == 1 and "nonsense" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- aggregation, against plain arithmetic
def test_aup_matches_a_hand_computation():
    # Points (TPF, accuracy %): the 30% point is > 5 below the first (80) and is dropped.
    pts = [(1.0, 80.0), (2.0, 78.0), (4.0, 30.0), (3.0, 76.0)]
    w = lambda y: y * min(math.exp(-3 * (1 - y / 80.0)), 1.0)
    expected = 1.0 * w(80) + (w(80) + w(78)) / 2 + (w(78) + w(76)) / 2
    assert math.isclose(aup(pts), expected)
    assert math.isclose(aup([(2.0, 50.0)]), 100.0)


def test_summary_speedups_use_the_same_batches():
    def row(method, ex, correct, nfe, tokens, batch, seconds):
        return {"benchmark": "b", "gen_length": 32, "example_id": ex, "method": method, "threshold": None,
                "completion": "", "correct": correct, "scores": "{}", "timed": True, "nfe": nfe, "answer_tokens": tokens,
                "decode_seconds": seconds, "batch_id": batch, "batch_seconds": seconds, "forwards_per_block": [nfe]}
    table = pa.Table.from_pylist([row("vanilla", "1", True, 32, 10, "x", 4.0), row("vanilla", "2", False, 32, 6, "x", 4.0),
                                  row("learn2pd", "1", True, 4, 10, "x", 0.5), row("learn2pd", "2", True, 2, 6, "x", 0.5)],
                                 schema=RESULTS)
    s = {r["method"]: r for r in summarize(table)}
    assert s["vanilla"]["tps"] == 16 / 4.0 and s["learn2pd"]["tps"] == 16 / 0.5    # batch time counted once
    assert s["learn2pd"]["speedup"] == 8.0 and s["learn2pd"]["nfe_speedup"] == 32 / 3
    assert s["learn2pd"]["accuracy"] == 100 and s["learn2pd"]["accuracy_delta"] == 50


def test_method_names_are_canonical_and_never_decoded_twice():
    assert expand_methods(["learn2pd+eotp", "threshold"], [0.5, 0.9]) == \
        ["vanilla", "learn2pd+eotp", "threshold", "threshold+eotp@0.5", "threshold+eotp", "learn2pd+eotp@0.5",
         "learn2pd+eotp@0.9"]   # the sweep is of the +eotp forms; threshold+eotp@0.9 is threshold+eotp
    context = FilterMLP(32, threshold=0.99)   # τ comes from the filter's sidecar
    assert expand_methods(["learn2pd", "learn2pd@0.99", "learn2pd+dual+eotp", "learn2pd+eotp+dual@0.99",
                           "threshold@0.9", "threshold", "vanilla"], filter=context) == \
        ["vanilla", "learn2pd", "learn2pd+eotp+dual", "threshold"]
    assert exact_form("threshold+dual@0.7") == "threshold+eotp+dual@0.7" and exact_form("vanilla+eotp") == "vanilla+eotp"
    assert exact_form("learn2pd+eotp-commit") == "learn2pd+eotp-commit"   # changes answers: its own form
    cfg = DecodeConfig.from_method("threshold@0.7")
    assert cfg.policy == "threshold" and cfg.tau() == 0.7
    with pytest.raises(Exception, match="not a threshold"):
        DecodeConfig.from_method("threshold@high")


def test_default_methods_resolve_to_distinct_decodes(filter_dir):
    """`jobs/evaluate.py --limit 16 --gen-length 256` with the default methods runs no method twice."""
    job = _evaluate_job()
    for sweep in ("", "0.5,0.7,0.9,0.95,0.99"):
        methods, _, meta = job.validate(job.parse_args(["--filter", filter_dir, "--limit", "16", "--gen-length", "256",
                                                        "--sweep", sweep]))
        filt = load_filter(filter_dir)
        decodes = [DecodeConfig.from_method(m) for m in methods]
        settings = [(c.policy, c.eotp, c.cache, c.tau(filt)) for c in decodes]
        assert len(settings) == len(set(settings)) == len(methods)
    assert job.validate(job.parse_args(["--filter", filter_dir]))[0][:len(DEFAULT_METHODS)] == list(DEFAULT_METHODS)


def _evaluate_job():
    import importlib.util
    spec = importlib.util.spec_from_file_location("evaluate_job", ROOT / "jobs" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def test_batches_spread_over_every_actor_the_untimed_ones_wide_and_the_sample_survives_a_resume():
    job = _evaluate_job()
    rows = [{"benchmark": "tiny", "gen_length": g, "example_id": str(i), "prompt": "p", "target": "{}"}
            for g, n in ((256, 200), (1024, 6)) for i in range(n)]
    chunks = job.chunks(rows, set(), batch_size=16, actors=2, timed_batches=1)
    batches = [json.loads(c["rows"]) for c in chunks]
    # The first batch of each group is timed and holds at most a batch of examples (gen 1024: 6 split over 2
    # actors); the rest goes in wide batches for the actors' slots, split over both actors; timed ones first, then
    # the longest generations.
    assert [(len(b), c["timed"], c["gen_length"]) for b, c in zip(batches, chunks)] == \
        [(3, True, 1024), (16, True, 256), (2, False, 1024), (1, False, 1024), (92, False, 256), (92, False, 256)]
    full = job.chunks(rows, set(), batch_size=16, actors=2, timed_batches=None)
    assert [(len(json.loads(c["rows"])), c["timed"]) for c in full] == [(3, True), (3, True), (100, True), (100, True)]
    assert len(job.chunks(rows * 3, set(), batch_size=16, actors=2, timed_batches=None)) > 4   # at most 8 x 16 each
    # a resume: the first 256 batch was half written; its other half is still the timed sample
    done = {job.key(r) for r in batches[1][:8]}
    resumed = job.chunks(rows, done, batch_size=16, actors=2, timed_batches=1)
    assert [(len(json.loads(c["rows"])), c["timed"]) for c in resumed] == \
        [(3, True), (8, True), (2, False), (1, False), (92, False), (92, False)]
    assert all(len({(r["benchmark"], r["gen_length"]) for r in b}) == 1 for b in batches)
    assert sorted(r["example_id"] + str(r["gen_length"]) for b in batches for r in b) == \
        sorted(r["example_id"] + str(r["gen_length"]) for r in rows)


# ---------------------------------------------------------------- paired bootstrap of the accuracy difference
def outcomes(method, correct, ids=None, bench="b", gen=32):
    """Result rows of one method: correct[i] for example ids[i] (default "000", "001", ...)."""
    ids = ids or [f"{i:03d}" for i in range(len(correct))]   # zero-padded: sorted ids keep the list order
    return [{"benchmark": bench, "gen_length": gen, "example_id": ex, "method": method, "threshold": None,
             "completion": "", "correct": c, "scores": "{}", "timed": True, "nfe": 4, "answer_tokens": 4, "decode_seconds": 1.0,
             "batch_id": "x", "batch_seconds": 1.0, "forwards_per_block": [4]} for ex, c in zip(ids, correct)]


def reference_bootstrap(mine, base, resamples=2000, seed=0):
    """Plain loops: the same resampled example indices, each resample's mean difference, and the 2.5th and
    97.5th percentiles by linear interpolation between order statistics."""
    import numpy as np
    diff = [100 * (int(m) - int(b)) for m, b in zip(mine, base)]
    picks = np.random.default_rng(seed).integers(0, len(diff), size=(resamples, len(diff)))
    means = sorted(sum(diff[i] for i in row) / len(diff) for row in picks.tolist())

    def pct(q):
        pos = q / 100 * (len(means) - 1)
        lo = int(pos)
        return means[lo] + (means[min(lo + 1, len(means) - 1)] - means[lo]) * (pos - lo)
    return sum(diff) / len(diff), [pct(2.5), pct(97.5)]


def test_cache_effects_pair_each_cached_method_with_the_same_method_without_it():
    """learn2pd+eotp+dual answers 2 of 40 examples worse than learn2pd+eotp and twice as fast; threshold+prefix@0.7
    is compared with threshold@0.7 (not with vanilla); a cached method whose plain twin did not run is left out."""
    rows = (outcomes("vanilla", [False] * 40) + outcomes("learn2pd+eotp", [True] * 40)
            + outcomes("learn2pd+eotp+dual", [False] * 2 + [True] * 38)
            + outcomes("threshold@0.7", [True] * 40) + outcomes("threshold+prefix@0.7", [True] * 40)
            + outcomes("factor+dual", [True] * 40))
    for r in rows:
        if r["method"] == "learn2pd+eotp+dual":
            r["batch_seconds"] = 0.5
    results = pa.Table.from_pylist(rows, schema=RESULTS)
    got = {c["method"]: c for c in cache_effects(results, summarize(results))}
    assert sorted(got) == ["learn2pd+eotp+dual", "threshold+prefix@0.7"]
    dual = got["learn2pd+eotp+dual"]
    assert dual["without_cache"] == "learn2pd+eotp" and dual["paired_examples"] == 40
    assert (dual["acc_diff"], dual["acc_diff_ci"]) == paired_accuracy_diff(outcomes("x", [False] * 2 + [True] * 38),
                                                                           outcomes("y", [True] * 40))[1:]
    assert math.isclose(dual["tps_ratio"], 2.0) and dual["within_2_points"] == (dual["acc_diff_ci"][0] >= -2)
    assert got["threshold+prefix@0.7"]["acc_diff"] == 0.0 and got["threshold+prefix@0.7"]["within_2_points"]
    assert "| tiny" not in markdown([], cache=[]) and "| learn2pd+eotp+dual | learn2pd+eotp | 40 |" in \
        markdown([], cache=list(got.values()))


def test_identical_methods_differ_by_exactly_zero():
    van = outcomes("vanilla", [True, False] * 20)
    assert paired_accuracy_diff(outcomes("egp", [True, False] * 20), van) == (40, 0.0, [0.0, 0.0])


def test_k_more_correct_examples():
    n, k = 40, 3
    van = outcomes("vanilla", [False] * n)
    m = outcomes("learn2pd", [True] * k + [False] * (n - k))
    got_n, diff, (lo, hi) = paired_accuracy_diff(m, van)
    assert got_n == n and math.isclose(diff, 100 * k / n)            # 7.5 points
    assert 0.0 <= lo <= diff <= hi <= 100.0                          # never worse: the interval cannot go below 0
    assert lo < diff < hi
    # correct on all 40 where vanilla is wrong on all: every resample is +100
    assert paired_accuracy_diff(outcomes("m", [True] * n), van) == (n, 100.0, [100.0, 100.0])


def test_one_lost_example_of_40_is_not_resolved_as_a_loss_within_1_point():
    van = outcomes("vanilla", [True] * 40)
    _, diff, (lo, hi) = paired_accuracy_diff(outcomes("m", [False] + [True] * 39), van)
    # P(the lost example is drawn 0 times) = (39/40)^40 = 0.36 > 2.5%, so the upper end is 0; it is drawn
    # 3 or more times in ~8% and 4 or more in ~2% of resamples, so the lower end is near -7.5 points
    assert diff == -2.5 and hi == 0.0 and -10.0 <= lo <= -5.0


def test_interval_matches_a_plain_reference():
    mine = [True, True, False, True, False, True, True, False, True, True] * 4
    base = [True, False, False, True, True, False, True, False, False, True] * 4
    n, diff, ci = paired_accuracy_diff(outcomes("m", mine), outcomes("vanilla", base))
    ref_diff, ref_ci = reference_bootstrap(mine, base)
    assert n == 40 and math.isclose(diff, ref_diff) and all(math.isclose(a, b) for a, b in zip(ci, ref_ci))
    assert paired_accuracy_diff(outcomes("m", mine), outcomes("vanilla", base)) == (n, diff, ci)   # seeded
    assert paired_accuracy_diff(outcomes("m", mine), outcomes("vanilla", base), seed=1)[2] != ci
    # the row order does not matter (results arrive in any order from the actors)
    assert paired_accuracy_diff(outcomes("m", mine)[::-1], outcomes("vanilla", base)) == (n, diff, ci)


def test_only_examples_present_for_both_are_paired():
    van = outcomes("vanilla", [True, True, False], ids=["a", "b", "c"])          # "d" failed for vanilla
    m = outcomes("m", [True, True, False], ids=["b", "c", "d"])                   # "a" failed for the method
    n, diff, _ = paired_accuracy_diff(m, van)
    assert n == 2 and diff == 50.0                                               # b: 0, c: +100
    assert paired_accuracy_diff(m, []) == (0, None, None)


def test_summary_and_report_carry_the_interval():
    van = [True] * 20 + [False] * 20
    ours = [False] + [True] * 19 + [True] + [False] * 19          # loses example 0, wins example 20: diff 0
    table = pa.Table.from_pylist(outcomes("vanilla", van) + outcomes("learn2pd+eotp", ours) +
                                 outcomes("egp", van), schema=RESULTS)
    summary = summarize(table)
    s = {r["method"]: r for r in summary}
    assert s["egp"]["acc_diff"] == 0.0 and s["egp"]["acc_diff_ci"] == [0.0, 0.0]
    assert s["learn2pd+eotp"]["acc_diff"] == 0.0 and s["learn2pd+eotp"]["paired_examples"] == 40
    lo, hi = s["learn2pd+eotp"]["acc_diff_ci"]
    assert lo <= -2.5 and hi >= 2.5
    json.dumps(summary)                                                          # report.json can hold it
    # the point estimate is 0, but the interval does not rule out losing more than 1 point
    [check] = target_checks(summary)
    assert check["accuracy_within_1_point"] is False and check["acc_diff_ci"] == [lo, hi]
    same = summarize(pa.Table.from_pylist(outcomes("vanilla", van) + outcomes("learn2pd+eotp", van), schema=RESULTS))
    assert target_checks(same)[0]["accuracy_within_1_point"] is True
    md = markdown(summary, checks=[check])
    assert "40 examples: one example = 2.5 accuracy points" in md and "Δacc vs vanilla [95% CI]" in md
    assert f"| +0.0 [{lo:+.1f}, {hi:+.1f}] |" in md and "| +0.0 [+0.0, +0.0] |" in md    # learn2pd+eotp, egp
    assert "lower end ≥ -1" in md and f"**no** +0.0 [{lo:+.1f}, {hi:+.1f}]" in md
    assert not any(line.startswith("| vanilla |") and "[" in line for line in md.splitlines())
