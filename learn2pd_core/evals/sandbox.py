"""Run untrusted Python programs (generated HumanEval / MBPP solutions plus their tests) in a sandbox.

``run_python(program)`` writes the program to a fresh temporary directory, runs it in a separate process
and reports whether it ran to its last line and exited 0 within every limit. The parent survives anything
the program does. Containment is layered, so that the inner layers still hold where an outer one is
unavailable:

1. Process boundary. The program runs under a throwaway launcher (this file, run as a script) in a new
   session, so the evaluating process is never its parent nor in its process group.
2. Private working directory. cwd, HOME and TMPDIR are a fresh ``tempfile.mkdtemp`` directory, removed
   after every run, timeouts included. Under a private root (layer 7) the program sees it at /sandbox/work.
3. Scrubbed environment. Only an allow-list reaches the program (PATH, C.UTF-8 locale, HOME, TMPDIR,
   PYTHONHASHSEED=0, PYTHONDONTWRITEBYTECODE=1): no credentials, no proxies.
4. Resource limits on each process: RLIMIT_AS (memory), RLIMIT_CPU (SIGXCPU, then SIGKILL a second
   later), RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_CORE=0, and no_new_privs (setuid binaries grant nothing).
   The CPU limit is the verdict's time limit: a program that uses it up is a ``timeout``. CPU time, unlike
   wall-clock time, does not grow when other processes share the CPU, so a correct program is not scored
   wrong because the machine is busy (the evaluator's own decoding, other scorers).
5. Wall-clock backstop, enforced by the evaluator, which then kills the program's whole process tree: for
   programs that wait instead of computing (sleep, a blocked read). Generous (default 6x the CPU limit), so
   that only a program starved for that long by other load could hit it while computing.
6. One memory limit for the whole process tree (per-process RLIMIT_AS alone lets N processes hold N times
   the limit). Where this process may create a child of its own cgroup with a memory limit (the v1 memory
   controller, e.g. as root; cgroup v2 where its cgroup.subtree_control already has "memory", which v2
   allows only in the root cgroup, as a cgroup with processes cannot enable controllers for children),
   every run gets its own child cgroup (layer ``memory-cgroup``). The sandbox is moved into it before it
   starts anything (a shell waits on a pipe until it is in); the limit is ``memory_mb`` plus 32 MiB for
   the sandbox's own launcher, swap is off, and a run in which the kernel OOM-killed any process is
   ``killed`` ("out of memory"), even if the program ignored its child's death. On cgroup v2 an OOM kill
   takes the whole group. After the run, whatever is left in the cgroup is killed and the cgroup removed.
   Elsewhere (layer ``memory-watchdog``) the launcher sums the resident memory of the program's processes
   every 50 ms and kills them all above ``memory_mb``: best effort, as a burst within one interval can
   overshoot (each process stays under RLIMIT_AS), shared pages count once per process, and memory that
   no process maps (memfd or tmpfs files, each bounded by RLIMIT_FSIZE) is not seen.
7. Namespaces, where util-linux ``unshare`` (>= 2.32) works (probed once per process): new user, pid, net and
   mount namespaces. The launcher is pid 1 of the pid namespace: the program cannot see or signal the
   evaluator, ``kill(-1, ...)`` stays inside, and every process it spawned dies with the launcher. /proc
   is remounted, so other processes' environments are invisible; the network namespace has only a
   loopback device that is down, so no host network and no host abstract Unix sockets (those are per
   network namespace). The filesystem is a fresh root (layer ``private-root``, an allow-list): a tmpfs
   holding read-only bind mounts of the OS's program and library directories (/usr, /bin, /sbin, /lib*),
   the Python installation (sys.prefix, sys.base_prefix, the interpreter's directory, the directories of
   the shared libraries it loaded), /etc/ld.so.cache and /etc/localtime, /dev/null, zero, full, random
   and urandom, /proc, and the working directory, the only writable place, at /sandbox/work rather than at
   its host path (under /tmp), so that wherever the Python installation lives (a virtual environment under
   /tmp, /home or the checkout), the folder above the working directory holds nothing else, and the
   folders above the installation hold only the way down to it. Then pivot_root (chroot where "/" is not a
   mount point), so the rest of the host's filesystem is not in the namespace at all: not the project
   checkout, /home, /root, /etc, /tmp (other runs' directories, Ray's sockets and files under /tmp/ray),
   /run, /var or /sys. Read-only mounts use mount_setattr (Linux >= 5.12), else a classic
   read-only remount of each mount. A namespace's pid_max is lowered to its minimum, 301 tasks (Linux >=
   6.14, a cap that holds even for root, whom RLIMIT_NPROC ignores); then the launcher drops every
   capability, so the program cannot undo any of it. Should the private root fail to build, the
   namespaces are not used at all (fallback below), so that ``mount-namespace`` always means a private root;
   so too where the Python installation lies under /sandbox, which the working directory has to itself.
8. When the evaluator runs as root, the program runs as ``nobody`` if that user can run
   ``sys.executable``: RLIMIT_NPROC does not apply to root, and root's files stay out of reach.
9. Bounded output. stdout is discarded; stderr goes to an unlinked temporary file, bounded by
   RLIMIT_FSIZE, of which only the last 64 KiB is read.

A pass means the program ran to its end: exit status 0 is not enough, as HumanEval / MBPP programs that
``sys.exit()``, ``raise SystemExit(0)`` or ``os._exit(0)`` before their checks would pass. The sandbox
appends a line that creates a file named after a random per-run token in the working directory, and a run
passes only if it exited 0 and that file exists. This stops programs that end early, not a program written
to forge the marker: the token is in its own source (program.py, its code object), which it can read.

Fallback, where ``unshare`` is missing or not permitted (e.g. Docker's default seccomp profile): layers
1-6, 8 and 9 still hold, the launcher is a child subreaper that kills whatever the program left behind,
on timeout the launcher kills the program and the evaluator the session's process group, and a root
launcher drops all capabilities. Not contained in fallback mode: network access, host Unix sockets the
program's uid may connect to (Ray's under /tmp/ray), reading every file that uid may read (the project
checkout; for root without a usable ``nobody``: every file), other concurrent runs' working directories;
writes outside the working directory wherever that uid may write (for root without a usable ``nobody``:
every root-owned file); reading /proc/<pid>/environ of other processes of that uid; ``kill(-1, ...)``,
which reaches every process of that uid, the evaluator's included when it is the same; task count for
uid 0; and with a memory cgroup, a program of the evaluator's own uid may raise the cgroup's limit through
/sys/fs/cgroup (in the namespaces /sys is not there). A process that leaves the session and outlives the
launcher survives the run, unless a memory cgroup holds it (it is killed when the run ends).

``containment()`` lists the layers active on this machine.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

__all__ = ["SandboxResult", "containment", "run_checked", "run_python"]

_NOBODY = 65534
_PROGRAM = "program.py"
_STDERR_TAIL = 64 * 1024
_DETAIL_CHARS = 300
_BASE_LAYERS = ("session", "private-workdir", "scrubbed-env", "rlimits", "wall-clock-backstop", "bounded-output")
_PROBE = "open('probe.txt', 'w').write('ok')\n"   # also proves the working directory is writable
# The default time limit, in CPU seconds per process. Benchmark convention is a 3 s wall-clock limit; the
# slowest gold solution of HumanEval / MBPP (MBPP task 123) needs 2.4 CPU s on the 2-core CI machine, so
# 5 s leaves it a margin on slower machines while an endless loop still fails within seconds.
CPU_SECONDS = 5
# The default wall-clock backstop, in multiples of the CPU limit: generous, so that only a program that waits (or is
# starved for that long) meets it. Its cost: a wrong program that blocks takes that long to fail, and one that
# sleeps less than it and then passes is scored correct, where the harness's 3 s of wall clock would fail it.
BACKSTOP = 6
# Appended to every program: a run passes only if this line ran (see the module docstring). Through
# `builtins`, so that a program that defines its own `open` still passes.
_END_LINE = "\n\n# Appended by the sandbox: only a program that runs to this line passes.\n" \
            "__import__('builtins').open({path!r}, 'x').close()\n"
_CGROUP_PREFIX = "l2pd-sandbox-"
_LAUNCHER_MEMORY = 32 << 20     # in the cgroup besides the program: unshare and the launcher (~15 MiB RSS)
_WATCH_INTERVAL = 0.05          # seconds between two looks of the memory watchdog
# Waits until the evaluator has moved it into the run's cgroup (it then writes a line) before it starts the
# sandbox, so that every process of the sandbox is born inside; EOF instead (the move failed) starts nothing.
# The shell exports PWD, which is not on the environment's allow-list.
_CGROUP_GATE = 'read -r _ && unset PWD && exec "$@" </dev/null'

# Linux constants (stable ABI) for the launcher.
_PR_SET_DUMPABLE, _PR_CAPBSET_DROP, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 4, 24, 36, 38
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_RELATIME = 1, 2, 4, 32, 4096, 16384, 1 << 21
_MNT_DETACH = 2
_SYS_MOUNT_SETATTR = 442            # same number on every architecture (Linux >= 5.12)
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41}    # glibc has no wrapper; elsewhere: chroot
_AT_FDCWD, _AT_RECURSIVE = -100, 0x8000
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID = 1, 2
_CAPABILITY_VERSION_3 = 0x20080522
# The private root: the OS's programs and libraries, and the few files and devices Python and libc use.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/localtime")
_DEVICES = ("null", "zero", "full", "random", "urandom")
# Where the private root shows the working directory: a path of the sandbox's own, not the host's, so that no
# host directory the sandbox must show (a virtual environment beside the working directory under /tmp)
# shares a folder with it. Without a private root the program sees the host path.
_PRIVATE_WORKDIR = "/sandbox/work"


@dataclass(frozen=True)
class SandboxResult:
    passed: bool        # ran to its last line and exited 0, within every limit
    status: str         # "passed" | "failed" | "timeout" | "killed" | "error"
    detail: str         # one short line, e.g. the last line of stderr ("AssertionError")


def run_python(program: str, *, cpu_seconds: int = CPU_SECONDS, timeout: float | None = None,
               memory_mb: int = 1024, max_processes: int = 32, max_file_mb: int = 16) -> SandboxResult:
    """Run `program` (Python source) in the sandbox. `cpu_seconds` is the time limit: whole CPU seconds
    for each of its processes (RLIMIT_CPU); `timeout` the wall-clock backstop in seconds from the start
    (default BACKSTOP x cpu_seconds); `memory_mb` the memory of all its processes together (memory cgroup
    or watchdog, see layer 6) and the address-space limit of each, `max_processes` how many processes and
    threads it may run at once, itself included (RLIMIT_NPROC; never enforced for uid 0), `max_file_mb` the
    largest file it may write (stderr included). It passes only if it runs to its last line and exits 0."""
    if not (isinstance(cpu_seconds, int) and cpu_seconds >= 1):
        raise ValueError(f"cpu_seconds must be a whole number of seconds >= 1, got {cpu_seconds!r}")
    wall = float(BACKSTOP * cpu_seconds if timeout is None else timeout)
    return _run(program, _mode(), wall, memory_mb, max_processes, max_file_mb, cpu_seconds)[0]


def run_checked(program: str, *, cpu_seconds: int = CPU_SECONDS) -> bool:
    """Whether `program` passes; raises when the sandbox itself could not run it (a broken machine must not
    look like wrong answers)."""
    result = run_python(program, cpu_seconds=cpu_seconds)
    if result.status == "error":
        raise RuntimeError(f"the sandbox could not run a program: {result.detail}")
    return result.passed


def containment() -> tuple[str, ...]:
    """The containment layers active on this machine (probed on first use)."""
    return _mode().layers


@dataclass(frozen=True)
class _CgroupParent:
    version: int        # 2: unified hierarchy; 1: the v1 memory controller
    parent: str         # the directory in which each run makes its own cgroup


@dataclass(frozen=True)
class _Mode:
    unshare: str | None         # path of util-linux unshare: namespaces; None: fallback
    uid: int | None             # run as this uid (evaluator is root); None: as the evaluator's uid
    cgroup: _CgroupParent | None = None     # None: the launcher's memory watchdog instead
    layers: tuple[str, ...] = ()


@functools.cache
def _mode() -> _Mode:
    """Try the strongest configuration first; keep the first one that runs a trivial program."""
    unshare = shutil.which("unshare") or shutil.which("unshare", path="/usr/bin:/bin")
    cgroup = _memory_cgroup()
    for ns in ([unshare] if unshare else []) + [None]:
        for uid in ([_NOBODY] if os.geteuid() == 0 else []) + [None]:
            for cg in ([cgroup] if cgroup else []) + [None]:
                result, layers = _run(_PROBE, _Mode(ns, uid, cg), 30.0, 1024, 32, 16, 30)
                if result.passed:
                    return _Mode(ns, uid, cg, _BASE_LAYERS + (("unprivileged-uid",) if uid is not None else ())
                                 + (("memory-cgroup",) if cg else ()) + layers)
    return _Mode(None, None, None, _BASE_LAYERS)   # even the plain launcher fails: runs will report why


def _run(program, mode, timeout, memory_mb, max_processes, max_file_mb, cpu):
    workdir = tempfile.mkdtemp(prefix="l2pd-sandbox-")
    shown = _PRIVATE_WORKDIR if mode.unshare else workdir     # the working directory as the program sees it
    cgroup = None
    try:
        path = os.path.join(workdir, _PROGRAM)
        end_name = f".end-{os.urandom(16).hex()}"
        end_marker = os.path.join(workdir, end_name)    # where the evaluator looks for what the program made
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:     # bad text: SyntaxError
            f.write(program + _END_LINE.format(path=os.path.join(shown, end_name)))
        if mode.uid is not None:
            for p in (workdir, path):
                os.chown(p, mode.uid, mode.uid)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": shown,
               "TMPDIR": shown, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        watchdog = 0 if mode.cgroup else memory_mb << 20    # the launcher watches memory only without a cgroup
        cmd = [sys.executable, "-I", "-S", os.path.abspath(__file__), workdir, "1" if mode.unshare else "0",
               str(memory_mb << 20), str(cpu), str(max_file_mb << 20), str(max_processes), str(watchdog)]
        if mode.unshare:
            # --kill-child: should unshare die, the namespace's init (and with it everything) dies too.
            cmd = [mode.unshare, "--user", "--map-root-user", "--pid", "--fork", "--kill-child", "--net",
                   "--mount", "--mount-proc", *cmd]
        drop = {} if mode.uid is None else {"user": mode.uid, "group": mode.uid, "extra_groups": []}
        try:
            if mode.cgroup:
                cgroup = _Cgroup.create(mode.cgroup, (memory_mb << 20) + _LAUNCHER_MEMORY)
                cmd = ["/bin/sh", "-c", _CGROUP_GATE, "sh", *cmd]
        except OSError as e:
            return SandboxResult(False, "error", _clip(f"cannot create the run's memory cgroup: {e}")), ()
        with tempfile.TemporaryFile() as report, tempfile.TemporaryFile() as stderr:
            try:
                proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=report, stderr=stderr,
                                        stdin=subprocess.PIPE if cgroup else subprocess.DEVNULL,
                                        start_new_session=True, **drop)
            except (OSError, ValueError, subprocess.SubprocessError) as e:
                return SandboxResult(False, "error", _clip(f"cannot start the sandbox: {e}")), ()
            if cgroup:
                try:
                    cgroup.add(proc.pid)
                    proc.stdin.write(b"in\n")
                except OSError as e:    # closing stdin without the line makes the gate exit: nothing runs
                    report.write(f"error cannot move the sandbox into its memory cgroup: {e}\n".encode())
                    report.flush()
                finally:
                    with contextlib.suppress(OSError):
                        proc.stdin.close()
            timed_out = not _exited(proc.pid, timeout)
            if timed_out:
                _stop(proc.pid, isolated=mode.unshare is not None)
            # Not yet reaped, so the group id cannot have been reused: sweep up whatever is left in it.
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            ended = os.path.isfile(end_marker)
            report.seek(0)
            lines = report.read(4096).decode("utf-8", "replace").splitlines()
            fields = dict(line.split(" ", 1) if " " in line else (line, "") for line in lines)
            stderr.seek(max(0, os.fstat(stderr.fileno()).st_size - _STDERR_TAIL))
            last = _last_line(stderr.read(_STDERR_TAIL))
        out_of_memory = "oom" in fields or (cgroup is not None and cgroup.oom_kills() > 0)
        layers = tuple(filter(None, fields.get("layers", "").split(",")))
        return _verdict(proc.returncode, fields, last, timed_out, timeout, cpu, out_of_memory, ended,
                        memory_mb), layers
    finally:
        if cgroup is not None:
            cgroup.remove()
        _remove(workdir)


def _verdict(returncode, fields, last, timed_out, timeout, cpu, out_of_memory, ended, memory_mb) -> SandboxResult:
    if "error" in fields:
        return SandboxResult(False, "error", _clip(fields["error"]))
    if out_of_memory:   # first: the program may have carried on after the kernel killed one of its processes
        return SandboxResult(False, "killed", f"out of memory: its processes together exceeded {memory_mb} MiB")
    if timed_out:
        return SandboxResult(False, "timeout", f"still running after {timeout:g} s of wall-clock time")
    code = fields.get("exit", "")
    if code.lstrip("-").isdigit():
        code = int(code)
        used = float(fields.get("cpu", "0") or 0)
        # SIGXCPU at the soft limit; SIGKILL at the hard one (a second later) if it caught SIGXCPU
        if -code == signal.SIGXCPU or (-code == signal.SIGKILL and used >= cpu):
            return SandboxResult(False, "timeout", f"used up its {cpu} s of CPU time")
        if code == 0:
            if ended:
                return SandboxResult(True, "passed", "")
            return SandboxResult(False, "failed", "exited with status 0 before its end")
        if code > 0:
            return SandboxResult(False, "failed", last or f"exit status {code}")
        return SandboxResult(False, "killed", _clip(f"killed by {_signame(-code)}" + (f": {last}" if last else "")))
    if returncode < 0:      # the launcher itself was killed (in fallback mode the program can do that)
        return SandboxResult(False, "killed", f"sandbox launcher killed by {_signame(-returncode)}")
    return SandboxResult(False, "error", last or f"sandbox exited with status {returncode}")


def _exited(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` s for `pid` to exit, without reaping it."""
    deadline, delay = time.monotonic() + timeout, 0.001
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(2 * delay, 0.02)


