"""`isreshape-verl kernels`: the design notes' table, the plot, and errors for bad arguments."""

import subprocess
import sys

import pytest

from isreshape_verl.cli import main as cli_main


def parse_rows(text):
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] in ("gaussian", "sech2", "cauchy", "laplace", "epanechnikov", "box"):
            rows[(parts[0], float(parts[1]))] = [float(v) for v in parts[2:4]]
    return rows


def test_kernels_r3_prints_the_design_notes_table(capsys):
    assert cli_main(["kernels", "--r", "3"]) == 0
    rows = parse_rows(capsys.readouterr().out)
    # section 3.5 of the notes: (K, g) at r = 3, sech² at width 2 (SAPO's τ = 1)
    assert rows[("gaussian", 1.0)] == [0.135, 0.406]  # e^{-2} = 0.1353, 3·0.1353 = 0.406 (notes: 0.41)
    assert rows[("sech2", 2.0)] == [0.420, 1.260]  # sech²(1) = 0.4200
    assert rows[("cauchy", 1.0)] == [0.200, 0.600]
    assert rows[("laplace", 1.0)] == [0.135, 0.406]
    assert rows[("sech2", 1.0)] == [0.071, 0.212]  # the notes' own definition at width 1: sech²(2) = 0.0707


def test_kernels_custom_grid_and_gamma(capsys):
    assert cli_main(["kernels", "--r", "0.5,2", "--kernels", "box", "--widths", "0.5,2", "--gamma", "0.5"]) == 0
    rows = {k: v for k, v in parse_rows(capsys.readouterr().out).items()}
    # box w=0.5 at r = 0.5: |x| = 0.5 ≤ 0.5 → K = 1, g = 0.5 + 0.5·0.5·1 = 0.75
    assert rows[("box", 0.5)] == [1.0, 0.75]
    assert rows[("box", 2.0)] == [1.0, 0.75]


def test_kernels_plot_writes_a_png(tmp_path):
    out = tmp_path / "g.png"
    assert cli_main(["kernels", "--r", "1", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


@pytest.mark.parametrize("args,message", [
    (["--kernels", "tri"], "--kernels must be comma-separated kernels among gaussian, sech2"),
    (["--r", "-1"], "--r must be comma-separated finite ratios > 0; got -1.0"),
    (["--r", "a,b"], "--r: must be comma-separated numbers; got 'a,b'"),
    (["--r", "nan"], "--r must be comma-separated finite ratios > 0; got nan"),
    (["--r", "1,inf"], "--r must be comma-separated finite ratios > 0; got 1.0 inf"),
    (["--widths", "0"], "--widths must be comma-separated finite widths > 0; got 0.0"),
    (["--gamma", "1.5"], "--gamma must be in [0, 1]; got 1.5"),
])
def test_kernels_bad_arguments(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["kernels", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_command_lists_the_commands(capsys):
    assert cli_main(["train"]) == 2
    assert "unknown command 'train'; allowed: kernels, compare, lab, plot-runs" in capsys.readouterr().err


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "isreshape_verl.cli", "kernels", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--plot FILE" in out and "SAPO" in out
