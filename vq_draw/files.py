"""Atomic file writes, shared by checkpoints and compressed files, and a folder lock."""

import glob
import os
import weakref

try:
    import fcntl
except ImportError:  # Windows: no flock; FolderLock then does not lock
    fcntl = None


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


class FolderInUse(RuntimeError):
    """Another process holds the lock of a folder (``FolderLock``)."""

    def __init__(self, path, holder):
        self.path, self.holder = path, holder
        super().__init__(f"{path} is locked by process {holder or '(unknown)'}")


# Locks held by this process: a forked child (a DataLoader worker) must not keep them, or a
# kill -9 of this process would leave them held until the child exits. Weak references, so
# that a lock dropped without ``release`` (its file then closed by the garbage collector)
# leaves no stale descriptor number here: the child would otherwise point whatever now has
# that number (a worker's result pipe, say) at /dev/null, and lose what it writes there.
_held_locks = weakref.WeakSet()


def _drop_locks_in_child():
    for lock in list(_held_locks):
        if lock._file.closed:
            continue
        # Point the child's copy of the descriptor at /dev/null instead of closing it, so that
        # the child's file object closing it later cannot close an unrelated file.
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, lock._file.fileno())
        os.close(null)
    _held_locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_locks_in_child)


class FolderLock:
    """An exclusive OS lock (``flock``) on ``folder/.lock``, which holds the owner's PID.

    The operating system releases it when the process ends in any way (``kill -9`` included),
    so it is never stale. Raises ``FolderInUse`` naming the holder's PID when another process
    (or another ``FolderLock`` in this one) holds it, and ``OSError`` when the folder cannot
    be written. Not enforced on Windows, nor between machines on filesystems without flock.
    """

    def __init__(self, folder, name=".lock"):
        self.path = os.path.join(folder, name)
        self._file = open(self.path, "a+")  # "a+": never truncates the PID of a holder
        if fcntl is None:
            return
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip()
            self._file.close()
            raise FolderInUse(self.path, holder) from None
        except BaseException:
            self._file.close()
            raise
        _held_locks.add(self)
        self._file.truncate(0)
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    @property
    def held(self):
        return not self._file.closed

    def release(self):
        """Release the lock (the file stays: removing it could let two processes lock two files)."""
        if not self._file.closed:
            _held_locks.discard(self)
            self._file.close()