def _stop(pid: int, isolated: bool) -> None:
    """Timeout: kill the program's whole process tree, then give the launcher side a moment to finish."""
    if isolated:
        # SIGKILL to the namespace's init (unshare's only child) kills every process in the namespace;
        # unshare exits once they are all gone, so the run leaves nothing behind.
        for child in _children(pid):
            with contextlib.suppress(OSError):
                os.kill(child, signal.SIGKILL)
    else:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)    # the launcher kills the program and sweeps up its orphans
    _exited(pid, 2.0)


def _remove(path: str) -> None:
    for _ in range(3):  # again if a dying process (fallback mode) was still writing
        with contextlib.suppress(OSError):
            _unlock(path)
            for _, dirs, _, fd in os.fwalk(path):
                for name in dirs:
                    with contextlib.suppress(OSError):
                        _unlock(name, fd)
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            return
        time.sleep(0.05)


def _unlock(name: str, dir_fd: int | None = None) -> None:
    """chmod 700 a directory the program may have made unreadable or read-only (we own it, or are root).
    O_PATH | O_NOFOLLOW | O_DIRECTORY refuses a planted symlink, so no chmod ever lands outside the tree."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY, dir_fd=dir_fd)
    try:
        os.chmod(f"/proc/self/fd/{fd}", 0o700)
    finally:
        os.close(fd)


def _children(pid: int) -> list[int]:
    return [p for p, ppid, _ in _processes() if ppid == pid]


def _processes() -> list[tuple[int, int, int]]:
    """(pid, parent pid, resident bytes) of every process in /proc."""
    found, page = [], os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()     # comm may contain spaces
                found.append((int(entry), int(fields[1]), int(fields[21]) * page))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _last_line(tail: bytes) -> str:
    for line in reversed(tail.decode("utf-8", "replace").splitlines()):
        if line.strip():
            return _clip(line.strip())
    return ""


def _clip(text: str) -> str:
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= _DETAIL_CHARS else text[:_DETAIL_CHARS - 3] + "..."


def _signame(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# ---- memory cgroups (evaluator side) ---------------------------------------------------------------------------

def _memory_cgroup() -> _CgroupParent | None:
    """Where this process may make child cgroups with a memory limit: under its own cgroup, in the unified
    hierarchy if the memory controller is there, else in the v1 memory hierarchy. Proven by making (and
    removing) one; None where neither works (not root, nothing delegated, read-only cgroupfs)."""
    try:
        with open("/proc/self/cgroup") as f:
            own = [line.rstrip("\n").split(":", 2) for line in f]
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split(" - ") for line in f if " - " in line]
    except OSError:
        return None
    for version, fstype in ((2, "cgroup2"), (1, "cgroup")):
        path = next((p for hid, ctl, p in own if (hid == "0" and ctl == "") == (version == 2)
                     and (version == 2 or "memory" in ctl.split(","))), None)
        for pre, post in mounts:
            fields, (kind, _, options) = pre.split(), post.split()[:3]
            if path is None or kind != fstype or (version == 1 and "memory" not in options.split(",")):
                continue
            root, mountpoint = fields[3], fields[4].replace("\\040", " ")
            if not (path + "/").startswith(root.rstrip("/") + "/"):     # our cgroup is outside this mount
                continue
            parent = os.path.normpath(mountpoint + "/" + path[len(root.rstrip("/")):])
            # v2: children have memory.max only if "memory" is already in our cgroup.subtree_control. Not
            # enabled here: that changes the host's setup, and the kernel refuses it for a cgroup with
            # processes (ours has us) unless it is the root cgroup.
            where = _CgroupParent(version, parent)
            try:
                _Cgroup.create(where, 64 << 20).remove()
            except OSError:
                continue
            return where
    return None


class _Cgroup:
    """One run's cgroup: every process of the sandbox is born in it, so they all share one memory limit."""

    def __init__(self, version: int, path: str):
        self.version, self.path = version, path

    @classmethod
    def create(cls, where: _CgroupParent, limit: int) -> _Cgroup:
        path = os.path.join(where.parent, _CGROUP_PREFIX + os.urandom(8).hex())
        os.mkdir(path)
        cgroup = cls(where.version, path)
        try:
            if where.version == 2:
                cgroup._write("memory.max", limit)
                cgroup._write("memory.swap.max", 0, optional=True)     # the limit is not dodged into swap
                cgroup._write("memory.oom.group", 1, optional=True)    # an OOM kill takes the whole sandbox
            else:
                cgroup._write("memory.limit_in_bytes", limit)
                cgroup._write("memory.memsw.limit_in_bytes", limit, optional=True)    # memory + swap
        except OSError:
            cgroup.remove()
            raise
        return cgroup

    def add(self, pid: int) -> None:
        self._write("cgroup.procs", pid)

    def oom_kills(self) -> int:
        """How many processes the kernel killed for want of memory in this cgroup."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            with open(os.path.join(self.path, name)) as f:
                counts = dict(line.split() for line in f if len(line.split()) == 2)
            return int(counts.get("oom_kill", 0))
        except (OSError, ValueError):
            return 0

    def remove(self) -> None:
        """Kill whatever is still in it (a fallback-mode process that left the session), then remove it."""
        for _ in range(100):
            try:
                with open(os.path.join(self.path, "cgroup.procs")) as f:
                    pids = [int(line) for line in f if line.strip()]
                if pids and self.version == 2:
                    self._write("cgroup.kill", 1, optional=True)   # atomic (Linux >= 5.14)
                for pid in pids:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:     # EBUSY: killed processes are still exiting
                time.sleep(0.02)

    def _write(self, name: str, value: int, optional: bool = False) -> None:
        try:
            with open(os.path.join(self.path, name), "w") as f:
                f.write(str(value))
        except FileNotFoundError:   # a kernel without this knob
            if not optional:
                raise


# ---- the launcher: `python -I -S sandbox.py WORKDIR ISOLATED MEMORY CPU FSIZE NPROC WATCHDOG` ------------------
# Runs as the evaluator's child (fallback) or as pid 1 of the new namespaces (under unshare). It sets up
# what must be set up from inside, forks the program, reports "layers ...", "oom" (the watchdog killed the
# program), "exit CODE" (negative: killed by that signal) and "cpu SECONDS" (the program's CPU time, with
# the children it waited for) or "error MESSAGE" on its stdout, which is a
# file the evaluator reads afterwards. WATCHDOG: the memory limit of the program's processes together, 0
# where a cgroup enforces it.

def _launch(workdir: str, isolated: bool, memory: int, cpu: int, fsize: int, nproc: int, watchdog: int) -> int:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        os.chdir(workdir)
        layers = _jail(libc, workdir) if isolated else []
        if not isolated:
            # Orphans of the program are re-parented to us instead of init, so _sweep can find them.
            _check(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0))
            layers.append("subreaper")
            if os.geteuid() == 0:   # root without a usable `nobody`: at least no capabilities
                with contextlib.suppress(OSError):
                    _drop_capabilities(libc)
                    layers.append("no-capabilities")
        _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
        layers.append("no-new-privs")
        if watchdog:
            layers.append("memory-watchdog")
        # Not dumpable: the program (same uid) cannot ptrace us or open our report through /proc/<pid>/fd.
        # The forked program becomes dumpable again when it execs.
        _check(libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0))
        # RLIMIT_NPROC counts every task of the real uid, not just ours: a small absolute value would stop
        # a user who already runs many processes (Ray workers) from starting the program at all. So the
        # limit is what the uid runs now plus the allowance. Inside the user namespace the count is per
        # namespace (Linux >= 5.14), so there it is just the launcher and unshare (+1) plus the allowance.
        nproc += _tasks_of(os.getuid()) + 1
    except Exception as e:  # noqa: BLE001 - any setup failure is reported, then the probe falls back
        _say(f"error sandbox setup failed: {e}")
        return 1
    _say("layers " + ",".join(layers))
    program = os.fork()
    if program == 0:
        _exec_program(memory, cpu, fsize, nproc)
    with contextlib.suppress(OSError):
        os.setpgid(program, program)    # also here, so that the group exists whichever side runs first
    if not isolated:    # the evaluator's timeout: kill the program's process group, then sweep below
        signal.signal(signal.SIGTERM, lambda *_: _sweep(program, reap=False))
    status, usage = _wait(program, isolated, watchdog)
    _say(f"exit {os.waitstatus_to_exitcode(status)}")
    _say(f"cpu {usage.ru_utime + usage.ru_stime:.3f}")
    if not isolated:    # in the namespace, everything left dies with us
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _sweep(program)
    return 0


def _wait(program: int, isolated: bool, watchdog: int) -> tuple[int, resource.struct_rusage]:
    """Reap children until the program exits (as init or subreaper we also reap its orphans); its wait
    status and resource usage. With a `watchdog` limit, meanwhile kill all the program's processes once together they hold
    more than that."""
    if watchdog:
        # Blocked, SIGCHLD stays pending for sigtimedwait, which so wakes as soon as a child exits. Only
        # after the fork: the program must not inherit the blocked signal.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    while True:
        pid, status, usage = os.wait4(-1, os.WNOHANG if watchdog else 0)
        if pid == program:
            return status, usage
        if pid == 0:    # no child has exited: look at memory, then sleep until one does (or a while)
            tree = _program_tree(isolated)
            if sum(rss for _, rss in tree) > watchdog:
                _say("oom")
                with contextlib.suppress(OSError):
                    os.killpg(program, signal.SIGKILL)
                for p, _ in tree:
                    with contextlib.suppress(OSError):
                        os.kill(p, signal.SIGKILL)
                watchdog = 0    # done: from now on just wait (the program is dead or dying)
            else:
                signal.sigtimedwait({signal.SIGCHLD}, _WATCH_INTERVAL)


def _program_tree(isolated: bool) -> list[tuple[int, int]]:
    """(pid, resident bytes) of the program's processes: in the pid namespace all but us (init); else our
    descendants (as subreaper, orphans that left the program's session are still ours)."""
    me, processes = os.getpid(), _processes()
    if isolated:
        return [(p, rss) for p, _, rss in processes if p != me]
    children = {}
    for p, ppid, rss in processes:
        children.setdefault(ppid, []).append((p, rss))
    tree, todo = [], [me]
    while todo:
        for p, rss in children.get(todo.pop(), ()):
            tree.append((p, rss))
            todo.append(p)
    return tree


def _jail(libc, workdir: str) -> list[str]:
    """Inside the fresh namespaces: a private root and a task cap, then drop all capabilities."""
    layers = ["user-namespace", "pid-namespace", "net-namespace", "mount-namespace"]    # made by unshare
    os.setsid()     # the program's session and process group lie wholly inside the namespace
    # pid_max is per pid namespace since Linux 6.14. Before, it is global, and uid 0 of a user namespace
    # that root made may write it: never touch it there.
    if _kernel() >= (6, 14):
        with contextlib.suppress(OSError):
            with open("/proc/sys/kernel/pid_max", "w") as f:
                f.write("301")
            layers.append("pid-max")
    # Not suppressed: a failure fails the probe, which then falls back to no namespaces, so that
    # "mount-namespace" always comes with a private, read-only root.
    _private_root(libc, workdir)
    layers += ["private-root", "read-only-fs"]
    # As root of its user namespace the program could remount, unmount /proc or touch the network setup.
    _drop_capabilities(libc)
    layers.append("no-capabilities")
    return layers


def _private_root(libc, workdir: str) -> None:
    """Make the root a fresh tmpfs with read-only bind mounts of what Python needs (see the module
    docstring) and the working directory, read-write at _PRIVATE_WORKDIR, its cwd; the rest of the host is
    gone."""
    python = sorted(_python_dirs())
    if any(_within(d, os.path.dirname(_PRIVATE_WORKDIR)) for d in python):     # raised: the probe falls back
        raise OSError(f"the Python installation lies under {os.path.dirname(_PRIVATE_WORKDIR)}, which the "
                      "private root keeps for the working directory")
    # The tmpfs goes over the working directory (any directory would do; this namespace is ours alone), so
    # the real one is reached through a descriptor opened first.
    keep = os.open(workdir, os.O_PATH | os.O_DIRECTORY)
    new = workdir
    _mount(libc, "tmpfs", new, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755")
    exposed = []    # host paths now visible, under which nothing more is bound

    def expose(path: str) -> None:
        if not os.path.lexists(path) or any(_within(path, e) for e in exposed):
            return
        target, real = new + path, os.path.realpath(path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if real != path and any(_within(real, e) for e in exposed):    # e.g. /bin -> usr/bin, /etc/localtime
            os.symlink(real, target)    # absolute, to what the new root shows at that same path
        else:
            if os.path.isdir(path):
                os.mkdir(target)
            else:
                open(target, "x").close()
            _mount(libc, path, target, None, _MS_BIND | _MS_REC)
            _read_only(libc, target)    # at once: nothing later may write through it to the host
        exposed.append(path)

    for path in _SYSTEM_DIRS + tuple(python) + _SYSTEM_FILES:
        if path != "/":     # a Python installed at / would expose everything: it then fails the probe
            expose(path)
    for name in _DEVICES:
        expose(f"/dev/{name}")
    os.makedirs(f"{new}/dev", exist_ok=True)
    for name, to in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                     ("stderr", "/proc/self/fd/2")):
        os.symlink(to, f"{new}/dev/{name}")
    expose("/proc")     # the pid namespace's own, mounted by unshare; read-only: no sysctl writes
    os.makedirs(new + _PRIVATE_WORKDIR)
    _read_only(libc, new, recursive=False)
    _mount(libc, f"/proc/self/fd/{keep}", new + _PRIVATE_WORKDIR, None, _MS_BIND)   # the one writable mount
    os.close(keep)
    os.chdir(new)
    pivot = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if pivot is not None and libc.syscall(ctypes.c_long(pivot), b".", b".") == 0:
        # The old root now sits on top of the new one at "/": detach it, and with it the host's tree.
        _check(libc.umount2(b".", _MNT_DETACH))
    else:
        # E.g. "/" is not a mount point. The old tree stays in the namespace, but out of reach: leaving a
        # chroot needs CAP_SYS_CHROOT (dropped before the program starts) or a descriptor outside (none).
        _check(libc.chroot(b"."))
    os.chdir(_PRIVATE_WORKDIR)


def _python_dirs() -> set[str]:
    """The Python installation: prefixes (a venv's and its base), the interpreter's directory, and the
    directories of the shared libraries it has loaded (installs outside the prefix: nix, conda, brew)."""
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
            os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable))}
    with open("/proc/self/maps") as f:
        for line in f:
            name = line.split(maxsplit=5)[5:]
            if name and name[0].startswith("/") and os.path.isfile(name[0].rstrip("\n")):
                dirs.add(os.path.dirname(name[0].rstrip("\n")))
    return {os.path.normpath(d) for d in dirs if d}


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _mount(libc, source, target, fstype, flags: int, data=None) -> None:
    args = [None if a is None else os.fsencode(a) for a in (source, target, fstype, data)]
    _check(libc.mount(*args[:3], ctypes.c_ulong(flags), args[3]))


