"""The package's one error type for problems with the user's input or environment.

`EnchtableError` is what every loader, checker and command raises when a file, tensor, field or option is
wrong: the CLI prints its message on one line and exits 2. Anything else that escapes is a bug and keeps its
traceback. It derives from ValueError so that code written against the earlier, plainer errors still works.
"""

from __future__ import annotations


class EnchtableError(ValueError):
    """Bad input or environment, described in one line that names the file, tensor, field or option."""
