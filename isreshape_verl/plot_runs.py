"""`isreshape-verl plot-runs DIR...`: plot and tabulate several verl runs side by side.

Input: JSON lines in either of two formats, told apart line by line, so that one command plots
cluster runs and sandbox runs alike:

* verl's ``FileLogger`` (``trainer.logger`` containing ``file``): ``{"step": int, "data": {metric: value}}``;
* the sandbox's (``isreshape-verl compare``) ``runs/<run>/metrics.jsonl``: flat rows ``{"step": int,
  metric: value, ...}``; its metrics are read under verl's names (SANDBOX_TO_VERL), the rest as they are.

The sandbox keeps its own format rather than logging through ``verl.utils.tracking.Tracking``:
its ``--resume`` appends to metrics.jsonl, while verl's FileLogger opens its file with mode "wb"
(a resumed run would erase its history), and its report reads the flat rows. Each DIR may be

* a run folder holding ``metrics.jsonl`` (what the recipes write: RUN_ROOT/EXP_NAME/metrics.jsonl),
* a folder holding runs (each sub-folder with a ``metrics.jsonl``; e.g. a compare.sh COMPARE_DIR),
* a ``compare --out`` folder (its runs in ``runs/*/metrics.jsonl``: each run a curve),
* a ``.jsonl`` file (verl's default ``<project>/<experiment>.jsonl``); or a folder of those.

Records that share a step are merged (later keys win). A line that is not JSON (typically the
last line of a run that was killed mid-write) is skipped with a warning naming file and line.

Output in ``--out``: one PNG per metric against step, for the metrics any run has --

  ``val_accuracy.png``   ``val-core/<data_source>/<acc|reward>/mean@<n>`` (verl's validation score;
                         with rule rewards 1/0 it is the accuracy), one line per run and data source
  ``reward.png``         ``critic/score/mean`` (mean sequence score of the training batch)
  ``entropy.png``        ``actor/entropy`` or ``actor/entropy_loss`` (mean token entropy)
  ``ppo_kl.png``         ``actor/ppo_kl`` (k1 estimate of KL(behaviour || current) over the update)
  ``is_reshape_mean_g.png`` ``actor/is_reshape/weight_mean`` (mean reshaped weight g)
  ``is_reshape_ess.png`` ``actor/is_reshape/ess`` = (Σg)² / (N·Σg²)

(sandbox runs: test accuracy as ``val-core/sandbox/acc/mean@1``, and g / ESS for every loss, since
the sandbox reads each loss's weight g off verl's gradient by autograd)

-- and ``summary.md``, a Markdown table with, per run: the last step, validation score at the
first and last validation and its best (with the step), and the mean over the last ``--last``
logged points of reward, entropy, ppo_kl, mean g and ESS ("–" where a run lacks the metric).
Training curves can be smoothed with a trailing moving average (``--smooth K``); the table
never is.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from isreshape_verl.cli_args import ArgumentParser, fail
from isreshape_verl.paths import ensure_writable_dir

VAL_RE = re.compile(r"^val-core/(?P<source>.+)/(?P<var>acc|reward)/mean@(?P<n>\d+)$")

# The sandbox's metric names (sandbox/loop.py's rows) read as the verl metric of the same meaning.
SANDBOX_TO_VERL = {
    "test_acc": "val-core/sandbox/acc/mean@1",  # greedy test accuracy, as verl's default (greedy) validation
    "reward": "critic/score/mean",  # mean score of the sampled training batch
    "entropy": "actor/entropy",  # mean token entropy
    "ppo_kl": "actor/ppo_kl",  # verl's ppo_kl, returned by the registered loss
    "g_mean": "actor/is_reshape/weight_mean",  # mean per-token weight g
    "ess": "actor/is_reshape/ess",  # (Σg)² / (N·Σg²)
}


@dataclass(frozen=True)
class Panel:
    """One plot: file stem, title, y label, table column and the metric keys to try in order
    (first present wins)."""

    stem: str
    title: str
    ylabel: str
    column: str
    keys: tuple[str, ...]


TRAIN_PANELS = (
    Panel("reward", "training reward", "critic/score/mean", "reward", ("critic/score/mean", "critic/rewards/mean")),
    Panel("entropy", "policy entropy", "mean token entropy", "entropy", ("actor/entropy", "actor/entropy_loss")),
    Panel("ppo_kl", "ppo_kl", "actor/ppo_kl", "ppo_kl", ("actor/ppo_kl",)),
    Panel("is_reshape_mean_g", "IS Reshape: mean weight g", "mean g", "mean g", ("actor/is_reshape/weight_mean",)),
    Panel("is_reshape_ess", "IS Reshape: ESS of g", "(Σg)² / (N·Σg²)", "ESS", ("actor/is_reshape/ess",)),
)


class NotMetricsError(ValueError):
    """A path that holds no metrics file (binary, missing, empty folder); the message is one line naming it."""


@dataclass
class Run:
    """One run's metrics: step -> {metric: float}."""

    name: str
    path: Path
    steps: dict[int, dict[str, float]] = field(default_factory=dict)
    bad_lines: list[int] = field(default_factory=list)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric, finite values only, sorted by step."""
        xs, ys = [], []
        for step in sorted(self.steps):
            value = self.steps[step].get(key)
            if value is not None and math.isfinite(value):
                xs.append(step)
                ys.append(value)
        return xs, ys

    def keys(self) -> set[str]:
        return {k for rec in self.steps.values() for k in rec}

    def first_key(self, keys: Sequence[str]) -> str | None:
        present = self.keys()
        return next((k for k in keys if k in present), None)

    def val_keys(self) -> list[str]:
        """validation keys; when a data source has several mean@n, the largest n."""
        best: dict[str, tuple[int, str]] = {}
        for key in self.keys():
            m = VAL_RE.match(key)
            if m:
                n = int(m["n"])
                if m["source"] not in best or n > best[m["source"]][0]:
                    best[m["source"]] = (n, key)
        return [key for _, key in sorted(best.values(), key=lambda t: t[1])]


def _to_float(value) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list) and len(value) == 1:
        return _to_float(value[0])
    return None


def _record(line: str) -> tuple[int, dict]:
    """(step, {metric: value}) of one line in either format (module docstring); raises on anything else."""
    rec = json.loads(line)
    step = int(rec["step"])
    if "data" in rec:  # verl's FileLogger
        if not isinstance(rec["data"], dict):
            raise TypeError("data is not an object")
        return step, rec["data"]
    return step, {SANDBOX_TO_VERL.get(k, k): v for k, v in rec.items() if k != "step"}  # compare's row


def read_run(path: Path, name: str | None = None) -> Run:
    """Read one JSON-lines file: verl FileLogger records or compare's metrics rows."""
    run = Run(name or (path.parent.name if path.name == "metrics.jsonl" else path.stem), path)
    lineno = 0
    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    step, data = _record(line)
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    run.bad_lines.append(lineno)
                    continue
                merged = run.steps.setdefault(step, {})
                for key, value in data.items():
                    f = _to_float(value)
                    if f is not None:
                        merged[key] = f
    except UnicodeDecodeError:
        raise NotMetricsError(f"{path}: not a metrics.jsonl text file (line {lineno + 1} is not UTF-8 text); "
                              "expected JSON lines from verl's FileLogger or compare") from None
    return run


