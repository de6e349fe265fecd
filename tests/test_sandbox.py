"""The sandbox for generated programs: verdicts, limits, and containment of hostile programs.

Hostile programs report what they managed to do through their exit status or stderr, and each test checks
the effect from outside too (processes left, files written, connections accepted, the sentinel alive).
Tests of a layer this machine lacks (see `containment()`) are skipped, never weakened."""
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from learn2pd_core.evals import sandbox
from learn2pd_core.evals.sandbox import SandboxResult, containment, run_python

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux-only")


def run(program, **limits):
    """run_python with a generous wall clock, for programs that should finish: a busy machine is no failure."""
    return run_python(program, **{"timeout": 30, **limits})


def need(*layers):
    missing = [layer for layer in layers if layer not in containment()]
    if missing:
        pytest.skip(f"containment layers unavailable here: {missing}")


def sleeper(marker):
    """Program text: the argv of a Python process that sleeps a minute, findable by `marker`."""
    return f"[sys.executable, '-c', 'import time; time.sleep(60)  # {marker}']"


def marked_processes(marker, wait=5.0):
    """Pids whose command line contains `marker`, polling up to `wait` s for them to disappear."""
    deadline = time.monotonic() + wait
    while True:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        if marker.encode() in f.read():
                            found.append(int(entry))
                except OSError:
                    pass
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


# ---- verdicts ----------------------------------------------------------------------------------------------

def test_correct_program_passes():
    r = run_python("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('ok')\n")
    assert r == SandboxResult(True, "passed", "")


@pytest.mark.parametrize("program, detail", [
    ("def f(x):\n    return x\n\nassert f(1) == 2\n", "AssertionError"),
    ("raise ValueError('boom')\n", "ValueError: boom"),
    ("def f(:\n    pass\n", "SyntaxError"),
    ("import sys\nsys.exit(3)\n", "exit status 3"),
], ids=["assert", "exception", "syntax", "exit-status"])
def test_failures_report_the_last_stderr_line(program, detail):
    r = run(program)
    assert (r.passed, r.status) == (False, "failed")
    assert detail in r.detail and len(r.detail) <= 300


def test_start_failure_is_an_error(monkeypatch):
    containment()   # probe with the real interpreter first
    monkeypatch.setattr(sandbox.sys, "executable", "/nonexistent/python")
    r = run("pass")
    assert (r.passed, r.status) == (False, "error") and r.detail


@pytest.mark.parametrize("unshare", [None, "/bin/false"], ids=["missing", "not-permitted"])
def test_falls_back_without_namespaces(monkeypatch, unshare):
    marker = uuid.uuid4().hex
    monkeypatch.setattr(sandbox.shutil, "which", lambda *args, **kwargs: unshare)
    sandbox._mode.cache_clear()
    try:
        layers = containment()
        assert "subreaper" in layers and "pid-namespace" not in layers
        assert run("import os\nassert os.getppid() != 1 and 'HOME' in os.environ\n").passed
        program = ("import subprocess, sys, time\n"
                   f"subprocess.Popen({sleeper(marker)}, start_new_session=True)\n"
                   "time.sleep(0.3)\n")
        assert run(program).passed
        assert marked_processes(marker) == []
    finally:
        sandbox._mode.cache_clear()     # the next test probes this machine again


def test_concurrent_runs_are_independent():
    programs = ["assert True", "assert False", "import time; time.sleep(0.3)", "raise KeyError('k')"] * 2
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, programs))
    assert [r.status for r in results] == ["passed", "failed", "passed", "failed"] * 2


# ---- limits ------------------------------------------------------------------------------------------------

def test_infinite_loop_times_out_on_cpu_time_promptly():
    start = time.monotonic()
    r = run("while True:\n    pass\n", cpu_seconds=1)    # wall-clock backstop: 30 s
    assert r == SandboxResult(False, "timeout", "used up its 1 s of CPU time")
    assert time.monotonic() - start < 10


def test_catching_sigxcpu_still_times_out():
    r = run("import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass\n", cpu_seconds=1)
    assert r == SandboxResult(False, "timeout", "used up its 1 s of CPU time")      # SIGKILL at the hard limit


