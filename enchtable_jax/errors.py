"""The package's one error type for problems with the user's input or environment.

`EnchtableError` is what every loader, checker and command raises when a file, tensor, field or option is
wrong: the CLI prints its message on one line and exits 2. Anything else that escapes is a bug and keeps its
traceback. It derives from ValueError so that code written against the earlier, plainer errors still works.
"""

from __future__ import annotations

import os
import re


class EnchtableError(ValueError):
    """Bad input or environment, described in one line that names the file, tensor, field or option."""


class MissingExtraError(EnchtableError, ImportError):
    """An optional dependency is not installed; the message names the pip extra that brings it.

    Also an ImportError, so code that probes for an optional backend with `except ImportError` still works.
    """


# tensorstore, under orbax, reports a failed file operation as ValueError("CODE: ... [os_error_code='N']"),
# and damaged data as DATA_LOSS. These codes are the environment's or the file's, never a bug of the caller.
_STORAGE_CODES = ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "NOT_FOUND", "DATA_LOSS", "UNAVAILABLE", "INTERNAL")
_OS_ERROR_CODE = re.compile(r"\[os_error_code='?(\d+)'?\]")
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')


def storage_error(e: BaseException) -> Exception | None:
    """The OSError (errno and file) or EnchtableError that a tensorstore failure stands for; None for any other
    exception (a bug keeps its traceback)."""
    if not isinstance(e, ValueError) or isinstance(e, EnchtableError):
        return None
    text = str(e)
    code = text.split(":", 1)[0]
    if code not in _STORAGE_CODES:
        return None
    paths = _QUOTED_PATH.findall(text)
    filename = paths[-1] if paths else None
    number = _OS_ERROR_CODE.search(text)
    if number is not None:
        return OSError(int(number.group(1)), os.strerror(int(number.group(1))), filename)
    if code == "DATA_LOSS":
        return EnchtableError(f"{filename or 'a checkpoint file'}: damaged or truncated ({text.splitlines()[0][:200]})")
    return None
