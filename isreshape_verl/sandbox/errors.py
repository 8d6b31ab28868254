"""Errors that `isreshape-verl compare` reports as one line and exit status 2: bad input found while working
(a run's damaged file, data that does not fit, a folder of another comparison), as opposed to a bug, which
keeps its traceback. ValueError subclasses, so that they cross a worker process boundary as they are."""

from __future__ import annotations


class CompareError(ValueError):
    """Bad input or a bad output folder, found after the flags were accepted; the message is the whole story."""


class RunFileError(CompareError):
    """A run's file (metrics.jsonl, checkpoint.pt, config.json) that cannot be read back; the message names the
    file (and line) and how to go on."""