def test_a_waiting_program_hits_the_wall_clock_backstop():
    start = time.monotonic()
    r = run_python("import time\ntime.sleep(60)\n", cpu_seconds=1, timeout=1)
    assert r == SandboxResult(False, "timeout", "still running after 1 s of wall-clock time")
    assert time.monotonic() - start < 10
    with pytest.raises(ValueError, match="whole number of seconds"):
        run_python("pass", cpu_seconds=0.5)


def test_resource_limits_are_applied():
    r = run(
        "import resource as r\n"
        "assert r.getrlimit(r.RLIMIT_AS) == (256 << 20, 256 << 20)\n"
        "assert r.getrlimit(r.RLIMIT_FSIZE) == (2 << 20, 2 << 20)\n"
        "assert r.getrlimit(r.RLIMIT_CPU) == (7, 8)\n"
        "assert r.getrlimit(r.RLIMIT_CORE) == (0, 0)\n"
        "assert r.getrlimit(r.RLIMIT_NPROC)[0] != r.RLIM_INFINITY\n"
        "open('/proc/self/status').read().index('NoNewPrivs:\\t1')\n",
        memory_mb=256, max_file_mb=2, cpu_seconds=7)
    assert r.passed, r.detail


@pytest.mark.parametrize("program", ["x = bytearray(10**10)\n",
                                     "x = []\nwhile True:\n    x.append(bytearray(10**6))\n"],
                         ids=["at-once", "growing"])
def test_huge_allocation_fails(program):
    r = run(program, memory_mb=256, timeout=10)
    assert (r.passed, r.status) == (False, "failed") and "MemoryError" in r.detail


def test_file_size_is_limited():
    r = run("try:\n    open('big', 'wb').write(b'x' * (2 << 20))\n"
            "except OSError as e:\n    raise SystemExit(f'refused: {e.strerror}')\n", max_file_mb=1)
    assert r == SandboxResult(False, "failed", "refused: File too large")


def test_output_flood_is_bounded():
    start = time.monotonic()
    r = run("import sys\nwhile True:\n    sys.stderr.write('x' * 65536)\n", max_file_mb=1, timeout=10)
    assert (r.passed, r.status) == (False, "failed") and len(r.detail) <= 300   # EFBIG, not the timeout
    r = run("while True:\n    print('y' * 65536)\n", timeout=1)      # stdout is discarded
    assert r.status == "timeout"
    assert time.monotonic() - start < 15


# ---- hostile programs: processes -----------------------------------------------------------------------------

def test_fork_bomb_is_contained():
    marker = uuid.uuid4().hex
    bomb = ("import os, sys\n"     # re-exec, so that every process of the bomb carries the marker
            "code = 'import os\\nwhile True:\\n    try:\\n        os.fork()\\n    except OSError:\\n        pass'\n"
            f"code += '  # {marker}'\n"
            "os.execv(sys.executable, [sys.executable, '-c', code])\n")
    start = time.monotonic()
    r = run(bomb, timeout=1, max_processes=16)
    assert (r.passed, r.status) == (False, "timeout")
    assert time.monotonic() - start < 15
    assert marked_processes(marker) == []


def test_processes_left_behind_are_killed():
    marker = uuid.uuid4().hex
    program = ("import os, subprocess, sys, time\n"
               f"subprocess.Popen({sleeper(marker)}, start_new_session=True)\n"
               "if os.fork() == 0:\n    os.setsid()\n"
               f"    os.execv(sys.executable, {sleeper(marker)})\n"
               "time.sleep(0.5)\n")
    assert run(program).passed
    assert marked_processes(marker) == []


@pytest.mark.parametrize("program, timeout, statuses", [
    # inside a pid namespace the parent (the namespace's init) survives, so the program sleeps into the timeout
    ("import os, signal, time\nos.kill(os.getppid(), signal.SIGKILL)\ntime.sleep(30)\n", 2, {"killed", "timeout"}),
    ("import os, signal, time\nos.killpg(0, signal.SIGKILL)\ntime.sleep(30)\n", 30, {"killed"}),
], ids=["parent", "process-group"])
def test_killing_the_parent_or_group_spares_the_evaluator(program, timeout, statuses):
    # Were the program our child or in our process group, these would kill pytest itself.
    r = run(program, timeout=timeout)
    assert not r.passed and r.status in statuses


