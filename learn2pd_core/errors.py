"""One exception family, so entry points can print a one-line message instead of a traceback."""


class Learn2PDError(Exception):
    """Base class: the message names the problem and the fix."""


class ConfigError(Learn2PDError, ValueError):
    """An invalid decoding setting or input."""


class ModelLoadError(Learn2PDError):
    """Model weights or tokenizer could not be loaded."""


def run_cli(main) -> None:
    """Run a job's main(); a Learn2PDError ends it with its one-line message (exit 1), not a traceback."""
    import sys
    try:
        sys.exit(main())
    except Learn2PDError as e:
        sys.exit(f"error: {e}")
