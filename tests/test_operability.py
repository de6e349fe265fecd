"""How the jobs fail and report: one line before any work for what the driver can know, one line (and no restart
storm) for what only an actor finds, truncated parts found and redone on resume, a multi-node cluster that refuses a
local --output and runs writing to S3, and a console a person can read."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from learn2pd_core import FilterMLP, save_filter, storage

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "learn2pd_core" / "tiny" / "checkpoint"
sys.path.insert(0, str(ROOT / "jobs"))
import collect  # noqa: E402
import evaluate  # noqa: E402
import train_filter  # noqa: E402
from learn2pd_core.console import run_cli  # noqa: E402

# the jobs connect to the session's Ray cluster (conftest.ray_cluster) rather than each starting one
pytestmark = pytest.mark.usefixtures("ray_cluster")


PROGRESS = re.compile(r"^\w+: +\d+%\|")   # the stage's progress bar, also on stderr


def job(name, *args, env=None, timeout=600, cwd=ROOT):
    """A job run as a user would. S3 runs log to ./logs, so those tests run in their own directory."""
    return subprocess.run([sys.executable, str(ROOT / "jobs" / f"{name}.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def one_line_failure(proc, *needles):
    """rc 1, stderr exactly one `error:` line containing every needle, no traceback anywhere."""
    err = [line for line in proc.stderr.splitlines() if line.strip() and not PROGRESS.match(line)]
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(err) == 1 and err[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def driver_failure(module, *args, needles=()):
    """A job's main() in this process, as run_cli runs it: the one line it exits with. Ray must not have started."""
    import ray
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: module.main(list(args)))
    message = str(exit_.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    assert not ray.is_initialized()
    return message


@pytest.fixture(scope="module")
def filter32(tmp_path_factory):
    out = tmp_path_factory.mktemp("filter32")
    save_filter(FilterMLP(32), str(out))
    return str(out)


# ---------------------------------------------------------------- one line, before Ray starts or a model loads
def test_settings_model_and_filter_are_checked_in_the_driver(tmp_path, filter32, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    cases = [
        (collect, ("--gen-length", "40", "--block-size", "32"), ("gen_length 40 is not a multiple of block_size 32",)),
        (evaluate, ("--gen-lengths", "40", "--block-size", "32", "--filter", filter32),
         ("gen_length 40 is not a multiple of block_size 32",)),
        (evaluate, ("--gen-lengths", "64", "--block-size", "16", "--filter", filter32),
         ("filter was trained for block_size 32",)),
        (collect, ("--model", str(tmp_path / "no-such-model")), ("does not exist", "no-such-model")),
        (evaluate, ("--model", str(tmp_path / "no-such-model"), "--filter", filter32), ("does not exist",)),
        (collect, ("--batch-size", "0"), ("--batch-size must be at least 1",)),
        (train_filter, ("--traces", str(tmp_path / "nothing")), ("no trace parts under",)),
    ]
    for module, args, needles in cases:
        driver_failure(module, *args, "--output", str(out), needles=needles)
        assert not out.exists()   # nothing started: no log, no manifest, not even the directory
    # and as a user sees it: exit status 1, one line on stderr, nothing else
    one_line_failure(job("collect", "--gen-length", "40", "--output", str(out)), "not a multiple of block_size")


def test_unwritable_output_is_found_before_any_decoding(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    driver_failure(collect, "--output", str(blocker / "out"),
                   needles=(f"cannot write to the output {blocker / 'out'}", "Not a directory"))


def test_s3_endpoint_down_or_bucket_missing_is_one_line(s3_server, monkeypatch):
    driver_failure(collect, "--output", "s3://no-such-bucket/run",
                   needles=("cannot write to the output s3://no-such-bucket/run", "bucket exists"))
    with socket.socket() as s:   # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    driver_failure(collect, "--output", f"{s3_server}/run", needles=(f"cannot write to the output {s3_server}/run",
                                                                     "NETWORK_CONNECTION", "endpoint"))


# ---------------------------------------------------------------- truncated parts on resume
def _batch(output, ids, *, kinds=("traces", "references")):
    name = storage.part_name(ids)
    for kind in kinds:
        storage.write_table(storage.join(output, kind, name),
                            pa.table({"prompt_id": ids, "trace_rows": [1] * len(ids)}))
    return name


def _truncate(path):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def test_collect_resume_redoes_a_batch_with_a_truncated_part(tmp_path, capsys):
    out = str(tmp_path / "out")
    good, cut = _batch(out, ["p1", "p2"]), _batch(out, ["p3", "p4"])
    _truncate(storage.join(out, "traces", cut))   # the references part is intact: the batch looked finished
    assert collect.finished_prompt_ids(out) == {"p1", "p2"}
    assert "1 unreadable part(s) removed" in capsys.readouterr().out
    assert {p.rsplit("/", 1)[1] for p in storage.list_parts(storage.join(out, "references"))} == {good}
    assert storage.list_parts(storage.join(out, "traces")) == [storage.join(out, "traces", good)]
    _truncate(storage.join(out, "references", good))   # a truncated references part: same
    assert collect.finished_prompt_ids(out) == set() and not storage.list_parts(storage.join(out, "traces"))


def test_train_filter_names_a_truncated_trace_part(tmp_path):
    out = str(tmp_path / "out")
    name = _batch(out, ["p1"], kinds=("traces",))
    _truncate(storage.join(out, "traces", name))
    driver_failure(train_filter, "--traces", out, "--output", str(tmp_path / "filter"),
                   needles=("cannot be read", name, "rerun jobs/collect.py"))


def test_storage_errors_name_the_file(tmp_path):
    part = tmp_path / "d" / "part-x.parquet"
    part.parent.mkdir()
    part.write_bytes(b"PAR1 not really")
    with pytest.raises(storage.StorageError, match=f"cannot read Parquet part {part}"):
        storage.read_dataset(str(part.parent))


# ---------------------------------------------------------------- what only an actor can find
def test_a_model_that_cannot_load_fails_the_job_once(tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(TINY, broken)
    for shard in broken.glob("*.safetensors"):
        shard.write_bytes(b"\0" * 64)   # present (the driver's check passes) but unreadable
    out = tmp_path / "out"
    proc = job("collect", "--model", str(broken), "--limit", "4", "--gen-length", "32", "--output", str(out))
    line = one_line_failure(proc, str(broken))
    log = (out / "collect.log").read_text()
    # One actor, one failure: not one per restart. (The log keeps Ray's account of it.)
    assert log.count(line[len("error: "):]) <= 2, log[-3000:]


def test_losing_the_s3_endpoint_mid_job_is_one_line_naming_the_part(tmp_path):
    from conftest import start_s3_server
    server, env, s3 = start_s3_server("lost")
    try:
        job_proc = subprocess.Popen(
            [sys.executable, str(ROOT / "jobs" / "collect.py"), "--limit", "24", "--gen-length", "32",
             "--batch-size", "2", "--num-actors", "1", "--output", "s3://lost/run"], cwd=tmp_path,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **env, "RAY_ADDRESS": "local"})   # a cluster of its own: its workers get this server
        deadline = time.time() + 300
        while time.time() < deadline and job_proc.poll() is None:   # the first batch is written: pull the plug
            if s3.list_objects_v2(Bucket="lost", Prefix="run/references/").get("KeyCount", 0):
                break
            time.sleep(0.2)
        server.send_signal(signal.SIGKILL)
        stdout, stderr = job_proc.communicate(timeout=600)
    finally:
        server.kill()
    proc = subprocess.CompletedProcess(job_proc.args, job_proc.returncode, stdout, stderr)
    one_line_failure(proc, "s3://lost/run/", "endpoint")


# ---------------------------------------------------------------- more than one node
@pytest.fixture(scope="module")
def two_nodes():
    """A local Ray cluster of two nodes (two raylets on this machine), one CPU each."""
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster.address
    finally:
        cluster.shutdown()


def test_two_nodes_refuse_a_local_output_and_run_on_s3(two_nodes, s3_server, tmp_path):
    """The refusal through the pipeline; the work through collect and train_filter (evaluate's actors are
    placed and write exactly as collect's)."""
    env = {"RAY_ADDRESS": two_nodes}
    local = tmp_path / "run"
    proc = job("pipeline", "--run-dir", str(local), "--per-task", "1", env=env)
    one_line_failure(proc, "is a local path, but the Ray cluster has 2 nodes", "s3://", "--shared-output")
    assert not (local / "collect" / "references").exists()

    # collect's actors and train_filter's two Ray Train workers (one CPU each: no node has two) on both nodes
    run = f"{s3_server}/two-nodes"
    proc = job("collect", "--per-task", "1", "--limit", "4", "--gen-length", "32", "--batch-size", "1",
               "--output", f"{run}/collect", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert storage.read_dataset(storage.join(run, "collect", "references")).num_rows == 4
    proc = job("train_filter", "--traces", f"{run}/collect", "--output", f"{run}/filter", "--epochs", "20",
               "--report-every", "20", "--num-workers", "2", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert storage.read_json(storage.join(run, "filter", "metrics.json"))["num_workers"] == 2
    # An S3 run's log is written locally while it runs (./logs), then copied beside the outputs.
    assert "execution finished" in storage.read_bytes(storage.join(run, "collect", "collect.log")).decode()
    assert (tmp_path / "logs" / "collect-learn2pd-test_two-nodes_collect.log").is_file()


def test_an_actor_on_another_node_refuses_a_local_output(two_nodes):
    """What an autoscaling cluster that grows after the driver's check would meet: the actor refuses."""
    code = ("import ray, sys; sys.path.insert(0, 'jobs'); from learn2pd_core.placement import check_same_node\n"
            "ray.init(address=sys.argv[1]); me = ray.get_runtime_context().get_node_id()\n"
            "other = [n['NodeID'] for n in ray.nodes() if n['Alive'] and n['NodeID'] != me][0]\n"
            "check_same_node('/tmp/x', True, other)\n"     # asserted shared: fine
            "check_same_node('s3://b/x', False, other)\n"  # object storage: fine
            "check_same_node('/tmp/x', False, other)\n")
    proc = subprocess.run([sys.executable, "-c", code, two_nodes], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "this actor runs on another node than the driver" in proc.stderr
