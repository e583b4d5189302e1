"""Crash-safe file writes shared by every stage: write to a temporary sibling, fsync, then rename.

A reader (or a resumed run) therefore sees either the old file or the complete new one, never half of it.

Outputs get the permissions of any other file the process creates: 0666 (files) / 0777 (directories) less the
umask, not the 0600 / 0700 of tempfile's private temporaries, so another user (or a server running as another
user) can read an export as far as the umask allows.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
import threading
from typing import Any, Iterator

from megatron_inpo.errors import InputError

_UMASK_LOCK = threading.Lock()


def _read_umask() -> int:
    """The process's current umask, read without changing it where /proc says it (Linux >= 4.7); else by setting
    and restoring it under a lock (only this module's writers read it that way)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o022)
        os.umask(old)
    return old


def file_mode() -> int:
    """Mode of a new output file: what open() would give it (0o666 less the umask)."""
    return 0o666 & ~_read_umask()


def dir_mode() -> int:
    """Mode of a new output directory: what mkdir() would give it (0o777 less the umask)."""
    return 0o777 & ~_read_umask()


def _fsync_dir(path: Path) -> None:
    # The rename itself must reach the disk, or a power loss can resurrect the old name.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> Path:
    """Write `data` to `path` atomically. `durable=False` skips the fsyncs: readers still never see half a file,
    but a power loss may lose the write (for files rewritten often that nothing resumes from, e.g. progress)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())  # mkstemp's 0600 -> what open() would have made
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:  # write()/fsync() name no file
            e.filename = str(path)
        raise
    if durable:
        _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, durable: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), durable)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2, durable: bool = True) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n", durable)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; on success it is renamed to `path`, on error removed.

    With overwrite=True an existing `path` is replaced (moved aside first, deleted after the rename succeeded).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, dir_mode())  # mkdtemp's 0700 -> what mkdir() would have made
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old.{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- one command per directory -------------------------------------------------------------------------------------

LOCK_FILE = ".lock"
"""The lock file of a directory that one command at a time may write (a run directory)."""


class DirectoryBusy(InputError, RuntimeError):
    """Another live process holds the directory's lock; the message names it (pid, command, since when)."""


def _holder(fd: int) -> str:
    try:
        rec = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
        return f"pid {rec['pid']}, `{rec['command']}`, since {rec['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that left no record"


@contextlib.contextmanager
def exclusive(directory: str | os.PathLike, what: str = "this directory", name: str = LOCK_FILE) -> Iterator[None]:
    """Hold `<directory>/<name>` (default `.lock`) exclusively while the block runs, or raise DirectoryBusy at once,
    naming the holder.

    flock(2): the kernel drops the lock with the last descriptor of its holder, so a SIGKILLed holder never leaves
    a stale lock behind (the file stays, with the dead holder's record, and the next command takes it over). The
    descriptor is close-on-exec: stage subprocesses do not inherit it, so a stage left running cannot hold the lock
    of a driver that died (they die with it: their parent-death signal). The holder removes the file when the block
    ends (still holding it) and the directory too if it made it and it is empty, so that a refused command leaves
    nothing behind; a process that opened the file just before it was removed sees that its lock is on a removed
    file and opens the new one."""
    import fcntl
    import sys
    import time

    directory = Path(directory)
    made = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            if made:
                _remove_empty(directory)
            raise DirectoryBusy(f"{directory}: {what} is in use by {holder}; let it finish or stop it (Ctrl-C), "
                                "then rerun") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed this file after we opened it: lock the new one
    try:
        argv = list(getattr(sys, "orig_argv", sys.argv))  # as typed: `python -m megatron_inpo run ...`
        command = " ".join([Path(argv[0]).name, *argv[1:]]) if argv else "?"
        record = json.dumps({"pid": os.getpid(), "command": command[:300],
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode("utf-8"), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still held: see the docstring
        os.close(fd)  # releases the lock
        if made:
            _remove_empty(directory)


def _remove_empty(directory: Path) -> None:
    with contextlib.suppress(OSError):
        directory.rmdir()  # only if empty


def exclusive_output(path: str | os.PathLike, what: str) -> contextlib.AbstractContextManager:
    """exclusive() for one output file or directory of a command: the lock file is `<path>.lock` beside it, so
    that a refused command does not create the output."""
    path = Path(path)
    return exclusive(path.parent, what, name=path.name + ".lock")
