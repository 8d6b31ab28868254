"""`isreshape-verl`: one console script, one subcommand per job. Each subcommand lives in its own module
with a `main(argv) -> int`; it is imported only when used, so `--help` stays fast."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "kernels": ("isreshape_verl.kernels_cli", "print K and g of every kernel at chosen ratios; plot g(r)"),
    "compare": ("isreshape_verl.sandbox.cli", "CPU sandbox: real RLVR with policy lag, GRPO vs SAPO vs IS Reshape"),
    "lab": ("isreshape_verl.lab.cli", "estimator lab: exact-gradient bias, variance and ESS of each loss under lag"),
    "plot-runs": ("isreshape_verl.plot_runs", "plot and tabulate verl file-logger runs side by side"),
    "report-runs": ("isreshape_verl.verl_report", "a folder of verl runs (compare.sh: arms x SEEDS) as the sandbox's "
                    "report.md: intervals over seeds, paired Δ, collapse flags"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: isreshape-verl COMMAND [ARGS...]", "", "IS Reshape policy losses for verl.", "", "commands:"]
    lines += [f"  {name:<{width}}  {about}" for name, (_, about) in SUBCOMMANDS.items()]
    lines += ["", "Run `isreshape-verl COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from isreshape_verl import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"isreshape-verl: unknown command {name!r}; allowed: {', '.join(SUBCOMMANDS)}\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
