"""Output folders and files: every command checks that it can write its `--out` before doing any work, writes
its files whole or not at all, and says in one line which file could not be written and why (a full disk
most often: a failed `write()` carries no file name, so the writers here add it)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def first_missing(folder: str) -> str | None:
    """The outermost folder that `os.makedirs(folder)` would create (None when `folder` exists): what to remove
    to leave the file system as it was."""
    path, missing = os.path.abspath(folder), None
    while not os.path.exists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def ensure_writable_dir(folder: str, flag: str = "--out") -> str | None:
    """Create `folder` if missing and prove it writable; raises ValueError naming the flag and the reason.

    Returns the outermost folder it created (None when `folder` existed), so that a command that fails later can
    remove what it made (`remove_created`). On failure it leaves nothing behind: neither the probe file (a full
    disk creates it and then fails to write it) nor the folders it created."""
    created = first_missing(folder)
    probe = os.path.join(folder, f".write_test_{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
    except OSError as err:
        with contextlib.suppress(OSError):
            os.remove(probe)
        if created:
            shutil.rmtree(created, ignore_errors=True)
        if err.errno in DISK_FULL:
            raise ValueError(f"{flag} {str(folder)!r}: the disk is full ({err.strerror}); free space or choose "
                             "another folder") from None
        raise ValueError(f"{flag} {str(folder)!r} is not writable ({err.strerror or err})") from None
    os.remove(probe)
    return created


def remove_created(created: str | None, keep=lambda path: False) -> bool:
    """Remove the folder tree `created` (as returned by `ensure_writable_dir`) unless a file in it is one to
    `keep` (results worth more than a clean disk). Returns whether it removed it."""
    if not created or not os.path.isdir(created):
        return False
    for root, _, files in os.walk(created):
        if any(keep(os.path.join(root, name)) for name in files):
            return False
    shutil.rmtree(created, ignore_errors=True)
    return True


@contextlib.contextmanager
def naming(path: str):
    """Re-raise an OSError from the block with `path` as its file name when it has none (a failed write or
    close: `[Errno 28] No space left on device` alone does not say where)."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno is not None:
            raise OSError(err.errno, err.strerror or str(err), path) from None
        raise


def write_atomic(path: str, write, mode: str = "w") -> None:
    """Write `path` whole or not at all: `write(file)` fills `path.tmp`, which then replaces `path`.

    A failure (a full disk, Ctrl-C) removes the temporary file and leaves `path` as it was: never a half-written
    report, plot or checkpoint. The caller holds the folder (one writer), so the temporary name is fixed."""
    tmp = path + ".tmp"
    try:
        with naming(path), open(tmp, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def os_error_line(err: OSError, hint: str = "") -> str:
    """One line for an OSError met while working: 'disk full: cannot write PATH (...)' or 'cannot use PATH: ...'."""
    where = repr(os.fspath(err.filename)) if err.filename is not None else "a file"
    if err.errno in DISK_FULL:
        return f"disk full: cannot write {where} ({err.strerror}); free space or choose another folder{hint}"
    return f"cannot use {where}: {err.strerror or err}{hint}"
