"""One exception family, so entry points can print a one-line message instead of a traceback."""


class Learn2PDError(Exception):
    """Base class: the message names the problem and the fix."""


class ConfigError(Learn2PDError, ValueError):
    """An invalid decoding setting or input."""


class ModelLoadError(Learn2PDError):
    """Model weights or tokenizer could not be loaded."""


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
    import sys
    import traceback

    from . import console
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("interrupted: rerun the same command to resume")
    except Exception as e:
        own = _own_error(e)
        if own is not None:
            sys.exit(f"error: {own}")
        log = console.last_log()
        if log is None:
            raise
        with open(log, "a") as f:
            traceback.print_exc(file=f)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        sys.exit(f"error: {type(e).__name__}: {first} (the full traceback is in {log}; --verbose shows everything)")