def test_kill_all_stays_inside_the_pid_namespace():
    need("pid-namespace")
    assert run("import os\nassert (os.getpid(), os.getppid()) == (2, 1)\n").passed   # guard: really inside
    sentinel = subprocess.Popen(["sleep", "30"])
    try:
        r = run("import os, signal, subprocess\n"
                "child = subprocess.Popen(['sleep', '30'])\n"
                "os.kill(-1, signal.SIGKILL)\n"
                "assert child.wait() == -signal.SIGKILL\n")     # it does kill inside the sandbox
        assert r.passed, r.detail
        time.sleep(0.2)
        assert sentinel.poll() is None, "kill(-1) inside the sandbox reached a process outside it"
    finally:
        sentinel.kill()
        sentinel.wait()


def test_capabilities_are_dropped():
    need("no-capabilities")
    program = ("status = open('/proc/self/status').read()\n"
               "for key in ('CapEff', 'CapPrm', 'CapBnd', 'CapAmb'):\n"
               "    assert int(status.split(key + ':')[1].split()[0], 16) == 0, key\n")
    if "mount-namespace" in containment():  # only there: with capabilities this would touch the host's mounts
        program += ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                    "assert libc.umount2(b'/proc', 2) != 0, 'could unmount /proc'\n"
                    "assert libc.mount(b'none', b'/', None, 32 | 4096, None) != 0, 'could remount / read-write'\n")
    r = run(program)
    assert r.passed, r.detail


# ---- hostile programs: environment, files, network ------------------------------------------------------------

ALLOWED_ENV = {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "PYTHONDONTWRITEBYTECODE", "PYTHONHASHSEED"}


