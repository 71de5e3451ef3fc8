"""Atomic writes: a failed or killed write never damages the file it replaces."""

import errno
import os
import subprocess
import sys

import pytest
import torch

from vq_draw import codec
from vq_draw.files import FolderLock, atomic_write
from vq_draw.checkpoint import save_checkpoint


def dead_pid():
    """The pid of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.skipif(os.name != "posix", reason="stale temporaries are recognized on POSIX only")
def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    path = tmp_path / "checkpoint.pt"
    dead = tmp_path / f"checkpoint.pt.tmp.{dead_pid()}"
    live = tmp_path / f"checkpoint.pt.tmp.{os.getppid()}"  # the parent process is running
    other = tmp_path / "checkpoint.pt.tmp.notes"
    for p in (dead, live, other):
        p.write_bytes(b"partial")
    save_checkpoint(str(path), {"step": 3})
    assert torch.load(path, weights_only=True)["step"] == 3
    assert sorted(os.listdir(tmp_path)) == sorted(["checkpoint.pt", live.name, other.name])


def test_interrupted_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "codes.vqd"
    path.write_bytes(b"old")

    def write(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, write)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["codes.vqd"]


def test_codec_disk_full_is_a_one_line_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "codes.vqd"
    path.write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(codec.CodecError, match=r"cannot write .*codes\.vqd: No space left on device"):
        codec.write_file(path, b"new contents")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["codes.vqd"]


def test_a_lock_dropped_without_release_leaves_a_forked_childs_files_alone(tmp_path):
    """A lock that is garbage-collected instead of released closes its descriptor; the number
    is then reused (here by a pipe, as a DataLoader worker's queue reuses it). A forked child
    must read that pipe, not the /dev/null that a held lock's copy is pointed at."""
    import gc

    lock = FolderLock(str(tmp_path))
    number = lock._file.fileno()
    del lock
    gc.collect()
    read_end, write_end = os.pipe()
    if read_end != number:  # the lowest free number, as a rule; make sure of it
        os.dup2(read_end, number)
        os.close(read_end)
    os.write(write_end, b"batch")
    pid = os.fork()
    if pid == 0:  # the child: a worker reading what the main process sent it
        os._exit(0 if os.read(number, 5) == b"batch" else 1)
    _, status = os.waitpid(pid, 0)
    os.close(number)
    os.close(write_end)
    assert os.waitstatus_to_exitcode(status) == 0
