"""`isreshape-verl lab`: exact-gradient bias, variance and ESS of every policy loss under policy lag.

    isreshape-verl lab --out benchmarks/results/lab_default          # the default run (~30 s on 2 free cores)
    isreshape-verl lab --losses vanilla sapo "is_reshape:kernel=cauchy,width=2" --rewards sparse --out /tmp/lab
    python -m isreshape_verl.lab --help

What it does (see the modules for the formulas): a tabular autoregressive softmax policy over V^L
sequences (policy.py) gives J = E_π[R] and ∇J exactly; behaviour policies μ sit at a chosen lag or
per-token KL from π (behaviour.py); for each (reward family, μ, advantage mode), R replicate
batches are drawn from μ and each loss's gradient is computed through verl's registry function
with autograd (estimators.py); bias², variance, MSE, cosine and ESS go to CSV, Markdown and PNG
(report.py). `--losses` takes the loss specs of `isreshape-verl compare` (isreshape_verl.specs).

Simplified: one prompt, fixed length (no EOS), tabular logits, exact value of everything.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from isreshape_verl.cli_args import ArgumentParser, add_flags, build, fail
from isreshape_verl.lab.experiment import Args
from isreshape_verl.paths import ensure_writable_dir

PROG = "isreshape-verl lab"


def build_parser() -> tuple[ArgumentParser, list]:
    parser = ArgumentParser(
        prog="isreshape-verl lab",
        description="Estimator lab: exact-gradient bias, variance and ESS of verl policy losses under controlled "
        "policy lag, on an enumerable toy policy (CPU, minutes).",
    )
    flags = add_flags(parser, Args)
    parser.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads [default: 1; tensors are tiny]")
    return parser, flags


def parse_args(argv: list[str]) -> tuple[Args, argparse.Namespace]:
    """Parse and validate everything (loss specs included) before any work; errors exit with code 2."""
    parser, flags = build_parser()
    ns = parser.parse_args(argv)
    try:
        args = build(Args, vars(ns), flags)
        from isreshape_verl.lab.estimators import build_estimators

        build_estimators(args.losses, args.references)
    except ValueError as err:
        parser.error(str(err))
    if ns.threads < 1:
        parser.error(f"--threads must be >= 1; got {ns.threads}")
    if ns.out.exists() and not ns.out.is_dir():
        parser.error(f"--out {ns.out} exists and is not a directory")
    ns.created = []  # the folders of --out made here, deepest first: removed again if Ctrl-C comes before the results
    folder = ns.out
    while not folder.exists() and folder != folder.parent:
        ns.created.append(folder)
        folder = folder.parent
    try:  # before the experiment, not after it
        ensure_writable_dir(str(ns.out))
    except ValueError as err:
        parser.error(str(err))
    return args, ns


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    stage = {"out": None, "created": [], "writing": False}
    try:
        return _main(argv, stage)
    except KeyboardInterrupt:  # Ctrl-C (the experiment may run minutes): one line, exit 130
        if stage["writing"]:
            fail(PROG, f"interrupted while writing to {stage['out']}; its files may be incomplete")
        else:
            for folder in stage["created"]:
                try:
                    folder.rmdir()
                except OSError:
                    break
            fail(PROG, "interrupted; nothing written" + (f" to {stage['out']}" if stage["out"] else ""))
        return 130


def _main(argv: list[str], stage: dict) -> int:
    args, ns = parse_args(argv)
    stage.update(out=ns.out, created=ns.created)
    import torch

    from isreshape_verl.lab.estimators import build_estimators
    from isreshape_verl.lab.experiment import run
    from isreshape_verl.lab.report import summary_table, write_all

    torch.set_num_threads(ns.threads)
    start = time.perf_counter()
    rows = run(args, progress=not ns.no_progress)
    wall = time.perf_counter() - start
    settings = {k: getattr(args, k) for k in ("vocab", "length", "replicates", "batch_size", "group_size",
                                              "train_steps", "lr", "init_scale", "seed")}
    command = "isreshape-verl lab " + shlex.join(argv)
    stage["writing"] = True
    paths = write_all(rows, ns.out, build_estimators(args.losses, args.references), command, wall, settings,
                      plots=not ns.no_plots)
    import pandas as pd

    df = pd.DataFrame(rows)
    adv = "grpo" if "grpo" in set(df["advantage"]) else df["advantage"].iloc[0]
    if (df["distance"] > 0).any():
        table = summary_table(df[df["advantage"] == adv])[["rel_mse", "rel_mse_best", "cosine", "ess"]]
        print(f"\nmean over off-policy cells (advantage={adv}), best 8 by rel_mse:")
        print(table.head(8).round(3).to_string())
    print(f"\n{len(rows)} rows in {wall:.1f} s; wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
