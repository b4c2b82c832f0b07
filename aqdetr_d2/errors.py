"""Errors in what the user gave (a checkpoint, a dataset, a config) rather than in the code.

`train_net.py` and the tools report them as one line, `error: ...`, and exit with status 2;
`AQDETR_TRACEBACK=1` in the environment shows the traceback instead.
"""
import contextlib
import os
import sys

__all__ = ["InputRefused", "UserInputError", "user_errors_exit"]


class UserInputError(Exception):
    """Base of the errors whose message names the file or key, what is wrong and the fix."""

    def message(self) -> str:
        return str(self.args[0]) if self.args else type(self).__name__


class InputRefused(SystemExit):
    """Exit status 2 after the message was printed; `str()` gives the message (for tests)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self):
        return self.message


@contextlib.contextmanager
def user_errors_exit():
    """Turn a UserInputError raised inside the block into one stderr line and exit status 2."""
    try:
        yield
    except UserInputError as e:
        if os.environ.get("AQDETR_TRACEBACK"):
            raise
        message = f"error: {e.message()}"
        print(message, file=sys.stderr, flush=True)
        raise InputRefused(message) from None
