"""`isreshape-verl kernels`: the kernel factor K(r − 1) and the weight g(r) at chosen ratios, as a table,
and a plot of g(r) for every kernel.

    isreshape-verl kernels --r 3                       # the design notes' table (section 3.5)
    isreshape-verl kernels --r 0.5,1,2 --kernels cauchy,box --widths 0.5,2 --gamma 0.5 --plot g.png
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from isreshape_verl.cli_args import ArgumentParser, add_flags, build, check, fail
from isreshape_verl.kernels import KERNEL_NAMES
from isreshape_verl.reshape import ISReshapeParams, reshape_terms

# The design notes' table at r = 3 uses width 1 for every kernel except sech², whose row is SAPO's
# sech²(τ(r − 1)/2) at τ = 1, i.e. width 2 here. The width-1 sech² row shows the notes' own definition.
DEFAULT_ROWS = [("gaussian", 1.0), ("sech2", 2.0), ("sech2", 1.0), ("cauchy", 1.0), ("laplace", 1.0),
                ("epanechnikov", 1.0), ("box", 1.0)]


def _comma_floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers; got {text!r}") from None


def _comma_names(text: str) -> list[str]:
    return [k.strip() for k in text.split(",") if k.strip()]


@dataclass
class KernelsArgs:
    """What `isreshape-verl kernels` prints and plots."""

    r: list[float] = field(default_factory=lambda: [0.5, 1.0, 3.0], metadata={"parse": _comma_floats, "metavar": "R,..."})
    """Comma-separated ratios r = π_θ/μ > 0."""
    kernels: list[str] | None = field(default=None, metadata={"parse": _comma_names, "metavar": "K,..."})
    """Comma-separated kernels among gaussian, sech2, cauchy, laplace, epanechnikov, box (None: all, or the
    design notes' rows when --widths is not given either)."""
    widths: list[float] | None = field(default=None, metadata={"parse": _comma_floats, "metavar": "W,..."})
    """Comma-separated widths w > 0, each combined with each kernel (None: the design notes' rows)."""
    gamma: float = 1.0
    """Mixing γ in [0, 1] (1 = pure kernelized IS)."""
    plot: str | None = field(default=None, metadata={"metavar": "FILE"})
    """Plot g(r), r ∈ (0, 4], to FILE; its extension picks the format (png, pdf, svg, ...; none: .png is added);
    an existing folder (or a path ending in /) gets kernel_weights.png."""

    def __post_init__(self):
        check("r", self.r, bool(self.r) and all(math.isfinite(v) and v > 0 for v in self.r),
              "comma-separated finite ratios > 0")
        check("kernels", self.kernels, self.kernels is None or (bool(self.kernels) and set(self.kernels) <= set(KERNEL_NAMES)),
              f"comma-separated kernels among {', '.join(KERNEL_NAMES)}")
        check("widths", self.widths, self.widths is None or (bool(self.widths) and all(math.isfinite(v) and v > 0 for v in self.widths)),
              "comma-separated finite widths > 0")
        check("gamma", self.gamma, 0.0 <= self.gamma <= 1.0, "in [0, 1]")

    def rows(self) -> list[tuple[str, float]]:
        """(kernel, width) rows: the design notes' rows unless --kernels or --widths is given."""
        if self.kernels is None and self.widths is None:
            return DEFAULT_ROWS
        return [(k, w) for k in (self.kernels or KERNEL_NAMES) for w in (self.widths or [1.0])]


def build_parser() -> tuple[ArgumentParser, list]:
    parser = ArgumentParser(
        prog="isreshape-verl kernels",
        description="Print K(r − 1) and g(r) = (1 − γ) + γ·r·K(r − 1) for each kernel and width at the given "
        "ratios r = π_θ/μ, and optionally plot g(r). Without --kernels/--widths, prints the rows of the design "
        "notes' table: width 1, plus sech2 at width 2 (SAPO's τ = 1, since SAPO's τ ↔ width 2/τ).",
    )
    return parser, add_flags(parser, KernelsArgs)


def row_params(name: str, width: float, gamma: float) -> ISReshapeParams:
    """The IS Reshape settings whose weight this command shows: kernel `name` at `width` on both sides of
    r = 1, fixed γ, plain SFT-like term, so g(r) = (1 − γ) + γ·r·K(r − 1) (width_min = width: any width > 0
    passes ISReshapeParams' bound check, which only adaptive widths use)."""
    return ISReshapeParams(kernel=name, width=width, one_sided=False, gamma_mode="fixed", gamma=gamma,
                           localize_sft=False, width_mode="fixed", width_min=width)


def _terms(name: str, width: float, gamma: float, r: torch.Tensor):
    """reshape_terms at the exact ratios r (A = 1: with two-sided kernels and fixed γ the sign does not matter)."""
    return reshape_terms(row_params(name, width, gamma), r.log(), torch.ones_like(r), ratio=r)


def table_rows(rows, ratios, gamma):
    """[(kernel, width, [(K, g) per r])] computed in float64 by the package's reshape_terms."""
    r = torch.tensor(ratios, dtype=torch.float64)
    out = []
    for name, width in rows:
        terms = _terms(name, width, gamma, r)
        out.append((name, width, list(zip(terms.kernel.tolist(), terms.weight.tolist()))))
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


PROG = "isreshape-verl kernels"
PLOT_NAME = "kernel_weights.png"  # the file name when --plot is a folder


def plot_formats() -> list[str]:
    """File extensions matplotlib's Agg canvas writes (pgf left out: it needs a LaTeX installation)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return sorted(ext for ext in FigureCanvasAgg.get_supported_filetypes() if ext != "pgf")


def plot_path(raw: str) -> Path:
    """The file --plot RAW writes: RAW/kernel_weights.png for a folder, RAW.png without an extension, else RAW.
    ValueError (one line, naming RAW and what is allowed) for an empty path, an unknown extension or a missing
    folder."""
    if not raw.strip():  # `--plot ''` (an unset shell variable, say) asked for a plot: saying nothing would hide it
        raise ValueError(f"--plot {raw!r}: an empty path; give a file (g.png) or a folder (which gets {PLOT_NAME})")
    path = Path(raw).expanduser()
    if path.is_dir() or raw.endswith(("/", os.sep)):
        path = path / PLOT_NAME
    elif not path.suffix:
        path = path.with_name(path.name + ".png")
    formats = plot_formats()
    if path.suffix[1:].lower() not in formats:
        raise ValueError(f"--plot {raw!r}: cannot write a {path.suffix!r} file; allowed extensions: "
                         f"{', '.join('.' + f for f in formats)} (or a folder, which gets {PLOT_NAME})")
    if not path.parent.is_dir():
        raise ValueError(f"--plot {raw!r}: no such folder {str(path.parent)!r}")
    try:  # an unnamed file: the probe leaves nothing behind
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as err:
        raise ValueError(f"--plot {raw!r}: folder {str(path.parent)!r} is not writable ({err.strerror or err})") from None
    return path


def plot_weights(rows, gamma, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = torch.linspace(1e-3, 4.0, 2000, dtype=torch.float64)
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(r, r, color="0.6", linestyle=":", label="plain IS: g = r")
    ax.axhline(1.0, color="0.6", linestyle="--", label="SFT-like: g = 1")
    for name, width in rows:
        ax.plot(r, _terms(name, width, gamma, r).weight, label=f"{name}, w={width:g}")
    ax.set(xlabel="r = π_θ / μ", ylabel="gradient weight g(r)", ylim=(0, 2.5),
           title=f"IS Reshape weights, γ = {gamma:g}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # renamed into place once complete
    try:
        fig.savefig(partial, dpi=120, format=path.suffix[1:].lower() or "png")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C: one line (the plot is renamed into place only once complete)
        fail(PROG, "interrupted")
        return 130


def _main(argv: list[str] | None) -> int:
    parser, flags = build_parser()
    ns = parser.parse_args(argv)
    try:
        args = build(KernelsArgs, vars(ns), flags)
    except ValueError as err:
        parser.error(str(err))
    try:
        path = plot_path(args.plot) if args.plot is not None else None  # before any output
    except ValueError as err:
        return fail(PROG, str(err))
    rows = args.rows()
    print(format_table(table_rows(rows, args.r, args.gamma), args.r, args.gamma))
    if path is not None:
        try:
            plot_weights(rows, args.gamma, path)
        except OSError as err:
            return fail(PROG, f"cannot write --plot {args.plot!r} ({err.strerror or err})")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
