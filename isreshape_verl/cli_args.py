"""Command-line flags from settings dataclasses: the one flag generator of every `isreshape-verl` command.

A settings dataclass documents each field with the string under it (CleanRL style) and checks its own
ranges in `__post_init__` with `check`. This module turns it into argparse flags:

    field `steps: int = 60` + docstring       →  --steps STEPS   "<docstring> [default: 60]"
    field `rl: RLArgs` (a nested dataclass)     →  RLArgs' flags, flattened (metadata prefix="warm" → --warm-…)
    metadata cli=False                          →  no flag (the program sets it, e.g. a run's lag)
    metadata flag="async"                       →  --async instead of --async-mode
    metadata parse=fn / choices / nargs="*"     →  argparse's type / choices / nargs

`build(cls, values)` constructs the (nested) dataclass from flag values and turns a `SettingError` raised
by any level into one line naming the flag the user typed: `--steps must be > 0; got 0`.

Written here rather than taken from tyro: the commands keep argparse's flag syntax, presets that
explicit flags override, and one-line errors, which tyro's nested-subcommand model does not give.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import types
import typing
from dataclasses import dataclass


class SettingError(ValueError):
    """A setting outside its allowed range. `name` is the dataclass field, so a command can name its flag."""

    def __init__(self, name: str, value, allowed: str):
        self.name, self.value, self.allowed = name, value, allowed
        super().__init__(f"{name} must be {allowed}; got {value!r}")


def check(name: str, value, ok: bool, allowed: str) -> None:
    """Raise SettingError(name, value, allowed) unless `ok`."""
    if not ok:
        raise SettingError(name, value, allowed)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: the message and a pointer to --help, not the whole usage block."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def field_docs(cls) -> dict[str, str]:
    """The string literal under each field of `cls` and of its dataclass bases, whitespace folded."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


@dataclass(frozen=True)
class Flag:
    """One command-line flag: `dest` (unique, underscores) sets the field at `path` in the nested dataclass."""

    dest: str
    path: tuple[str, ...]
    kind: object  # the field's resolved type
    default: object
    doc: str
    metadata: typing.Mapping

    @property
    def option(self) -> str:
        return "--" + self.dest.replace("_", "-")


def flags_of(cls, prefix: str = "", path: tuple[str, ...] = ()) -> list[Flag]:
    """Every flag of `cls`, nested dataclass fields flattened (with their `prefix` metadata)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    defaults = cls()
    flags = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            inner = f.metadata.get("prefix", "")
            flags += flags_of(kind, prefix + (inner + "_" if inner else ""), path + (f.name,))
            continue
        dest = f.metadata.get("flag", prefix + f.name).replace("-", "_")
        flags.append(Flag(dest, path + (f.name,), kind, getattr(defaults, f.name), docs.get(f.name, ""), f.metadata))
    dests = [flag.dest for flag in flags]
    assert len(set(dests)) == len(dests), f"{cls.__name__}: two fields share a flag: {sorted(dests)}"
    return flags


def _shown(value, sep: str = " ", limit: int = 200) -> str:
    """A value as --help shows it; a list longer than `limit` characters as its first item and its length."""
    if not isinstance(value, list):
        return str(value)
    text = sep.join(map(str, value))
    return text if len(text) <= limit else f"{value[0]}{sep}… ({len(value)} in all)"


def add_flags(parser: argparse.ArgumentParser, cls, notes: typing.Mapping[str, str] | None = None) -> list[Flag]:
    """Add a flag for every field of `cls` (default None, so that explicit flags can be told apart)."""
    flags = flags_of(cls)
    for flag in flags:
        kind, meta = flag.kind, flag.metadata
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))  # X | None → X
        help_text = flag.doc
        if kind is not bool:
            help_text += f" [default: {_shown(flag.default, ',' if 'parse' in meta else ' ')}]"
        help_text += (notes or {}).get(flag.dest, "")
        kwargs = dict(dest=flag.dest, default=None, help=help_text.replace("%", "%%"))
        if kind is bool:
            assert flag.default is False, f"{flag.option}: a switch must default to False (it can only turn on)"
            kwargs["action"] = "store_true"
        else:
            if typing.get_origin(kind) is list and "parse" not in meta:  # a parse function reads the whole list
                kwargs["nargs"] = meta.get("nargs", "+")
                kind = typing.get_args(kind)[0]
            kwargs["type"] = meta.get("parse", kind)
            for key in ("choices", "metavar"):
                if key in meta:
                    kwargs[key] = meta[key]
        parser.add_argument(flag.option, **kwargs)
    return flags


def build(cls, values: typing.Mapping[str, object], flags: list[Flag] | None = None):
    """`cls` from flag values by dest (missing ones keep the dataclass defaults); ValueError names the flag."""
    flags = flags if flags is not None else flags_of(cls)
    by_path = {flag.path: flag for flag in flags}

    def make(klass, path):
        kwargs = {}
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            if dataclasses.is_dataclass(hints[f.name]) and f.metadata.get("cli", True):
                kwargs[f.name] = make(hints[f.name], path + (f.name,))
            elif path + (f.name,) in by_path and values.get(by_path[path + (f.name,)].dest) is not None:
                kwargs[f.name] = values[by_path[path + (f.name,)].dest]
        try:
            return klass(**kwargs)
        except SettingError as err:
            flag = by_path.get(path + (err.name,))
            if flag is None:
                raise
            raise ValueError(f"{flag.option} must be {err.allowed}; got {_shown(err.value)}") from None

    return make(cls, ())


def fail(prog: str, message: str) -> int:
    """Print a one-line error the way ArgumentParser does and return exit status 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2