def _read_only(libc, path: str, recursive: bool = True) -> None:
    try:
        _mount_setattr(libc, os.fsencode(path), set_=_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, recursive=recursive)
    except OSError as e:
        if e.errno != errno.ENOSYS:
            raise
        # Linux < 5.12: a classic read-only remount, of this mount only (not its submounts). In a user
        # namespace it must repeat the flags that the mount already has and that are locked.
        have = os.statvfs(path).f_flag
        kept = have & (os.ST_NODEV | os.ST_NOEXEC | os.ST_NOATIME | os.ST_NODIRATIME)     # same bits as MS_*
        kept |= _MS_RELATIME if have & os.ST_RELATIME else 0
        _mount(libc, None, path, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | kept)


def _kernel() -> tuple[int, int]:
    try:
        major, minor = os.uname().release.split("-")[0].split(".")[:2]     # "6.8.0-45-generic"
        return int(major), int(minor)
    except ValueError:
        return (0, 0)


def _drop_capabilities(libc) -> None:
    # Empty the bounding set first (exec as uid 0 would otherwise grant it all back), then our own sets.
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    for cap in range(last_cap + 1):
        _check(libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0))
    _check(libc.capset((ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0), (ctypes.c_uint32 * 6)()))


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _mount_setattr(libc, path: bytes, set_: int = 0, clear: int = 0, recursive: bool = True) -> None:
    attr = _MountAttr(set_, clear, 0, 0)
    _check(libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_long(_AT_FDCWD), path,
                        ctypes.c_long(_AT_RECURSIVE if recursive else 0), ctypes.byref(attr),
                        ctypes.c_long(ctypes.sizeof(attr))))


