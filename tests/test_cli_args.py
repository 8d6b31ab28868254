"""The one flag generator (isreshape_verl.cli_args) and the sandbox settings it serves: one owner per default."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from isreshape_verl.cli_args import ArgumentParser, SettingError, add_flags, build, check, field_docs, flags_of


@dataclass
class Inner:
    size: int = 3
    """How big."""
    hidden: int = field(default=7, metadata={"cli": False})
    """Set by the program."""
    target: float = field(default=0.5, metadata={"flag": "inner-goal"})
    """A share."""

    def __post_init__(self):
        check("size", self.size, self.size > 0, "> 0")
        check("target", self.target, 0 <= self.target <= 1, "in [0, 1]")


@dataclass
class Outer:
    names: list[str] = field(default_factory=lambda: ["a"])
    """Some names."""
    inner: Inner = field(default_factory=Inner, metadata={"prefix": "in"})
    flag_on: bool = False
    """A switch."""


def test_flags_are_flattened_prefixed_renamed_or_hidden():
    flags = {f.dest: f for f in flags_of(Outer)}
    assert set(flags) == {"names", "in_size", "inner_goal", "flag_on"}  # hidden is not a flag
    assert flags["in_size"].path == ("inner", "size") and flags["in_size"].option == "--in-size"
    assert flags["inner_goal"].path == ("inner", "target") and flags["inner_goal"].default == 0.5
    assert field_docs(Inner) == {"size": "How big.", "hidden": "Set by the program.", "target": "A share."}


def test_build_keeps_defaults_and_names_the_flag_of_a_nested_error():
    assert build(Outer, {}) == Outer()
    built = build(Outer, {"names": ["x", "y"], "in_size": 5, "flag_on": True})
    assert built == Outer(names=["x", "y"], inner=Inner(size=5), flag_on=True)
    with pytest.raises(ValueError, match=r"^--inner-goal must be in \[0, 1\]; got 2.0$"):
        build(Outer, {"inner_goal": 2.0})
    with pytest.raises(SettingError, match=r"^size must be > 0; got 0$"):  # without the CLI: the field's name
        Inner(size=0)


def test_parser_types_defaults_and_one_line_errors(capsys):
    parser = ArgumentParser(prog="demo")
    flags = add_flags(parser, Outer)
    ns = parser.parse_args(["--names", "p", "q", "--in-size", "4", "--flag-on"])
    assert build(Outer, vars(ns), flags) == Outer(names=["p", "q"], inner=Inner(size=4), flag_on=True)
    assert parser.parse_args([]).in_size is None  # None = not given, so a preset can fill it
    assert "How big. [default: 3]" in " ".join(parser.format_help().split())
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--in-size", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 2 and err[0].startswith("demo: error: argument --in-size")


def test_two_fields_on_one_flag_are_refused():
    @dataclass
    class Clash:
        a_b: int = 1
        a: Inner = field(default_factory=Inner, metadata={"prefix": "a"})
        b: int = field(default=2, metadata={"flag": "a-size"})

    with pytest.raises(AssertionError, match="share a flag"):
        flags_of(Clash)


# ---- the sandbox: each setting has one owner, and every flag reaches it


def test_compare_presets_name_only_real_flags_and_defaults_have_one_owner():
    from isreshape_verl.sandbox.cli import PRESETS, CompareArgs, resolve_args
    from isreshape_verl.sandbox.loop import RLArgs
    from isreshape_verl.sandbox.model import TinyModelArgs
    from isreshape_verl.sandbox.warmstart import WarmStartArgs

    dests = {f.dest for f in flags_of(CompareArgs)}
    for name, (_, overrides) in PRESETS.items():
        assert set(overrides) <= dests, (name, set(overrides) - dests)
    assert not {"lag", "seed", "warm_seed"} & dests  # set per run by the comparison, not by the user
    args = CompareArgs()
    assert (args.rl, args.tiny, args.warm) == (RLArgs(), TinyModelArgs(), WarmStartArgs())
    smoke, _ = resolve_args(["--preset", "smoke", "--out", "/tmp/unused-by-test", "--warm-target", "0.2"])
    assert smoke.tiny.hidden_size == 64 and smoke.rl.steps == 6 and smoke.warm.target_accuracy == 0.2


def test_compare_help_shows_nested_defaults_and_presets():
    from isreshape_verl.sandbox.cli import build_parser

    text = " ".join(build_parser()[0].format_help().split())
    assert "--warm-target WARM_TARGET Warm start: stop at the first checkpoint" in text
    assert "[default: 0.4] [smoke: 0.15]" in text
    assert "--max-new-tokens MAX_NEW_TOKENS Longest response" in text and "[default: 28]" in text
    assert "--async " in text and "--lag " not in text


def test_the_default_tiny_model_is_the_size_its_docstring_says():
    from isreshape_verl.sandbox.model import TinyModelArgs, tiny_policy

    assert "0.60 M parameters" in TinyModelArgs.__doc__
    assert round(tiny_policy(TinyModelArgs(), 0).num_parameters / 1e6, 2) == 0.60


@pytest.mark.parametrize("command", ["compare", "lab", "kernels", "plot-runs"])
def test_every_command_errors_in_one_line(command, tmp_path):
    positional = [str(tmp_path)] if command == "plot-runs" else []
    out = subprocess.run([sys.executable, "-m", "isreshape_verl.cli", command, *positional, "--no-such-flag", "--out",
                          str(tmp_path)], capture_output=True, text=True)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 2, out.stderr
    assert lines[0].startswith(f"isreshape-verl {command}: error: unrecognized arguments: --no-such-flag")



def test_a_long_default_list_is_shortened_in_help():
    from isreshape_verl.lab.cli import build_parser
    from isreshape_verl.lab.experiment import DEFAULT_LOSSES

    text = " ".join(build_parser()[0].format_help().split())
    assert f"… ({len(DEFAULT_LOSSES)} in all)]" in text and DEFAULT_LOSSES[-1] not in text
