"""Output folders and files: every command checks that it can write its `--out` before doing any work, writes
its files whole or not at all, and says in one line which file could not be written and why (a full disk
most often: a failed `write()` carries no file name, so the writers here add it)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
# how libraries that do not raise OSError (safetensors' Rust writer) say the same
DISK_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")


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


def os_error_behind(err: BaseException) -> OSError | None:
    """The OSError that `err` stands for, or None: `err` itself; an OSError in its cause/context chain (torch.save
    on a full disk reports the write's ENOSPC as the context of a RuntimeError 'unexpected pos …' raised while
    closing the archive); or a full disk told only in words (safetensors: 'I/O error: No space left on device
    (os error 28)'), which becomes OSError(ENOSPC)."""
    seen, link = set(), err
    while link is not None and id(link) not in seen:
        if isinstance(link, OSError) and link.errno is not None:
            return link
        seen.add(id(link))
        link = link.__cause__ or (None if link.__suppress_context__ else link.__context__)  # `from None` ends it
    text = str(err)
    if any(word in text for word in DISK_FULL_WORDS):
        return OSError(errno.EDQUOT if "quota" in text or "os error 122" in text else errno.ENOSPC, text)
    return None


@contextlib.contextmanager
def naming(path: str, temporary: str | None = None):
    """Re-raise a failed write of the block as an OSError naming `path` (`[Errno 28] No space left on device`
    alone does not say where; a file under the name `temporary`, by default `path.tmp…`, is named as `path`, the
    file the user asked for), whatever library wrote: torch's RuntimeError and safetensors' error that hide a full
    disk become the OSError behind them (`os_error_behind`). An error about another file keeps that file's name;
    any other error passes as is."""
    try:
        yield
    except Exception as err:  # anything but a failed write is re-raised as it is
        cause = os_error_behind(err)
        if cause is None:
            raise
        name = cause.filename
        if name is None or os.fspath(name).startswith((os.fspath(path), os.fspath(temporary or path))):
            name = path
        strerror = os.strerror(cause.errno) if cause.errno in DISK_FULL else (cause.strerror or str(cause))
        raise OSError(cause.errno, strerror, name) from None


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
    if err.errno in DISK_FULL:  # pyarrow's strerror is 'Error writing bytes to file. Detail: [errno 28] …'
        return f"disk full: cannot write {where} ({os.strerror(err.errno)}); free space or choose another folder{hint}"
    return f"cannot use {where}: {err.strerror or err}{hint}"