def _exec_program(memory: int, cpu: int, fsize: int, nproc: int) -> None:
    try:
        os.setpgid(0, 0)    # a process group of its own, which the launcher can kill as a whole
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)    # stdout is discarded; fd 1 was the launcher's report
        for res, soft, hard in ((resource.RLIMIT_AS, memory, memory), (resource.RLIMIT_CPU, cpu, cpu + 1),
                                (resource.RLIMIT_FSIZE, fsize, fsize), (resource.RLIMIT_NPROC, nproc, nproc),
                                (resource.RLIMIT_CORE, 0, 0)):
            cap = resource.getrlimit(res)[1]
            if cap != resource.RLIM_INFINITY:   # an unprivileged process cannot raise its hard limit
                soft, hard = min(soft, cap), min(hard, cap)
            resource.setrlimit(res, (soft, hard))
        # Not -I: it would also ignore PYTHONHASHSEED; the environment is already an allow-list.
        os.execv(sys.executable, [sys.executable, "-s", "-B", _PROGRAM])
    except BaseException as e:  # noqa: BLE001
        os.write(2, f"sandbox: cannot start the program: {e}\n".encode())
    finally:
        os._exit(127)


def _sweep(group: int, reap: bool = True) -> None:
    """Fallback: kill what the program left behind: its process group at once (a fork bomb cannot outrun
    that), then, as subreaper, our children and the orphans each kill hands us, until none is left."""
    with contextlib.suppress(OSError):
        os.killpg(group, signal.SIGKILL)
    while reap:
        kids = _children(os.getpid())
        if not kids:
            return
        for pid in kids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for _ in kids:      # each of them will exit (or already has); orphans they leave come next round
            try:
                os.wait()
            except ChildProcessError:
                return


def _tasks_of(uid: int) -> int:
    tasks = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
                if int(fields["Uid"].split()[0]) == uid:
                    tasks += int(fields["Threads"])
            except (OSError, KeyError, ValueError):
                continue
    return tasks


def _check(ret: int) -> None:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _say(line: str) -> None:
    os.write(1, (line + "\n").encode())


if __name__ == "__main__":
    sys.exit(_launch(sys.argv[1], sys.argv[2] == "1", *map(int, sys.argv[3:8])))