def test_environment_is_scrubbed(monkeypatch):
    for key in ("AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "HTTPS_PROXY", "PYTHONPATH"):
        monkeypatch.setenv(key, "sekrit-test-value")
    r = run("import os, sys\n"
            f"assert set(os.environ) <= {ALLOWED_ENV!r}, sorted(os.environ)\n"
            "assert 'AWS_SECRET_ACCESS_KEY' not in os.environ\n"
            "assert b'sekrit' not in open('/proc/self/environ', 'rb').read()\n"
            "assert os.environ['HOME'] == os.environ['TMPDIR'] == os.getcwd()\n"
            "assert sys.flags.hash_randomization == 0\n")
    assert r.passed, r.detail
    r = run("import os, sys\nsys.exit(0 if os.environ.get('AWS_SECRET_ACCESS_KEY') == 'sekrit-test-value' else 1)\n")
    assert r == SandboxResult(False, "failed", "exit status 1")


def test_other_processes_environments_are_invisible():
    if "pid-namespace" not in containment() and "unprivileged-uid" not in containment():
        pytest.skip("fallback mode as the evaluator's own uid: /proc/<pid>/environ of its processes is readable")
    secret = f"sekrit-{uuid.uuid4().hex}"
    sentinel = subprocess.Popen(["sleep", "30"], env={**os.environ, "AWS_SECRET_ACCESS_KEY": secret})
    try:
        deadline = time.monotonic() + 10
        while True:     # the secret really is there to find, once the sentinel has exec'd
            with open(f"/proc/{sentinel.pid}/environ", "rb") as f:
                if secret.encode() in f.read():
                    break
            assert time.monotonic() < deadline, "the sentinel never showed its environment"
            time.sleep(0.01)
        r = run("import os, sys\n"
                "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
                "    try:\n"
                "        data = open(f'/proc/{pid}/environ', 'rb').read()\n"
                "    except OSError:\n"
                "        continue\n"
                f"    if b'{secret}' in data:\n"
                "        sys.exit(0)\n"
                "sys.exit('not found')\n")
        assert r == SandboxResult(False, "failed", "not found")
    finally:
        sentinel.kill()
        sentinel.wait()


def test_workdir_is_private_writable_and_removed(monkeypatch):
    made = []

    def mkdtemp(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    real = tempfile.mkdtemp
    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", mkdtemp)
    program = ("import os\n"
               "assert os.listdir('.') == ['program.py'], os.listdir('.')\n"
               "os.makedirs('a/b/c')\nopen('a/b/c/f', 'w').write('x')\nopen('rel.txt', 'w').write('x')\n"
               "os.chmod('a/b/c', 0)\nos.chmod('a/b', 0o500)\nos.chmod('a', 0)\nos.symlink('/etc', 'link')\n"
               "os.chmod('.', 0o500)\n")
    etc_mode = os.stat("/etc").st_mode
    r = run(program + "raise SystemExit(os.getcwd())\n")
    # The program really ran in that directory, which a private root shows at a path of its own.
    shown = sandbox._PRIVATE_WORKDIR if "private-root" in containment() else made[-1]
    assert r.status == "failed" and r.detail == shown
    r = run(program + "while True:\n    pass\n", timeout=1)
    assert r.status == "timeout"
    assert made and not any(os.path.lexists(d) for d in made)
    assert os.stat("/etc").st_mode == etc_mode                 # cleanup never followed the planted link


def test_writes_outside_the_workdir_are_blocked(tmp_path):
    need("read-only-fs")
    target = tmp_path / "escape.txt"
    r = run(f"open({str(target)!r}, 'w').write('x')\n")
    # With a private root the directory is not there at all; without one it is, read-only.
    assert (r.passed, r.status) == (False, "failed")
    assert ("No such file" if "private-root" in containment() else "Read-only file system") in r.detail
    assert not target.exists()
    target = os.path.join(sys.prefix, f"escape-{uuid.uuid4().hex}.txt")    # a directory the sandbox shows
    r = run(f"open({target!r}, 'w').write('x')\n")
    assert (r.passed, r.status) == (False, "failed") and "Read-only file system" in r.detail
    assert not os.path.exists(target)
    r = run("import tempfile\nwith tempfile.NamedTemporaryFile() as f:\n    f.write(b'x')\n")
    assert r.passed, r.detail   # TMPDIR is the working directory, which stays writable


def test_network_is_unreachable():
    need("net-namespace")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        r = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n")
        assert (r.passed, r.status) == (False, "failed") and "OSError" in r.detail
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()


# ---- hostile programs: reading the host ------------------------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("which", ["checkout", "tmp-file", "shadow"])
def test_host_files_are_unreadable(tmp_path, which):
    need("mount-namespace")     # the sandbox's filesystem is a fresh root: the Python install and the workdir
    path = {"checkout": os.path.join(REPO, "README.md"), "tmp-file": str(tmp_path / "secret.txt"),
            "shadow": "/etc/shadow"}[which]
    if which == "tmp-file":
        (tmp_path / "secret.txt").write_text("sekrit")
    if not os.path.isfile(path):
        pytest.skip(f"{path} does not exist on this machine")
    r = run(f"print(open({path!r}, 'rb').read())\n")
    assert (r.passed, r.status) == (False, "failed") and "FileNotFoundError" in r.detail, r


def test_filesystem_shows_only_the_python_install_and_the_workdir():
    need("mount-namespace")
    # The sandbox must show this interpreter's installation at its own paths, wherever it lives (a virtual
    # environment under /tmp, /home or the checkout): a host folder above it may be there, but hold only the
    # way down to it. (It also shows the folders of the shared libraries Python loaded: for the installs
    # tested here, the OS's folders or ones inside these.)
    python = {os.path.normpath(d) for d in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                                            os.path.dirname(sys.executable),
                                            os.path.dirname(os.path.realpath(sys.executable)))}
    r = run("import os, sys\n"
            "assert os.listdir(os.path.dirname(os.getcwd())) == [os.path.basename(os.getcwd())]\n"  # no other runs
            f"python = {sorted(python)!r}\n"
            "for gone in ('/home', '/root/.ssh', '/work', '/run', '/var', '/sys', '/etc/passwd', '/tmp'):\n"
            "    if os.path.exists(gone):\n"
            "        way = {p[len(gone) + 1:].split('/')[0] for p in python if p.startswith(gone + '/')}\n"
            "        assert way, f'{gone} is there'\n"
            "        assert set(os.listdir(gone)) <= way, (gone, sorted(os.listdir(gone)))\n"
            "assert sorted(os.listdir('/dev')) <= ['fd', 'full', 'null', 'random', 'stderr', 'stdin', 'stdout',"
            " 'urandom', 'zero'], os.listdir('/dev')\n"
            "import json, math, re, collections, heapq, itertools, decimal, fractions, hashlib, random\n"
            "assert os.urandom(4) and open('/dev/null', 'rb').read() == b''\n")
    assert r.passed, r.detail


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_host_unix_sockets_are_unreachable(tmp_path, kind):
    # Ray's sockets (/tmp/ray/session_*/sockets) are path sockets; abstract ones live in the network namespace.
    need("mount-namespace" if kind == "path" else "net-namespace")
    address = str(tmp_path / "listener.sock") if kind == "path" else f"\0l2pd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(address)
        listener.listen()
        r = run(f"import socket\nsocket.socket(socket.AF_UNIX).connect({address!r})\n")
        assert (r.passed, r.status) == (False, "failed") and "Error" in r.detail, r
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()


# ---- memory of the whole process tree --------------------------------------------------------------------------

# Three children each hold ~60% of the limit at once (every page touched); the parent ignores how they end.
MEMORY_HOG = ("import os, time\n"
              "kids = []\n"
              "for _ in range(3):\n"
              "    pid = os.fork()\n"
              "    if pid == 0:\n"
              "        block = b'x' * (154 << 20)\n"
              "        time.sleep(1.5)\n"
              "        os._exit(0)\n"
              "    kids.append(pid)\n"
              "for pid in kids:\n"
              "    os.waitpid(pid, 0)\n")


def assert_out_of_memory(r):
    assert (r.passed, r.status) == (False, "killed") and "out of memory" in r.detail, r


def test_memory_limit_covers_the_whole_process_tree():
    assert_out_of_memory(run(MEMORY_HOG, memory_mb=256, timeout=30))
    assert run(MEMORY_HOG.replace("range(3)", "range(1)"), memory_mb=256).passed     # one child fits


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "fallback"])
def test_memory_watchdog_without_cgroups(monkeypatch, namespaces):
    monkeypatch.setattr(sandbox, "_memory_cgroup", lambda: None)
    if not namespaces:
        monkeypatch.setattr(sandbox.shutil, "which", lambda *args, **kwargs: None)
    sandbox._mode.cache_clear()
    try:
        assert "memory-watchdog" in containment() and "memory-cgroup" not in containment()
        assert_out_of_memory(run(MEMORY_HOG, memory_mb=256, timeout=30))
        assert run(MEMORY_HOG.replace("range(3)", "range(1)"), memory_mb=256).passed
    finally:
        sandbox._mode.cache_clear()


