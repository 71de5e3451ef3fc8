"""Atomic file writes, shared by checkpoints and compressed files."""

import glob
import os


def atomic_write(path, write):
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then rename it into place.

    A crash, an interrupt or a full disk in the middle leaves ``path`` as it was. The
    temporary file is removed on any error (which is re-raised); one left behind by a
    writer that was killed outright is removed by the next write to the same path.
    """
    path = os.fspath(path)
    remove_stale_temporaries(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: never leave a half-written temporary
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def remove_stale_temporaries(path):
    """Remove ``path.tmp.<pid>`` files whose writing process no longer exists (POSIX only)."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return
    for tmp in glob.glob(glob.escape(path) + ".tmp.*"):
        pid = tmp.rsplit(".", 1)[1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            try:
                os.remove(tmp)
            except OSError:
                pass
        except OSError:
            pass  # the process exists (owned by another user): leave its file alone
