"""Test helpers for scripts and file systems: a data_prep script as a module, a small real disk.

    tiny = load_data_prep("tiny")                  # data_prep/tiny.py, with its sibling verl_format importable
    @pytest.fixture
    def small(tmp_path):                           # a 1 MB tmpfs (root only, else the test skips)
        yield from small_disk(tmp_path / "small")
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

DATA_PREP = Path(__file__).resolve().parents[2] / "data_prep"


def load_data_prep(name: str) -> ModuleType:
    """Import `data_prep/<name>.py` as a module, once. The folder is not a package: `python data_prep/X.py` puts
    it on sys.path, which is how the scripts find their sibling verl_format, so it goes on sys.path here too."""
    key = f"_dp_{name}"
    if key in sys.modules:
        return sys.modules[key]
    if str(DATA_PREP) not in sys.path:
        sys.path.append(str(DATA_PREP))
    spec = importlib.util.spec_from_file_location(key, DATA_PREP / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module  # dataclasses need their module registered
    spec.loader.exec_module(module)
    return module


def small_disk(where: Path, size: str = "1m") -> Iterator[Path]:
    """Body of a pytest fixture: a tmpfs of `size` mounted at `where` (a real disk that fills up), unmounted
    afterwards; the test is skipped where mounting is not allowed (not root, no mount)."""
    import pytest

    where.mkdir(parents=True, exist_ok=True)
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                                    str(where)], capture_output=True, check=False).returncode == 0
    if not mounted:
        pytest.skip("a real full disk needs a small tmpfs: root and mount")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)
