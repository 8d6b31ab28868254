"""Ctrl-C and SIGTERM: one line from the parent, no traceback from any child process.

* SIGTERM (a scheduler, `kill`) raises `Terminated` (a KeyboardInterrupt) in the main process, so that it stops
  the workers and says how to resume exactly as Ctrl-C does, and the exit status says which one it was:
  130 = 128 + SIGINT, 143 = 128 + SIGTERM, as a shell reports a process killed by the signal.
* Child processes (workers, the async generator, the multiprocessing manager) are started with SIGINT ignored:
  Ctrl-C reaches the whole process group, and a child that gets it in the middle of importing torch would print
  a traceback of its own. The parent stops them instead.
"""

from __future__ import annotations

import contextlib
import signal
import threading

EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would raise KeyboardInterrupt."""


def _raise_terminated(signum, frame):
    raise Terminated


def exit_status(interrupt: KeyboardInterrupt) -> int:
    return EXIT_SIGTERM if isinstance(interrupt, Terminated) else EXIT_SIGINT


def describe(interrupt: KeyboardInterrupt) -> str:
    return "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted"


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM raises Terminated inside the block; the caller's handler is restored afterwards. A no-op outside
    the main thread (signal handlers live there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def children_ignore_ctrl_c():
    """Processes started inside the block begin with SIGINT ignored (an ignored signal stays ignored across
    exec, and Python then installs no KeyboardInterrupt handler), so they never print a traceback of their own.
    A Ctrl-C that arrives during the block (process starts take milliseconds) is lost."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
