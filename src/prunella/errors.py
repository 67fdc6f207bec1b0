"""The one exception type for user mistakes.

Anything raised as :class:`PrunellaError` is a problem with the input (a path,
a value, a file), not a bug: the CLI prints its message on one line and exits
with status 2, with no traceback.
"""


class PrunellaError(ValueError):
    """Bad input, described in one line that names the bad value and what is allowed."""


def first_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def warn(message: str) -> None:
    """Say ``message`` as one line on stderr: something looks wrong, and the run goes on."""
    import sys

    print(f"warning: {message}", file=sys.stderr)


_noticed: set[str] = set()


def notice(message: str) -> None:
    """Say ``message`` once per process, as one line on stderr (deprecations)."""
    import sys

    if message not in _noticed:
        _noticed.add(message)
        print(f"note: {message}", file=sys.stderr)
