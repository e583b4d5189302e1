"""The errors that are not bugs, and how they read in one line. The bottom layer: imports nothing of the project.

An error that means bad input or a broken environment subclasses `InputError` and carries its exit status
(`exit_code`, 2): the CLI (cli/loader.guard) prints its message in one line and exits with it, and recognises it by
type, not by name. torch's CheckpointException (a BaseException that `except Exception` misses) is told by name
here, so that nothing of torch is imported to recognise it.
"""
from __future__ import annotations

import errno

EXIT_BAD_INPUT = 2
_RESUMABLE = "; rerun the same command to resume once that is fixed"


class InputError(Exception):
    """Bad input or environment: one line on stderr (the message, see one_line) and `exit_code`."""

    exit_code = EXIT_BAD_INPUT


def one_line(text: str) -> str:
    """`text` on one line: a line ending in ':' runs on into the next, other lines are joined by '; '."""
    out = ""
    for line in (x.strip() for x in str(text).splitlines()):
        if not line:
            continue
        out = line if not out else out + (" " if out.endswith(":") else "; ") + line
    return out


def is_checkpoint_exception(e: BaseException) -> bool:
    """torch.distributed.checkpoint's CheckpointException (told by name: nothing is imported for it)."""
    t = type(e)
    return t.__name__ == "CheckpointException" and t.__module__.startswith("torch.distributed.checkpoint")


def checkpoint_exception_summary(e: BaseException) -> str:
    """torch's CheckpointException in one line: the first failing rank's error (its str() holds every rank's
    whole traceback)."""
    failures = getattr(e, "failures", None) or {}
    for rank in sorted(failures):
        exc = failures[rank]
        exc = exc[0] if isinstance(exc, tuple) else exc
        more = f" (and {len(failures) - 1} more rank(s))" if len(failures) > 1 else ""
        text = str(exc) or ("the file ends early (truncated?)" if isinstance(exc, EOFError) else "")
        return one_line(f"rank {rank}: {type(exc).__name__}: {text}{more}".rstrip(": "))
    return one_line(str(e.args[0]) if e.args else type(e).__name__)


def _where(e: OSError) -> str:
    names = [str(n) for n in (e.filename, e.filename2) if n is not None]
    return f": {' -> '.join(names)}" if names else ""


def describe_os_error(e: OSError) -> str:
    """A broken environment in words: what happened and to which file."""
    code = e.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return f"no space left on device{_where(e)} ({e.strerror or 'disk full'}){_RESUMABLE}"
    if code == errno.EROFS:
        return f"read-only file system{_where(e)}; write the output somewhere writable"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied{_where(e)}"
    if code == errno.ENOENT:
        return f"no such file or directory{_where(e)}"
    if isinstance(e, (ConnectionError, TimeoutError)) or code is None:
        return one_line(str(e)) or type(e).__name__
    return f"{e.strerror or e}{_where(e)}"


def explain(e: BaseException) -> str | None:
    """The one-line message of a failure that is not a bug (bad input, broken environment), else None."""
    if isinstance(e, (SystemExit, KeyboardInterrupt, GeneratorExit)):
        return None
    if is_checkpoint_exception(e):
        return f"cannot read or write the distributed checkpoint ({checkpoint_exception_summary(e)})"
    if isinstance(e, InputError):
        return one_line(str(e)) or type(e).__name__
    if isinstance(e, OSError):
        return describe_os_error(e)
    return None
