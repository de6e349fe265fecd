"""jobs/pipeline.py submitted with `ray job submit` to a real local Ray cluster: one run directory, all three
stages, and a second submission that finds every stage complete."""
import subprocess
from pathlib import Path

from learn2pd_core import storage

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--per-task", "1", "--collect-gen-length", "32", "--epochs", "200", "--gen-lengths", "32", "--limit", "3",
        "--num-actors", "1", "--stage-args", "collect:--limit 4", "--stage-args", "evaluate:--sweep 0.7",
        "--stage-args", "train_filter:--report-every 200"]


def submit(address, env, run_dir):
    proc = subprocess.run(["ray", "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
                           "python", "jobs/pipeline.py", "--run-dir", run_dir, *FAST],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    return proc.stdout


def test_pipeline_runs_every_stage_then_skips_them(ray_cluster, tmp_path):
    address, env = ray_cluster
    run = str(tmp_path / "run")
    first = submit(address, env, run)
    for stage in ("collect", "train_filter", "evaluate"):
        assert f"== {stage}: python jobs/{stage}.py" in first
    refs = storage.read_dataset(storage.join(run, "collect", "references"))
    assert refs.num_rows == 4
    assert storage.exists(storage.join(run, "filter", "filter.safetensors"))
    results = storage.read_dataset(storage.join(run, "evaluate", "results"))
    per_benchmark = {}
    for r in results.select(["benchmark", "example_id"]).to_pylist():
        per_benchmark.setdefault(r["benchmark"], set()).add(r["example_id"])
    assert {b: len(ids) for b, ids in per_benchmark.items()} == {"tiny": 3, "tiny-long": 3}   # the default pair
    assert "| learn2pd+eotp |" in first and "pipeline complete" in first
    # A console a person can read: the stages' lines, progress bars and report; Ray's own output is in the log.
    log = Path(run, "pipeline.log").read_text()
    assert f"Ray's output goes to {Path(run, 'pipeline.log')}" in first
    for noise in ("execution finished", "TrainController", "Reporting training result"):
        assert noise not in first and noise in log

    second = submit(address, env, run)
    for stage in ("collect", "train_filter", "evaluate"):
        assert f"== {stage}: already complete, skipped" in second
    assert "| learn2pd+eotp |" in second                    # the report is shown again
    assert storage.read_dataset(storage.join(run, "evaluate", "results")).num_rows == results.num_rows