def test_memory_cgroups_are_removed():
    need("memory-cgroup")
    parent = sandbox._mode().cgroup.parent
    before = set(os.listdir(parent))
    assert run("pass").passed
    assert_out_of_memory(run(MEMORY_HOG, memory_mb=256, timeout=30))
    assert set(os.listdir(parent)) == before


# ---- a pass means the program ran to its end ---------------------------------------------------------------------

@pytest.mark.parametrize("exit_line", ["raise SystemExit(0)", "import sys; sys.exit()", "import os; os._exit(0)"],
                         ids=["SystemExit", "sys.exit", "os._exit"])
def test_exiting_early_with_status_0_fails(exit_line):
    program = f"def f(x):\n    return x\n\n{exit_line}\nassert f(1) == 2\n"
    r = run(program)
    assert (r.passed, r.status) == (False, "failed") and "before its end" in r.detail, r
    assert sandbox.run_checked(program) is False


def test_humaneval_completion_that_exits_early_fails():
    from learn2pd_core.evals import humaneval
    target = {"task_id": "t", "prompt": "def inc(x):\n", "entry_point": "inc",
              "test": "def check(candidate):\n    assert candidate(1) == 2\n"}
    assert humaneval.scores(target, "    return x + 1\n") == {"correct": True}
    assert humaneval.scores(target, "    return x\n") == {"correct": False}
    for early in ("    raise SystemExit(0)\n", "    import sys; sys.exit()\n", "    import os; os._exit(0)\n",
                  "    return x\nimport os\nos._exit(0)\n"):
        assert humaneval.scores(target, early) == {"correct": False}, early


def test_mbpp_code_that_exits_early_fails():
    from learn2pd_core.evals import mbpp
    target = {"task_id": 1, "test_setup_code": "", "test_list": ["assert inc(1) == 2"]}
    assert mbpp.scores(target, "def inc(x):\n    return x + 1\n") == {"correct": True}
    assert mbpp.scores(target, "def inc(x):\n    return x\n") == {"correct": False}
    assert mbpp.scores(target, "def inc(x):\n    return x\nimport os\nos._exit(0)\n") == {"correct": False}
