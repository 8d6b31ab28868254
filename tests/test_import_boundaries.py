"""Import boundaries: which module may import which, and that importing CPU mode's parts changes nothing.

1. `isreshape_verl.specs` never imports `isreshape_verl.verl_loss`, and the loss imports nothing from the
   spec parser: the dependency goes one way (read from the source, no import needed).
2. Importing any module of `isreshape_verl.cpu` but `activate` leaves the process as it was: verl's
   platform, `os.environ`, verl's process-group function, the rollout registries, `sys.meta_path`;
   importing `isreshape_verl.cpu.activate` changes each (in a fresh process: the switch is process-wide).
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "isreshape_verl"


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` in the file names, at any depth (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_specs_never_imports_the_verl_loss_and_the_loss_never_imports_specs():
    assert "isreshape_verl.verl_loss" not in imported_modules(PACKAGE / "specs.py"), \
        "specs.py imports isreshape_verl.verl_loss: the spec parser reads verl's registry as any user does"
    assert not {m for m in imported_modules(PACKAGE / "verl_loss.py") if m.startswith("isreshape_verl.specs")}, \
        "verl_loss.py imports isreshape_verl.specs: shared constants belong in reshape.py"


def test_loss_agg_modes_keep_their_old_name():
    from isreshape_verl import reshape, specs

    assert specs.LOSS_AGG_MODES is reshape.LOSS_AGG_MODES
