"""What the command lines share: one-line usage errors, argument types and output checks.

Every command ends a failure with one line ``error: ...`` on stderr and exit status 1, never
a traceback: ``Parser`` does it for usage mistakes, ``fail`` for the rest. The checks here run
before any work, so that a bad flag or an output that cannot be written costs nothing (an
evaluation is not lost at its end because its ``--json`` folder is missing).
"""

import argparse
import os
import sys
import tempfile

from .devices import check_device


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line, like every other error."""

    def error(self, message):
        sys.exit(f"error: {message} (see '{self.prog} --help')")


def fail(message):
    """Exit with status 1 and ``error: message`` on one line."""
    sys.exit(f"error: {one_line(message)}")


def one_line(exc, limit=500):
    """An exception (or text) as one line: an OSError as 'FILE: reason', at most ``limit`` chars."""
    if isinstance(exc, BaseException):
        text = str(exc).strip() or type(exc).__name__
        if isinstance(exc, OSError) and exc.strerror and getattr(exc, "filename", None):
            text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc)
    return " ".join(text.split())[:limit]


def positive_int(text):
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def device(text):
    """argparse type: a device this machine has (``devices.check_device``, as training checks it)."""
    try:
        check_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def check_output(path, flag):
    """Raise ``ValueError`` unless ``path`` can be written as a file: its folder exists and is
    writable, and it is not a folder itself. Called before the work whose result it receives."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path}: the folder {os.path.dirname(path) or '.'} does not "
                         f"exist; create it first")
    try:  # try it: permissions, a read-only file system (root ignores only the first)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
        writable = not os.path.exists(path) or os.access(path, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        raise ValueError(f"{flag} {path}: cannot write there (permission denied or a read-only "
                         f"file system); choose another place")
