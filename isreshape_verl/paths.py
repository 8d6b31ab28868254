"""Output folders: every command checks that it can write its `--out` before doing any work."""

from __future__ import annotations

import os


def ensure_writable_dir(folder: str, flag: str = "--out") -> None:
    """Create `folder` if missing and prove it writable; raises ValueError naming the flag and the reason."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"{flag} {str(folder)!r} is not writable ({err.strerror or err})") from None
