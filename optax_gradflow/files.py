"""Files written atomically, with the permissions any new file gets.

The threshold store and the monitor's export write through
:func:`write_atomically`: a temporary file in the target's directory, flushed
and fsync'ed, then ``os.replace``. A temporary file is created with mode 0600
(``tempfile.mkstemp``); the result is given the mode ``open()`` would have
given a new file, ``0666`` less the process's umask, so that a file written
here is readable by whoever could read any other file the user writes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading

_UMASK_LOCK = threading.Lock()


def new_file_mode() -> int:
    """``0o666 & ~umask``: the mode of a file created with ``open(path, "w")``."""
    # os.umask can only be read by setting it; the lock keeps two threads of
    # this process from seeing each other's temporary 0.
    with _UMASK_LOCK:
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path: str | os.PathLike[str], text: str, *, prefix: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically; readers see the old or the new file.

    Raises whatever the write raises, with the target untouched and the
    temporary file removed.
    """
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable where possible
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
