"""The one exception type for user mistakes.

Anything raised as :class:`PrunellaError` is a problem with the input (a path,
a value, a file), not a bug: the CLI prints its message on one line and exits
with status 2, with no traceback.
"""


class PrunellaError(ValueError):
    """Bad input, described in one line that names the bad value and what is allowed."""
