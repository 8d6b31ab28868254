"""`python -m isreshape_verl.launch.early MODULE ARG...`: import MODULE, wait for the line `go` on stdin, then run
MODULE as `python -m MODULE ARG...` would (as `__main__`, with the same `sys.argv`).

On a CPU most of a verl run's start-up is a chain of processes, each importing verl for about 5 s on one core
(`benchmarks/results/verl_cpu_speed/startup-sync.txt`). The first two links were the launcher, importing verl to
check the config, and then `main_ppo`, importing it again. The launcher starts `main_ppo` through this module
before its check: both imports run side by side, on two cores. When the check passes, the launcher writes `go`.
When it fails, the launcher stops this process, which has done nothing but import. When stdin closes without
`go` (the launcher is gone), the module exits 1 without running.

The import runs with the environment the run will have, so verl's `VERL_USE_EXTERNAL_MODULES` hook (the CPU
mode) acts in it as in `python -m`.
"""

from __future__ import annotations

import importlib
import runpy
import sys

GO = "go"


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m isreshape_verl.launch.early MODULE [ARG...]")
    module, args = sys.argv[1], sys.argv[2:]
    importlib.import_module(module)  # the work done ahead; running it below executes its code once more, cheaply
    if sys.stdin.readline().strip() != GO:
        sys.exit(1)
    sys.argv = [module, *args]  # run_module puts the module's file in sys.argv[0], as `python -m` does
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
