"""Stopping a training run by a signal: the first SIGINT, SIGTERM or SIGHUP asks the loop to
finish the update under way, save and stop; a second one stops at once.

SIGHUP (a closed terminal or ssh session) is treated like SIGTERM (a scheduler's stop), so
neither loses the work since the last checkpoint. Under DDP the loop agrees on the stop with
a collective (``Processes.max_flag``), so every process stops after the same update.
"""

import os
import signal
import sys
import threading
import time

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, name))  # Windows has no SIGHUP


class Interrupted(KeyboardInterrupt):
    """A signal stopped ``TrainLoop.run`` at an update boundary, after it saved.

    ``signum`` is the signal; the message says where the checkpoint is.
    """

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum

    @classmethod
    def at(cls, signum, step, path, held=False, during=None):
        """The exception for a run stopped at ``step``: saved to ``path`` then, already ``held``
        there, or (at step 0) not saved at all; ``during`` names what the signal cut short."""
        name = signal_name(signum) + (f" during {during}" if during else "")
        if held:
            where = f"at step {step}, which {path} already holds"
        elif step == 0:
            return cls(signum, f"stopped by {name} before the first update; nothing was saved, "
                               f"and the same command starts from the beginning")
        else:
            where = f"at step {step}, saved to {path}"
        return cls(signum, f"stopped by {name} {where}; run the same command again to resume "
                           f"from there")


class StoppedAtOnce(KeyboardInterrupt):
    """A second signal stopped the run at once, without saving; ``signum`` is that signal."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_name(signum):
    return signal.Signals(signum).name


class StopSignals:
    """The stop signals received while installed (``with StopSignals(...) as signals:``).

    ``first`` is the first signal received (None before), for the loop to act on at the next
    update boundary. A second signal raises ``StoppedAtOnce`` in the main thread; under DDP a
    second one within a second of the first is the same request (torchrun passes on the
    signal it got, which a Ctrl-C also sent to every process directly) and is ignored.
    The previous handlers are restored on exit. Outside the main thread, where Python cannot
    install handlers, nothing is caught.

    :param announce: print what the first signal does (rank 0, not quiet).
    :param distributed: whether this process is one of several of a torchrun job.
    """

    def __init__(self, announce=True, distributed=False):
        self.announce = announce
        self.distributed = distributed
        self.first = None
        self._first_time = None
        self._pid = None
        self._previous = None

    def __enter__(self):
        self.first, self._pid = None, os.getpid()
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self.receive) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in (self._previous or {}).items():
            # None: a handler installed outside Python, which cannot be put back; the default instead.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = None
        return False

    def receive(self, signum, frame=None):
        """The handler: record the first signal, stop at once on a second."""
        if self._pid is not None and os.getpid() != self._pid:
            return  # a forked DataLoader worker: the main process stops it
        now = time.monotonic()
        if self.first is None:
            self.first, self._first_time = signum, now
            if self.announce:
                _write_stderr(f"\n{signal_name(signum)}: finishing this update, then saving a "
                              f"checkpoint; press Ctrl-C again to stop at once without saving\n")
            return
        if self.distributed and now - self._first_time < 1.0:
            return
        raise StoppedAtOnce(signum)


def _write_stderr(text):
    """Write from a signal handler: os.write, since a print interrupted by the signal would
    raise on re-entry."""
    try:
        os.write(sys.stderr.fileno(), text.encode())
    except (OSError, ValueError, AttributeError):
        pass  # no usable stderr (e.g. replaced by an object without a file descriptor)
