"""Run untrusted Python programs (generated HumanEval / MBPP solutions plus their tests) in a sandbox.

``run_python(program)`` writes the program to a fresh temporary directory, runs it in a separate process
and reports whether it exited 0 within every limit. The parent survives anything the program does.
Containment is layered, so that the inner layers still hold where an outer one is unavailable:

1. Process boundary. The program runs under a throwaway launcher (this file, run as a script) in a new
   session, so the evaluating process is never its parent nor in its process group.
2. Private working directory. cwd, HOME and TMPDIR are a fresh ``tempfile.mkdtemp`` directory, removed
   after every run, timeouts included.
3. Scrubbed environment. Only an allow-list reaches the program (PATH, C.UTF-8 locale, HOME, TMPDIR,
   PYTHONHASHSEED=0, PYTHONDONTWRITEBYTECODE=1): no credentials, no proxies.
4. Resource limits on the program: RLIMIT_AS (memory), RLIMIT_CPU (SIGXCPU, then SIGKILL a second
   later), RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_CORE=0, and no_new_privs (setuid binaries grant nothing).
5. Wall-clock timeout, enforced by the evaluator, which then kills the program's whole process tree.
6. Namespaces, where util-linux ``unshare`` (>= 2.32) works (probed once per process): new user, pid, net and
   mount namespaces. The launcher is pid 1 of the pid namespace: the program cannot see or signal the
   evaluator, ``kill(-1, ...)`` stays inside, and every process it spawned dies with the launcher. /proc
   is remounted, so other processes' environments are invisible; the network namespace has only a
   loopback device that is down; the whole filesystem is remounted read-only except the working
   directory (Linux >= 5.12); the namespace's pid_max is lowered to its minimum, 301 tasks (Linux >= 6.14,
   a cap that holds even for root, whom RLIMIT_NPROC ignores); then the launcher drops every capability,
   so the program cannot undo any of it.
7. When the evaluator runs as root, the program runs as ``nobody`` if that user can run
   ``sys.executable``: RLIMIT_NPROC does not apply to root, and root's files stay out of reach.
8. Bounded output. stdout is discarded; stderr goes to an unlinked temporary file, bounded by
   RLIMIT_FSIZE, of which only the last 64 KiB is read.

Fallback, where ``unshare`` is missing or not permitted (e.g. Docker's default seccomp profile): layers
1-5, 7 and 8 still hold, the launcher is a child subreaper that kills whatever the program left behind,
on timeout the launcher kills the program and the evaluator the session's process group, and a root
launcher drops all capabilities. Not contained in fallback mode: network access; writes outside the
working directory wherever the program's uid may write (for root without a usable ``nobody``: every
root-owned file); reading /proc/<pid>/environ of other processes of that uid; ``kill(-1, ...)``, which
reaches every process of that uid, the evaluator's included when it is the same; task count for uid 0.
A process that leaves the session and outlives the launcher survives the run.

``containment()`` lists the layers active on this machine.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import math
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
_BASE_LAYERS = ("session", "private-workdir", "scrubbed-env", "rlimits", "wall-clock-timeout", "bounded-output")
_PROBE = "open('probe.txt', 'w').write('ok')\n"   # also proves the working directory is writable

# Linux constants (stable ABI) for the launcher.
_PR_SET_DUMPABLE, _PR_CAPBSET_DROP, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 4, 24, 36, 38
_MS_BIND, _MS_REC = 4096, 16384
_SYS_MOUNT_SETATTR = 442            # same number on every architecture (Linux >= 5.12)
_AT_FDCWD, _AT_RECURSIVE = -100, 0x8000
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID = 1, 2
_CAPABILITY_VERSION_3 = 0x20080522


@dataclass(frozen=True)
class SandboxResult:
    passed: bool        # exited 0 within every limit
    status: str         # "passed" | "failed" | "timeout" | "killed" | "error"
    detail: str         # one short line, e.g. the last line of stderr ("AssertionError")


def run_python(program: str, *, timeout: float = 3.0, memory_mb: int = 1024, max_processes: int = 32,
               max_file_mb: int = 16, cpu_seconds: int | None = None) -> SandboxResult:
    """Run `program` (Python source) in the sandbox. `timeout` is wall-clock seconds from the start,
    `memory_mb` the address-space limit of each process, `max_processes` how many processes and threads
    it may run at once, itself included (RLIMIT_NPROC; never enforced for uid 0), `max_file_mb` the
    largest file it may write (stderr included), `cpu_seconds` the CPU time of each process (default
    ceil(timeout) + 1, so that the wall-clock timeout normally fires first)."""
    return _run(program, _mode(), timeout, memory_mb, max_processes, max_file_mb, cpu_seconds)[0]


def containment() -> tuple[str, ...]:
    """The containment layers active on this machine (probed on first use)."""
    return _mode().layers


@dataclass(frozen=True)
class _Mode:
    unshare: str | None         # path of util-linux unshare: namespaces; None: fallback
    uid: int | None             # run as this uid (evaluator is root); None: as the evaluator's uid
    layers: tuple[str, ...] = ()


@functools.lru_cache(maxsize=None)
def _mode() -> _Mode:
    """Try the strongest configuration first; keep the first one that runs a trivial program."""
    unshare = shutil.which("unshare") or shutil.which("unshare", path="/usr/bin:/bin")
    for ns in ([unshare] if unshare else []) + [None]:
        for uid in ([_NOBODY] if os.geteuid() == 0 else []) + [None]:
            result, layers = _run(_PROBE, _Mode(ns, uid), 30.0, 1024, 32, 16, None)
            if result.passed:
                return _Mode(ns, uid, _BASE_LAYERS + (("unprivileged-uid",) if uid is not None else ()) + layers)
    return _Mode(None, None, _BASE_LAYERS)   # even the plain launcher fails: runs will report why


def _run(program, mode, timeout, memory_mb, max_processes, max_file_mb, cpu_seconds):
    cpu = cpu_seconds if cpu_seconds is not None else math.ceil(timeout) + 1
    workdir = tempfile.mkdtemp(prefix="l2pd-sandbox-")
    try:
        path = os.path.join(workdir, _PROGRAM)
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:     # bad text: SyntaxError
            f.write(program)
        if mode.uid is not None:
            for p in (workdir, path):
                os.chown(p, mode.uid, mode.uid)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": workdir,
               "TMPDIR": workdir, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        cmd = [sys.executable, "-I", "-S", os.path.abspath(__file__), workdir, "1" if mode.unshare else "0",
               str(memory_mb << 20), str(cpu), str(max_file_mb << 20), str(max_processes)]
        if mode.unshare:
            # --kill-child: should unshare die, the namespace's init (and with it everything) dies too.
            cmd = [mode.unshare, "--user", "--map-root-user", "--pid", "--fork", "--kill-child", "--net",
                   "--mount", "--mount-proc", *cmd]
        drop = {} if mode.uid is None else {"user": mode.uid, "group": mode.uid, "extra_groups": []}
        with tempfile.TemporaryFile() as report, tempfile.TemporaryFile() as stderr:
            try:
                proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=report,
                                        stderr=stderr, start_new_session=True, **drop)
            except (OSError, ValueError, subprocess.SubprocessError) as e:
                return SandboxResult(False, "error", _clip(f"cannot start the sandbox: {e}")), ()
            timed_out = not _exited(proc.pid, timeout)
            if timed_out:
                _stop(proc.pid, isolated=mode.unshare is not None)
            # Not yet reaped, so the group id cannot have been reused: sweep up whatever is left in it.
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            report.seek(0)
            lines = report.read(4096).decode("utf-8", "replace").splitlines()
            fields = dict(line.split(" ", 1) for line in lines if " " in line)
            stderr.seek(max(0, os.fstat(stderr.fileno()).st_size - _STDERR_TAIL))
            last = _last_line(stderr.read(_STDERR_TAIL))
        layers = tuple(filter(None, fields.get("layers", "").split(",")))
        return _verdict(proc.returncode, fields, last, timed_out, timeout), layers
    finally:
        _remove(workdir)


def _verdict(returncode, fields, last, timed_out, timeout) -> SandboxResult:
    if timed_out:
        return SandboxResult(False, "timeout", f"timed out after {timeout:g} s")
    if "error" in fields:
        return SandboxResult(False, "error", _clip(fields["error"]))
    code = fields.get("exit", "")
    if code.lstrip("-").isdigit():
        code = int(code)
        if code == 0:
            return SandboxResult(True, "passed", "")
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
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])    # comm may contain spaces
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                kids.append(int(entry))
    return kids


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


# ---- the launcher: `python -I -S sandbox.py WORKDIR ISOLATED MEMORY CPU FSIZE NPROC` ----------------------
# Runs as the evaluator's child (fallback) or as pid 1 of the new namespaces (under unshare). It sets up
# what must be set up from inside, forks the program, reports "layers ..." and "exit CODE" (negative: killed
# by that signal) or "error MESSAGE" on its stdout, which is a file the evaluator reads afterwards.

def _launch(workdir: str, isolated: bool, memory: int, cpu: int, fsize: int, nproc: int) -> int:
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
    while True:         # as init or subreaper we also reap the program's orphans
        pid, status = os.wait()
        if pid == program:
            break
    _say(f"exit {os.waitstatus_to_exitcode(status)}")
    if not isolated:    # in the namespace, everything left dies with us
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _sweep(program)
    return 0


def _jail(libc, workdir: str) -> list[str]:
    """Inside the fresh namespaces: lock the filesystem and task count down, then drop all capabilities."""
    layers = ["user-namespace", "pid-namespace", "net-namespace", "mount-namespace"]    # made by unshare
    os.setsid()     # the program's session and process group lie wholly inside the namespace
    # pid_max is per pid namespace since Linux 6.14. Before, it is global, and uid 0 of a user namespace
    # that root made may write it: never touch it there.
    if _kernel() >= (6, 14):
        with contextlib.suppress(OSError):
            with open("/proc/sys/kernel/pid_max", "w") as f:
                f.write("301")
            layers.append("pid-max")
    with contextlib.suppress(OSError):
        wd = workdir.encode()
        _check(libc.mount(wd, wd, None, ctypes.c_ulong(_MS_BIND | _MS_REC), None))   # a mount of its own...
        _mount_setattr(libc, b"/", set_=_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID)      # ...stays writable
        _mount_setattr(libc, wd, clear=_MOUNT_ATTR_RDONLY)
        os.chdir(workdir)   # onto the writable bind mount
        layers.append("read-only-fs")
    # As root of its user namespace the program could remount, unmount /proc or touch the network setup.
    _drop_capabilities(libc)
    layers.append("no-capabilities")
    return layers


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


def _mount_setattr(libc, path: bytes, set_: int = 0, clear: int = 0) -> None:
    attr = _MountAttr(set_, clear, 0, 0)
    _check(libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_long(_AT_FDCWD), path,
                        ctypes.c_long(_AT_RECURSIVE), ctypes.byref(attr), ctypes.c_long(ctypes.sizeof(attr))))


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
    sys.exit(_launch(sys.argv[1], sys.argv[2] == "1", *map(int, sys.argv[3:7])))


def run_checked(program: str, *, timeout: float = 3.0) -> bool:
    """Whether `program` passes; raises when the sandbox itself could not run it (a broken machine must not
    look like wrong answers)."""
    result = run_python(program, timeout=timeout)
    if result.status == "error":
        raise RuntimeError(f"the sandbox could not run a program: {result.detail}")
    return result.passed