def find_runs(paths: Sequence[str]) -> list[Run]:
    """Expand the command-line paths into runs (see module docstring); error if one holds none."""
    files: list[tuple[Path, str | None]] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_file():
            files.append((p, None))
        elif (p / "metrics.jsonl").is_file():
            files.append((p / "metrics.jsonl", p.name))
        elif p.is_dir():
            found = (sorted(p.glob("*/metrics.jsonl")) or sorted(p.glob("runs/*/metrics.jsonl"))
                     or sorted(p.glob("*.jsonl")))
            if not found:
                raise NotMetricsError(f"{p}: no metrics.jsonl, */metrics.jsonl, runs/*/metrics.jsonl (a compare "
                                        "--out folder) or *.jsonl inside")
            files.extend((f, None) for f in found)
        else:
            raise NotMetricsError(f"{p}: no such file or folder")
    from tqdm import tqdm

    runs = [read_run(f, name) for f, name in tqdm(files, desc="reading runs", unit="run", disable=len(files) < 4)]
    seen: dict[str, int] = {}
    for run in runs:  # unique labels
        if run.name in seen:
            seen[run.name] += 1
            run.name = f"{run.name}#{seen[run.name]}"
        else:
            seen[run.name] = 1
    return runs


def smooth(values: list[float], k: int) -> list[float]:
    """Trailing moving average over the last k points (k=1: unchanged)."""
    if k <= 1:
        return list(values)
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


LEGEND_INSIDE_MAX = 10  # more lines than this: the legend is drawn beside the axes


def _plot(out: Path, stem: str, title: str, ylabel: str, lines: list[tuple[str, list[int], list[float]]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # many runs (a compare --out folder holds dozens): the legend goes beside the axes, in columns of 25
    columns = -(-len(lines) // 25) if len(lines) > LEGEND_INSIDE_MAX else 0
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for label, xs, ys in lines:
        ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.5, label=label)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    path = out / f"{stem}.png"
    if columns:  # the figure grows to the right to hold the legend; the axes keep their size
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=columns, frameon=False)
        save = {"bbox_inches": "tight"}
    else:
        ax.legend(fontsize=8)
        fig.tight_layout()
        save = {}
    try:
        _write_whole(path, lambda partial: fig.savefig(partial, format="png", **save))
    finally:
        plt.close(fig)
    return path


def _write_whole(path: Path, write) -> None:
    """`write(partial)` to a temporary name beside `path`, then rename: `path` is whole or absent, never partial."""
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}"


