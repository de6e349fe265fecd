"""What a person sees while a job runs: one progress bar per stage and a short summary, while everything else
written to the process's stdout and stderr (Ray Data's and Ray Train's progress, the workers' forwarded logs,
warnings) goes to a log file.

    with console.session("runs/collect", "collect", verbose=False):   # Ray's output -> runs/collect/collect.log
        console.say("256 prompts: 0 already done, 256 to collect")
        with console.progress(256, "collect", "prompt") as bar:
            bar.update(16)

The redirection is at the file-descriptor level (dup2 of fds 1 and 2), because Ray and its C++ core write to the
descriptors directly, not only through Python's sys.stdout. Sessions nest: the pipeline opens one and its stages
reuse it. verbose=True leaves the descriptors alone, so everything reaches the terminal as before.
`run_cli(main)` ends a job with one line: its error, or where the full traceback is.
"""
from __future__ import annotations

import contextlib
import os
import sys

from tqdm import tqdm

from .errors import Learn2PDError

_state = {"depth": 0, "out": None, "err": None, "log": None, "last_log": None, "at_close": []}


def log_path() -> str | None:
    """The active session's log file (None when verbose or outside a session)."""
    return _state["log"]


def last_log() -> str | None:
    """The log file of the latest session, also after it closed: where a failed job's traceback goes."""
    return _state["last_log"]


def _out():
    return _state["out"] or sys.stdout


def _err():
    return _state["err"] or sys.stderr


class _Lines:
    """A file for tqdm that is not a terminal (CI, a pipe): each refresh becomes its own line instead of a
    carriage-return redraw that would pile up on one line."""

    def __init__(self, file):
        self.file = file

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            print(text, file=self.file, flush=True)

    def flush(self) -> None:
        self.file.flush()


@contextlib.contextmanager
def session(output: str, name: str, verbose: bool = False):
    """For the duration, send fds 1 and 2 to the log file of job `name` writing to `output` (see log_file),
    unless `verbose` or a session is already active (the pipeline's stages write to the pipeline's log)."""
    if _state["depth"] or verbose:
        _state["depth"] += 1
        try:
            yield
        finally:
            _state["depth"] -= 1
        return
    log = os.path.abspath(log_file(output, name))
    os.makedirs(os.path.dirname(log), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    out, err = os.fdopen(os.dup(saved_out), "w", buffering=1), os.fdopen(os.dup(saved_err), "w", buffering=1)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    _state.update(depth=1, out=out, err=err, log=log, last_log=log)
    try:
        yield
    finally:
        for fn in _state["at_close"]:   # e.g. Ray's shutdown, whose last messages belong in the log too
            fn()
        _state["at_close"].clear()
        sys.stdout.flush()
        sys.stderr.flush()
        if output.startswith("s3://"):
            _upload(log, output, name)
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        out.close()
        err.close()
        _state.update(depth=0, out=None, err=None, log=None)


def at_close(fn) -> None:
    """Run `fn` when the session closes, while its output still goes to the log."""
    if _state["log"] and fn not in _state["at_close"]:
        _state["at_close"].append(fn)


def say(message: str) -> None:
    """A line for the person running the job (and for the log, which keeps the whole story)."""
    print(message, file=_out(), flush=True)
    if _state["log"]:
        print(message, flush=True)


def progress(total: int, desc: str, unit: str) -> tqdm:
    """A progress bar with counts, rate and ETA on stderr; where stderr is not a terminal, one such line at
    most every 10 s."""
    interactive = _err().isatty()
    return tqdm(total=total, desc=desc, unit=unit, file=_err() if interactive else _Lines(_err()),
                dynamic_ncols=interactive, mininterval=0.5 if interactive else 10.0, ascii=not interactive)


def log_file(output: str, name: str) -> str:
    """Where a job writing to `output` keeps its log: `<output>/<name>.log` for a local output; for s3:// outputs a
    local file under ./logs named after the prefix (a log is appended to while the job runs, S3 objects cannot
    be), copied to `<output>/<name>.log` when the session closes."""
    if output.startswith("s3://"):
        slug = "".join(c if c.isalnum() or c in "-." else "_" for c in output[len("s3://"):].strip("/"))
        return os.path.join("logs", f"{name}-{slug}.log")
    return os.path.join(output, f"{name}.log")


def _upload(local: str, output: str, name: str) -> None:
    """Copy a session's local log next to its s3:// output."""
    from . import storage
    try:
        with open(local, "rb") as f:
            storage.write_bytes(storage.join(output, f"{name}.log"), f.read())
    except (OSError, storage.StorageError) as e:   # the run's outputs are written: say so, do not fail the job
        print(f"the log stays at {local}: {e}", file=_out(), flush=True)


# ---- how a job ends: one line

def _own_error(exc: BaseException) -> Learn2PDError | None:
    """The Learn2PDError behind `exc`, also when Ray re-raised it from an actor or task (RayTaskError keeps the
    original as .cause; Ray Data chains its own exceptions with __cause__)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Learn2PDError):
            return _own_error(cause) or cause
        if isinstance(exc, Learn2PDError) and cause is None:
            return exc
        exc = exc.__cause__ or exc.__context__ or (cause if isinstance(cause, BaseException) else None)
    return None


def run_cli(main) -> None:
    """Run a job's main(). A Learn2PDError, raised here or in a Ray worker, ends it with its one-line message
    (exit 1); any other failure ends it with one line too when a log file holds the full traceback."""
    import traceback

    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("interrupted: rerun the same command to resume")
    except Exception as e:
        own = _own_error(e)
        if own is not None:
            sys.exit(f"error: {own}")
        log = last_log()
        if log is None:
            raise
        with open(log, "a") as f:
            traceback.print_exc(file=f)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        sys.exit(f"error: {type(e).__name__}: {first} (the full traceback is in {log}; --verbose shows everything)")
