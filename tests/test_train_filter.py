"""jobs/train_filter.py end to end: traces from the tiny model, real local Ray Train, real S3-API server."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from learn2pd_core import ContextFilter, DecodeConfig, FilterMLP, generate, load_filter, load_model, storage
from learn2pd_core.tiny.tasks import instruction_examples
from learn2pd_core.traces import collect_batch

# the jobs connect to the session's Ray cluster (conftest.ray_cluster) rather than each starting one
pytestmark = pytest.mark.usefixtures("ray_cluster")

ROOT = Path(__file__).resolve().parents[1]
MODEL = os.environ.get("LEARN2PD_TEST_MODEL", "tiny")
FIT = ["--epochs", "300", "--lr", "3e-3", "--eval-every", "10", "--report-every", "100", "--val-fraction", "0.25"]


def train_filter(*args, check=True):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "train_filter.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode:
        raise AssertionError(f"train_filter failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def write_traces(root, table, manifest=None):
    storage.write_table(storage.join(root, "traces", "part-0.parquet"), table)
    storage.write_json(storage.join(root, "manifest.json"), manifest or {"model": MODEL, "finished": "t",
                                                                       "decode": {"gen_length": 64, "block_size": 32}})
    return root


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL)


@pytest.fixture(scope="module")
def traces(model, tmp_path_factory):
    """EGP traces of the tiny model on instruction prompts (the collect job's own batch function)."""
    rows = [{"prompt_id": e["id"], "task": e["task"], "prompt": e["prompt"]} for e in instruction_examples(4, seed=3)]
    table, _, errors = collect_batch(model, rows, gen_length=64, block_size=32, batch_size=16)
    assert errors.num_rows == 0 and table.num_rows > len(rows)
    return write_traces(str(tmp_path_factory.mktemp("traces")), table)


@pytest.fixture(scope="module")
def fitted(traces, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("filter"))
    return out, train_filter("--traces", traces, "--output", out, *FIT)


def test_fit_beats_the_base_rate_and_the_filter_decodes(fitted, model):
    out, proc = fitted
    m = json.loads(Path(out, "metrics.json").read_text())
    assert m["parameters"] == ContextFilter(32).metadata()["parameters"] and m["block_size"] == 32
    assert m["variant"] == "context"   # the default
    assert m["best_val_loss"] < 0.75 * m["base_rate_val_loss"], m
    assert m["history"][-1]["train_loss"] < m["history"][0]["train_loss"]
    assert set(m["commit"]) == {"0.9", "0.96", "0.99"}
    recalls = [m["commit"][t]["recall"] for t in ("0.9", "0.96", "0.99")]
    assert recalls == sorted(recalls, reverse=True)          # a higher τ commits less
    assert Path(out, "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "best epoch" in proc.stdout.splitlines()[-1]

    filt = load_filter(out)
    assert isinstance(filt, ContextFilter) and filt.provenance["model"] == MODEL and filt.threshold == 0.99
    prompts = [e["prompt"] for e in instruction_examples(1, seed=4)][:6]
    vanilla = generate(model, prompts, DecodeConfig(gen_length=64, block_size=32))
    fast = generate(model, prompts, DecodeConfig(gen_length=64, block_size=32, policy="learn2pd"), filter=filt)
    assert sum(r.nfe for r in fast) < sum(r.nfe for r in vanilla)
    assert all(r.token_ids and model.mask_token_id not in r.token_ids for r in fast)


def test_rerun_is_skipped_and_overwrite_refits_identically(fitted, traces):
    out, _ = fitted
    outputs = lambda: {p.name: p.read_bytes() for p in Path(out).iterdir() if p.suffix != ".log"}   # not the run log
    before = outputs()
    again = train_filter("--traces", traces, "--output", out, *FIT)
    assert "already holds this fit" in again.stdout
    assert outputs() == before
    train_filter("--traces", traces, "--output", out, *FIT, "--overwrite")
    assert Path(out, "filter.safetensors").read_bytes() == before["filter.safetensors"]   # seeded: same fit
    assert not Path(out, "_ray_train").exists()


def test_two_workers_and_s3_output_give_the_same_filter(fitted, traces, s3_server):
    out, _ = fitted
    uri = f"{s3_server}/filters/two-workers"
    train_filter("--traces", traces, "--output", uri, *FIT, "--num-workers", "2")
    two, one = storage.read_json(f"{uri}/metrics.json"), json.loads(Path(out, "metrics.json").read_text())
    assert two["num_workers"] == 2
    # DDP over 2 shards follows the full-batch trajectory of one worker (Ray's equal split may drop one row)
    curve = lambda m: np.array([[h["train_loss"], h["val_loss"]] for h in m["history"]])
    assert np.allclose(curve(two), curve(one), rtol=2e-2), (curve(two)[-3:], curve(one)[-3:])
    assert two["base_rate_val_loss"] == pytest.approx(one["base_rate_val_loss"], rel=1e-2)
    assert load_filter(uri).metadata()["parameters"] == one["parameters"]
    assert storage.exists(f"{uri}/loss_curve.png")


def test_non_finite_rows_are_dropped_and_reported_and_the_paper_variant_fits(traces, tmp_path):
    table = storage.read_dataset(storage.join(traces, "traces"))
    conf = np.array(table.column("confidence").to_pylist(), dtype=np.float32)
    conf[0, 3] = np.nan
    conf[1, 0] = np.inf
    bad = table.set_column(table.schema.get_field_index("confidence"), "confidence",
                           pa.array(conf.tolist(), pa.list_(pa.float32())))
    src = write_traces(str(tmp_path / "nan"), bad)
    # also the paper's variant (one Ray Train run less in the suite): its 2,112-parameter MLP and τ 0.96
    proc = train_filter("--traces", src, "--output", str(tmp_path / "out"), "--epochs", "20", "--report-every", "20",
                        "--variant", "paper")
    assert f"dropping 2 of {table.num_rows} trace rows" in proc.stdout
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["dropped_non_finite"] == 2 and np.isfinite(m["best_val_loss"])
    assert (m["variant"], m["parameters"]) == ("paper", 2112)
    filt = load_filter(str(tmp_path / "out"))
    assert isinstance(filt, FilterMLP) and filt.threshold == 0.96


def test_bad_trace_sets_fail_with_one_line(traces, tmp_path):
    empty = train_filter("--traces", str(tmp_path / "nothing"), "--output", str(tmp_path / "o1"), check=False)
    assert empty.returncode != 0 and empty.stderr.strip().count("\n") == 0
    assert "no trace parts" in empty.stderr and "jobs/collect.py" in empty.stderr

    table = storage.read_dataset(storage.join(traces, "traces"))
    narrow = table.slice(0, 3).set_column(table.schema.get_field_index("confidence"), "confidence",
                                          pa.array([[0.5] * 16] * 3, pa.list_(pa.float32())))
    mixed = str(tmp_path / "mixed")
    write_traces(mixed, table)
    storage.write_table(storage.join(mixed, "traces", "part-1.parquet"), narrow)
    proc = train_filter("--traces", mixed, "--output", str(tmp_path / "o2"), "--epochs", "5", check=False)
    assert proc.returncode != 0 and "mix block sizes [16, 32]" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "o2" / "filter.safetensors").exists()
