"""One exception family, so entry points can print a one-line message instead of a traceback."""


class Learn2PDError(Exception):
    """Base class: the message names the problem and the fix."""


class ConfigError(Learn2PDError, ValueError):
    """An invalid decoding setting or input."""


class ModelLoadError(Learn2PDError):
    """Model weights or tokenizer could not be loaded."""
