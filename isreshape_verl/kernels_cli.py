"""`isreshape-verl kernels`: the kernel factor K(r − 1) and the weight g(r) at chosen ratios, as a table,
and a plot of g(r) for every kernel.

    isreshape-verl kernels --r 3                       # the design notes' table (section 3.5)
    isreshape-verl kernels --r 0.5,1,2 --kernels cauchy,box --widths 0.5,2 --gamma 0.5 --plot g.png
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from isreshape_verl.kernels import KERNEL_NAMES, kernel_value

# The design notes' table at r = 3 uses width 1 for every kernel except sech², whose row is SAPO's
# sech²(τ(r − 1)/2) at τ = 1, i.e. width 2 here. The width-1 sech² row shows the notes' own definition.
DEFAULT_ROWS = [("gaussian", 1.0), ("sech2", 2.0), ("sech2", 1.0), ("cauchy", 1.0), ("laplace", 1.0),
                ("epanechnikov", 1.0), ("box", 1.0)]


def _float_list(text: str, what: str, positive: bool = False) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{what} is empty")
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"{what} must be finite numbers, got {text!r}")
    if positive and any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{what} must all be > 0, got {text!r}")
    return values


def _kernel_list(text: str) -> list[str]:
    names = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in names if k not in KERNEL_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown kernel(s) {bad or text!r}; allowed: {', '.join(KERNEL_NAMES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="isreshape-verl kernels",
        description="Print K(r − 1) and g(r) = (1 − γ) + γ·r·K(r − 1) for each kernel and width at the given "
        "ratios r = π_θ/μ, and optionally plot g(r). Without --kernels/--widths, prints the rows of the design "
        "notes' table: width 1, plus sech2 at width 2 (SAPO's τ = 1, since SAPO's τ ↔ width 2/τ).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--r", type=lambda t: _float_list(t, "--r", positive=True), default=[0.5, 1.0, 3.0],
                        help="comma-separated ratios r > 0")
    parser.add_argument("--kernels", type=_kernel_list, default=None,
                        help=f"comma-separated kernels among {', '.join(KERNEL_NAMES)} (default: all)")
    parser.add_argument("--widths", type=lambda t: _float_list(t, "--widths", positive=True), default=None,
                        help="comma-separated widths w > 0, each combined with each kernel (default: the notes' rows)")
    parser.add_argument("--gamma", type=float, default=1.0, help="mixing γ in [0, 1] (1 = pure kernelized IS)")
    parser.add_argument("--plot", metavar="FILE", default=None, help="write a PNG of g(r), r ∈ (0, 4], to FILE")
    return parser


def table_rows(rows, ratios, gamma):
    """[(kernel, width, [(K, g) per r])] computed in float64."""
    r = torch.tensor(ratios, dtype=torch.float64)
    out = []
    for name, width in rows:
        k = kernel_value(name, r - 1.0, width)
        g = (1.0 - gamma) + gamma * r * k
        out.append((name, width, list(zip(k.tolist(), g.tolist()))))
    return out


def format_table(computed, ratios, gamma) -> str:
    header = f"{'kernel':<13} {'width':>6} " + " ".join(f"{'K(r=' + f'{r:g}' + ')':>10} {'g(r=' + f'{r:g}' + ')':>10}"
                                                        for r in ratios)
    lines = [f"g(r) = (1 − γ) + γ·r·K(r − 1), γ = {gamma:g}", header, "-" * len(header)]
    for name, width, values in computed:
        cells = " ".join(f"{k:>10.3f} {g:>10.3f}" for k, g in values)
        note = "   (SAPO τ = {:g})".format(2.0 / width) if name == "sech2" else ""
        lines.append(f"{name:<13} {width:>6g} {cells}{note}")
    return "\n".join(lines)


def plot_weights(rows, gamma, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = torch.linspace(1e-3, 4.0, 2000, dtype=torch.float64)
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(r, r, color="0.6", linestyle=":", label="plain IS: g = r")
    ax.axhline(1.0, color="0.6", linestyle="--", label="SFT-like: g = 1")
    for name, width in rows:
        g = (1.0 - gamma) + gamma * r * kernel_value(name, r - 1.0, width)
        ax.plot(r, g, label=f"{name}, w={width:g}")
    ax.set(xlabel="r = π_θ / μ", ylabel="gradient weight g(r)", ylim=(0, 2.5),
           title=f"IS Reshape weights, γ = {gamma:g}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.gamma <= 1.0:
        parser.error(f"--gamma {args.gamma} is not allowed; it must be in [0, 1]")
    if args.kernels is None and args.widths is None:
        rows = DEFAULT_ROWS
    else:
        rows = [(k, w) for k in (args.kernels or KERNEL_NAMES) for w in (args.widths or [1.0])]
    print(format_table(table_rows(rows, args.r, args.gamma), args.r, args.gamma))
    if args.plot:
        try:
            plot_weights(rows, args.gamma, args.plot)
        except OSError as err:
            print(f"isreshape-verl kernels: cannot write --plot {args.plot!r}: {err}", file=sys.stderr)
            return 1
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