def summary_table(runs: Sequence[Run], last: int) -> str:
    """Markdown table (see module docstring)."""
    cols = ["run", "last step", "val first", "val last", "val best (step)", *(p.column for p in TRAIN_PANELS)]
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for run in runs:
        cells = [run.name, str(max(run.steps)) if run.steps else "–"]
        vkeys = run.val_keys()
        if vkeys:
            # several data sources: the mean over them at each step they are all present
            xs, ys = _mean_series(run, vkeys)
            best = max(range(len(ys)), key=lambda i: ys[i]) if ys else None
            cells += [_fmt(ys[0]) if ys else "–", _fmt(ys[-1]) if ys else "–",
                      f"{_fmt(ys[best])} ({xs[best]})" if best is not None else "–"]
        else:
            cells += ["–", "–", "–"]
        for panel in TRAIN_PANELS:
            key = run.first_key(panel.keys)
            ys = run.series(key)[1] if key else []
            cells.append(_fmt(sum(ys[-last:]) / len(ys[-last:])) if ys else "–")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _mean_series(run: Run, keys: Sequence[str]) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for step in sorted(run.steps):
        vals = [run.steps[step].get(k) for k in keys]
        if all(v is not None and math.isfinite(v) for v in vals):
            xs.append(step)
            ys.append(sum(vals) / len(vals))
    return xs, ys


def plot_runs(runs: Sequence[Run], out: Path, smooth_k: int = 1, last: int = 5) -> list[Path]:
    """Write the PNGs and summary.md for ``runs`` into ``out``; return the written paths."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    val_lines = []
    for run in runs:
        vkeys = run.val_keys()
        for key in vkeys:
            xs, ys = run.series(key)
            source = VAL_RE.match(key)["source"]
            val_lines.append((run.name if len(vkeys) == 1 else f"{run.name} · {source}", xs, ys))
    if val_lines:
        written.append(_plot(out, "val_accuracy", "validation accuracy (val-core mean@n)", "score", val_lines))
    for panel in TRAIN_PANELS:
        lines = []
        for run in runs:
            key = run.first_key(panel.keys)
            if key:
                xs, ys = run.series(key)
                lines.append((run.name, xs, smooth(ys, smooth_k)))
        if lines:
            title = panel.title + (f" (moving average of {smooth_k})" if smooth_k > 1 else "")
            written.append(_plot(out, panel.stem, title, panel.ylabel, lines))
    table = out / "summary.md"
    text = ("# Runs\n\n" + summary_table(runs, last)
            + f"\nval: verl's val-core mean@n score; training columns: mean of the last {last} logged points.\n")
    _write_whole(table, lambda partial: partial.write_text(text, encoding="utf-8"))
    written.append(table)
    return written


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="isreshape-verl plot-runs",
        description="Plot validation accuracy, reward, entropy, ppo_kl and (IS Reshape) mean g / ESS against "
        "step for several verl runs (FileLogger JSON lines) or sandbox runs (compare's metrics.jsonl), and write a "
        "Markdown summary table.",
        epilog="examples: isreshape-verl plot-runs runs/gsm8k-compare-*/* --out plots; "
        "isreshape-verl plot-runs COMPARE_OUT --out plots",
    )
    parser.add_argument("paths", nargs="+", metavar="DIR",
                        help="run folder (with metrics.jsonl), folder of runs, compare --out folder, or .jsonl file")
    parser.add_argument("--out", default="plots", help="output folder for the PNGs and summary.md (default: plots)")
    parser.add_argument("--smooth", type=int, default=1, metavar="K",
                        help="trailing moving average over K points for training curves (default 1: none)")
    parser.add_argument("--last", type=int, default=5, metavar="N",
                        help="table: average training metrics over the last N logged points (default 5)")
    return parser


PROG = "isreshape-verl plot-runs"


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C: one line; every file is written whole or not at all
        fail(PROG, "interrupted")
        return 130


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error(f"--smooth must be >= 1; got {args.smooth}")
    if args.last < 1:
        parser.error(f"--last must be >= 1; got {args.last}")
    out = Path(args.out).expanduser()
    created = _missing_folders(out)
    try:
        ensure_writable_dir(str(out))
    except ValueError as err:
        return fail(PROG, str(err))
    try:
        runs = find_runs(args.paths)
        empty = [r for r in runs if not r.steps]
        if empty:
            raise NotMetricsError("no metrics in " + ", ".join(
                f"{r.path}" + (f" ({len(r.bad_lines)} line{'s' * (len(r.bad_lines) != 1)}, none a FileLogger record or a compare row)"
                               if r.bad_lines else "") for r in empty))
    except NotMetricsError as exc:
        for folder in created:  # the bad input leaves no empty --out behind
            try:
                folder.rmdir()
            except OSError:
                break
        return fail(PROG, str(exc))
    for run in runs:
        if run.bad_lines:
            print(f"warning: {run.path}: skipped {len(run.bad_lines)} line(s) that are neither FileLogger records "
                  f"nor compare rows (lines {', '.join(map(str, run.bad_lines[:5]))})", file=sys.stderr)
    written = plot_runs(runs, out, smooth_k=args.smooth, last=args.last)
    print(summary_table(runs, args.last), end="")
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
