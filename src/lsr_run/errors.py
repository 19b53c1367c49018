"""The one exception type a user sees without a traceback.

Anything raised as `LsrError` is printed by the CLI as a single message naming the file, line or config key
at fault and what to do; everything else is a bug and keeps its traceback.
"""


class LsrError(RuntimeError):
    """A problem with the user's input or environment, explained in one message."""


class ConfigError(LsrError):
    """A config key with a bad value, named by its dotted path."""


class DataError(LsrError):
    """A dataset file that cannot be used, named by its path (and line where there is one)."""


class RunDirBusy(LsrError):
    """Another lsr-run process holds the run directory; nothing of it may be touched."""
