"""jobs/collect.py end to end on the tiny model: real local Ray, real S3-API server on loopback."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from learn2pd_core import DecodeConfig, generate, load_model, storage

# the jobs connect to the session's Ray cluster (conftest.ray_cluster) rather than each starting one
pytestmark = pytest.mark.usefixtures("ray_cluster")

ROOT = Path(__file__).resolve().parents[1]
MODEL = os.environ.get("LEARN2PD_TEST_MODEL", "tiny")   # another checkpoint directory may stand in
FAST = ["--model", MODEL, "--gen-length", "64", "--block-size", "32", "--batch-size", "4"]


def collect(*args, env=None, check=True):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "collect.py"), *FAST, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    if check and proc.returncode:
        raise AssertionError(f"collect failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def rows(output, kind):
    table = storage.read_dataset(storage.join(output, kind))
    return sorted(table.to_pylist(), key=lambda r: (r["prompt_id"], r.get("block", 0), r.get("step", 0))) if table else []


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("collect") / "out")
    proc = collect("--limit", "8", "--output", out)
    return out, proc


def test_traces_match_the_oracle(local_run):
    out, proc = local_run
    assert "collect: 8 prompts" in proc.stdout.splitlines()[-1] and "0 failures" in proc.stdout.splitlines()[-1]
    traces, refs = rows(out, "traces"), rows(out, "references")
    assert storage.read_dataset(storage.join(out, "traces")).schema.equals(
        __import__("learn2pd_core.traces", fromlist=["TRACES"]).TRACES)
    assert len(refs) == 8 and len({r["prompt_id"] for r in refs}) == 8
    for ref in refs:
        mine = [t for t in traces if t["prompt_id"] == ref["prompt_id"]]
        assert len(mine) == ref["egp_nfe"] == ref["trace_rows"]          # one trace row per EGP forward pass
        assert ref["reference_nfe"] <= 64 and len(ref["reference_ids"]) == 64
        for a, b in zip(mine, mine[1:]):
            if a["block"] != b["block"]:
                continue
            newly = [i for i in range(32) if a["masked"][i] and not b["masked"][i]]
            hits = [i for i in range(32) if a["masked"][i] and a["correct"][i]]
            # EGP commits exactly the correct masked predictions, or one forced token when there are none.
            assert newly == hits if hits else len(newly) == 1
    # The reference (decoded in vanilla's EoTP block form) is vanilla's full greedy answer, token for token.
    model = load_model(MODEL)
    vanilla = generate(model, [model.encode_prompt(r["prompt"], chat=True) for r in refs],
                       DecodeConfig(gen_length=64, block_size=32))
    for ref, v in zip(refs, vanilla):
        end = v.answer_tokens + 1
        assert ref["reference_text"] == v.text and ref["reference_ids"][:end] == v.token_ids[:end]
    manifest = storage.read_json(storage.join(out, "manifest.json"))
    assert manifest["counts"] == {"prompts": 8, "collected": 8, "trace_rows": len(traces), "errors": 0,
                                  "errors_by_reason": {}}
    assert manifest["decode"]["gen_length"] == 64 and manifest["model"] == MODEL


def test_rerun_is_idempotent_and_resumes(local_run, tmp_path):
    out, _ = local_run
    again = collect("--limit", "8", "--output", out)
    assert "8 already done, 0 to collect" in again.stdout
    # Simulate a kill: one batch lost its reference part (its traces part is now an orphan) and a temp file is left.
    broken = str(tmp_path / "broken")
    subprocess.run(["cp", "-r", out, broken], check=True)
    lost = sorted(Path(broken, "references").glob("part-*.parquet"))[0]
    lost.unlink()
    Path(broken, "traces", ".part-x.parquet.123.tmp").write_bytes(b"partial")
    resumed = collect("--limit", "8", "--output", broken)
    assert "4 already done, 4 to collect" in resumed.stdout
    for kind in ("traces", "references"):
        assert rows(broken, kind) == rows(out, kind)


def test_s3_prompts_and_output_equal_local_output(local_run, s3_server):
    out, _ = local_run
    uri = f"{s3_server}/run1"
    # The same 8 prompts, read from a JSONL object on the S3 server instead of the built-in family.
    from learn2pd_core.prompts import load_prompts
    prompts = f"{s3_server}/inputs/prompts.jsonl"
    storage.write_bytes(prompts, "\n".join(json.dumps(r) for r in load_prompts(limit=8)).encode())
    proc = collect("--prompts", prompts, "--output", uri)
    assert "testing-secret" not in proc.stdout + proc.stderr
    for kind in ("traces", "references"):
        assert rows(uri, kind) == rows(out, kind)
    assert "testing-secret" not in json.dumps(storage.read_json(storage.join(uri, "manifest.json")))


def test_bad_prompts_are_recorded_and_skipped(tmp_path):
    src = tmp_path / "prompts.jsonl"
    good = [{"prompt_id": f"ok{i}", "task": "reverse", "prompt": f"Reverse the word: abc{i}"} for i in range(3)]
    bad = [{"prompt_id": "empty", "task": "reverse", "prompt": "  "},
           {"prompt_id": "huge", "task": "reverse", "prompt": "x" * 5000},
           {"prompt_id": "notext", "task": "reverse", "prompt": None},
           {"task": "reverse", "prompt": 7}]
    lines = [json.dumps(r).encode() for r in good + bad] + [
        b'{"task": "reverse", "prompt": "caf\xe9"}', b'{"task": "reverse", "prompt": "a \\udc80 b"}', b"{oops"]
    src.write_bytes(b"\n".join(lines))
    out = str(tmp_path / "out")
    proc = collect("--prompts", str(src), "--output", out)
    errors = {r["prompt_id"]: r["error"] for r in rows(out, "errors")}
    assert set(errors) == {"empty", "huge", "notext", f"{src} line 7", f"{src} line 8", f"{src} line 9",
                           f"{src} line 10"}
    assert errors["empty"].startswith(f"empty prompt: {src} line 4: ") and errors["notext"].startswith("missing column")
    assert errors[f"{src} line 7"].startswith(f"not text: {src} line 7: 'prompt' is int")
    assert errors[f"{src} line 8"].startswith(f"not UTF-8: {src} line 8: byte 0xe9")
    assert errors[f"{src} line 9"].startswith(f"lone surrogate: {src} line 9: 'prompt' holds the lone surrogate")
    assert errors[f"{src} line 10"].startswith(f"not JSON: {src} line 10: ")
    # Too long for the model: found by the actor that tokenises it, the rest of its batch goes on.
    assert re.search(r"prompt of \d{4} tokens \+ gen_length 64 exceeds the model's context of \d+", errors["huge"])
    assert {r["prompt_id"] for r in rows(out, "references")} == {"ok0", "ok1", "ok2"}
    said = proc.stdout.splitlines()
    # The rows that are not prompts are said before Ray starts, in one line with their count and the first.
    assert said[0].startswith(f"{src}: 6 failures (") and f"the first: empty: empty prompt: {src} line 4" in said[0]
    assert "to collect" in said[1]
    assert any(line.startswith("collect: 7 failures (") and "1 too long" in line for line in said)
    assert "7 failures" in said[-1]
    counts = storage.read_json(storage.join(out, "manifest.json"))["counts"]
    assert counts["prompts"] == 10 and counts["collected"] == 3 and counts["errors"] == 7
    assert counts["errors_by_reason"] == {"empty prompt": 1, "too long": 1, "missing column": 1, "not text": 1,
                                          "not UTF-8": 1, "lone surrogate": 1, "not JSON": 1}


def test_a_fixed_line_is_collected_and_no_other_prompt_again(tmp_path):
    src, out = tmp_path / "prompts.jsonl", str(tmp_path / "out")
    line = lambda text: json.dumps({"task": "reverse", "prompt": f"Reverse the word: {text}"}).encode()   # noqa: E731
    src.write_bytes(b"\n".join([line("one"), b'{"task": "reverse", "prompt": "caf\xe9"}', line("three")]))
    first = collect("--prompts", str(src), "--output", out)
    assert "1 failure (1 not UTF-8)" in first.stdout and "1 failures" in first.stdout.splitlines()[-1]
    before = {r["prompt_id"] for r in rows(out, "references")}
    src.write_bytes(b"\n".join([line("zero"), line("one"), line("café"), line("three")]))   # fixed, and one more
    second = collect("--prompts", str(src), "--output", out)
    assert "2 already done, 2 to collect" in second.stdout
    after = {r["prompt_id"] for r in rows(out, "references")}
    assert before < after and len(after) == 4 and rows(out, "errors") == []
    assert storage.read_json(storage.join(out, "manifest.json"))["counts"]["errors"] == 0


def test_a_flan_shaped_directory_is_sampled_and_collected(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from prompts_sample import flan_rows, write_shards
    from learn2pd_core.prompts import read_prompts
    shards = tmp_path / "flan"
    write_shards(flan_rows(600, seed=4, tasks=3), shards, [("a.jsonl", 0.5), ("b/c.parquet", 0.5)])
    out = str(tmp_path / "out")
    proc = collect("--prompts", str(shards), "--per-task", "2", "--output", out)
    assert "collect: 8 prompts from" in proc.stdout and "0 failures" in proc.stdout.splitlines()[-1]
    expected = {r["prompt_id"] for r in read_prompts(str(shards), per_task=2).rows}
    assert {r["prompt_id"] for r in rows(out, "references")} == expected and len(expected) == 8


@pytest.mark.parametrize("when", ["while Ray starts", "while collecting"])
def test_ctrl_c_ends_the_job_in_one_line_and_leaves_no_ray_process(tmp_path, when):
    """As a terminal does it: SIGINT to the job's whole process group, the local Ray instance it started included."""
    out = tmp_path / "out"
    job = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "collect.py"), *FAST, "--per-task", "40",
                            "--output", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True, env={**os.environ, "RAY_ADDRESS": "local"})
    try:
        assert "to collect" in job.stdout.readline()
        time.sleep(2.5)   # ray.init takes seconds here: the press comes in the middle of it
        deadline = time.monotonic() + 300
        while when == "while collecting" and not list(out.glob("references/part-*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        os.killpg(job.pid, signal.SIGINT)
        interrupted = time.monotonic()
        _, stderr = job.communicate(timeout=120)
        took = time.monotonic() - interrupted
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("collect: ")]  # the bar
    assert lines == ["interrupted: rerun the same command to resume"] and job.returncode == 1, stderr[-3000:]
    assert took < 30, took
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:   # Ray's processes, in the job's process group, end with it
        try:
            os.killpg(job.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("Ray processes of the interrupted job are still running")
    assert (out / "collect.log").read_text().count("Started a local Ray instance") <= 1


def test_unusable_sources_fail_at_once_with_one_line(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"text": "hi"}))
    proc = collect("--prompts", str(tmp_path / "p.jsonl"), "--output", str(tmp_path / "o"), check=False)
    assert proc.returncode != 0 and "no prompt column" in proc.stderr and "Traceback" not in proc.stderr
    proc = collect("--prompts", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o"), check=False)
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_ray_job_submit(tmp_path, ray_cluster):
    address, env = ray_cluster
    out = str(tmp_path / "out")
    proc = subprocess.run(["ray", "job", "submit", "--address", address, "--working-dir", str(ROOT),
                           "--", "python", "jobs/collect.py", *FAST, "--limit", "2", "--output", out, "--verbose"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "collect: 2 prompts" in proc.stdout
    assert len(rows(out, "references")) == 2
    # --verbose: Ray's own output on the console, no log file
    assert "execution finished" in proc.stdout + proc.stderr and not os.path.exists(os.path.join(out, "collect.log"))


def test_a_dead_actor_is_replaced_and_its_batch_retried(tmp_path):
    marker = tmp_path / "crashed"
    script = tmp_path / "crash_once.py"
    script.write_text(f"""
import os, sys
sys.path.insert(0, {str(ROOT / "jobs")!r})
import collect


class CrashOnce(collect.CollectActor):
    def __call__(self, batch):
        if not os.path.exists({str(marker)!r}):
            open({str(marker)!r}, "w").close()
            os._exit(1)          # the actor's process dies in the middle of its first batch
        return super().__call__(batch)

collect.CollectActor = CrashOnce
sys.exit(collect.main(sys.argv[1:]))
""")
    out = str(tmp_path / "out")
    # Workers import the base class from jobs/collect.py: a cluster of its own, whose workers get this PYTHONPATH.
    env = {**os.environ, "PYTHONPATH": str(ROOT / "jobs"), "RAY_ADDRESS": "local"}
    proc = subprocess.run([sys.executable, str(script), *FAST, "--limit", "8", "--output", out], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert marker.exists()
    refs = rows(out, "references")
    assert sorted(r["prompt_id"] for r in refs) == sorted({r["prompt_id"] for r in refs}) and len(refs) == 8


def test_actor_placement_splits_cpus_and_gpus():
    from learn2pd_core.placement import plan_actors
    assert plan_actors({"CPU": 2.0}, None, None) == (0, 2 // 2, 2)      # one actor per CPU
    assert plan_actors({"CPU": 2.0}, None, 1) == (0, 2, 1)              # a lone CPU actor gets both threads
    assert plan_actors({"CPU": 16.0}, None, 3) == (0, 5, 3)
    assert plan_actors({"CPU": 32.0, "GPU": 4.0}, None, None) == (1, None, 4)
    assert plan_actors({"CPU": 32.0, "GPU": 4.0}, 0.5, None) == (0.5, None, 8)
    assert plan_actors({"CPU": 2.0}, None, 1, largest_node_cpus=1) == (0, 1, 1)   # two 1-CPU nodes: 1 fits anywhere
